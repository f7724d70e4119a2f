"""Who may associate: calling AE titles (``node.allowed_calling_aets``), their address bindings
(``node.allowed_peers``) and the called AE title. Used on the raw A-ASSOCIATE-RQ header, before the rest of
the request is read (:mod:`node.dicom.transport`)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from node.config import NodeSettings
from node.dicom.headers import safe_code

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(address: str) -> _IP | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def _in_any(ip: _IP, networks: list[str]) -> bool:
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def peer_allowed(node: NodeSettings, calling_aet: str, address: str) -> bool:
    """Whether ``calling_aet`` may connect from ``address`` under ``node.allowed_peers``.

    AE titles without a binding are not restricted here (``allowed_calling_aets`` decides about them).
    """
    bindings = node.peer_bindings().get(calling_aet.strip())
    if not bindings:
        return True
    ip = _ip(address)
    return ip is not None and _in_any(ip, bindings)


def address_allowed(node: NodeSettings, address: str) -> bool:
    """Whether any allowed caller could connect from ``address``: false only when every allowed calling AE
    title is bound to networks (``node.allowed_peers``) and none of them holds the address. Checked as the
    connection is accepted, before a byte is read."""
    allowed = node.effective_calling_aets()
    bindings = node.peer_bindings()
    if not allowed or any(aet not in bindings for aet in allowed):
        return True  # some caller may come from anywhere
    ip = _ip(address)
    return ip is not None and any(_in_any(ip, networks) for networks in bindings.values())


@dataclass(frozen=True)
class Refused:
    """An A-ASSOCIATE-RJ to send: (result, source, diagnostic) of PS3.8 9.3.4 and why, for the audit log."""

    result: int
    source: int
    diagnostic: int
    why: str


def association_refusal(node: NodeSettings, calling_aet: str, called_aet: str, address: str) -> Refused | None:
    """The rejection for a request from ``calling_aet`` at ``address`` to ``called_aet``, or None to go on.
    The same checks (and rejection codes) pynetdicom applies with ``require_calling_aet`` and
    ``require_called_aet``, plus the address bindings."""
    allowed = node.effective_calling_aets()
    if allowed and calling_aet not in allowed:
        return Refused(1, 1, 3, "calling AE title not allowed (node.allowed_calling_aets / node.allowed_peers)")
    if not peer_allowed(node, calling_aet, address):
        return Refused(1, 1, 3, f"calling AE {calling_aet} not allowed from {address} (node.allowed_peers)")
    if node.require_called_aet and called_aet != node.ae_title.strip():
        called = safe_code(called_aet) if called_aet else "empty"
        return Refused(1, 1, 7, f"called AE title {called} is not {node.ae_title}")
    return None
