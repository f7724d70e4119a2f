"""Series selection: header rules on crafted headers, the choice among series, and the real shared slices."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from node.pipeline.select import (
    NO_LUNG_REASON,
    classify_orientation,
    evaluate_series,
    group_series,
    select_series,
)
from tests.builders import CORONAL, SAGITTAL, ct_header, ct_series
from tests.support import ABDOMEN_AXIAL, CHEST_AXIAL, shared_dicom

pytestmark = pytest.mark.unit


def tilted(deg: float) -> list[float]:
    """Axial orientation rotated by ``deg`` about the patient x axis (gantry-tilt-like)."""
    t = np.radians(deg)
    return [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t))]


# --------------------------------------------------------------------------------------------- header rules


def test_plain_axial_chest_series_is_accepted():
    d = evaluate_series(ct_series(40))
    assert d.accepted, d.reason
    assert d.orientation == "axial" and d.n_instances == 40 and d.slice_spacing == pytest.approx(1.25)
    assert d.reason.startswith("acceptable: axial original CT, 40 slices")


@pytest.mark.parametrize("image_type, expected", [
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], "localizer"),
    (["ORIGINAL", "PRIMARY", "SCOUT"], "localizer"),
    (["DERIVED", "SECONDARY", "SUBTRACTION"], "derived image"),
    (["DERIVED", "PRIMARY", "MIP"], "projection or rendering"),
    (["ORIGINAL", "SECONDARY", "AXIAL"], "derived image"),
])
def test_localizers_and_derived_images_are_rejected(image_type, expected):
    d = evaluate_series(ct_series(20, ImageType=image_type))
    assert not d.accepted and expected in d.reason


@pytest.mark.parametrize("orientation, name", [(CORONAL, "coronal reformat"), (SAGITTAL, "sagittal reformat"),
                                               (tilted(45), "oblique slices")])
def test_non_axial_series_are_rejected_naming_the_orientation(orientation, name):
    d = evaluate_series(ct_series(20, orientation=orientation))
    assert not d.accepted and d.reason.startswith(name)
    assert "only axial slices are analysed" in d.reason


def test_small_tilt_is_still_axial_but_reported():
    assert classify_orientation(np.array(tilted(8)))[0] == "axial"
    assert classify_orientation(np.array(tilted(12)))[0] == "oblique"
    d = evaluate_series(ct_series(10, orientation=tilted(5)))
    assert d.accepted and any("tilted 5.0 degrees" in f for f in d.flags)


def test_mixed_orientation_within_a_series_is_rejected():
    headers = ct_series(6, series_uid="1.9.1") + ct_series(2, series_uid="1.9.1", orientation=CORONAL)
    d = evaluate_series(headers)
    assert not d.accepted and "mixed slice orientations" in d.reason and d.orientation == "mixed"


@pytest.mark.parametrize("part, accepted", [("ABDOMEN", False), ("PELVIS", False), ("HEAD", False),
                                            ("CHEST", True), ("LUNG", True), ("THORAX", True),
                                            ("CHESTABDOMEN", True), ("PARTIALBODY", True), (None, True)])
def test_body_part_examined(part, accepted):
    d = evaluate_series(ct_series(10, BodyPartExamined=part))
    assert d.accepted is accepted, d.reason
    if not accepted:
        assert f"body part examined is {part}, not the chest" in d.reason
    elif part in (None, "PARTIALBODY"):
        assert any("checked on the image" in f for f in d.flags)


def test_enhanced_ct_is_not_supported_yet():
    d = evaluate_series([ct_header(SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1", NumberOfFrames=120)])
    assert not d.accepted and d.reason == "Enhanced CT (multi-frame) is not supported yet"
    d = evaluate_series([ct_header(NumberOfFrames=3)])
    assert "Enhanced CT (multi-frame) is not supported yet" in d.reason


def test_modality_rules():
    assert "modality MR is not CT" in evaluate_series(ct_series(3, Modality="MR")).reason
    d = evaluate_series(ct_series(3, Modality=None))  # CT SOP class left: accepted, with a flag
    assert d.accepted and any("treated as CT" in f for f in d.flags)
    d = evaluate_series(ct_series(3, Modality=None, SOPClassUID=None, RescaleIntercept=None))
    assert not d.accepted and "not a CT image" in d.reason


def test_inconsistent_pixel_spacing_size_and_positions_are_rejected():
    spacing = ct_series(4, series_uid="1.8.1") + [ct_header(z=5.0, series_uid="1.8.1", spacing=(0.8, 0.8))]
    assert "pixel spacing" in evaluate_series(spacing).reason
    size = ct_series(4, series_uid="1.8.2") + [ct_header(z=5.0, series_uid="1.8.2", rows=32)]
    assert "image size" in evaluate_series(size).reason
    gap = ct_series(10, series_uid="1.8.3")
    del gap[5]
    assert evaluate_series(gap).reason.startswith("gap in the series")
    dup = ct_series(5, series_uid="1.8.4") + [ct_header(z=2.5, series_uid="1.8.4")]
    assert "duplicate slice position" in evaluate_series(dup).reason
    nopos = ct_series(3, ImagePositionPatient=None)
    assert "no ImagePositionPatient" in evaluate_series(nopos).reason


def test_single_slice_is_accepted_for_2d_and_min_slices_is_configurable():
    d = evaluate_series([ct_header()])
    assert d.accepted and any("single slice: analysed in 2D only" in f for f in d.flags)
    d = evaluate_series([ct_header()], min_slices=20)
    assert not d.accepted and "only 1 slice(s); at least 20 are needed" in d.reason


# --------------------------------------------------------------------------------------------- grouping, choice


def test_group_series_by_uid_and_fallback_key():
    a, b = ct_series(3, series_uid="1.1"), ct_series(2, series_uid="1.2")
    blank = ct_series(2, series_uid="", SeriesNumber=7)
    groups = group_series(a + b + blank)
    assert len(groups["1.1"]) == 3 and len(groups["1.2"]) == 2
    key = next(k for k in groups if k.startswith("no-series-uid:"))
    assert len(groups[key]) == 2
    d = evaluate_series(groups[key], series_uid=key)
    assert any("SeriesInstanceUID missing" in f for f in d.flags)


def test_choice_most_slices_then_thinnest_with_reasons():
    thin = ct_series(100, step=1.0, thickness=1.0, series_uid="1.5.1")
    thick = ct_series(100, step=5.0, thickness=5.0, series_uid="1.5.2")
    few = ct_series(30, series_uid="1.5.3")
    scout = ct_series(1, series_uid="1.5.4", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    chosen, decisions = select_series(thick + few + thin + scout)
    assert chosen is not None and chosen.series_uid == "1.5.1" and chosen.chosen
    assert "thinner slices (1 vs 5 mm)" in chosen.reason
    by_uid = {d.series_uid: d for d in decisions}
    assert by_uid["1.5.2"].reason.startswith("acceptable but not chosen: thicker slices")
    assert by_uid["1.5.3"].reason.startswith("acceptable but not chosen: fewer slices (30 vs 100)")
    assert not by_uid["1.5.4"].accepted and "localizer" in by_uid["1.5.4"].reason
    chosen, _ = select_series(few + ct_series(300, series_uid="1.5.5"))
    assert chosen.series_uid == "1.5.5" and "most slices (300 vs 30" in chosen.reason


def test_select_series_reports_unreadable_files_and_folders(tmp_path):
    (tmp_path / "README.txt").write_text("not dicom")
    for i, ds in enumerate(ct_series(3)):
        ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
    chosen, decisions = select_series([tmp_path])
    assert chosen is not None and chosen.n_instances == 3
    bad = [d for d in decisions if "not a readable DICOM file" in d.reason]
    assert len(bad) == 1 and bad[0].description.endswith("README.txt")
    # decisions serialise without the DICOM headers
    import dataclasses
    assert "headers" not in dataclasses.asdict(chosen) and "headers" not in chosen.as_dict()


# --------------------------------------------------------------------------------------------- real slices

def test_real_reformats_are_rejected_by_header():
    folder = shared_dicom() / "ny-sbu"
    files = sorted(folder.glob("*/coronal/*.dcm")) + sorted(folder.glob("*/sagittal/*.dcm"))
    assert len(files) == 24
    for path in files:
        chosen, (d,) = select_series([path])
        expected = "coronal reformat" if "/coronal/" in str(path) else "sagittal reformat"
        assert chosen is None and not d.accepted and expected in d.reason, (path, d.reason)


def test_real_axial_slices_pass_the_header_rules():
    folder = shared_dicom() / "ny-sbu"
    for name in CHEST_AXIAL + ABDOMEN_AXIAL:  # abdomen slices need the pixel check (no BodyPartExamined)
        chosen, (d,) = select_series([folder / name])
        assert chosen is d and d.accepted and d.n_instances == 1, (name, d.reason)
    assert NO_LUNG_REASON == "no lung in field of view (abdomen?)"


def test_stripped_lungmask_slices_are_treated_as_ct():
    folder = shared_dicom() / "lungmask-slices"
    assert "Modality" not in pydicom.dcmread(folder / "0.dcm", stop_before_pixels=True)
    chosen, (d,) = select_series([folder])
    assert chosen is d and d.accepted and d.n_instances == 2
    assert any("Modality missing: treated as CT" in f for f in d.flags)


def test_patient_conflict_across_series_and_anonymised_series():
    from node.pipeline.select import patient_conflict

    def decisions(*series_list):
        return select_series([ds for s in series_list for ds in s])[1]

    a = ct_series(4, PatientID="P1", PatientName="Doe^Jane", PatientBirthDate="19600101")
    same = ct_series(3, PatientID="P1", PatientName="DOE^JANE ", PatientBirthDate="19600101")  # case, spacing
    anonymised = ct_series(3, PatientID="P1", PatientName="", PatientBirthDate="")
    other = ct_series(3, PatientID="P2", PatientName="Doe^Jane", PatientBirthDate="19600101")
    assert patient_conflict(decisions(a, same, anonymised)) is None
    reason = patient_conflict(decisions(a, other))
    assert reason.startswith("instances of more than one patient") and "(PatientID differ)" in reason
    assert "P1" not in reason and "P2" not in reason and "Doe" not in reason  # no identifiers: it is logged
