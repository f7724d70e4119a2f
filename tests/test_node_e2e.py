"""The node end to end in one process: phantom study in over DICOM, SEG and SR out, all in the database."""
from __future__ import annotations

import re

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from models.metrics import dice
from node.db.schema import Event, Export, Job, Result
from node.demo import Receiver, send_study
from node.processing import analyse
from node.service import Node
from tests.nodes import make_settings
from tests.util import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory):
    from node.phantom import make_phantom, write_phantom_study

    folder = tmp_path_factory.mktemp("phantom")
    phantom = make_phantom(rows=192, cols=192, slices=60, pixel_spacing=2.0, slice_spacing=5.0, seed=1, burden=0.2)
    return phantom, write_phantom_study(phantom, folder / "dicom")


def test_study_in_seg_and_sr_out(tmp_path, phantom_study, monkeypatch, capsys):
    phantom, files = phantom_study
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        settings = make_settings(tmp_path, destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
        node = Node(settings)
        node.start()
        try:
            # the study arrives over two associations, as PACS often send it
            half = len(files) // 2
            assert send_study(files[:half], "127.0.0.1", node.listener.port, "CTNODE", progress=False) == half
            assert send_study(files[half:], "127.0.0.1", node.listener.port, "CTNODE", progress=False) == len(files) - half
            wait_for(lambda: len(pacs.received) >= 2, 240, "the SEG and SR at the destination")
        finally:
            node.stop()

        received = {dcmread(p).Modality: p for p in pacs.received}
        assert set(received) == {"SEG", "SR"}
        source = dcmread(files[0], stop_before_pixels=True)
        seg = hd.seg.segread(received["SEG"])
        sr = dcmread(received["SR"])
        for ds in (seg, sr):
            assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert seg.SegmentationType == "BINARY"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID

        with node.sessions() as s:
            job = s.scalars(select(Job)).one()
            result = s.scalars(select(Result)).one()
            exports = s.scalars(select(Export)).all()
            kinds = {e.kind for e in s.scalars(select(Event))}
        assert job.state == "done" and job.version == 1
        assert result.engine_name == "threshold" and result.seg_sop_instance_uid == seg.SOPInstanceUID
        assert {e.state for e in exports} == {"sent"} and len(exports) == 2
        assert {"association_accepted", "job_ready", "job_processing", "job_done", "export_sent"} <= kinds
        for key in ("right_lung_volume_ml", "left_lung_volume_ml", "percent_involved_total"):
            assert result.scores[key] is not None and result.scores[key] >= 0

        # The SEG overlays the source slices: same positions, and the lung voxels match the phantom's masks.
        headers = [dcmread(p, stop_before_pixels=True) for p in files]
        position = {str(h.SOPInstanceUID): [float(v) for v in h.ImagePositionPatient] for h in headers}
        truth_index = {tuple(np.round(pos, 3)): k for k, pos in enumerate(phantom.positions)}
        # a label map: a whole lung is every lung or lesion segment of its side ("Right lung", "GGO, right
        # lung", ...; not "Pleural effusion, right")
        labels = {s.SegmentNumber: s.SegmentLabel.lower() for s in seg.SegmentSequence}
        labels = {n: label for n, label in labels.items() if "effusion" not in label}
        right_nos = [n for n, label in labels.items() if "right" in label]
        left_nos = [n for n, label in labels.items() if "left" in label]
        assert seg.SegmentsOverlap == "NO" and right_nos and left_nos
        # source instances in the phantom's slice order (k = 0 is the most inferior slice)
        sops = sorted(position, key=lambda sop: truth_index[tuple(np.round(position[sop], 3))])

        def lung(sop_order, numbers):
            pixels = seg.get_pixels_by_source_instance(sop_order, segment_numbers=numbers,
                                                       assert_missing_frames_are_empty=True)
            return pixels.any(axis=-1)

        right, left = lung(sops, right_nos), lung(sops, left_nos)
        assert right.shape == phantom.hu.shape
        for frame in seg.PerFrameFunctionalGroupsSequence:
            sop = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            np.testing.assert_allclose(pos, position[sop], atol=1e-3)
        assert dice(right, phantom.masks["right_lung"]) > 0.9
        assert dice(left, phantom.masks["left_lung"]) > 0.9
        # and equal, voxel for voxel, what the same pipeline computes offline
        offline = analyse(files, engine="threshold")
        sorted_sops = offline.pipeline.volume.sop_instance_uids
        np.testing.assert_array_equal(lung(sorted_sops, right_nos), offline.pipeline.lungs.right)
        np.testing.assert_array_equal(lung(sorted_sops, left_nos), offline.pipeline.lungs.left)

        # What an auditor sees on the command line
        from node.cli import main

        monkeypatch.setenv("CTNODE_STORAGE_DATABASE_URL", settings.storage.database_url)
        capsys.readouterr()
        assert main(["results", "list"]) == 0
        listing = capsys.readouterr().out
        assert source.StudyInstanceUID in listing and "done" in listing and "threshold" in listing
        assert main(["results", "show", str(job.id)]) == 0
        shown = capsys.readouterr().out
        assert "percent_involved_total" in shown and str(result.seg_path) in shown and "pacs: sent" in shown
        assert re.search(r"received \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, finished \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\n",
                         shown)
        assert main(["results", "export", "--csv", str(tmp_path / "r.csv")]) == 0
        import csv

        rows = list(csv.DictReader(open(tmp_path / "r.csv")))
        assert len(rows) == 1 and float(rows[0]["percent_involved_total"]) == pytest.approx(
            result.scores["percent_involved_total"])
        assert rows[0]["notes"].split(" | ") == result.decisions["notes"] and "GGO lower bound" in rows[0]["notes"]
        assert main(["jobs", "list"]) == 0
        assert "pacs:sent" in capsys.readouterr().out
