"""External lobe maps (node/pipeline/regionmap.py): a lobe SEG for the analysed series gives the zones."""
from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.db.schema import Job, ReferenceSeg, Result
from node.demo import send_study
from node.pipeline.regionmap import is_lobe_map
from node.pipeline.regions import ZONES
from node.pipeline.run import run_pipeline
from node.pipeline.scores import compute_scores
from node.pipeline.segments import classify_lobe
from node.service import Node
from tests.nodes import c_store, make_settings
from tests.util import wait_for

pytestmark = pytest.mark.unit

UPPER = hd.sr.CodedConcept("45653009", "SCT", "Upper lobe of lung")      # DICOM CID 6170 "Lobe of Lung"
MIDDLE = hd.sr.CodedConcept("72481006", "SCT", "Middle lobe of right lung")
LOWER = hd.sr.CodedConcept("90572001", "SCT", "Lower lobe of lung")
RIGHT, LEFT = hd.sr.CodedConcept.from_code(codes.SCT.Right), hd.sr.CodedConcept.from_code(codes.SCT.Left)
# ZONES order: right_upper, right_middle, right_lower, left_upper, left_lower
LOBE_CODES = [(UPPER, RIGHT), (MIDDLE, None), (LOWER, RIGHT), (UPPER, LEFT), (LOWER, LEFT)]


def make_phantom_study(tmp_path, seed):
    from pydicom import dcmread

    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=128, cols=128, slices=36, pixel_spacing=2.6, slice_spacing=7.0, seed=seed)
    files = write_phantom_study(phantom, tmp_path / f"ct{seed}")
    headers = [dcmread(p, stop_before_pixels=True) for p in files]
    index = {tuple(np.round(pos, 3)): k for k, pos in enumerate(phantom.positions)}
    ordered = sorted(headers, key=lambda h: index[tuple(np.round([float(v) for v in h.ImagePositionPatient], 3))])
    return phantom, files, ordered


def lobe_seg(headers: list[Dataset], regions: np.ndarray) -> hd.seg.Segmentation:
    """A lobe segmentation tool's output: five lobes coded as DICOM CID 6170 with laterality modifiers."""
    descriptions = []
    for number, (name, (prop, side)) in enumerate(zip(ZONES, LOBE_CODES), start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=f"Lobe {number}",  # labels say nothing: the codes must decide
            segmented_property_category=hd.sr.CodedConcept.from_code(codes.SCT.AnatomicalStructure),
            segmented_property_type=copy.deepcopy(prop), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="lobes", version="1", family=hd.sr.CodedConcept.from_code(codes.DCM.ArtificialIntelligence)))
        if side is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [side]
        descriptions.append(desc)
    masks = np.stack([regions == i + 1 for i in range(len(ZONES))], axis=-1).astype(np.uint8)
    return hd.seg.Segmentation(
        source_images=headers, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=960,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Lobes Inc.",
        manufacturer_model_name="lobes", software_versions="1", device_serial_number="1", omit_empty_frames=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    phantom, files, headers = make_phantom_study(tmp_path_factory.mktemp("lobes"), seed=7)
    return phantom, files, headers, lobe_seg(headers, phantom.regions)


def item(label: str, code: hd.sr.CodedConcept | None = None, side: hd.sr.CodedConcept | None = None) -> Dataset:
    ds = Dataset()
    ds.SegmentLabel = label
    if code is not None:
        prop = copy.deepcopy(code)
        if side is not None:
            prop.SegmentedPropertyTypeModifierCodeSequence = [side]
        ds.SegmentedPropertyTypeCodeSequence = [prop]
    return ds


def test_classify_lobe_by_code_then_label():
    assert classify_lobe(item("x", UPPER, RIGHT)) == "right_upper"
    assert classify_lobe(item("x", LOWER, LEFT)) == "left_lower"
    assert classify_lobe(item("x", MIDDLE)) == "right_middle"
    assert classify_lobe(item("Left", UPPER)) == "left_upper"           # laterality from the label
    assert classify_lobe(item("x", UPPER)) is None                     # an upper lobe of which lung?
    assert classify_lobe(item("RUL")) == "right_upper"
    assert classify_lobe(item("lung_lower_lobe_left")) == "left_lower"  # TotalSegmentator's names
    assert classify_lobe(item("Right middle lobe")) == "right_middle"
    assert classify_lobe(item("Right lung", hd.sr.CodedConcept.from_code(codes.SCT.Lung), RIGHT)) is None
    assert classify_lobe(item("COVID lesion")) is None


def test_lobe_map_gives_the_zones(tmp_path, study):
    phantom, files, headers, seg = study
    assert is_lobe_map(seg)
    path = tmp_path / "lobes.dcm"
    seg.save_as(path)
    result = run_pipeline(files, "threshold", lobe_maps=[path])
    assert result.status == "done" and result.lobe_map_uid == seg.SOPInstanceUID
    assert result.scores.region_method == "lobes"
    assert any("zones are the lobes of SEG" in n for n in result.notes)
    # the same scores as with the phantom's own lobe labels, put in the volume's slice order
    by_sop = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    order = [by_sop[uid] for uid in result.volume.sop_instance_uids]
    expected = compute_scores(result.volume, result.lungs, result.infection, region_map=phantom.regions[order])
    assert result.scores.zones == expected.zones and result.scores.regions == expected.regions
    from node.processing import analyse

    sr = analyse(files, engine="threshold", lobe_maps=[path]).sr  # the SR lists the lobe SEG as evidence
    evidence = {str(sop.ReferencedSOPInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    geometric = run_pipeline(files, "threshold")
    assert geometric.scores.region_method == "geometric" and geometric.lobe_map_uid is None


def test_lobe_map_of_another_frame_of_reference_is_not_used(tmp_path, study):
    _, files, _, seg = study
    other = copy.deepcopy(seg)
    other.FrameOfReferenceUID, other.SOPInstanceUID = generate_uid(), generate_uid()
    path = tmp_path / "other.dcm"
    other.save_as(path)
    result = run_pipeline(files, "threshold", lobe_maps=[path])
    assert result.scores.region_method == "geometric" and result.lobe_map_uid is None
    assert any("not used: its FrameOfReferenceUID differs" in n for n in result.lobe_map_notes)


@pytest.mark.integration
@pytest.mark.slow
def test_node_uses_a_lobe_map_sent_before_or_after_the_study(tmp_path, study):
    """Before: the first result uses it. After: the study is processed again (version 2) with it."""
    _, late_files, late_headers, late_map = study
    early_phantom, early_files, early_headers = make_phantom_study(tmp_path, seed=8)
    early_map = lobe_seg(early_headers, early_phantom.regions)
    node = Node(make_settings(tmp_path))
    node.start()
    try:
        port = node.listener.port
        assert c_store(port, early_map) == [0]
        assert send_study(early_files, "127.0.0.1", port, "CTNODE", progress=False) == len(early_files)
        assert send_study(late_files, "127.0.0.1", port, "CTNODE", progress=False) == len(late_files)

        def state_of(sop):
            with node.sessions() as s:
                return s.scalars(select(ReferenceSeg.state).where(ReferenceSeg.sop_instance_uid == sop)).first()

        wait_for(lambda: state_of(early_map.SOPInstanceUID) == "anatomy", 180, "the early lobe map used")

        def done_versions(series_uid):
            with node.sessions() as s:
                return [(j.version, r.decisions.get("lobe_map"), r.scores.get("region_method"))
                        for r, j in s.execute(select(Result, Job).join(Job, Result.job_id == Job.id)
                                              .where(Result.series_instance_uid == series_uid, Job.state == "done")
                                              .order_by(Job.version))]

        late_series = str(late_headers[0].SeriesInstanceUID)
        wait_for(lambda: done_versions(late_series), 180, "the late study's first result")
        assert c_store(port, late_map) == [0]
        wait_for(lambda: state_of(late_map.SOPInstanceUID) == "anatomy", 180, "the late lobe map used")
        late = done_versions(late_series)
        early = done_versions(str(early_headers[0].SeriesInstanceUID))
        from node.reports import result_text

        with node.sessions() as s:
            shown = result_text(s, s.scalars(select(Job.id).order_by(Job.id.desc())).first())
    finally:
        node.stop()
    assert early == [(1, early_map.SOPInstanceUID, "lobes")]
    assert late == [(1, None, "geometric"), (2, late_map.SOPInstanceUID, "lobes")]
    assert f"zones: the lobes of SEG {late_map.SOPInstanceUID}" in shown
