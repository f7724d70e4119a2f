"""Test data made in code: CT instances, headers and series, the writers' inputs, a small synthetic chest.

* ``ct_slice`` / ``write``: one small CT instance with pixel data (listener, registry, export, bad input).
* ``ct_header`` / ``ct_series`` / ``with_pixels`` / ``write_series``: CT headers and series written to disk
  (series selection, volume assembly, the whole pipeline).
* ``make_volume`` / ``make_masks`` / ``roundtrip``: a ``Volume`` of headers and overlapping lung / infection
  masks, as the pipeline hands them to the SEG and SR writers.
* ``synthetic_chest`` / ``single_slice`` / ``dice``: a chest with known lungs and lesions, and the overlap
  measure the segmentation tests compare with.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models.metrics import dice  # noqa: F401 - the one Dice, re-exported for the tests
from node.pipeline.types import EngineIdentity, InfectionResult, LungMasks, Volume

INFNET = EngineIdentity(name="infnet", version="1.2.0", weights_sha256="0123456789abcdef" * 4)
THRESHOLD = EngineIdentity(name="threshold", version="0.3.0", weights_sha256="")

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
_c, _s = np.cos(np.radians(30)), np.sin(np.radians(30))
OBLIQUE = (_c, _s, 0.0, -_s * 0.8, _c * 0.8, 0.6)  # rotated rows, tilted columns (unit, orthogonal)


# --------------------------------------------------------------------------------------------- CT instances

def ct_slice(*, study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
             z: float = 0.0, size: int = 16, modality: str = "CT", value: int = -800) -> Dataset:
    """A ``size`` x ``size`` CT instance filled with ``value`` HU, at ``z`` mm on an axial stack."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = "1.2.3.4"
    ds.Modality = modality
    ds.PatientName, ds.PatientID = "Test^Patient", "TEST-1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = np.full((size, size), value, dtype=np.int16).tobytes()
    return ds


def write(ds: Dataset, folder: Path, name: str | None = None) -> Path:
    """Save ``ds`` as a DICOM file in ``folder`` (named by its SOP Instance UID unless ``name`` is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------- CT series

def ct_header(*, z: float = 0.0, series_uid: str = "1.2.3.1", study_uid: str = "1.2.3", rows: int = 64,
              cols: int = 64, spacing: Sequence[float] = (0.7, 0.7), orientation: Sequence[float] = AXIAL,
              position: Sequence[float] | None = None, thickness: float | None = 1.25, **attrs) -> Dataset:
    """A CT Image Storage header (no pixel data); ``attrs`` override or add attributes (None deletes)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = "1.2.3.9"
    ds.Modality = "CT"
    ds.SeriesNumber, ds.SeriesDescription = 3, "Thorax 1.25"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.ImageOrientationPatient = list(orientation)
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    ds.ImagePositionPatient = list(position) if position is not None else [float(v) for v in normal * z]
    ds.PixelSpacing = list(spacing)
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def ct_series(n: int, *, step: float = 1.25, start: float = 0.0, **kw) -> list[Dataset]:
    """``n`` headers of one series, ``step`` mm apart along the normal."""
    uid = kw.pop("series_uid", generate_uid())
    return [ct_header(z=start + i * step, series_uid=uid, InstanceNumber=i + 1, **kw) for i in range(n)]


def with_pixels(ds: Dataset, hu: np.ndarray, *, slope: float = 1.0, intercept: float = -1024.0) -> Dataset:
    """Give ``ds`` pixel data that decode to ``hu`` under the given rescale (int16 storage)."""
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    stored = np.clip(stored, -32768, 32767).astype(np.int16)
    ds.Rows, ds.Columns = stored.shape
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.tobytes()
    return ds


def write_series(folder: Path, hu: np.ndarray, *, spacing: Sequence[float] = (2.0, 2.0), step: float = 3.0,
                 orientation: Sequence[float] = AXIAL, positions: np.ndarray | None = None,
                 order: Sequence[int] | None = None, rescale: Sequence[tuple[float, float]] | None = None,
                 **attrs) -> list[Path]:
    """Write ``hu[k]`` as CT files (slice k at k * step along the normal unless ``positions`` is given).

    Files are written in ``order`` (a permutation of k; file names follow the writing order), so tests can
    check that assembly sorts by geometry and not by name. Returns the paths in writing order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    n = hu.shape[0]
    paths = []
    for i, k in enumerate(order if order is not None else range(n)):
        pos = None if positions is None else positions[k]
        ds = ct_header(z=k * step, series_uid=series_uid, study_uid=study_uid, spacing=spacing,
                       orientation=orientation, position=pos, thickness=step, InstanceNumber=k + 1, **attrs)
        slope, intercept = rescale[k] if rescale is not None else (1.0, -1024.0)
        with_pixels(ds, hu[k], slope=slope, intercept=intercept)
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------- writer inputs

PATIENT_STUDY = {
    "PatientName": "Test^Patient", "PatientID": "PID123", "PatientBirthDate": "19600101",
    "PatientSex": "F", "AccessionNumber": "ACC42", "StudyID": "S1", "StudyDate": "20200401",
    "StudyTime": "101500", "ReferringPhysicianName": "Ref^Doc", "StudyDescription": "CT CHEST",
}



def make_volume(n: int = 12, rows: int = 64, cols: int = 64, orientation=AXIAL,
                spacing: tuple[float, float] = (0.7, 0.8), dz: float = 2.5) -> Volume:
    """CT headers (no PixelData) in sorted slice order, as the loader hands them to the writers."""
    orient = np.asarray(orientation, float)
    normal = np.cross(orient[:3], orient[3:])
    origin = np.array([-100.0, -120.0, -300.0])
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    datasets, positions = [], []
    for k in range(n):
        uid = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        for keyword, value in PATIENT_STUDY.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.Manufacturer = "Synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        position = origin + k * dz * normal
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orient]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.zeros((rows, cols), np.int16).tobytes()
        del ds.PixelData  # Volume.datasets holds headers only
        datasets.append(ds)
        positions.append([float(v) for v in ds.ImagePositionPatient])
    return Volume(
        hu=np.full((n, rows, cols), -1000, np.float32), positions=np.array(positions),
        orientation=np.array([float(v) for v in datasets[0].ImageOrientationPatient]),
        pixel_spacing=spacing, slice_spacing=dz if n > 1 else 0.0,
        sop_instance_uids=[ds.SOPInstanceUID for ds in datasets], series_instance_uid=series,
        study_instance_uid=study, datasets=datasets)


def make_masks(volume: Volume, *, classes: bool = True, infection: bool = True,
               ) -> tuple[LungMasks, InfectionResult]:
    """Right/left lungs over inner slices, infection patches inside them (so segments overlap)."""
    n, rows, cols = volume.shape
    labels = np.zeros((n, rows, cols), np.uint8)
    first, last = (1, n - 1) if n > 2 else (0, n)
    labels[first:last, 10:50, 6:30] = LungMasks.RIGHT   # image left = patient right (axial)
    labels[first:last, 10:50, 34:58] = LungMasks.LEFT
    inf = np.zeros((n, rows, cols), bool)
    if infection:
        inf[min(3, n - 1):7, 20:30, 10:20] = True
        inf[min(5, n - 1):9, 30:35, 40:50] = True
        inf[:, 12, 7] = labels[:, 12, 7] > 0  # a 1-voxel-wide streak through every lung slice
    ggo = consolidation = None
    if classes:
        ggo = inf.copy()
        ggo[:, 20:30, 10:14] = False
        consolidation = inf & ~ggo
    return LungMasks(labels=labels), InfectionResult(infection=inf, ggo=ggo, consolidation=consolidation)


def expected_segments(lungs: LungMasks, infection: InfectionResult) -> dict[str, np.ndarray]:
    """The non-empty disjoint segments, in SEG order: consolidation wins over GGO, a class over the
    unclassified infection, any infection over the lung; each split by side."""
    none = np.zeros_like(lungs.right)
    cons = infection.consolidation if infection.consolidation is not None else none
    ggo = (infection.ggo if infection.ggo is not None else none) & ~cons
    rest = infection.infection & ~ggo & ~cons
    kinds = {"lung": ~(cons | ggo | rest), "infection": rest, "ggo": ggo, "consolidation": cons}
    masks = {f"{side}_{kind}": mask & (lungs.right if side == "right" else lungs.left)
             for kind, mask in kinds.items() for side in ("right", "left")}
    order = ["right_lung", "left_lung", "right_infection", "left_infection", "right_ggo", "left_ggo",
             "right_consolidation", "left_consolidation"]
    return {key: masks[key] for key in order if masks[key].any()}


def roundtrip(ds: Dataset) -> Dataset:
    """``ds`` written to bytes and read back, as a reader would see it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


# --------------------------------------------------------------------------------------------- synthetic chest


@dataclass
class Chest:
    volume: Volume
    right: np.ndarray      # ground-truth lungs (patient right / left), bool (k, r, c)
    left: np.ndarray
    ggo: np.ndarray
    consolidation: np.ndarray
    vessel: np.ndarray


def _occupancy(dist_mm: np.ndarray, radius_mm: float, pixel_mm: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is ``dist_mm`` from a surface at ``radius_mm``."""
    return np.clip((radius_mm - dist_mm) / pixel_mm + 0.5, 0.0, 1.0)


def synthetic_chest(*, slices: int = 16, size: int = 96, pixel: float = 2.0, step: float = 3.0,
                    orientation: Sequence[float] = AXIAL, lung_slices: tuple[int, int] | None = None,
                    ggo: bool = False, consolidation: bool = False, vessel: bool = False,
                    trachea: bool = True, seed: int = 0, noise: float = 10.0) -> Chest:
    """A small chest: body ellipse on a table, two lungs (-850 HU), optional lesions and a vessel tube.

    The lung drawn at small column index is the patient's RIGHT lung for the standard orientation; with
    a mirrored row direction (orientation[0] < 0) the same drawing is the patient's LEFT lung, which is
    what the ground truth says. ``lung_slices`` = (first, last) slice containing lung (default: all but
    two slices at each end, so coverage is complete). The trachea sits on the cranial slices.
    """
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float64)
    mid = (size - 1) / 2.0
    hu = np.full((slices, size, size), -1000.0)
    body2d = ((cc - mid) / (0.42 * size)) ** 2 + ((rr - mid) / (0.32 * size)) ** 2 <= 1.0
    table2d = (rr >= mid + 0.36 * size) & (rr <= mid + 0.38 * size) & (np.abs(cc - mid) < 0.45 * size)
    hu[:, body2d] = 40.0
    hu[:, table2d] = 200.0

    first, last = lung_slices if lung_slices is not None else (2, slices - 3)
    small_c = ((cc - (mid - 0.19 * size)) / (0.13 * size)) ** 2 + ((rr - mid) / (0.2 * size)) ** 2 <= 1.0
    large_c = ((cc - (mid + 0.19 * size)) / (0.13 * size)) ** 2 + ((rr - mid) / (0.2 * size)) ** 2 <= 1.0
    lung_small = np.zeros(hu.shape, bool)
    lung_large = np.zeros(hu.shape, bool)
    lung_small[first:last + 1] = small_c
    lung_large[first:last + 1] = large_c
    lungs = lung_small | lung_large
    hu[lungs] = -850.0

    o = np.asarray(orientation, dtype=float)
    cranial_high = np.cross(o[:3], o[3:])[2] >= 0
    if trachea:
        cranial = range(last - 1, slices) if cranial_high else range(0, first + 2)
        tube = (cc - mid) ** 2 + (rr - (mid - 0.12 * size)) ** 2 <= (7.0 / pixel) ** 2
        for k in cranial:
            hu[k][tube] = -1000.0

    kz = (np.arange(slices) * step)[:, None, None]
    centre_k = (first + last) / 2.0
    z0 = centre_k * step
    g = np.zeros(hu.shape, bool)
    c = np.zeros(hu.shape, bool)
    v = np.zeros(hu.shape, bool)
    if ggo:  # ball of radius 10 mm in the small-column lung
        d = np.sqrt((kz - z0) ** 2 + ((rr - mid) * pixel) ** 2 + ((cc - (mid - 0.19 * size)) * pixel) ** 2)
        g = (d <= 10.0) & lung_small
        hu[g] = -550.0
    if consolidation:  # ball of radius 9 mm in the large-column lung, enclosed by aerated lung
        d = np.sqrt((kz - z0) ** 2 + ((rr - (mid - 0.05 * size)) * pixel) ** 2 + ((cc - (mid + 0.19 * size)) * pixel) ** 2)
        c = (d <= 9.0) & lung_large
        hu[c] = -20.0
    if vessel:  # tubes of radius 2.5 mm rendered with partial volume: through-plane in the large-column
        # lung, in-plane (along the rows, on three slices) in the small-column lung
        d = np.sqrt(((rr - (mid + 0.1 * size)) * pixel) ** 2 + ((cc - (mid + 0.19 * size)) * pixel) ** 2)
        occ = np.broadcast_to(_occupancy(d, 2.5, pixel), hu.shape) * lung_large
        d2 = np.abs(cc - (mid - 0.19 * size)) * pixel
        in_plane = np.zeros(hu.shape)
        kc = int(round(centre_k))
        in_plane[kc - 1:kc + 2] = _occupancy(d2, 2.5, pixel)
        occ = np.maximum(occ, in_plane * lung_small)
        hu = hu * (1 - occ) + 40.0 * occ
        v = occ >= 0.5
    hu += rng.normal(0.0, noise, hu.shape)

    positions = np.array([np.cross(o[:3], o[3:]) * k * step for k in range(slices)])
    volume = Volume(hu=hu.astype(np.float32), positions=positions, orientation=o, pixel_spacing=(pixel, pixel),
                    slice_spacing=step if slices > 1 else 0.0, sop_instance_uids=[generate_uid() for _ in range(slices)],
                    series_instance_uid=generate_uid(), study_instance_uid=generate_uid())
    right, left = (lung_small, lung_large) if o[0] > 0 else (lung_large, lung_small)
    return Chest(volume, right, left, g, c, v)


def single_slice(chest: Chest, k: int | None = None) -> Chest:
    """Slice ``k`` (default: the middle) of ``chest`` as a one-slice study."""
    k = chest.volume.shape[0] // 2 if k is None else k
    v = chest.volume
    vol = Volume(hu=v.hu[k:k + 1].copy(), positions=v.positions[k:k + 1], orientation=v.orientation,
                 pixel_spacing=v.pixel_spacing, slice_spacing=0.0, sop_instance_uids=v.sop_instance_uids[k:k + 1],
                 series_instance_uid=v.series_instance_uid, study_instance_uid=v.study_instance_uid)
    cut = lambda m: m[k:k + 1]  # noqa: E731
    return Chest(vol, cut(chest.right), cut(chest.left), cut(chest.ggo), cut(chest.consolidation), cut(chest.vessel))



