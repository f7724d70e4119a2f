"""Engine "auto" with Inf-Net weights that do not load: the threshold engine, a WARNING, a note in the SR and
an audit event; engine "infnet" with the same weights: the job fails and says why."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")

from node.pipeline.engines import EngineUnavailable, ThresholdEngine, build_engine  # noqa: E402
from tests.util import captured_logs  # noqa: E402

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "weights"
BROKEN = "infnet-compact"


@pytest.fixture(params=["hash-mismatch", "unreadable", "missing"])
def broken_weights(request, tmp_path, monkeypatch) -> str:
    """The shipped weights folder with ``infnet-compact.safetensors`` overwritten by garbage; "unreadable":
    its sidecar's sha256 updated to match, so that the file itself fails to load; "missing": the file
    deleted. Returns what the reason for the failed load must contain."""
    import json

    import models.registry

    if not (SHIPPED / f"{BROKEN}.safetensors").exists():
        pytest.skip("infnet-compact weights not shipped")
    folder = tmp_path / "weights"
    shutil.copytree(SHIPPED, folder)
    garbage = b"not a safetensors file" * 100
    (folder / f"{BROKEN}.safetensors").write_bytes(garbage)
    expected = "sha256 mismatch"
    if request.param == "unreadable":
        sidecar = folder / f"{BROKEN}.json"
        meta = json.loads(sidecar.read_text())
        meta["sha256"] = hashlib.sha256(garbage).hexdigest()
        sidecar.write_text(json.dumps(meta))
        expected = "SafetensorError"
    elif request.param == "missing":
        (folder / f"{BROKEN}.safetensors").unlink()
        expected = f"{BROKEN}.safetensors missing"
    monkeypatch.setattr(models.registry, "WEIGHTS_DIR", folder)
    return expected


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> list[Path]:
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=128, cols=128, slices=24, pixel_spacing=2.8, slice_spacing=10.0, seed=6)
    return write_phantom_study(phantom, tmp_path_factory.mktemp("phantom") / "study")


def test_auto_is_infnet_when_its_weights_load():
    if not (SHIPPED / f"{BROKEN}.safetensors").exists():
        pytest.skip("infnet-compact weights not shipped")
    from node.config import ProcessingSettings

    assert ProcessingSettings().engine == "auto"
    choice = build_engine("auto", device="cpu")
    assert choice.engine.identity.name == "infnet" and choice.fallback == ""


def test_auto_falls_back_to_threshold_with_a_warning(broken_weights):
    with captured_logs(logging.WARNING) as logs:
        choice = build_engine("auto", device="cpu")
    assert isinstance(choice.engine, ThresholdEngine)
    assert broken_weights in choice.fallback and "Inf-Net engine" in choice.fallback
    assert "threshold engine was used instead" in choice.fallback
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert choice.fallback in warnings


def test_infnet_asked_for_by_name_is_an_error(broken_weights):
    with pytest.raises(EngineUnavailable, match=broken_weights):
        build_engine("infnet", device="cpu")


def _text_values(items) -> list[str]:
    out = []
    for item in items:
        if "TextValue" in item:
            out.append(str(item.TextValue))
        if "ContentSequence" in item:
            out += _text_values(item.ContentSequence)
    return out


def test_the_fallback_is_in_the_result_and_the_sr(broken_weights, phantom_files):
    from node.processing import analyse

    analysis = analyse(phantom_files, engine="auto", engine_options={"device": "cpu"})
    assert analysis.status == "done", analysis.reason
    assert analysis.pipeline.engine.name == "threshold"
    assert broken_weights in analysis.engine_fallback
    assert analysis.engine_fallback in analysis.pipeline.notes
    assert analysis.engine_fallback in _text_values(analysis.sr.ContentSequence)


def _claimed_job(settings, files: list[Path]) -> tuple[int, int]:
    """Record ``files`` as received instances of one study and claim its job, as the node does."""
    from pydicom import dcmread

    from node.db import open_database
    from node.registry import ReceivedInstance, claim_next_job, mark_stable_studies_ready, record_instance

    sessions = open_database(settings.storage.database_url)
    with sessions.begin() as session:
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            record_instance(session, ReceivedInstance(
                study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(path), size=path.stat().st_size,
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(), modality=ds.Modality))
    with sessions.begin() as session:
        mark_stable_studies_ready(session, 0.0)
        job = claim_next_job(session, lease_s=600, owner="test/1/a")
        return job.id, job.attempts


@pytest.mark.parametrize("engine", ["auto", "infnet"])
def test_the_worker_records_the_fallback_or_fails(tmp_path, broken_weights, phantom_files, engine):
    """In the worker: "auto" completes the job with the threshold engine and an ``engine_fallback`` audit
    event; "infnet" fails the job with the reason."""
    from sqlalchemy import select

    from node.db import open_database
    from node.db.schema import Event, Job
    from node.worker import process_job
    from tests.nodes import make_settings

    settings = make_settings(tmp_path, processing={"engine": engine, "device": "cpu"})
    job_id, attempt = _claimed_job(settings, phantom_files)
    state = process_job(settings, job_id, attempt)
    with open_database(settings.storage.database_url, migrate=False)() as session:
        job = session.get(Job, job_id)
        events = session.scalars(select(Event.detail).where(Event.kind == "engine_fallback")).all()
        if engine == "auto":
            assert state == "done" and job.result.engine_name == "threshold"
            [detail] = events
            assert broken_weights in detail and detail in job.result.decisions["notes"]
        else:
            assert state == "failed" and not events
            assert job.reason.startswith("EngineUnavailable: the Inf-Net engine could not be loaded")
            assert broken_weights in job.reason
