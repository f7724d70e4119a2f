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

from node.pipeline.segments import SegmentKey, classify_lobe, classify_segment, lesion_side
from node.pipeline.types import Effusion, EngineIdentity, InfectionResult, LungMasks, Volume
from node.writers.seg import (EFFUSION_ALGORITHM_NAME, SEGMENT_LABELS, SEGMENTS, build_segmentation,
                              segment_numbers)
from node.writers.equipment import algorithm_device_uid
from node.writers.sr import (
    NO_EFFUSION_TEXT,
    PRIVATE_SCHEME,
    SEVERITY_NONE_TEXT,
    build_report,
    read_report_measurements,
    read_report_notes,
    read_report_segment_references,
)
from tests.builders import (AXIAL, INFNET, OBLIQUE, PATIENT_STUDY, THRESHOLD, expected_segments, make_masks,
                            make_volume, roundtrip)

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------- synthetic data

def expected_stack(lungs: LungMasks, infection: InfectionResult) -> np.ndarray:
    return np.stack(list(expected_segments(lungs, infection).values()), axis=-1)


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
    assert seg.SegmentsOverlap == "NO"
    items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    # every infection voxel is GGO or consolidation: no (empty) "Infection" segments; no consolidation left
    assert {n: str(s.SegmentLabel) for n, s in items.items()} == {
        1: "Right lung", 2: "Left lung", 3: "Ground-glass opacity, right lung",
        4: "Ground-glass opacity, left lung", 5: "Consolidation, right lung"}
    assert segment_numbers(seg) == {"right_lung": 1, "left_lung": 2, "right_ggo": 3, "left_ggo": 4,
                                    "right_consolidation": 5}

    def code(seq):
        return (seq[0].CodingSchemeDesignator, seq[0].CodeValue)

    for number, laterality in ((1, ("SCT", "24028007")), (2, ("SCT", "7771000"))):
        item = items[number]
        assert code(item.SegmentedPropertyCategoryCodeSequence) == ("SCT", "91723000")
        assert code(item.SegmentedPropertyTypeCodeSequence) == ("SCT", "39607008")
        modifier = item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
        assert code(modifier) == laterality
    for number, expected, side in ((3, ("DCM", "112120"), ("SCT", "24028007")),
                                   (4, ("DCM", "112120"), ("SCT", "7771000")),
                                   (5, ("SCT", "9656002"), ("SCT", "24028007"))):
        item = items[number]
        assert code(item.SegmentedPropertyCategoryCodeSequence) == ("SCT", "49755003")
        assert code(item.SegmentedPropertyTypeCodeSequence) == expected
        assert "SegmentedPropertyTypeModifierCodeSequence" not in item.SegmentedPropertyTypeCodeSequence[0]
        (region,) = item.AnatomicRegionSequence   # in which lung
        assert code([region]) == ("SCT", "39607008") and code(region.AnatomicRegionModifierSequence) == side
    colours = {tuple(s.RecommendedDisplayCIELabValue) for s in items.values()}
    assert len(colours) == 4   # a colour per kind: right lung, left lung, GGO, consolidation
    for item in items.values():
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.TrackingID == item.SegmentLabel and item.TrackingUID
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        if int(item.SegmentNumber) <= 2:   # the lungs come from the HU lung method, whatever the engine
            assert algo.AlgorithmName == "ctnode HU lung segmentation"
            assert code(algo.AlgorithmFamilyCodeSequence) == ("DCM", "123104")  # Morphological Operations
            continue
        assert algo.AlgorithmName == "ctnode infnet"
        assert algo.AlgorithmVersion.startswith("1.2.0") and "0123456789ab" in algo.AlgorithmVersion
        assert INFNET.weights_sha256 in algo.AlgorithmParameters
        assert code(algo.AlgorithmFamilyCodeSequence) == ("DCM", "123110")  # Artificial Intelligence


def test_every_reader_classifies_the_node_segments_as_written(case):
    """One classifier: every segment the SEG writer writes is read back, after a file round trip, as its
    structure (a lung by its side, a lesion by its class and the lung it lies in), by its codes alone."""
    _, _, _, seg = case
    written = roundtrip(seg).SegmentSequence
    specs = {spec.label: spec for spec in SEGMENTS}
    assert written, "the SEG has segments"
    for item in written:
        spec = specs[str(item.SegmentLabel)]
        side = SegmentKey(f"{spec.side}_lung")
        expected = side if spec.is_lung else SegmentKey(spec.kind)
        unlabelled = copy.deepcopy(item)
        unlabelled.SegmentLabel = "segment"
        for candidate in (item, unlabelled):  # the codes alone say it
            assert classify_segment(candidate) == expected
            assert classify_lobe(candidate) is None  # a lung is not a lobe
        assert (lesion_side(item) is None) if spec.is_lung else (lesion_side(item) == side)


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
    assert "Laterality" not in seg  # both lungs: Frame Laterality B instead of R or L
    (anatomy,) = seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence
    assert anatomy.FrameLaterality == "B" and anatomy.AnatomicRegionSequence[0].CodeValue == "39607008"
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices) == \
        pytest.approx(volume.slice_spacing)
    acquisition, algorithm, library = seg.ContributingEquipmentSequence
    assert acquisition.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    assert acquisition.Manufacturer == volume.datasets[0].Manufacturer
    purpose = algorithm.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
        ("Newcode1", "99IHE", "Processing Algorithm")
    assert algorithm.Manufacturer == "ctnode" and algorithm.ManufacturerModelName == "ctnode infnet"
    assert algorithm.DeviceUID == algorithm_device_uid(INFNET) != algorithm_device_uid(
        EngineIdentity(name="infnet", version="1.2.0", weights_sha256="f" * 64))
    assert library.ManufacturerModelName == "highdicom"


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
    expected = expected_stack(lungs, infection)
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
    np.testing.assert_array_equal(decoded.astype(bool), expected_stack(lungs, infection))
    # a label map: the segments of one side make the whole lung, the lesion segments the whole infection
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    right = [i for i, label in enumerate(labels) if "right" in label.lower()]
    np.testing.assert_array_equal(decoded.astype(bool)[..., right].any(axis=-1), lungs.right)
    np.testing.assert_array_equal(decoded.astype(bool)[..., 2:].any(axis=-1), infection.infection)


def test_seg_empty_infection_omits_the_segment():
    volume = make_volume()
    lungs, infection = make_masks(volume, classes=False, infection=False)
    seg = build_segmentation(volume, lungs, infection, THRESHOLD)
    assert [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence] == [
        (1, "Right lung"), (2, "Left lung")]
    frame_segments = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                      for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_segments == {1, 2}
    assert seg.SegmentsOverlap == "NO"
    decoded = hd.seg.segread(io.BytesIO(_bytes(seg))).get_pixels_by_source_instance(
        volume.sop_instance_uids, segment_numbers=[1, 2], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded.astype(bool), expected_stack(lungs, infection))


def test_seg_engine_without_classes_writes_one_infection_segment():
    volume = make_volume()
    lungs, infection = make_masks(volume, classes=False)
    seg = build_segmentation(volume, lungs, infection, THRESHOLD)
    assert segment_numbers(seg) == {"right_lung": 1, "left_lung": 2, "right_infection": 3, "left_infection": 4}
    algo = seg.SegmentSequence[2].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123105"  # Histogram Analysis


def test_seg_single_class_keeps_the_unclassified_infection():
    volume = make_volume()
    lungs, infection = make_masks(volume)
    infection.consolidation = None  # GGO only: the rest of the infection is "Infection"
    seg = build_segmentation(volume, lungs, infection, INFNET)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == [
        SEGMENT_LABELS[k] for k in ("right_lung", "left_lung", "right_infection", "right_ggo", "left_ggo")]
    decoded = hd.seg.segread(io.BytesIO(_bytes(seg))).get_pixels_by_source_instance(
        volume.sop_instance_uids, segment_numbers=[1, 2, 3, 4, 5], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded.astype(bool), expected_stack(lungs, infection))


def test_seg_single_slice_has_no_spacing_between_slices():
    volume = make_volume(n=1)
    seg = build_segmentation(volume, *make_masks(volume, classes=False), THRESHOLD)
    assert "SpacingBetweenSlices" not in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]


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
    for key, value in scores.items():  # rounded to 0.1 ml, 0.01 %, 0.1 HU
        tolerance = 0.05 if "_ml" in key or "hu" in key else 0.005
        assert measured[key] == pytest.approx(float(value), abs=tolerance), key
    assert measured["percent_involved_right"] == 4.61 and measured["mean_hu_infection"] in (-512.7, -512.8)

    refs = read_report_segment_references(sr)
    numbers = segment_numbers(seg)
    # the infection totals and the class totals are on the first segment of theirs in SEG order
    anchors = {"right_lung": "right_lung", "left_lung": "left_lung", "infection": "right_ggo",
               "ggo": "right_ggo", "consolidation": "right_consolidation"}
    assert refs == {key: (seg.SOPInstanceUID, numbers[anchor]) for key, anchor in anchors.items()}

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
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"   # CID 100
    device = hd.sr.CodedConcept("121007", "DCM", "Device")
    observer = report.content.get_observer_contexts(observer_type=device)
    assert observer and observer[0].observer_identifying_attributes.name == "ctnode"
    tracking = {str(i.TrackingID): str(i.TrackingUID) for i in seg.SegmentSequence}
    algorithms = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        names = {i.ConceptNameCodeSequence[0].CodeValue for i in group[0].ContentSequence}
        assert {"111001", "111003", "121071", "363698007"} <= names  # algorithm, finding, site
        algorithms[group.tracking_identifier] = next(
            i.TextValue for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111001")
        if group.tracking_identifier in tracking:   # a segment's own group shares its tracking UID
            assert group.tracking_uid == tracking[group.tracking_identifier]
            assert group.tracking_identifier != "Infection"
        (site,) = group.finding_sites
        if group.tracking_identifier in ("Right lung", "Left lung"):
            assert site.laterality.value == ("24028007" if group.tracking_identifier == "Right lung" else "7771000")
            # the involvement of a lung (volume, PO) names the infection engine on each of its measurements
            involvement = [m for m in group.get_measurements() if m.name.scheme_designator == PRIVATE_SCHEME]
            assert len(involvement) == 2
            for measurement in involvement:
                assert [i.TextValue for i in measurement[0].ContentSequence
                        if i.ConceptNameCodeSequence[0].CodeValue == "111001"] == ["ctnode infnet"]
    assert algorithms == {"Right lung": "ctnode HU lung segmentation", "Left lung": "ctnode HU lung segmentation",
                          "Infection": "ctnode infnet", "Ground-glass opacity": "ctnode infnet",
                          "Consolidation": "ctnode infnet"}

    acquisition, algorithm, _ = sr.ContributingEquipmentSequence
    assert acquisition.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    assert acquisition.Manufacturer == "Synthetic"       # the CT's, not ctnode
    assert algorithm.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    assert algorithm.DeviceUID == algorithm_device_uid(INFNET)


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
    assert [i.TextValue for i in container.ContentSequence
            if i.ConceptNameCodeSequence[0].CodeValue == "121106"] == notes
    assert read_report_measurements(sr) == pytest.approx(
        read_report_measurements(roundtrip(build_report(volume, seg, scores_3d(), INFNET))))
    plain = roundtrip(build_report(volume, seg, scores_3d(), INFNET))
    assert read_report_notes(plain) == [] and not [i for i in plain.ContentSequence
                                                   if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]


def test_sr_severity_and_omitted_segments_at_report_level():
    """Severity is a report-level CODE; below the minimum involvement a statement says why there is none;
    a segment left out for being empty is named, and the infection numbers it would carry are not written."""
    volume = make_volume()
    lungs, infection = make_masks(volume, classes=False, infection=False)
    seg = build_segmentation(volume, lungs, infection, THRESHOLD)
    scores = {"volumetric": True, "right_lung_volume_ml": 1500.0, "left_lung_volume_ml": 1400.0,
              "percent_involved_right": 0.0, "percent_involved_total": 0.0, "severity": "none"}
    sr = roundtrip(build_report(volume, seg, scores, THRESHOLD))
    (container,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    texts = [i.TextValue for i in container.ContentSequence if i.ValueType == "TEXT"]
    assert texts == ["not in the SEG (no voxel): Infection",
                     "not reported (their segment is not in the SEG): Infection", SEVERITY_NONE_TEXT]
    assert "0.1 %" in SEVERITY_NONE_TEXT
    back = read_report_measurements(sr)
    assert back["severity"] == "none" and back["percent_involved_right"] == 0.0
    assert "percent_involved_total" not in back

    lungs, infection = make_masks(volume)
    seg = build_segmentation(volume, lungs, infection, INFNET)
    sr = roundtrip(build_report(volume, seg, {**scores_3d(), "severity": "moderate"}, INFNET))
    (container,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    (severity,) = [i for i in container.ContentSequence if i.ValueType == "CODE"]
    assert (severity.ConceptNameCodeSequence[0].CodeValue, severity.ConceptCodeSequence[0].CodeValue) == \
        ("246112005", "6736007")
    assert read_report_measurements(sr)["severity"] == "moderate"


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
    assert len(text) == 1  # once, at report level
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


# --------------------------------------------------------------------------- pleural effusion

def make_effusion(volume: Volume, sides: tuple[str, ...] = ("right",)) -> Effusion:
    """A pleural effusion behind the lungs of :func:`tests.builders.make_masks` (rows 10-49), on ``sides``."""
    labels = np.zeros(volume.shape, np.uint8)
    ks = slice(0, volume.shape[0]) if volume.shape[0] < 3 else slice(2, 8)
    if "right" in sides:
        labels[ks, 52:58, 6:30] = LungMasks.RIGHT
    if "left" in sides:
        labels[ks, 52:58, 34:58] = LungMasks.LEFT
    voxel = volume.pixel_spacing[0] * volume.pixel_spacing[1] * (volume.slice_spacing or 1.0)
    return Effusion(labels=labels, dense_unexplained=np.zeros(volume.shape, np.uint8),
                    volumetric=volume.is_volumetric, voxel_mm3=voxel)


@pytest.fixture(scope="module")
def effusion_case():
    volume = make_volume()
    lungs, infection = make_masks(volume)
    effusion = make_effusion(volume)
    return volume, lungs, infection, effusion, build_segmentation(volume, lungs, infection, INFNET, effusion=effusion)


def test_seg_effusion_segment_codes_and_voxels(effusion_case):
    volume, lungs, infection, effusion, seg = effusion_case
    seg = roundtrip(seg)
    numbers = segment_numbers(seg)
    assert "right_effusion" in numbers and "left_effusion" not in numbers   # no empty segment
    assert max(numbers.values()) == numbers["right_effusion"]                # last: the others keep their numbers
    assert seg.SegmentsOverlap == "NO"
    (item,) = [s for s in seg.SegmentSequence if int(s.SegmentNumber) == numbers["right_effusion"]]
    assert item.SegmentLabel == "Pleural effusion, right"
    prop = item.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodingSchemeDesignator, prop.CodeValue, prop.CodeMeaning) == ("SCT", "60046008", "Pleural effusion")
    category = item.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"   # Right
    algo = item.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == EFFUSION_ALGORITHM_NAME
    # neither a lung nor a lesion to the readers of SEGs (agreement, lobe maps)
    assert classify_segment(item) is None and lesion_side(item) is None and classify_lobe(item) is None
    decoded = hd.seg.segread(io.BytesIO(_bytes(seg))).get_pixels_by_source_instance(
        volume.sop_instance_uids, segment_numbers=sorted(numbers.values()), assert_missing_frames_are_empty=True)
    order = sorted(numbers, key=numbers.get)
    np.testing.assert_array_equal(decoded[..., order.index("right_effusion")].astype(bool), effusion.labels == 1)
    lung_right = [i for i, key in enumerate(order) if key.startswith("right_") and key != "right_effusion"]
    np.testing.assert_array_equal(decoded[..., lung_right].any(axis=-1), lungs.right)


def test_seg_effusion_never_overlaps_the_lung():
    volume = make_volume()
    lungs, infection = make_masks(volume)
    effusion = make_effusion(volume, ("right", "left"))
    effusion.labels[3, 40:55, 6:30] = LungMasks.RIGHT          # reaching into the lung: the lung keeps it
    seg = build_segmentation(volume, lungs, infection, THRESHOLD, effusion=effusion)
    numbers = segment_numbers(seg)
    assert seg.SegmentsOverlap == "NO" and {"right_effusion", "left_effusion"} <= set(numbers)
    decoded = hd.seg.segread(io.BytesIO(_bytes(seg))).get_pixels_by_source_instance(
        volume.sop_instance_uids, segment_numbers=[numbers["right_effusion"]], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded[..., 0].astype(bool), (effusion.labels == 1) & ~lungs.lungs)


def test_sr_effusion_groups_reference_their_segment(effusion_case):
    volume, _, _, _, seg = effusion_case
    scores = {**scores_3d(), "right_effusion_volume_ml": 212.34, "left_effusion_volume_ml": 0.0}
    sr = roundtrip(build_report(volume, seg, scores, INFNET, strict=True))
    measured = read_report_measurements(sr)
    assert measured["right_effusion_volume_ml"] == pytest.approx(212.3)
    assert "left_effusion_volume_ml" not in measured          # no segment, no group: a statement instead
    assert read_report_segment_references(sr)["right_effusion"] == (
        seg.SOPInstanceUID, segment_numbers(seg)["right_effusion"])
    texts = [str(i.TextValue) for i in _walk(sr) if i.get("ValueType") == "TEXT"]
    assert f"{NO_EFFUSION_TEXT}: left" in texts and not any("not reported" in t for t in texts)
    codes_in = {(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
                for i in _walk(sr) if i.get("ValueType") == "CODE"}
    assert ("121071", "60046008") in codes_in                 # Finding: Pleural effusion
    assert ("363698007", "3120008") in codes_in               # Finding Site: Pleura


def test_sr_no_effusion_says_so():
    volume = make_volume()
    lungs, infection = make_masks(volume)
    seg = build_segmentation(volume, lungs, infection, INFNET, effusion=make_effusion(volume, ()))
    assert not {"right_effusion", "left_effusion"} & set(segment_numbers(seg))
    sr = build_report(volume, seg, {**scores_3d(), "right_effusion_volume_ml": 0.0, "left_effusion_volume_ml": 0.0},
                      INFNET, strict=True)
    texts = [str(i.TextValue) for i in _walk(sr) if i.get("ValueType") == "TEXT"]
    assert f"{NO_EFFUSION_TEXT}: right, left" in texts


def test_sr_2d_effusion_area():
    volume = make_volume(n=1)
    lungs, infection = make_masks(volume, classes=False)
    seg = build_segmentation(volume, lungs, infection, THRESHOLD, effusion=make_effusion(volume))
    sr = roundtrip(build_report(volume, seg, {"volumetric": False, "right_effusion_area_cm2": 3.456,
                                              "left_effusion_area_cm2": 0.0}, THRESHOLD, strict=True))
    measured = read_report_measurements(sr)
    assert measured["right_effusion_area_cm2"] == pytest.approx(3.46) and "right_effusion_volume_ml" not in measured


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
    seg_effusion = build_segmentation(volume, *make_masks(volume), INFNET, effusion=make_effusion(volume))
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
        "seg_effusion": seg_effusion,
        "sr_effusion": build_report(volume, seg_effusion, {**scores_3d(), "right_effusion_volume_ml": 20.0,
                                                           "left_effusion_volume_ml": 0.0}, INFNET),
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


# --------------------------------------------------------------------------- SEG and SR files together

def test_seg_and_sr_files_share_the_tracking_of_each_measured_segment(tmp_path):
    """Read back from the files ``ctnode process`` writes: an SR group that measures exactly the segment it
    references has that segment's Tracking ID and Tracking UID; a group measuring a part or a union of
    segments (CT-SS regions, zones, infection totals) has its own UID; a Tracking UID never names two
    findings, in either file."""
    from pydicom import dcmread

    from node.phantom import make_phantom, write_phantom_study
    from node.processing import analyse, write_outputs

    paths = write_phantom_study(make_phantom(rows=128, cols=128, slices=40, pixel_spacing=3.0, slice_spacing=8.0, seed=3), tmp_path / "ct")
    analysis = analyse(paths, engine="threshold")
    assert analysis.status == "done", analysis.reason
    out = write_outputs(analysis, tmp_path / "out")
    seg, sr = dcmread(out["seg"]), dcmread(out["sr"])
    segments = {int(item.SegmentNumber): (str(item.TrackingID), str(item.TrackingUID)) for item in seg.SegmentSequence}
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) > 5  # lungs, infection, classes, regions and zones
    own = {}
    for group in groups:
        ref = group.referenced_segment
        assert str(ref.referenced_sop_instance_uid) == seg.SOPInstanceUID
        (number,) = ref.referenced_segment_numbers
        segment_id, segment_uid = segments[int(number)]
        if group.tracking_identifier == segment_id:
            assert group.tracking_uid == segment_uid, segment_id
            own[segment_id] = group.tracking_uid
        else:
            assert group.tracking_uid not in {uid for _, uid in segments.values()}, group.tracking_identifier
    assert set(own) == {"Right lung", "Left lung"}  # the segments measured as a whole
    names: dict[str, set[str]] = {}
    for identifier, uid in [*segments.values(), *((g.tracking_identifier, g.tracking_uid) for g in groups)]:
        names.setdefault(uid, set()).add(identifier)
    assert all(len(ids) == 1 for ids in names.values()), names


def test_lungs_of_the_lung_network_name_it_in_seg_and_sr(case):
    """Lung segments made with the lung network (method "net") name that algorithm, as AI, with the hash of
    its weights, in the SEG and in the SR groups that measure them."""
    import dataclasses

    from models.registry import read_meta

    volume, lungs, infection, _ = case
    net_lungs = dataclasses.replace(lungs, method="net")
    seg = build_segmentation(volume, net_lungs, infection, INFNET, series_number=905)
    lung_items = [i for i in seg.SegmentSequence if i.SegmentLabel in ("Right lung", "Left lung")]
    assert len(lung_items) == 2
    for item in lung_items:
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "ctnode HU lung segmentation with lung network"
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
        assert read_meta("lungnet")["sha256"][:16] in algo.AlgorithmVersion
    sr = build_report(volume, seg, scores_3d(), INFNET, lung_method="net")
    names: set[str] = set()

    def walk(items) -> None:
        for i in items:
            if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeValue == "111001":
                names.add(str(i.TextValue))
            walk(i.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert "ctnode HU lung segmentation with lung network" in names
    assert "ctnode HU lung segmentation" not in names
    # the AIR processing algorithm names the lung network's weights, and its Device UID changes with them
    (algorithm,) = [e for e in sr.ContributingEquipmentSequence
                    if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    assert any(v.startswith("lungnet sha256:") for v in algorithm.SoftwareVersions)
    assert algorithm.DeviceUID == algorithm_device_uid(INFNET, read_meta("lungnet")["sha256"])
    assert algorithm.DeviceUID != algorithm_device_uid(INFNET)
    (seg_algorithm,) = [e for e in seg.ContributingEquipmentSequence
                        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    assert seg_algorithm.DeviceUID == algorithm.DeviceUID
