"""Agreement with a reference SEG: a radiologist's "correction" sent to a running node is compared with the
node's own SEG (Dice, volumes), stored, retried until the node has a result, and shown by ``results show``."""
from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import select

from models.metrics import dice
from node.db.schema import Agreement, Instance, Job, ReferenceSeg, Result, Study
from node.demo import send_study
from node.pipeline.segments import classify_segment
from node.processing import analyse
from node.service import Node
from tests.nodes import c_store, make_settings
from tests.util import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPACING, SLICE = 2.2, 6.0


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The phantom, its CT files, their headers in the phantom's slice order (k ascending in z)."""
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=160, cols=160, slices=40, pixel_spacing=SPACING, slice_spacing=SLICE, seed=5)
    files = write_phantom_study(phantom, tmp_path_factory.mktemp("phantom") / "dicom")
    headers = [dcmread(p, stop_before_pixels=True) for p in files]
    index = {tuple(np.round(pos, 3)): k for k, pos in enumerate(phantom.positions)}
    ordered = sorted(headers, key=lambda h: index[tuple(np.round([float(v) for v in h.ImagePositionPatient], 3))])
    return phantom, files, ordered


def _desc(number: int, label: str, prop: hd.sr.CodedConcept) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=hd.sr.CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure),
        segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)


def reference_seg(headers: list[Dataset], masks: list[np.ndarray]) -> hd.seg.Segmentation:
    """A "radiologist's" SEG with its own numbering and vocabulary: 1 lesion, 2 left lung, 3 right lung."""
    descriptions = [
        _desc(1, "COVID lesion", hd.sr.CodedConcept.from_code(codes.SCT.Lesion)),              # label -> infection
        _desc(2, "Left lung", hd.sr.CodedConcept("44029006", "SCT", "Left lung")),              # code -> left
        _desc(3, "Lung R", hd.sr.CodedConcept.from_code(codes.SCT.Lung)),                       # Lung + modifier
    ]
    descriptions[2].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.SCT.Right)]
    return hd.seg.Segmentation(
        source_images=headers, pixel_array=np.stack(masks, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=950, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="Radiology", manufacturer_model_name="manual", software_versions="1", device_serial_number="1",
        omit_empty_frames=True)


def test_classify_segment_by_code_and_label():
    def item(label: str, scheme: str = "SCT", value: str = "52988006", modifier: str | None = None) -> Dataset:
        ds = Dataset()
        ds.SegmentLabel = label
        prop = Dataset()
        prop.CodingSchemeDesignator, prop.CodeValue = scheme, value
        if modifier:
            m = Dataset()
            m.CodingSchemeDesignator, m.CodeValue = "SCT", modifier
            prop.SegmentedPropertyTypeModifierCodeSequence = [m]
        ds.SegmentedPropertyTypeCodeSequence = [prop]
        return ds

    assert classify_segment(item("x", "SCT", "39607008", "24028007")) == "right_lung"
    assert classify_segment(item("Lung", "SCT", "39607008", "7771000")) == "left_lung"
    assert classify_segment(item("anything", "DCM", "112001")) == "infection"
    assert classify_segment(item("Ground-glass opacity", "DCM", "112120")) == "ggo"
    assert classify_segment(item("ground glass opacity")) == "ggo"  # "opacity" alone would say infection
    assert classify_segment(item("Consolidation")) == "consolidation"
    assert classify_segment(item("Opacity")) == "infection"
    assert classify_segment(item("Heart")) is None
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) is None


def test_reference_seg_is_compared_stored_and_shown(tmp_path, study, monkeypatch, capsys):
    phantom, files, headers = study
    truth = phantom.masks
    # The "correction": ground truth lungs, and the truth infection with the lowest lesion slices erased.
    infection = truth["infection"].copy()
    infection[: phantom.shape[0] // 3] = False
    correction = reference_seg(headers, [infection, truth["left_lung"], truth["right_lung"]])
    ct_series = str(headers[0].SeriesInstanceUID)
    # The same correction claimed for a series the node never received.
    stranger = copy.deepcopy(correction)
    stranger.ReferencedSeriesSequence[0].SeriesInstanceUID = unknown_series = generate_uid()
    stranger.SOPInstanceUID = generate_uid()
    # A SEG object mislabelled as CT is refused like any other non-conformant instance.
    wrong = copy.deepcopy(correction)
    wrong.Modality, wrong.SOPInstanceUID = "CT", generate_uid()

    settings = make_settings(tmp_path)
    node = Node(settings)
    node.start()
    try:
        port = node.listener.port
        # The reference arrives before the study: recorded, no job, unmatched until the node has a result.
        assert c_store(port, correction, stranger, wrong) == [0, 0, 0xA900]
        def unmatched() -> bool:
            with node.sessions() as s:
                return len(s.scalars(select(ReferenceSeg).where(ReferenceSeg.state == "unmatched")).all()) == 2

        wait_for(unmatched, 30, "both references unmatched")
        with node.sessions() as s:
            assert s.scalars(select(Job)).all() == [] and s.scalars(select(Study)).all() == []
            assert s.scalars(select(Instance)).all() == []
            ref = s.scalars(select(ReferenceSeg).where(ReferenceSeg.sop_instance_uid == correction.SOPInstanceUID)).one()
            assert ref.reason == f"no node result for series {ct_series} yet"
            assert ref.path.startswith("references/") and settings.files.spool_file(ref.path).is_file()

        assert send_study(files, "127.0.0.1", port, "CTNODE", progress=False) == len(files)

        def compared():
            with node.sessions() as s:
                r = s.scalars(select(ReferenceSeg).where(ReferenceSeg.sop_instance_uid == correction.SOPInstanceUID)).one()
                return r if r.state in ("done", "failed") else None

        ref = wait_for(compared, 120, "the agreement with the reference SEG")
        assert ref.state == "done", ref.reason
        with node.sessions() as s:
            job = s.scalars(select(Job)).one()  # the reference joined no job and started none
            result = s.scalars(select(Result)).one()
            rows = {a.segment_key: a for a in s.scalars(select(Agreement))}
            other = s.scalars(select(ReferenceSeg).where(ReferenceSeg.sop_instance_uid == stranger.SOPInstanceUID)).one()
            assert len(s.scalars(select(Instance)).all()) == len(files)
        # A new version of the study (one instance re-sent with changed content): compared again, v1 rows kept.
        resent = dcmread(files[0])
        resent.ImageComments = "re-sent"
        assert send_study([resent], "127.0.0.1", port, "CTNODE", progress=False) == 1

        def recompared():
            with node.sessions() as s:
                jobs = [a.job_id for a in s.scalars(select(Agreement))]
                return jobs if len(set(jobs)) == 2 else None

        agreement_jobs = wait_for(recompared, 120, "the reference compared with version 2")
        with node.sessions() as s:
            v2 = s.scalars(select(Job).where(Job.version == 2)).one()
            rows_v2 = {a.segment_key: a for a in s.scalars(select(Agreement).where(Agreement.job_id == v2.id))}
    finally:
        node.stop()
    assert sorted(set(agreement_jobs)) == [job.id, v2.id] and len(agreement_jobs) == 6
    assert {k: r.dice for k, r in rows_v2.items()} == pytest.approx({k: r.dice for k, r in rows.items()})

    assert job.state == "done" and job.version == 1 and ref.job_id == job.id
    assert other.state == "unmatched" and other.reason == f"no node result for series {unknown_series} yet"
    assert set(rows) == {"right_lung", "left_lung", "infection"}
    assert rows["infection"].reference_segment_numbers == "1" and rows["infection"].node_segment_number == 3
    assert rows["right_lung"].reference_segment_numbers == "3" and rows["left_lung"].reference_segment_numbers == "2"

    # Independently: the same pipeline offline gives the node's masks (volume order); the truth in that order.
    offline = analyse(files, engine="threshold").pipeline
    by_sop = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    order = [by_sop[uid] for uid in offline.volume.sop_instance_uids]
    voxel_ml = SPACING * SPACING * SLICE / 1000.0
    node_masks = {"right_lung": offline.lungs.right, "left_lung": offline.lungs.left,
                  "infection": offline.infection.infection}
    ref_masks = {"right_lung": truth["right_lung"][order], "left_lung": truth["left_lung"][order],
                 "infection": infection[order]}
    for key, row in rows.items():
        a, b = node_masks[key], ref_masks[key]
        expected = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        assert row.dice == pytest.approx(expected, abs=1e-9), key
        assert row.volume_node_ml == pytest.approx(a.sum() * voxel_ml)
        assert row.volume_reference_ml == pytest.approx(b.sum() * voxel_ml)
        assert row.volume_difference_ml == pytest.approx((b.sum() - a.sum()) * voxel_ml)
    assert rows["right_lung"].dice > 0.8 and rows["infection"].dice < rows["right_lung"].dice
    assert rows["right_lung"].volume_node_ml == pytest.approx(result.scores["right_lung_volume_ml"], rel=1e-3)

    from node.cli import main

    monkeypatch.setenv("CTNODE_STORAGE_DATABASE_URL", settings.storage.database_url)
    capsys.readouterr()
    assert main(["results", "show", str(job.id)]) == 0
    shown = capsys.readouterr().out
    assert f"agreement with reference SEG {correction.SOPInstanceUID} (received " in shown
    assert f"right lung Dice {rows['right_lung'].dice:.2f}" in shown
    assert f"infection Dice {rows['infection'].dice:.2f}" in shown
    assert f"volume difference {rows['infection'].volume_difference_ml:+.1f} ml" in shown
