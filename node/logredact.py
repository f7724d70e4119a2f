"""PHI-safe logging: every log record of the process is redacted when it is created.

The DICOM libraries put element values into their messages: pydicom's validation warnings quote the value
("Invalid value for VR PN: 'Doe^Jane'"), highdicom's person-name warning quotes the whole PatientName,
highdicom and pynetdicom name data sets by their UIDs. Those messages arrive both through ``logging`` and
through ``warnings``; :func:`install_log_redaction` routes warnings into logging and installs a log record
factory, so every record, whatever logger made it and whatever handler (present or added later) writes it,
is redacted before anyone formats it:

* every message: DICOM UIDs become :func:`~node.security.uid_ref` references (the database holds the UID),
  except the standard's own UIDs (transfer syntaxes, SOP classes: 1.2.840.10008.*);
* messages of other packages than ``node`` (pydicom, highdicom, pynetdicom, ``py.warnings`` ...) and every
  traceback: quoted values are replaced (a DICOM keyword such as "PatientName" is kept, a quoted UID becomes
  its reference), so are the value of
  "Invalid value for VR XX: ..." and the name in highdicom's person-name warning, and what is left is cut to
  :data:`MAX_LIBRARY_MESSAGE` characters. The node's own messages carry no patient values by design.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from pydicom.datadict import tag_for_keyword

from node.security import uid_ref

#: Messages from other packages are cut to this many characters after redaction.
MAX_LIBRARY_MESSAGE = 400
REDACTED = "<redacted>"
#: Logger names whose messages are the node's own (written without patient values).
OWN_LOGGERS = ("node", "models", "training")
#: Root of the UIDs that the DICOM standard itself defines; they identify no one.
STANDARD_UID_ROOT = "1.2.840.10008."

# A UID of five or more numeric components (four would be an IPv4 address).
_UID_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w])")
_STANDARD_UID_RE = re.compile(re.escape(STANDARD_UID_ROOT) + r"\d+(?:\.\d+)*")
# A quoted value, optionally prefixed as bytes; an unterminated quote runs to the end of the message.
_QUOTED_RE = re.compile(r"""(['"])((?:(?!\1)[^\\]|\\.)*)(\1|\Z)""", re.S)
# pydicom: "Invalid value for VR PN: 'Doe^Jane'. Please see <...> for allowed values for each VR."
_VR_VALUE_RE = re.compile(r"(Invalid value for VR \w+: ).*?(?=\. Please see <[^<>]*> for allowed values|\Z)", re.S)
# highdicom: 'The string "Doe Jane" is unlikely to represent the intended person name ...'
_PERSON_NAME_RE = re.compile(r"(The string ).*( is unlikely to represent the intended person name)", re.S)


def _uid(match: re.Match[str]) -> str:
    uid = match.group(0)
    return uid if uid.startswith(STANDARD_UID_ROOT) else uid_ref(uid)


def _quoted(match: re.Match[str]) -> str:
    value = match.group(2)
    if tag_for_keyword(value) is not None or _STANDARD_UID_RE.fullmatch(value):
        return match.group(0)
    replacement = uid_ref(value) if _UID_RE.fullmatch(value) else REDACTED  # a UID still correlates
    return f"{match.group(1)}{replacement}{match.group(3)}"


def redact_library_text(text: str) -> str:
    """``text`` from a library (or a traceback) without the element values it may quote."""
    text = _VR_VALUE_RE.sub(rf"\1{REDACTED}", text)
    text = _PERSON_NAME_RE.sub(rf"\1{REDACTED}\2", text)
    return _QUOTED_RE.sub(_quoted, text)


def redact_uids(text: str) -> str:
    """``text`` with each non-standard DICOM UID replaced by its :func:`~node.security.uid_ref`."""
    return _UID_RE.sub(_uid, text)


def is_own_logger(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


def redact_message(message: str, logger_name: str) -> str:
    """The log message ``message`` of logger ``logger_name`` as it may be written."""
    if not is_own_logger(logger_name):
        message = redact_library_text(message)
        if len(message) > MAX_LIBRARY_MESSAGE:
            message = message[:MAX_LIBRARY_MESSAGE] + f" ... [{len(message) - MAX_LIBRARY_MESSAGE} characters cut]"
    return redact_uids(message)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Replace the message (and the traceback, if any) of ``record`` by their redacted text, in place."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: logging reports it when the record is written
        return record
    record.msg, record.args = redact_message(message, record.name), None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact_uids(redact_library_text(_FORMATTER.formatException(record.exc_info)))
    if record.stack_info:
        record.stack_info = redact_uids(redact_library_text(record.stack_info))
    return record


_FORMATTER = logging.Formatter()
_installed = False


def install_log_redaction() -> None:
    """Route ``warnings`` into logging (logger ``py.warnings``) and redact every log record made in this
    process from now on (idempotent; each process calls it: the listener's, the CLI's, each worker)."""
    global _installed
    logging.captureWarnings(True)
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(make_record(*args, **kwargs))

    logging.setLogRecordFactory(redacted_record)
    _installed = True
