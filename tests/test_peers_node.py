"""The node with real peers: DCMTK sends and receives, Orthanc is the PACS, dciodvfy checks the objects."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.db.schema import Event, Export, Instance, Job
from node.service import Node
from tests import peers
from tests.nodes import make_settings
from tests.util import wait_for

pytestmark = [pytest.mark.peer, pytest.mark.slow]


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=192, cols=192, slices=48, pixel_spacing=2.0, slice_spacing=6.0, seed=2)
    return write_phantom_study(phantom, tmp_path_factory.mktemp("phantom") / "dicom")


def started_node(tmp_path, dest_aet, dest_port, **processing):
    return started_node_to(tmp_path, {"name": "pacs", "ae_title": dest_aet, "host": "127.0.0.1", "port": dest_port},
                           processing=processing)


def started_node_to(tmp_path, destination, *, processing=None, env=None):
    settings = make_settings(tmp_path, processing=processing or {}, destinations=[destination], env=env)
    node = Node(settings)
    node.start()
    return node


def test_dcmtk_storescu_in_storescp_out(tmp_path, phantom_files):
    peers.require_peer("storescu")
    with peers.StoreSCP(aet="STORESCP") as scp:
        node = started_node(tmp_path, scp.aet, scp.port)
        try:
            echo = peers.echoscu("127.0.0.1", node.listener.port, called_aet="CTNODE")
            assert echo.returncode == 0, echo.stdout
            sent = peers.storescu("127.0.0.1", node.listener.port, phantom_files, called_aet="CTNODE")
            assert sent.returncode == 0, sent.stdout
            files = scp.wait_for(2, timeout=240)
        finally:
            node.stop()
        modalities = sorted(dcmread(f, stop_before_pixels=True).Modality for f in files)
        assert modalities == ["SEG", "SR"]
        with node.sessions() as s:
            assert len(s.scalars(select(Instance)).all()) == len(phantom_files)
            assert s.scalars(select(Job)).one().state == "done"
        for f in files:
            errors, _warnings = peers.dciodvfy(f)
            assert errors == [], f"dciodvfy errors in {dcmread(f, stop_before_pixels=True).Modality}: {errors}"


def test_orthanc_round_trip(tmp_path, phantom_files):
    peers.require_peer("Orthanc")
    with peers.Orthanc(aet="ORTHANC") as orthanc:
        node = started_node(tmp_path, orthanc.aet, orthanc.dicom_port, key_images=2)
        try:
            orthanc.add_modality("ctnode", "CTNODE", "127.0.0.1", node.listener.port)
            ids = [orthanc.upload(p)["ID"] for p in phantom_files]
            study_uid = str(dcmread(phantom_files[0], stop_before_pixels=True).StudyInstanceUID)
            source_series = str(dcmread(phantom_files[0], stop_before_pixels=True).SeriesInstanceUID)
            orthanc.send_to_modality("ctnode", ids)
            seg_series = orthanc.wait_for_series(study_uid, "SEG", timeout=240)
            sr_series = orthanc.wait_for_series(study_uid, "SR", timeout=60)
            key_series = orthanc.wait_for_series(study_uid, "OT", instances=2, timeout=60)
        finally:
            node.stop()
        assert len(seg_series) == 1 and len(sr_series) == 1
        seg_tags = orthanc.instance_tags(seg_series[0]["Instances"][0])
        sr_tags = orthanc.instance_tags(sr_series[0]["Instances"][0])
        assert seg_tags["StudyInstanceUID"] == study_uid == sr_tags["StudyInstanceUID"]
        assert seg_series[0]["MainDicomTags"].get("SeriesDescription")
        seg = dcmread(__import__("io").BytesIO(orthanc.instance_file(seg_series[0]["Instances"][0])))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_series
        sr = dcmread(__import__("io").BytesIO(orthanc.instance_file(sr_series[0]["Instances"][0])))
        referenced_series = {str(item.SeriesInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
        assert source_series in referenced_series
        # key images: one Secondary Capture series of two DERIVED images, each derived from a source CT slice
        assert len(key_series) == 1 and len(key_series[0]["Instances"]) == 2
        assert "DERIVED" in key_series[0]["MainDicomTags"]["SeriesDescription"]
        source_sops = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom_files}
        for instance in key_series[0]["Instances"]:
            sc = dcmread(__import__("io").BytesIO(orthanc.instance_file(instance)))
            assert sc.StudyInstanceUID == study_uid and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
            assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in source_sops
        from node.reports import result_text

        with node.sessions() as s:  # `ctnode results show` lists them, each exported once
            shown = result_text(s, s.scalars(select(Job)).one().id)
        assert shown.count("key image (Secondary Capture, DERIVED)") == 2 and shown.count(": sent,") == 4
        # and what the analysis said about itself, as recorded in the result (here the HU engine's threshold)
        assert "  notes:\n" in shown and "GGO lower bound" in shown


def test_stow_rs_to_orthanc_dicomweb(tmp_path, phantom_files):
    """The node analyses a phantom study from DCMTK and sends its SEG and SR by STOW-RS to Orthanc's DICOMweb
    plugin, logging in with HTTP basic authentication (the password from the environment): Orthanc holds
    exactly those two instances, the same data sets as the node's result files, each exported once."""
    peers.require_peer("storescu")
    with peers.Orthanc(dicomweb=True, users={"ctnode": "stow-secret"}) as orthanc:
        node = started_node_to(tmp_path, {"name": "web", "transport": "stow-rs", "url": orthanc.dicomweb_url,
                                          "auth": "basic", "username": "ctnode", "password_env": "ORTHANC_PASSWORD"},
                               env={"ORTHANC_PASSWORD": "stow-secret"})
        try:
            sent = peers.storescu("127.0.0.1", node.listener.port, phantom_files, called_aet="CTNODE")
            assert sent.returncode == 0, sent.stdout
            study_uid = str(dcmread(phantom_files[0], stop_before_pixels=True).StudyInstanceUID)
            orthanc.wait_for_series(study_uid, "SR", timeout=240)
            wait_for(lambda: len(orthanc.get("/instances")) >= 2, 30, "the SEG and the SR in Orthanc")
        finally:
            node.stop()
        with node.sessions() as s:
            exports = s.scalars(select(Export)).all()
            events = [e.kind for e in s.scalars(select(Event)) if e.kind.startswith("export_")]
        assert sorted((e.state, e.attempts) for e in exports) == [("sent", 1), ("sent", 1)]
        assert events == ["export_sent", "export_sent"]
        stored = {}
        for instance in orthanc.get("/instances"):
            data = orthanc.instance_file(instance)
            stored[str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
        ours = {e.sop_instance_uid: node.settings.files.results_file(e.path) for e in exports}
        assert set(stored) == set(ours)  # exactly the instances sent: no source image, nothing twice
        for uid, path in ours.items():
            sent_ds, stored_ds = dcmread(path), dcmread(io.BytesIO(stored[uid]))
            assert stored_ds.Modality in ("SEG", "SR") and stored_ds == sent_ds
        # and DICOMweb's own query (QIDO-RS) lists them in the study
        qido = orthanc.get(f"/dicom-web/studies/{study_uid}/instances")
        assert {item["00080018"]["Value"][0] for item in qido} == set(ours)


def run_process(path, out, env=None):
    import os

    run = subprocess.run([sys.executable, "-m", "node.cli", "process", str(path), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads((out / "report.json").read_text())


def test_ctnode_process_on_real_slices(tmp_path, shared_data):
    """Real NY-SBU slices through `ctnode process`: an axial chest slice gives a 2D partial result whose SEG,
    SR and key image pass dciodvfy; a coronal reformat and an abdomen slice are skipped with their reasons."""
    ny = shared_data / "dicom" / "ny-sbu"
    chest = run_process(ny / "A002304" / "axial", tmp_path / "chest", env={"CTNODE_PROCESSING_KEY_IMAGES": "1"})
    assert chest["status"] == "done"
    assert chest["scores"]["volumetric"] is False and 0 < chest["scores"]["percent_involved_total"] < 100
    assert set(chest["outputs"]) == {"seg", "sr", "key-1"}
    assert any("single slice: 2D segmentation" in note for note in chest["notes"]), chest["notes"]
    for key in ("seg", "sr", "key-1"):
        errors, _ = peers.dciodvfy(chest["outputs"][key])
        assert errors == [], errors
    coronal = run_process(ny / "A002304" / "coronal", tmp_path / "coronal")
    assert coronal["status"] == "skipped" and all("coronal" in d["reason"] for d in coronal["series"])
    abdomen = run_process(ny / "A027284" / "axial" / "19000925-116.dcm", tmp_path / "abdomen")
    assert abdomen["status"] == "skipped" and "no lung" in abdomen["reason"]


def test_compressed_study_is_stored_as_sent_and_processed(tmp_path):
    """A JPEG 2000 lossless study from DCMTK: spooled byte for byte in its own transfer syntax, then decoded."""
    from pydicom.uid import JPEG2000Lossless

    from node.phantom import make_phantom, write_phantom_study

    peers.require_peer("storescu")
    phantom = make_phantom(rows=160, cols=160, slices=30, pixel_spacing=2.4, slice_spacing=10.0, seed=4)
    files = write_phantom_study(phantom, tmp_path / "j2k", transfer_syntax=JPEG2000Lossless)
    with peers.StoreSCP(aet="STORESCP") as scp:
        node = started_node(tmp_path, scp.aet, scp.port)
        try:
            sent = peers.storescu("127.0.0.1", node.listener.port, files, called_aet="CTNODE")
            assert sent.returncode == 0, sent.stdout
            scp.wait_for(2, timeout=240)
        finally:
            node.stop()
        with node.sessions() as s:
            instances = s.scalars(select(Instance)).all()
            assert s.scalars(select(Job)).one().state == "done"
    assert {i.transfer_syntax_uid for i in instances} == {JPEG2000Lossless}
    originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    for inst in instances:  # the spool holds the dataset exactly as sent (no decode / re-encode)
        spooled = dcmread(node.settings.files.spool_file(inst.path))
        original = dcmread(originals[inst.sop_instance_uid])
        assert spooled.PixelData == original.PixelData
