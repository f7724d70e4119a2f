"""No patient identifier reaches a log line: not from the node, not from pydicom, highdicom or pynetdicom,
not through ``warnings``, in the listener's process nor in a worker's (node.logredact)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.schema import Job
from node.demo import send_study
from node.logredact import MAX_LIBRARY_MESSAGE, REDACTED, install_log_redaction, redact_message
from node.processing import analyse, write_outputs
from node.security import uid_ref
from node.service import Node
from tests.nodes import make_settings, wait_first_job_finished

pytestmark = pytest.mark.integration

# Identifiable values: a one-component name (highdicom warns about it, quoting it), IDs, a date, UIDs.
NAME = "Zebracorn Quintessa O'Secretname"
PATIENT_ID = "PID-Zebracorn-7781"
ACCESSION = "ACC-Quintessa-5529"
STUDY_DATE = "19870512"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242.777001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.4343.777002"
BAD_FRAME_UID = "1.2.3.4242.zebracorn"  # not a UID: pydicom warns "Invalid value for VR UI: '...'"
SECRETS = ["Zebracorn", "Quintessa", "Secretname", PATIENT_ID, ACCESSION, STUDY_DATE, "1987-05-12", STUDY_UID,
           SERIES_UID]


def _study(folder: Path) -> list[Path]:
    import pydicom

    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=96, cols=96, slices=24, pixel_spacing=3.5, slice_spacing=10.0, seed=1, burden=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing them warns too; what the node logs is under test
        files = write_phantom_study(phantom, folder, patient_id=PATIENT_ID, patient_name=NAME,
                                    study_instance_uid=STUDY_UID, series_instance_uid=SERIES_UID,
                                    study_date=STUDY_DATE)
        for path in files:
            ds = pydicom.dcmread(path)
            ds.AccessionNumber = ACCESSION
            ds.FrameOfReferenceUID = BAD_FRAME_UID
            ds.save_as(path, enforce_file_format=True)
    return files


def _leaks(text: str, extra: list[str] = ()) -> list[str]:
    return [s for s in [*SECRETS, *extra] if s.lower() in text.lower()]


class _Lines(logging.Handler):
    """Every record as its handler writes it (message and traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def all_log_lines():
    """Root logger at DEBUG, warnings shown every time, a handler added after the redaction was installed.
    pytest records each test's warnings itself: its recorder is set aside while the test runs, as a node
    process has none."""
    root, handler = logging.getLogger(), _Lines()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)
        install_log_redaction()
        root.setLevel(logging.DEBUG)
        root.addHandler(handler)
        yield handler.lines
        root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def test_library_messages_are_redacted():
    vr = "Invalid value for VR PN: 'Doe^Jane'. Please see <https://dicom.nema.org/x.html#t> for allowed values."
    assert redact_message(vr, "pydicom") == f"Invalid value for VR PN: {REDACTED}. Please see <https://dicom.nema.org/x.html#t> for allowed values."
    name = 'The string "Doe"Jane" is unlikely to represent the intended person name since it contains one'
    assert "Jane" not in redact_message(name, "py.warnings") and "Doe" not in redact_message(name, "py.warnings")
    assert redact_message('copied attribute "PatientName"', "highdicom.base") == 'copied attribute "PatientName"'
    plugin = "Found plugin 'openjpeg' for UID '1.2.840.10008.1.2.4.90'"
    assert redact_message(plugin, "pylibjpeg.utils") == f"Found plugin '{REDACTED}' for UID '1.2.840.10008.1.2.4.90'"
    long = "x" * (3 * MAX_LIBRARY_MESSAGE)
    assert len(redact_message(long, "pydicom")) < MAX_LIBRARY_MESSAGE + 40
    # every logger: UIDs become references; the node's own quoted text is kept
    own = f"series {SERIES_UID}: file '/spool/{STUDY_UID}/x.dcm' cannot be read"
    assert redact_message(own, "node.pipeline.run") == (
        f"series {uid_ref(SERIES_UID)}: file '/spool/{uid_ref(STUDY_UID)}/x.dcm' cannot be read")
    assert redact_message("peer 10.1.2.3 on 1.2.3", "node.listener") == "peer 10.1.2.3 on 1.2.3"


def test_tracebacks_are_redacted(all_log_lines):
    try:
        raise ValueError(f"Unable to convert '{STUDY_DATE}' to 'DA' object for {STUDY_UID}")
    except ValueError:
        logging.getLogger("node.test").exception("conversion failed")
    assert any("conversion failed" in line and "ValueError" in line for line in all_log_lines)
    assert not _leaks("\n".join(all_log_lines))


def test_worker_path_logs_no_identifier(tmp_path, all_log_lines):
    """analyse + write_outputs, as a worker runs them, with every logger at DEBUG and every warning shown."""
    files = _study(tmp_path / "dicom")
    analysis = analyse(files, engine="threshold")
    assert analysis.status == "done", analysis.reason
    write_outputs(analysis, tmp_path / "out")
    text = "\n".join(all_log_lines)
    # what would have leaked was logged, redacted: highdicom's person-name warning and pydicom's VR warning
    assert "is unlikely to represent the intended person name" in text
    assert f"Invalid value for VR UI: {REDACTED}" in text
    assert not _leaks(text), _leaks(text)


@pytest.mark.slow
def test_node_logs_no_identifier(tmp_path, all_log_lines, capfd):
    """Listener (C-STORE at DEBUG: pynetdicom's own handlers on), scheduler and the worker process (its log
    goes to the inherited stderr) while the study is received, analysed and exported."""
    files = _study(tmp_path / "dicom")
    settings = make_settings(tmp_path)
    node = Node(settings)
    node.start()
    try:
        assert send_study(files, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == len(files)

        wait_first_job_finished(node, 240)
    finally:
        node.stop()
    with node.sessions() as s:
        assert s.scalars(select(Job)).one().state == "done"
    captured = capfd.readouterr()
    worker = captured.err + captured.out
    here = "\n".join(all_log_lines)
    assert "Received Store Request" in here  # pynetdicom's DEBUG handlers ran
    assert "worker[" in worker and "is unlikely to represent the intended person name" in worker
    assert not _leaks(here, [BAD_FRAME_UID]), _leaks(here)
    assert not _leaks(worker, [BAD_FRAME_UID]), _leaks(worker)
