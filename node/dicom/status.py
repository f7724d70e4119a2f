"""C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4.2.1.4), association rejection reasons (PS3.8 9.3.4) and the
reasons a connection is dropped, as they appear in the audit log."""
from __future__ import annotations

from enum import Enum, IntEnum

from pydicom.dataset import Dataset

ERROR_COMMENT_MAX = 64  # ErrorComment is LO: 64 characters at most


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    COERCION_OF_DATA_ELEMENTS = 0xB000        # warning: stored
    ELEMENTS_DISCARDED = 0xB006               # warning: stored
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007  # warning: stored


#: Statuses with which a peer has stored the instance (success and the C-STORE warnings).
STORED = frozenset({StoreStatus.SUCCESS, StoreStatus.COERCION_OF_DATA_ELEMENTS, StoreStatus.ELEMENTS_DISCARDED,
                    StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS})


def status_dataset(code: int, comment: str) -> Dataset:
    """A C-STORE response status with its ErrorComment (cut to the VR's length)."""
    ds = Dataset()
    ds.Status = int(code)
    ds.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return ds


#: A-ASSOCIATE-RJ (source, diagnostic) -> why, for the audit log (PS3.8 9.3.4)
REJECT_REASONS = {
    (1, 3): "calling AE title not allowed (node.allowed_calling_aets / node.allowed_peers)",
    (1, 7): "called AE title is not this node's",
    (3, 2): "too many associations (node.max_associations)",
    (3, 1): "temporary congestion",
    (2, 1): "ACSE: no reason given (user identity?)",
}


class DropReason(Enum):
    """Why the transport guard closed a connection (the start of the ``connection_dropped`` event's detail)."""

    PEER_NOT_ALLOWED = "peer address not allowed (node.allowed_peers / node.allowed_calling_aets)"
    TOO_MANY_FROM_PEER = "too many connections from this address (node.max_associations_per_peer)"
    SILENT = "no A-ASSOCIATE-RQ within node.acse_timeout"
    ASSOCIATE_TOO_SLOW = "A-ASSOCIATE-RQ not complete within node.acse_timeout"
    PDU_TOO_SLOW = "PDU not complete within node.network_timeout"
    ASSOCIATE_TOO_LONG = "A-ASSOCIATE-RQ longer than allowed"
    PDU_TOO_LONG = "PDU longer than the maximum PDU size"
    UNKNOWN_PDU = "unknown or unexpected PDU type"
    UNKNOWN_CONTEXT = "P-DATA for a presentation context not negotiated"
    MALFORMED_PDU = "malformed PDU"
