"""The DICOMweb transport: result files sent by STOW-RS (PS3.18 10.5) with ``dicomweb-client``, one request
per batch, and the HTTP answer mapped to one outcome per instance.

=====================  =========================================================================================
HTTP status            outcome of each instance
=====================  =========================================================================================
200 OK                 stored (a WarningReason in its ReferencedSOPSequence item is kept as a warning)
202 Accepted           the response dataset decides: stored if in ReferencedSOPSequence (with its WarningReason),
                       failed if in FailedSOPSequence (its FailureReason, see below), transient failure if in
                       neither (not confirmed)
400, 409, 413, 415     permanent failure: the destination rejected the request itself; not sent again until
                       ``ctnode jobs retry`` (a FailureReason given for the instance decides instead, see below)
other statuses         transient failure (401/403/404: configuration; 408/429/5xx: load): retried with backoff
connection errors      transient failure (TLS errors included)
=====================  =========================================================================================

A FailureReason of the "out of resources" family (0xA7xx) or "processing failure" (0x0110) is transient;
any other (SOP class not supported, data set does not match, cannot understand...) is permanent.
The library's own HTTP retries are off: the outbox retries, with its backoff and audit events.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread

from node.config import Destination, HttpAuth, Settings
from node.dicom.status import StoreStatus
from node.exporters.outcome import SendOutcome, all_failed

#: Every instance stored.
ALL_STORED = HTTPStatus.OK
#: Some stored, some failed or with warnings: the response dataset says which.
PARTIAL = HTTPStatus.ACCEPTED
#: The destination rejected the request itself: sending it again cannot help.
PERMANENT_STATUSES = frozenset({HTTPStatus.BAD_REQUEST, HTTPStatus.CONFLICT, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                HTTPStatus.UNSUPPORTED_MEDIA_TYPE})
#: FailureReason (0008,1197) values worth another try: "refused: out of resources" (0xA7xx) and "processing
#: failure" (0x0110).
TRANSIENT_REASON_MASK, TRANSIENT_REASON_FAMILY = 0xFF00, 0xA700
PROCESSING_FAILURE = 0x0110
#: Send the whole request with a Content-Length: dicomweb-client switches to chunked transfer encoding above
#: its chunk size, which not every DICOMweb server accepts.
NO_CHUNKING = sys.maxsize
DICOM_JSON = "application/dicom+json"

# dicomweb-client's retry decorator logs every failed request with a traceback at WARNING, even with its
# retries off; the outbox logs each failure once, with its outcome.
logging.getLogger("retrying").setLevel(logging.ERROR)


def reason_text(code: int) -> str:
    """``0xA700 (OUT_OF_RESOURCES)`` or ``0x0124`` for a FailureReason / WarningReason code."""
    try:
        return f"0x{code:04X} ({StoreStatus(code).name})"
    except ValueError:
        return f"0x{code:04X}"


def failure_is_transient(reason: int) -> bool:
    return reason & TRANSIENT_REASON_MASK == TRANSIENT_REASON_FAMILY or reason == PROCESSING_FAILURE


def _by_uid(response: Dataset, sequence: str, reason: str) -> dict[str, int | None]:
    """{Referenced SOP Instance UID: its ``reason`` code or None} of the items of ``sequence``."""
    out: dict[str, int | None] = {}
    for item in response.get(sequence, []):
        uid = item.get("ReferencedSOPInstanceUID")
        if uid:
            value = item.get(reason)
            out[str(uid)] = None if value is None else int(value)
    return out


def outcomes(status: int, response: Dataset, sop_instance_uids: Sequence[str]) -> list[SendOutcome]:
    """One outcome per instance of a STOW-RS request from the HTTP ``status`` and the response dataset
    (empty when the server sent none), in the order of ``sop_instance_uids`` (the module's table)."""
    failed = _by_uid(response, "FailedSOPSequence", "FailureReason")
    stored = _by_uid(response, "ReferencedSOPSequence", "WarningReason")
    label = f"STOW-RS HTTP {status}"
    out = []
    for uid in sop_instance_uids:
        if uid in failed:
            reason = failed[uid]
            if reason is None:
                out.append(SendOutcome(False, f"{label}: failed (no FailureReason)",
                                       permanent=status in PERMANENT_STATUSES))
            else:
                out.append(SendOutcome(False, f"{label}: FailureReason {reason_text(reason)}",
                                       permanent=not failure_is_transient(reason)))
        elif status in PERMANENT_STATUSES:
            out.append(SendOutcome(False, f"{label} {HTTPStatus(status).phrase}: rejected", permanent=True))
        elif status == ALL_STORED or (status == PARTIAL and uid in stored):
            warning = stored.get(uid)
            out.append(SendOutcome(True, warning="" if warning is None else f"WarningReason {reason_text(warning)}"))
        elif status == PARTIAL:
            out.append(SendOutcome(False, f"{label}: the instance is in neither ReferencedSOPSequence nor "
                                          "FailedSOPSequence (not confirmed)"))
        else:
            out.append(SendOutcome(False, f"{label} {_phrase(status)}"))
    return out


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def session(dest: Destination) -> requests.Session:
    """An HTTP session towards ``dest``: its authentication and TLS settings (certificate verification on
    unless ``tls_verify = false``; ``tls_ca_file``, else the CA bundle of ``certifi``).

    Only the destination's configuration counts: the environment (``REQUESTS_CA_BUNDLE``, which requests
    would let override ``tls_ca_file``; ``~/.netrc`` credentials; proxy variables) is not used."""
    s = requests.Session()
    s.trust_env = False
    if dest.auth == HttpAuth.BASIC:
        s.auth = requests.auth.HTTPBasicAuth(dest.username, dest.secret)
    elif dest.auth == HttpAuth.BEARER:
        s.headers["Authorization"] = f"Bearer {dest.secret}"
    s.verify = (dest.tls_ca_file or True) if dest.tls_verify else False
    if dest.tls_cert_file:
        s.cert = (dest.tls_cert_file, dest.tls_key_file)
    s.headers["Accept"] = DICOM_JSON
    return s


def client(settings: Settings, dest: Destination, http: requests.Session) -> DICOMwebClient:
    """A DICOMweb client of ``dest`` over ``http`` (:func:`session`), without the library's own retries."""
    web = DICOMwebClient(dest.url.rstrip("/"), session=http, chunk_size=NO_CHUNKING,
                         timeout=settings.export.timeout)
    web.set_http_retry_params(retry=False)
    return web


def _error_dataset(response: requests.Response) -> Dataset:
    """The DICOM JSON dataset of an error answer, or an empty one (no body, another format)."""
    if "json" not in response.headers.get("Content-Type", ""):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except Exception:  # any JSON that is not a DICOM JSON dataset (e.g. a server's own error object)
        return Dataset()


def send_files(settings: Settings, dest: Destination, paths: list[Path]) -> list[SendOutcome]:
    """STOW-RS ``paths`` to ``dest`` in one request; one outcome per path, in order."""
    datasets = [dcmread(p) for p in paths]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    statuses: list[int] = []  # the library returns the response dataset only: the status comes from a hook
    http = session(dest)
    http.hooks["response"].append(lambda response, *args, **kwargs: statuses.append(response.status_code))
    try:
        answer = client(settings, dest, http).store_instances(datasets)
    except requests.HTTPError as exc:
        if exc.response is None:
            return all_failed(len(paths), f"STOW-RS: {exc}")
        return outcomes(exc.response.status_code, _error_dataset(exc.response), uids)
    except requests.exceptions.SSLError as exc:
        return all_failed(len(paths), f"TLS: {exc} (check the server certificate, tls_ca_file)")
    except requests.RequestException as exc:
        return all_failed(len(paths), f"{type(exc).__name__}: {exc}")
    finally:
        http.close()
    return outcomes(statuses[-1], answer, uids)
