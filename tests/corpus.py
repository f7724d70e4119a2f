"""Bad-input corpus, generated in code: each case is a small series plus its expected outcome.

``LISTENER_CASES`` are sent over a real association. ``status`` is the expected C-STORE status of each
instance (one code for all, or a list); ``comment`` a phrase of the ErrorComment for refusals. ``outcome``
is, for accepted cases, the expected pipeline result of the study: (status set, phrase of the reason)
where an administrator should read why nothing was analysed.

Decision rule: the listener refuses only what no series could ever use (instance-level: not CT, no or
inconsistent Pixel Data, not greyscale, invalid UIDs, unsupported SOP class); everything that depends on
the other slices (geometry, orientation, spacing, tilt, duplicates) is accepted and judged by series
selection/assembly, so the job ends "skipped" or "failed" with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.builders import ct_slice

OK, REFUSED_CLASS, NOT_UNDERSTOOD, NOT_SUPPORTED = 0x0000, 0xA900, 0xC000, 0x0122
DONE_OR_SKIPPED = {"done", "skipped"}  # tiny synthetic slices may show no lung: "skipped", with that reason


@dataclass
class Case:
    name: str
    build: Callable[[], list[Dataset]]
    status: int | list[int] = OK
    comment: str = ""
    outcome: tuple[set[str], str] | None = None
    what: str = ""  # the node's behaviour, for docs/reliability.md
    events: list[str] = field(default_factory=list)  # audit event kinds expected


def series(n: int = 4, size: int = 16, **kw) -> list[Dataset]:
    study, ser = generate_uid(), generate_uid()
    out = []
    for z in range(n):
        ds = ct_slice(study_uid=study, series_uid=ser, z=float(z), size=size, **kw)
        ds.InstanceNumber = z + 1
        out.append(ds)
    return out


def one(change: Callable[[Dataset], None], **kw) -> Callable[[], list[Dataset]]:
    def build() -> list[Dataset]:
        ds = ct_slice(**kw)
        change(ds)
        return [ds]
    return build


def each(change: Callable[[int, Dataset], None], n: int = 4) -> Callable[[], list[Dataset]]:
    def build() -> list[Dataset]:
        sl = series(n)
        for i, ds in enumerate(sl):
            change(i, ds)
        return sl
    return build


def _set(**values) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for k, v in values.items():
            setattr(ds, k, v)
    return change


def _del(*keys: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for k in keys:
            delattr(ds, k)
    return change


def _rgb(ds: Dataset) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)


def _eight_bit(i: int, ds: Dataset) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 8
    ds.PixelData = np.full((ds.Rows, ds.Columns), 100, np.uint8).tobytes()


def _unsigned(i: int, ds: Dataset) -> None:
    ds.PixelRepresentation, ds.RescaleIntercept = 0, -1024
    ds.PixelData = np.full((ds.Rows, ds.Columns), 224, np.uint16).tobytes()


def _tilt(deg: float) -> Callable[[int, Dataset], None]:
    def change(i: int, ds: Dataset) -> None:  # positions shear along y: the stack leans by ``deg``
        ds.ImagePositionPatient = [0.0, float(np.tan(np.radians(deg)) * i), float(i)]
    return change


def _dup_pair(i: int, ds: Dataset) -> None:
    if i == 2:
        ds.ImagePositionPatient = [0.0, 0.0, 1.0]


def _mixed(i: int, ds: Dataset) -> None:
    if i == 1:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal


def _dup_sop_different_content() -> list[Dataset]:
    a = ct_slice()
    b = ct_slice(study_uid=a.StudyInstanceUID, series_uid=a.SeriesInstanceUID, sop_uid=a.SOPInstanceUID, value=40)
    return [a, b]


LISTENER_CASES: list[Case] = [
    # -- refused at the listener (instance level) ---------------------------------------------------------
    Case("missing_pixel_data", one(_del("PixelData")), REFUSED_CLASS, "no Pixel Data",
         what="refused 0xA900 'no Pixel Data'"),
    Case("zero_length_pixel_data", one(_set(PixelData=b"")), NOT_UNDERSTOOD, "Pixel Data is empty",
         what="refused 0xC000 'Pixel Data is empty'"),
    Case("pixel_data_shorter", one(lambda ds: setattr(ds, "PixelData", ds.PixelData[:-64])), NOT_UNDERSTOOD,
         "Pixel Data shorter", what="refused 0xC000 'Pixel Data shorter than Rows x Columns'"),
    Case("pixel_data_longer", one(lambda ds: setattr(ds, "PixelData", ds.PixelData + bytes(64))),
         NOT_UNDERSTOOD, "Pixel Data longer", what="refused 0xC000 'Pixel Data longer than Rows x Columns'"),
    Case("rows_columns_65535", one(_set(Rows=65535, Columns=65535)), NOT_UNDERSTOOD, "Pixel Data shorter",
         what="refused 0xC000 (the declared matrix does not match the data; nothing is allocated)"),
    Case("rows_zero", one(_set(Rows=0)), NOT_UNDERSTOOD, "Rows/Columns missing, zero or malformed",
         what="refused 0xC000 'Rows/Columns missing, zero or malformed'"),
    Case("rows_two_values", one(_set(Rows=[16, 16])), NOT_UNDERSTOOD, "Rows/Columns missing, zero or malformed",
         what="refused 0xC000 (fuzz regression: a multi-valued Rows crashed series assembly)"),
    Case("image_position_one_value", one(_set(ImagePositionPatient=5.0)), NOT_UNDERSTOOD,
         "ImagePositionPatient is not 3 numbers",
         what="refused 0xC000 (fuzz regression: a single-valued position crashed series assembly)"),
    Case("image_orientation_five_values", one(_set(ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0])),
         NOT_UNDERSTOOD, "ImageOrientationPatient is not 6 numbers", what="refused 0xC000 (fuzz regression)"),
    Case("pixel_spacing_one_value", one(_set(PixelSpacing=[0.7])), NOT_UNDERSTOOD,
         "PixelSpacing is not 2 numbers", what="refused 0xC000 (fuzz regression)"),
    Case("bits_allocated_12", one(_set(BitsAllocated=12)), NOT_UNDERSTOOD, "BitsAllocated 12",
         what="refused 0xC000 'BitsAllocated 12 not supported'"),
    Case("modality_mr", one(_set(Modality="MR")), REFUSED_CLASS, "Modality MR",
         what="refused 0xA900 'Modality MR, expected CT'"),
    Case("modality_missing", one(_del("Modality")), REFUSED_CLASS, "Modality missing",
         what="refused 0xA900 'Modality missing, expected CT'"),
    Case("rgb_ct", one(_rgb), REFUSED_CLASS, "not a greyscale image",
         what="refused 0xA900 'not a greyscale image ... CT must be MONOCHROME'"),
    Case("uid_with_path_characters", one(_set(SOPInstanceUID="1.2/../../etc/passwd")), NOT_UNDERSTOOD,
         "invalid SOPInstanceUID", what="refused 0xC000; no file name is ever built from it"),
    Case("uid_too_long", one(_set(SeriesInstanceUID="1." + "2" * 70)), NOT_UNDERSTOOD,
         "invalid SeriesInstanceUID", what="refused 0xC000"),
    Case("uid_leading_zero", one(_set(StudyInstanceUID="1.2.03")), NOT_UNDERSTOOD, "invalid StudyInstanceUID",
         what="refused 0xC000"),
    # -- accepted, judged at the series level ----------------------------------------------------------
    Case("control_series", lambda: series(), OK, outcome=(DONE_OR_SKIPPED, ""),
         what="stored; processed"),
    Case("unsigned_ct", each(_unsigned), OK, outcome=(DONE_OR_SKIPPED, ""),
         what="stored; processed (HU from the rescale)"),
    Case("eight_bit_ct", each(_eight_bit), OK, outcome=(DONE_OR_SKIPPED, ""),
         what="stored; processed (HU from the rescale)"),
    Case("missing_image_position", each(lambda i, ds: i == 1 and delattr(ds, "ImagePositionPatient")), OK,
         outcome=({"skipped"}, "no ImagePositionPatient"), what="stored; job skipped: 'no ImagePositionPatient'"),
    Case("missing_image_orientation", each(lambda i, ds: delattr(ds, "ImageOrientationPatient")), OK,
         outcome=({"skipped"}, "no ImageOrientationPatient"),
         what="stored; job skipped: 'no ImageOrientationPatient: the slice orientation is unknown'"),
    Case("degenerate_image_orientation",
         each(lambda i, ds: setattr(ds, "ImageOrientationPatient", [0.0] * 6)), OK,
         outcome=({"skipped"}, "ImageOrientationPatient"), what="stored; job skipped (orientation unknown)"),
    Case("missing_pixel_spacing", each(lambda i, ds: delattr(ds, "PixelSpacing")), OK,
         outcome=({"skipped"}, "no PixelSpacing"), what="stored; job skipped: 'no PixelSpacing'"),
    Case("gantry_tilt_40_degrees", each(_tilt(40)), OK, outcome=({"skipped"}, "gantry tilt"),
         what="stored; job skipped: 'gantry tilt of 40.0 degrees is above the supported 30'"),
    Case("duplicated_slice_positions", each(_dup_pair), OK, outcome=({"skipped"}, "duplicate slice position"),
         what="stored; job skipped: 'duplicate slice position(s)'"),
    Case("mixed_orientations", each(_mixed), OK, outcome=({"skipped"}, "mixed slice orientations"),
         what="stored; job skipped: 'mixed slice orientations within the series'"),
    Case("two_patients_one_study", each(lambda i, ds: i == 2 and setattr(ds, "PatientID", "SOMEONE-ELSE")), OK,
         outcome=({"failed"}, "more than one patient"),
         what="stored; job failed: 'instances of more than one patient under one StudyInstanceUID (PatientID "
              "differ): not analysed ...' (no result that could be filed under the wrong patient)"),
    Case("duplicate_sop_uid_different_content", _dup_sop_different_content, OK,
         outcome=(DONE_OR_SKIPPED, ""), events=["instance_replaced"],
         what="both acknowledged; the second replaces the first (audit 'instance_replaced'), the study is "
              "processed again as a new version if already taken"),
]
