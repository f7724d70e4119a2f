"""Security helpers: TLS contexts for the listener and for exports, peer checks, PHI-safe UID references for log lines.

Nothing here logs a patient identifier. UIDs, where a log line needs to tell two objects apart, are
written as a short hash (:func:`uid_ref`): enough to correlate with the database (which holds the UID),
useless to someone who only reads the log.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from node.config import Destination, NodeSettings, TLSSettings

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when ``[tls] enabled = false``."""
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    if tls.crl_file:
        ctx.load_verify_locations(cafile=tls.crl_file)  # PEM CRLs load like certificates
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else (
        ssl.CERT_OPTIONAL if tls.ca_file else ssl.CERT_NONE)
    return ctx


def client_ssl_context(dest: Destination) -> ssl.SSLContext | None:
    """TLS context towards ``dest`` (server certificate and host name always verified), or None."""
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_cert_file:
        ctx.load_cert_chain(dest.tls_cert_file, dest.tls_key_file)
    return ctx


def client_tls_args(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for :meth:`pynetdicom.AE.associate`."""
    ctx = client_ssl_context(dest)
    return None if ctx is None else (ctx, dest.tls_server_name or dest.host)


def peer_allowed(node: NodeSettings, calling_aet: str, address: str) -> bool:
    """Whether ``calling_aet`` may connect from ``address`` under ``node.allowed_peers``.

    AE titles without a binding are not restricted here (``allowed_calling_aets`` decides about them).
    """
    bindings = node.peer_bindings().get(calling_aet.strip())
    if not bindings:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(b, strict=False) for b in bindings)


def uid_ref(uid: object) -> str:
    """A short, stable, non-reversible reference to a UID for log lines (``uid#1a2b3c4d``)."""
    return "uid#" + hashlib.sha256(str(uid).encode()).hexdigest()[:8]


def restrict_sqlite_files(database_url: str) -> None:
    """chmod 0600 the SQLite database file and its WAL/SHM companions (no-op for other databases)."""
    if not database_url.startswith("sqlite:///") or database_url.startswith("sqlite:///:memory:"):
        return
    base = Path(database_url.removeprefix("sqlite:///"))
    for path in (base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm")):
        try:
            os.chmod(path, 0o600)
        except FileNotFoundError:
            pass
