"""DICOM TLS: the listener's server context (with its revocation list reloaded when the file changes) and
the client contexts for exports."""
from __future__ import annotations

import logging
import os
import ssl

from node.config import Destination, TLSSettings

log = logging.getLogger(__name__)

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


class ServerContexts:
    """The listener's TLS context, rebuilt when ``tls.crl_file`` changes on disk (a refreshed revocation
    list takes effect for the next connection, without a restart). A CRL file that cannot be loaded keeps
    the previous context and logs an error."""

    def __init__(self, tls: TLSSettings, context: ssl.SSLContext | None):
        self.tls, self.context = tls, context
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.tls.crl_file)
            return st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def current(self) -> ssl.SSLContext | None:
        if self.context is None or not self.tls.crl_file:
            return self.context
        stamp = self._stamp()
        if stamp != self.stamp:
            try:
                self.context = server_ssl_context(self.tls)
                log.info("TLS: revocation list %s reloaded", self.tls.crl_file)
            except (OSError, ssl.SSLError) as exc:
                log.error("TLS: cannot load the revocation list %s (%s); the previous one stays in force",
                          self.tls.crl_file, exc)
            self.stamp = stamp
        return self.context
