"""Tests for the DICOM SEG and SR writers (node/writers/seg.py, node/writers/sr.py).

A small synthetic CT series (12 slices of 64x64, 2.5 mm apart, headers only as ``Volume.datasets``
holds them) with overlapping lung / infection masks is encoded, re-read and compared voxel for voxel.
"""
from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from node.pipeline.types import InfectionResult, LungMasks
from node.writers.seg import SEGMENT_LABELS, SEGMENT_NUMBERS, build_segmentation
from node.writers.sr import (
    PRIVATE_SCHEME,
    build_report,
    read_report_measurements,
    read_report_notes,
    read_report_segment_references,
)
from tests.builders import AXIAL, INFNET, OBLIQUE, PATIENT_STUDY, THRESHOLD, make_masks, make_volume, roundtrip

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------- synthetic data

def expected_stack(lungs: LungMasks, infection: InfectionResult, n_segments: int) -> np.ndarray:
    masks = [lungs.right, lungs.left, infection.infection, infection.ggo, infection.consolidation]
    return np.stack([m if m is not None else np.zeros_like(lungs.right) for m in masks[:n_segments]],
                    axis=-1)


def scores_3d(classes: bool = True) -> dict:
    scores = {
        "volumetric": True, "right_lung_volume_ml": 1523.25, "left_lung_volume_ml": 1388.125,
        "infection_volume_ml": 120.5, "right_infection_volume_ml": 70.25,
        "left_infection_volume_ml": 50.25, "percent_involved_right": 4.6118,
        "percent_involved_left": 3.6199, "percent_involved_total": 4.1389,
        "mean_hu_infection": -512.75,
    }
    if classes:
        scores.update(ggo_volume_ml=100.5, consolidation_volume_ml=20.0)
    return scores


@pytest.fixture(scope="module")
def case():
    volume = make_volume()
    lungs, infection = make_masks(volume)
    seg = build_segmentation(volume, lungs, infection, INFNET, series_number=905)
    return volume, lungs, infection, seg


# --------------------------------------------------------------------------- SEG

def test_seg_segments_codes_and_binary(case):
    _, _, _, seg = case
    assert seg.SegmentationType == "BINARY" and seg.BitsAllocated == 1
    assert "SegmentationFractionalType" not in seg
    assert seg.SegmentsOverlap == "YES"
    items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert {n: str(s.SegmentLabel) for n, s in items.items()} == SEGMENT_LABELS
    assert SEGMENT_NUMBERS == {"right_lung": 1, "left_lung": 2, "infection": 3, "ggo": 4,
                               "consolidation": 5}

    def code(seq):
        return (seq[0].CodingSchemeDesignator, seq[0].CodeValue)

    for number, laterality in ((1, ("SCT", "24028007")), (2, ("SCT", "7771000"))):
        item = items[number]
        assert code(item.SegmentedPropertyCategoryCodeSequence) == ("SCT", "91723000")
        assert code(item.SegmentedPropertyTypeCodeSequence) == ("SCT", "39607008")
        modifier = item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
        assert code(modifier) == laterality
    for number, expected in ((3, ("DCM", "112001")), (4, ("DCM", "112120")), (5, ("SCT", "9656002"))):
        item = items[number]
        assert code(item.SegmentedPropertyCategoryCodeSequence) == ("SCT", "49755003")
        assert code(item.SegmentedPropertyTypeCodeSequence) == expected
        assert "SegmentedPropertyTypeModifierCodeSequence" not in item.SegmentedPropertyTypeCodeSequence[0]
    colours = {tuple(s.RecommendedDisplayCIELabValue) for s in items.values()}
    assert len(colours) == 5
    for item in items.values():
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "ctnode infnet"
        assert algo.AlgorithmVersion.startswith("1.2.0") and "0123456789ab" in algo.AlgorithmVersion
        assert INFNET.weights_sha256 in algo.AlgorithmParameters
        assert code(algo.AlgorithmFamilyCodeSequence) == ("DCM", "123110")  # Artificial Intelligence


def test_seg_header_and_patient_study(case):
    volume, _, _, seg = case
    seg = roundtrip(seg)
    for keyword, value in PATIENT_STUDY.items():
        assert str(seg.get(keyword)) == value, keyword
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.SeriesInstanceUID != volume.series_instance_uid
    assert seg.FrameOfReferenceUID == volume.datasets[0].FrameOfReferenceUID
    assert seg.Modality == "SEG" and seg.SeriesNumber == 905
    assert seg.SeriesDescription == "ctnode lungs and infection"
    assert seg.Manufacturer == "ctnode" and seg.DeviceSerialNumber and seg.SoftwareVersions
    assert seg.ContentLabel == "CTNODE_LUNG_INF"


@pytest.mark.parametrize("orientation", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
def test_seg_references_and_frame_geometry(orientation):
    volume = make_volume(orientation=orientation)
    lungs, infection = make_masks(volume)
    seg = roundtrip(build_segmentation(volume, lungs, infection, INFNET))

    (series_ref,) = seg.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == volume.series_instance_uid
    assert {i.ReferencedSOPInstanceUID for i in series_ref.ReferencedInstanceSequence} == \
        set(volume.sop_instance_uids)

    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        volume.orientation, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               volume.pixel_spacing)

    position_by_uid = dict(zip(volume.sop_instance_uids, volume.positions))
    expected = expected_stack(lungs, infection, 5)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, position_by_uid[source_uid], atol=1e-4)
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert expected[volume.sop_instance_uids.index(source_uid), ..., segment - 1].any()
    # every non-empty (slice, segment) pair has exactly one frame
    assert seg.NumberOfFrames == int(expected.any(axis=(1, 2)).sum())


def test_seg_masks_roundtrip_voxel_for_voxel(case):
    volume, lungs, infection, seg = case
    reread = hd.seg.segread(io.BytesIO(_bytes(seg)))
    decoded = reread.get_pixels_by_source_instance(
        volume.sop_instance_uids, segment_numbers=[1, 2, 3, 4, 5], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded.astype(bool), expected_stack(lungs, infection, 5))


def test_seg_empty_infection_keeps_segment_without_frames():
    volume = make_volume()
    lungs, infection = make_masks(volume, classes=False, infection=False)
    seg = build_segmentation(volume, lungs, infection, THRESHOLD)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    frame_segments = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                      for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_segments == {1, 2}
    assert seg.SegmentsOverlap == "NO"
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123105"  # Histogram Analysis
    decoded = hd.seg.segread(io.BytesIO(_bytes(seg))).get_pixels_by_source_instance(
        volume.sop_instance_uids, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded.astype(bool), expected_stack(lungs, infection, 3))


def test_seg_single_class_written_with_empty_partner():
    volume = make_volume()
    lungs, infection = make_masks(volume)
    infection.consolidation = None  # GGO only: consolidation keeps number 5, empty
    seg = build_segmentation(volume, lungs, infection, INFNET)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == list(SEGMENT_LABELS.values())
    assert 5 not in {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                     for f in seg.PerFrameFunctionalGroupsSequence}


def test_seg_source_headers_missing_type2_are_not_mutated():
    volume = make_volume()
    for ds in volume.datasets:
        del ds.PatientBirthDate, ds.ReferringPhysicianName
    before = copy.deepcopy(volume.datasets[0])
    lungs, infection = make_masks(volume, classes=False)
    seg = build_segmentation(volume, lungs, infection, INFNET)
    assert seg.PatientBirthDate == "" and seg.PatientID == "PID123"
    assert volume.datasets[0] == before


def test_seg_rejects_headers_out_of_order():
    volume = make_volume()
    volume.datasets = volume.datasets[::-1]
    lungs, infection = make_masks(volume)
    with pytest.raises(ValueError, match="order"):
        build_segmentation(volume, lungs, infection, INFNET)


# --------------------------------------------------------------------------- SR

def test_sr_roundtrip_measurements_and_references(case):
    volume, _, _, seg = case
    scores = scores_3d()
    sr = roundtrip(build_report(volume, seg, scores, INFNET, series_number=906))

    measured = read_report_measurements(sr)
    assert set(measured) == set(scores)
    for key, value in scores.items():
        assert measured[key] == pytest.approx(float(value), rel=1e-9), key

    refs = read_report_segment_references(sr)
    assert refs == {key: (seg.SOPInstanceUID, number) for key, number in SEGMENT_NUMBERS.items()}

    for keyword, value in PATIENT_STUDY.items():
        assert str(sr.get(keyword)) == value, keyword
    assert sr.StudyInstanceUID == volume.study_instance_uid
    assert sr.SeriesInstanceUID not in (volume.series_instance_uid, seg.SeriesInstanceUID)
    assert sr.SeriesDescription == "ctnode measurements" and sr.SeriesNumber == 906
    assert sr.Manufacturer == "ctnode"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert any(i.CodingSchemeDesignator == PRIVATE_SCHEME for i in sr.CodingSchemeIdentificationSequence)

    evidence = {(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    assert {(volume.series_instance_uid, uid) for uid in volume.sop_instance_uids} <= evidence

    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (procedure,) = [i for i in report.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "169069000"
    device = hd.sr.CodedConcept("121007", "DCM", "Device")
    observer = report.content.get_observer_contexts(observer_type=device)
    assert observer and observer[0].observer_identifying_attributes.name == "ctnode"
    for group in report.content.get_volumetric_roi_measurement_groups():
        names = {i.ConceptNameCodeSequence[0].CodeValue for i in group[0].ContentSequence}
        assert {"111001", "111003", "121071", "363698007"} <= names  # algorithm, finding, site


def test_sr_carries_the_analysis_notes(case):
    """Notes go, in order, into the report-level "Qualitative Evaluations" container of TID 1500 as
    TEXT "Comment" items; the numbers read back unchanged, and a report without notes has no container."""
    volume, _, _, seg = case
    notes = ["recovered 49 ml of dense peripheral tissue (consolidation/effusion at the chest wall) into the lungs",
             "GGO lower bound -670 HU (aerated lung peaks at -845 HU)"]
    sr = roundtrip(build_report(volume, seg, scores_3d(), INFNET, notes=notes))
    assert read_report_notes(sr) == notes
    (container,) = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"
                    and i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert {i.ConceptNameCodeSequence[0].CodeValue for i in container.ContentSequence} == {"121106"}
    assert read_report_measurements(sr) == pytest.approx(
        read_report_measurements(roundtrip(build_report(volume, seg, scores_3d(), INFNET))))
    plain = roundtrip(build_report(volume, seg, scores_3d(), INFNET))
    assert read_report_notes(plain) == [] and not [i for i in plain.ContentSequence
                                                   if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]


def test_sr_2d_reports_areas_and_partial_coverage():
    volume = make_volume(n=1)
    assert not volume.is_volumetric
    lungs, infection = make_masks(volume, classes=False)
    seg = build_segmentation(volume, lungs, infection, THRESHOLD)
    scores = {"volumetric": False, "right_lung_area_cm2": 98.5, "left_lung_area_cm2": 91.25,
              "infection_area_cm2": 7.5, "percent_involved_total": 3.94,
              "right_lung_volume_ml": 0.0}  # volume keys are meaningless in 2D and not written
    sr = roundtrip(build_report(volume, seg, scores, THRESHOLD))
    measured = read_report_measurements(sr)
    expected = {k: float(v) for k, v in scores.items() if not k.endswith("_volume_ml")}
    assert measured == pytest.approx(expected)
    text = [i for i in _walk(sr)
            if i.get("ValueType") == "TEXT" and i.get("TextValue") == "2D, partial coverage"]
    assert len(text) == 3  # one per measurement group
    units = {i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
             for i in _walk(sr) if i.get("ValueType") == "NUM"}
    assert units == {"cm2", "%"}


def test_sr_rejects_unknown_keys_and_missing_segments(case):
    volume, _, _, seg = case
    with pytest.raises(KeyError, match="percent_involved_totl"):
        build_report(volume, seg, {"volumetric": True, "percent_involved_totl": 1.0}, INFNET, strict=True)
    lenient = build_report(volume, seg, {"volumetric": True, "percent_involved_total": 1.0,
                                         "zone_scores": {"RUL": 2}, "notes": ["x"]}, INFNET)
    assert read_report_measurements(lenient) == {"percent_involved_total": 1.0, "volumetric": 1.0}
    lungs, infection = make_masks(volume, classes=False)
    seg3 = build_segmentation(volume, lungs, infection, INFNET)
    with pytest.raises(ValueError, match="ggo"):
        build_report(volume, seg3, scores_3d(classes=True), INFNET)
    measured = read_report_measurements(build_report(volume, seg3, scores_3d(classes=False), INFNET))
    assert "ggo_volume_ml" not in measured


def test_sr_skips_missing_values(case):
    volume, _, _, seg = case
    scores = scores_3d()
    scores["mean_hu_infection"] = float("nan")
    scores["ggo_volume_ml"] = None
    measured = read_report_measurements(build_report(volume, seg, scores, INFNET))
    assert "mean_hu_infection" not in measured and "ggo_volume_ml" not in measured
    assert measured["consolidation_volume_ml"] == 20.0


# --------------------------------------------------------------------------- dciodvfy

@pytest.fixture(scope="module")
def dciodvfy() -> str:
    path = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (Debian package dicom3tools) is required under CI")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    return path


def _dciodvfy_errors(path: str, ds: Dataset, tmp_path: Path, name: str) -> list[str]:
    target = tmp_path / f"{name}.dcm"
    ds.save_as(target, enforce_file_format=True)
    result = subprocess.run([path, str(target)], capture_output=True, text=True, timeout=120)
    lines = (result.stderr + "\n" + result.stdout).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.peer
def test_dciodvfy_seg_and_sr_have_no_errors(dciodvfy, tmp_path, case):
    volume, _, _, seg = case
    lungs, empty = make_masks(volume, classes=False, infection=False)
    seg_empty = build_segmentation(volume, lungs, empty, THRESHOLD)
    volume_2d = make_volume(n=1)
    seg_2d = build_segmentation(volume_2d, *make_masks(volume_2d, classes=False), THRESHOLD)
    objects = {
        "seg": seg,
        "seg_empty_infection": seg_empty,
        "sr": build_report(volume, seg, scores_3d(), INFNET, notes=["a note", "another note"]),
        "sr_empty_infection": build_report(volume, seg_empty, {
            "volumetric": True, "right_lung_volume_ml": 1.0, "left_lung_volume_ml": 1.0,
            "infection_volume_ml": 0.0, "percent_involved_total": 0.0}, THRESHOLD),
        "sr_partial_scan": build_report(volume, seg, {"volumetric": True, "partial_coverage": True,
                                                      "right_lung_volume_ml": 900.0, "percent_involved_total": 3.0},
                                        INFNET),
        "seg_2d": seg_2d,
        "sr_2d": build_report(volume_2d, seg_2d, {"volumetric": False, "infection_area_cm2": 2.0},
                              THRESHOLD),
    }
    errors = {name: _dciodvfy_errors(dciodvfy, ds, tmp_path, name) for name, ds in objects.items()}
    assert errors == {name: [] for name in objects}


# --------------------------------------------------------------------------- helpers

def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _walk(ds: Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
