"""Smoke tests of the real-peer harness (tests/peers.py) and of deploy/'s Orthanc routing.

Each test drives a real external tool (DCMTK, Orthanc, dciodvfy) against a small
pynetdicom peer started here, so a failure points at the harness or the tool, not at
ctnode.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from tests import peers

pytestmark = pytest.mark.peer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@dataclass
class PynetdicomSCP:
    """A pynetdicom Storage + Verification SCP on a free loopback port (own thread)."""

    aet: str = "CTNODE"
    port: int = field(default_factory=peers.free_port)
    received: list[pydicom.Dataset] = field(default_factory=list)
    syntaxes: list[str] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._cond:
            self.received.append(ds)
            self.syntaxes.append(str(event.context.transfer_syntax))
            self.callers.append(event.assoc.requestor.ae_title)
            self._cond.notify_all()
        return 0x0000

    def wait_for(self, n: int, timeout: float = 15) -> list[pydicom.Dataset]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.received) >= n, timeout), (
                f"{len(self.received)}/{n} instances received")
            return list(self.received)


@pytest.fixture
def scp() -> Iterator[PynetdicomSCP]:
    node = PynetdicomSCP()
    ae = AE(node.aet)
    for ctx in AllStoragePresentationContexts:
        ae.add_supported_context(ctx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", node.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, node._on_store)])
    try:
        yield node
    finally:
        server.shutdown()


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    path = tmp_path / "ct.dcm"
    peers.write_small_ct(path)
    return path


def test_require_peer_resolves_dcmtk_not_pynetdicom_scripts() -> None:
    for tool in ("storescu", "storescp", "echoscu"):
        path = peers.require_peer(tool)
        assert "pyenv" not in path and "site-packages" not in path, path


def test_echoscu_against_pynetdicom(scp: PynetdicomSCP) -> None:
    res = peers.echoscu("127.0.0.1", scp.port, called_aet=scp.aet)
    assert res.returncode == 0, res.stdout


def test_storescu_sends_ct_and_compressed_in_own_syntax(
        scp: PynetdicomSCP, ct_file: Path, tmp_path: Path) -> None:
    j2k_dir = tmp_path / "j2k"
    j2k_dir.mkdir()
    study = pydicom.dcmread(ct_file).StudyInstanceUID
    for i in (1, 2):
        peers.write_small_ct(j2k_dir / f"{i}.dcm", study_uid=study, instance_number=i, size=64,
                             transfer_syntax=JPEG2000Lossless)

    res = peers.storescu("127.0.0.1", scp.port, [ct_file, j2k_dir], calling_aet="MODALITY",
                         called_aet=scp.aet)

    assert res.returncode == 0, res.stdout
    got = scp.wait_for(3)
    assert {ds.StudyInstanceUID for ds in got} == {study}
    assert sorted(scp.syntaxes) == sorted(["1.2.840.10008.1.2.1", JPEG2000Lossless, JPEG2000Lossless])
    assert set(scp.callers) == {"MODALITY"}


def test_storescp_receives_from_pynetdicom(ct_file: Path) -> None:
    ds = pydicom.dcmread(ct_file)
    with peers.StoreSCP("PACS") as pacs:
        ae = AE("CTNODE")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title=pacs.aet)
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000
        [path] = pacs.wait_for(1, timeout=10)
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def test_storescp_refusing_mode(ct_file: Path) -> None:
    with peers.StoreSCP("PACS", mode="refuse") as pacs:
        res = peers.storescu("127.0.0.1", pacs.port, ct_file, called_aet=pacs.aet)
        assert res.returncode != 0
        assert pacs.received_files() == []


def test_dciodvfy_accepts_small_ct(ct_file: Path) -> None:
    errors, warnings = peers.dciodvfy(ct_file)
    assert errors == [], errors
    assert warnings == [], warnings


def test_orthanc_upload_list_and_send(scp: PynetdicomSCP, ct_file: Path) -> None:
    with peers.Orthanc(modalities={"ctnode": (scp.aet, "127.0.0.1", scp.port)}) as orthanc:
        up = orthanc.upload(ct_file)
        assert up["Status"] == "Success"
        assert orthanc.studies() == [up["ParentStudy"]]
        [series] = orthanc.study_series(up["ParentStudy"])
        assert series["MainDicomTags"]["Modality"] == "CT"
        study_uid = orthanc.instance_tags(up["ID"])["StudyInstanceUID"]
        assert orthanc.find_series_by_modality(study_uid, "CT")[0]["ID"] == series["ID"]

        res = orthanc.send_to_modality("ctnode", up["ParentStudy"])

        assert res["InstancesCount"] == 1 and res["FailedInstancesCount"] == 0
        [ds] = scp.wait_for(1)
        assert ds.StudyInstanceUID == study_uid
        assert scp.callers == ["ORTHANC"]


def test_deploy_lua_routes_stable_ct_study_once(scp: PynetdicomSCP, ct_file: Path,
                                                tmp_path: Path) -> None:
    """deploy/orthanc.json + orthanc-route-ct.lua: a stable CT study goes to "ctnode"
    once; results stored back into the study do not trigger a second send."""
    config = json.loads((DEPLOY / "orthanc.json").read_text())
    config["DicomModalities"]["ctnode"].update(AET=scp.aet, Port=scp.port)
    config["LuaScripts"] = [str(DEPLOY / "orthanc-route-ct.lua")]
    config["StableAge"] = 1
    with peers.Orthanc(extra_config=config) as orthanc:
        up = orthanc.upload(ct_file)
        [ds] = scp.wait_for(1)
        assert ds.Modality == "CT"

        # The node's answer comes back by C-STORE into the same study.
        sr = pydicom.dcmread(ct_file)
        sr.Modality, sr.SeriesInstanceUID = "SR", generate_uid()
        sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        sr.save_as(tmp_path / "result.dcm")
        res = peers.storescu("127.0.0.1", orthanc.dicom_port, tmp_path / "result.dcm",
                             calling_aet=scp.aet, called_aet=orthanc.aet)
        assert res.returncode == 0, res.stdout
        deadline = time.monotonic() + 15
        while not orthanc.study(up["ParentStudy"])["IsStable"]:
            assert time.monotonic() < deadline, "study never became stable again"
            time.sleep(0.2)
        time.sleep(1.0)  # let the Lua callback for the second stable event run
        assert len(scp.received) == 1, "CT series was routed twice"
