"""The pleural effusion from the analysis to what a reader sees: SEG, SR, the results row and ``results show``."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.db import open_database
from node.db.schema import Job, Result
from node.processing import analyse, write_outputs
from node.registry import ReceivedInstance, record_instance
from node.results import result_row
from node.storage import Storage
from node.writers.seg import segment_numbers
from node.writers.sr import read_report_measurements, read_report_segment_references

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    from node.phantom import make_phantom, write_phantom_study

    tmp = tmp_path_factory.mktemp("effusion")
    files = write_phantom_study(make_phantom(rows=192, cols=192, slices=40, pixel_spacing=1.8, slice_spacing=6.0,
                                             seed=4, burden=0.1, effusion=0.15), tmp / "dicom")
    analysis = analyse(files, engine="threshold")
    assert analysis.status == "done", analysis.reason
    return analysis, write_outputs(analysis, tmp / "out")


def test_the_effusion_reaches_seg_sr_and_the_results_row(analysed, tmp_path, monkeypatch, capsys):
    analysis, outputs = analysed
    scores = analysis.scores
    right, left = scores["right_effusion_volume_ml"], scores["left_effusion_volume_ml"]
    assert right > 20 and left > 20          # the phantom's effusion is bilateral

    seg = dcmread(outputs["seg"])
    numbers = segment_numbers(seg)
    assert {"right_effusion", "left_effusion"} <= set(numbers)
    sr = dcmread(outputs["sr"])
    measured = read_report_measurements(sr)
    assert measured["right_effusion_volume_ml"] == pytest.approx(right, abs=0.05)
    assert measured["left_effusion_volume_ml"] == pytest.approx(left, abs=0.05)
    refs = read_report_segment_references(sr)
    assert refs["right_effusion"] == (seg.SOPInstanceUID, numbers["right_effusion"])

    files = Storage(tmp_path / "spool", outputs["seg"].parent.parent)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    sessions = open_database(url)
    with sessions.begin() as s:
        record_instance(s, ReceivedInstance(
            study_instance_uid=str(seg.StudyInstanceUID), series_instance_uid="1.2.3.1", sop_instance_uid="1.2.3.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", path="/spool/1.dcm",
            size=10, sha256="a", calling_aet="A"))
        job = s.scalars(select(Job)).one()
        s.add(result_row(job.id, analysis, outputs, files))
        job_id = job.id
    with sessions() as s:
        row = s.scalars(select(Result)).one()
        assert row.right_effusion_ml == pytest.approx(right) and row.left_effusion_ml == pytest.approx(left)
        assert not Path(row.seg_path).is_absolute() and files.results_file(row.seg_path) == outputs["seg"]
        assert row.right_effusion_cm2 is None and row.left_effusion_cm2 is None   # a volume, not a slice

    from node.cli import main

    monkeypatch.setenv("CTNODE_STORAGE_DATABASE_URL", url)
    capsys.readouterr()
    assert main(["results", "show", str(job_id)]) == 0
    shown = capsys.readouterr().out
    assert f"pleural effusion: right {right:.1f} ml, left {left:.1f} ml" in shown
    assert main(["results", "export", "--csv", str(tmp_path / "r.csv")]) == 0
    import csv

    (exported,) = csv.DictReader(open(tmp_path / "r.csv"))
    assert float(exported["right_effusion_volume_ml"]) == pytest.approx(right)
    assert exported["right_effusion_area_cm2"] == ""



def test_every_effusion_key_has_a_results_column():
    from node.pipeline.types import Effusion
    from node.results import EFFUSION_KEYS

    assert set(EFFUSION_KEYS) == set(Effusion.SR_KEYS)
    assert set(EFFUSION_KEYS.values()) <= {c.name for c in Result.__table__.columns}
