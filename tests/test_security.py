"""Security: who may associate (calling AE, peer address, called AE), DICOM TLS (listener and exports),
PHI kept out of logs, file permissions, no hand-formatted SQL."""
from __future__ import annotations

import logging
import re
import ssl
import stat
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from node.config import ConfigError, load_settings
from node.db import open_database
from node.db.schema import Event, Instance
from node.demo import free_port
from node.export import send_files
from node.exporters.cstore import echo
from node.listener import Listener
from tests.builders import ct_slice, write
from tests.nodes import make_settings
from tests.tls_ca import client_ctx, tls_node

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def start_listener(tmp_path, **sections):
    settings = make_settings(tmp_path, **sections)
    lst = Listener(settings, open_database(settings.storage.database_url))
    lst.start()
    return lst


@pytest.fixture
def make_listener(tmp_path):
    started = []

    def make(**sections):
        lst = start_listener(tmp_path, **sections)
        started.append(lst)
        return lst
    yield make
    for lst in started:
        lst.stop()


def associate(port, calling="SENDER", called="CTNODE", tls=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)


def wait_events(lst, kind, n=1, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        with lst.sessions() as s:
            rows = list(s.scalars(select(Event).where(Event.kind == kind)))
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# -- association gate ------------------------------------------------------------------------------------

def test_called_aet_must_be_ours(make_listener):
    lst = make_listener(node={"allowed_calling_aets": ["SENDER"]})
    assoc = associate(lst.port, called="SOMEBODY")
    assert not assoc.is_established and assoc.is_rejected
    [row] = wait_events(lst, "association_rejected")
    assert row.calling_aet == "SENDER" and row.peer.startswith("127.0.0.1:")
    assert "called AE title SOMEBODY is not CTNODE" in row.detail


def test_unknown_calling_aet_rejected_with_reason(make_listener):
    lst = make_listener(node={"allowed_calling_aets": ["SENDER"]})
    assert not associate(lst.port, calling="INTRUDER").is_established
    [row] = wait_events(lst, "association_rejected")
    assert row.calling_aet == "INTRUDER" and "calling AE title not allowed" in row.detail


def test_peer_address_binding(make_listener):
    lst = make_listener(node={"allowed_peers": ["SENDER@10.9.9.9", "LOCAL@127.0.0.0/8"]})
    assoc = associate(lst.port, calling="SENDER")  # right AE title, wrong address
    assert not assoc.is_established and assoc.is_rejected
    [row] = wait_events(lst, "association_rejected")
    assert row.calling_aet == "SENDER" and row.peer.startswith("127.0.0.1:")
    assert "not allowed from 127.0.0.1" in row.detail
    assoc = associate(lst.port, calling="LOCAL")  # bound to loopback: accepted
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    # Bound AE titles form the allow-list: an unlisted AE title is rejected too
    assert not associate(lst.port, calling="OTHER").is_established


def test_allowed_peers_validation(tmp_path):
    for bad in (["ORTHANC"], ["ORTHANC@pacs.example.org"], ["@10.0.0.1"], ["THIS-AE-TITLE-IS-TOO-LONG@10.0.0.1"]):
        with pytest.raises(ConfigError, match="^node.allowed_peers"):
            make_settings(tmp_path, node={"allowed_peers": bad})
    s = load_settings(env={"CTNODE_NODE_ALLOWED_PEERS": "ORTHANC@10.0.0.5, ORTHANC@10.0.1.0/24, CT1@::1"})
    assert s.node.peer_bindings() == {"ORTHANC": ["10.0.0.5", "10.0.1.0/24"], "CT1": ["::1"]}


def test_production_example_rejects_unknown_callers(tmp_path):
    path = REPO / "config" / "node.production.toml"
    # the example's certificate paths do not exist here: TLS and destinations are checked by the TLS tests
    raw = load_settings(path, env={}, overrides={"tls": {"enabled": False, "require_client_cert": False},
                                                 "destinations": []})
    assert raw.node.effective_calling_aets(), "the production example must have an allow-list"
    assert raw.node.require_called_aet
    text = path.read_text()
    assert re.search(r"(?m)^enabled\s*=\s*true", text) and re.search(r"(?m)^require_client_cert\s*=\s*true", text)
    # the same file with test paths: an unknown caller is rejected, a bound caller from loopback accepted
    settings = load_settings(path, env={}, overrides={
        "node": {"port": 0, "host": "127.0.0.1", "allowed_peers": [*raw.node.allowed_peers, "SENDER@127.0.0.1"]},
        "tls": {"enabled": False, "require_client_cert": False}, "destinations": [],
        "storage": {"spool_dir": str(tmp_path / "spool"), "results_dir": str(tmp_path / "results"),
                    "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}"}})
    lst = Listener(settings, open_database(settings.storage.database_url))
    lst.start()
    try:
        assert not associate(lst.port, calling="INTRUDER").is_established
        assert wait_events(lst, "association_rejected")[0].calling_aet == "INTRUDER"
        assoc = associate(lst.port, calling="SENDER")
        assert assoc.is_established
        assoc.release()
    finally:
        lst.stop()


# -- TLS -------------------------------------------------------------------------------------------------

def test_mutual_tls_store_succeeds_with_a_valid_client_certificate(make_listener, pki):
    lst = make_listener(node={"allowed_calling_aets": ["SENDER"]}, tls=tls_node(pki))
    assoc = associate(lst.port, tls=(client_ctx(pki), "localhost"))
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ct_slice()).Status == 0x0000
    finally:
        assoc.release()
    with lst.sessions() as s:
        assert s.scalars(select(Instance)).one()


@pytest.mark.parametrize("how", ["no client certificate", "certificate from another CA", "plain TCP"])
def test_mutual_tls_refuses_clients_without_a_valid_certificate(make_listener, pki, how):
    lst = make_listener(node={"allowed_calling_aets": ["SENDER"]}, tls=tls_node(pki))
    tls = {"no client certificate": (client_ctx(pki, cert=False), "localhost"),
           "certificate from another CA": (client_ctx(pki, rogue=True), "localhost"),
           "plain TCP": None}[how]
    assoc = associate(lst.port, tls=tls)
    assert not assoc.is_established
    failures = wait_events(lst, "tls_handshake_failed")  # audited with the peer address
    assert len(failures) == 1 and failures[0].peer.startswith("127.0.0.1:") and failures[0].detail
    with lst.sessions() as s:
        assert not list(s.scalars(select(Event).where(Event.kind == "association_accepted")))


def test_revoked_client_certificate_is_refused_and_a_new_crl_applies_without_restart(make_listener, pki, tmp_path):
    from tests.tls_ca import issue_client, write_crl

    revoked, kept = issue_client(pki, tmp_path, "SENDER"), issue_client(pki, tmp_path, "SENDER")
    crl = write_crl(pki, [revoked[0]], tmp_path / "ca.crl")
    lst = make_listener(node={"allowed_calling_aets": ["SENDER"]}, tls={**tls_node(pki), "crl_file": str(crl)})

    def ctx(cert_and_key):
        c = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        c.load_cert_chain(*map(str, cert_and_key))
        return c

    assert not associate(lst.port, tls=(ctx(revoked), "localhost")).is_established
    failures = wait_events(lst, "tls_handshake_failed")
    assert len(failures) == 1 and "revoked" in failures[0].detail.lower()
    assoc = associate(lst.port, tls=(ctx(kept), "localhost"))
    assert assoc.is_established
    assoc.release()
    # the CA revokes the second certificate too: the refreshed file takes effect at the next connection
    time.sleep(0.01)
    write_crl(pki, [revoked[0], kept[0]], crl)
    assert not associate(lst.port, tls=(ctx(kept), "localhost")).is_established
    assert len(wait_events(lst, "tls_handshake_failed", n=2)) == 2


def test_client_refuses_a_server_it_cannot_verify(make_listener, pki):
    lst = make_listener(tls=tls_node(pki, mutual=False))
    assert not associate(lst.port, tls=(client_ctx(pki, cert=False, ca=pki.other_ca), "localhost")).is_established
    assoc = associate(lst.port, tls=(client_ctx(pki, cert=False), "localhost"))  # server-only TLS: fine
    assert assoc.is_established
    assoc.release()


def test_tls_config_is_validated(tmp_path, pki):
    with pytest.raises(ConfigError, match="^tls.crl_file"):
        make_settings(tmp_path, tls={**tls_node(pki, mutual=False), "crl_file": str(pki.ca)})
    with pytest.raises(ConfigError, match="^tls.crl_file"):
        make_settings(tmp_path, tls={**tls_node(pki), "crl_file": str(tmp_path / "missing.crl")})
    with pytest.raises(ConfigError, match="^tls.cert_file"):
        make_settings(tmp_path, tls={"enabled": True})
    with pytest.raises(ConfigError, match="^tls.key_file"):
        make_settings(tmp_path, tls={**tls_node(pki), "key_file": str(tmp_path / "missing.key")})
    with pytest.raises(ConfigError, match="^tls.require_client_cert"):
        make_settings(tmp_path, tls={"require_client_cert": True})
    with pytest.raises(ConfigError, match=r"^destinations\[0\].tls_cert_file"):
        make_settings(tmp_path, destinations=[{"name": "p", "ae_title": "P", "host": "h", "port": 1,
                                               "tls": True, "tls_cert_file": str(pki.client_cert)}])


def test_export_over_mutual_tls(tmp_path, pki):
    received = []

    def on_store(event):
        received.append(event.encoded_dataset())
        return 0x0000

    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    scp.add_supported_context(Verification)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server_ctx.load_verify_locations(cafile=str(pki.ca))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": True,
                "tls_ca_file": str(pki.ca), "tls_cert_file": str(pki.client_cert),
                "tls_key_file": str(pki.client_key)}
        settings = make_settings(tmp_path, destinations=[dest])
        path = write(ct_slice(), tmp_path / "out")
        [outcome] = send_files(settings, settings.destinations[0], [path])
        assert outcome.ok, outcome.error
        assert len(received) == 1
        assert echo(settings, settings.destinations[0]).ok
        # without the client certificate the PACS refuses the handshake: a retryable failure, not a crash
        no_cert = make_settings(tmp_path, destinations=[{k: v for k, v in dest.items()
                                                         if k not in ("tls_cert_file", "tls_key_file")}])
        [outcome] = send_files(no_cert, no_cert.destinations[0], [path])
        assert not outcome.ok and "TLS" in outcome.error
        # plain TCP to the TLS port fails the same way
        plain = make_settings(tmp_path, destinations=[{**dest, "tls": False}])
        [outcome] = send_files(plain, plain.destinations[0], [path])
        assert not outcome.ok
        assert len(received) == 1
    finally:
        server.shutdown()


# -- PHI and files ---------------------------------------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def test_no_patient_identifiers_in_logs(make_listener, monkeypatch):
    lst = make_listener(node={"allowed_calling_aets": ["SENDER"]})
    name, pid, acc = "Zebracorn^Quintessa", "PID-99887766", "ACC-55443322"
    good = ct_slice()
    good.PatientName, good.PatientID, good.AccessionNumber = name, pid, acc
    refused = ct_slice(modality="MR")
    refused.PatientName, refused.PatientID, refused.AccessionNumber = name, pid, acc
    sneaky = ct_slice()  # a sender that puts the name where a code string belongs (pydicom logs invalid values)
    sneaky.Modality = "Zebracorn"
    sneaky.PatientName = name
    handler = _Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        assoc = associate(lst.port)
        statuses = [assoc.send_c_store(ds).Status for ds in (good, refused, sneaky)]
        assoc.release()
        assert statuses == [0x0000, 0xA900, 0xA900]
        from sqlalchemy.exc import OperationalError

        def broken(session, inst):  # a database error message that would carry the SQL parameters
            raise OperationalError("INSERT INTO studies (patient_id) VALUES (?)", (pid, acc), Exception("locked"))
        monkeypatch.setattr("node.listener.record_instance", broken)
        failed = ct_slice()
        failed.PatientName, failed.PatientID, failed.AccessionNumber = name, pid, acc
        assoc = associate(lst.port)
        assert assoc.send_c_store(failed).Status == 0xA700
        assoc.release()
        assert not associate(lst.port, calling="INTRUDER").is_established
        wait_events(lst, "association_rejected")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = "\n".join(handler.lines)
    assert "instance refused" in text and "database error" in text  # the log did capture the events
    for secret in ("Zebracorn", "Quintessa", pid, acc, good.SOPInstanceUID, refused.SOPInstanceUID,
                   failed.SOPInstanceUID, good.StudyInstanceUID):
        assert secret not in text, f"{secret!r} leaked into the log"


def test_spool_and_database_permissions(tmp_path):
    from node.service import Node

    settings = make_settings(tmp_path, node={"allowed_calling_aets": ["SENDER"]})
    node = Node(settings)
    db = Path(settings.storage.database_url.removeprefix("sqlite:///"))
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if extra.exists():
            assert stat.S_IMODE(extra.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.spool_dir.stat().st_mode) == 0o700
    node.listener.start()
    try:
        ds = ct_slice()
        assoc = associate(node.listener.port)
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    finally:
        node.listener.stop()
    with node.sessions() as s:
        path = node.settings.files.spool_file(s.scalars(select(Instance)).one().path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, path.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_sql_is_never_formatted_by_hand():
    """Every query goes through SQLAlchemy expressions with bound parameters."""
    pattern = re.compile(r"""(text|execute|exec_driver_sql)\(\s*(f["']|["'][^"']*["']\s*(%|\.format))"""
                         r"""|\b(SELECT|INSERT|UPDATE|DELETE)\b[^\n]*["']\s*(%|\+|\.format)""", re.I)
    offenders = []
    for path in (REPO / "node").rglob("*.py"):
        if "migrations" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_pydicom_value_messages_are_redacted():
    from node.logredact import REDACTED, redact_record

    record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1,
                               "Invalid value for VR PN: 'Zebracorn^Quintessa'. Please see ...", None, None)
    redact_record(record)
    assert "Zebracorn" not in record.getMessage() and REDACTED in record.getMessage()
