"""The listener's connections under pynetdicom's server: socket timeouts and the TLS handshake.

pynetdicom accepts connections with blocking sockets and, with TLS, runs the handshake in the accept loop:
a peer that stops halfway through a PDU would hold its thread forever, and one that opens a TCP connection
to the TLS port and sends nothing would stop the node accepting anyone. :func:`harden` gives each accepted
socket the network timeout and moves the TLS handshake to the connection's own thread, where a failure is
reported (``on_tls_failure``) and the connection closed. It replaces two methods of pynetdicom 3's
``AssociationServer`` (``get_request``, ``process_request_thread``).
"""
from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

from node.dicom.tls import ServerContexts


def harden(server: Any, timeout: float, contexts: ServerContexts,
           on_tls_failure: Callable[[Any, Exception], None]) -> None:
    """Make a stalled or hostile peer cost one thread for at most ``timeout`` seconds (see the module)."""
    original_thread = server.process_request_thread

    def get_request() -> tuple[socket.socket, Any]:
        sock, address = server.socket.accept()
        sock.settimeout(timeout)
        context = contexts.current()
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request_thread(request: Any, address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:
                on_tls_failure(address, exc)
                server.shutdown_request(request)
                return
        original_thread(request, address)

    server.get_request = get_request
    server.process_request_thread = process_request_thread
