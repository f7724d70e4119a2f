"""Bad input: the generated corpus over a real association, broken files offline, and a bounded fuzz test
of instance validation and series assembly. The listener must keep serving after every case."""
from __future__ import annotations

import copy
import io
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from node.db import open_database
from node.db.schema import Event, Instance, Study
from node.dicom.headers import validate_instance
from node.listener import Listener
from node.pipeline.run import run_pipeline
from node.pipeline.select import evaluate_series
from node.pipeline.volume import VolumeError, assemble_volume
from tests.builders import write
from tests.corpus import LISTENER_CASES, Case, series
from tests.nodes import make_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("bad"), node={"allowed_calling_aets": ["SENDER"]})
    lst = Listener(settings, open_database(settings.storage.database_url))
    lst.start()
    yield lst
    lst.stop()


def associate(port):
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="CTNODE")


@pytest.mark.parametrize("case", LISTENER_CASES, ids=[c.name for c in LISTENER_CASES])
def test_corpus_case(listener, case: Case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we build on purpose
        datasets = case.build()
    assoc = associate(listener.port)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    expected = case.status if isinstance(case.status, list) else [case.status] * len(datasets)
    assert [s.Status for s in statuses] == expected
    if case.comment:
        assert all(case.comment in s.ErrorComment for s in statuses)
    # the listener keeps serving
    assoc = associate(listener.port)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    study_uid = str(datasets[0].StudyInstanceUID)
    with listener.sessions() as s:
        paths = [listener.settings.files.spool_file(p) for p in s.scalars(
            select(Instance.path).join(Study, Instance.study_id == Study.id).where(Study.study_instance_uid == study_uid))]
        kinds = set(s.scalars(select(Event.kind).where(Event.study_instance_uid == study_uid)))
    for kind in case.events:
        assert kind in kinds
    if case.outcome is None:
        assert paths == []
        return
    assert paths, "an accepted case must be in the spool"
    result = run_pipeline(paths, "threshold")
    statuses_ok, words = case.outcome
    assert result.status in statuses_ok, result.reason
    assert words in result.reason
    assert result.reason  # always explained


def test_truncated_and_garbage_files_are_reported_and_the_rest_processed(tmp_path):
    folder = tmp_path / "study"
    files = [write(ds, folder) for ds in series(4)]
    other = series(3)  # a second, intact series, so one broken file does not hide the others
    for ds in other:
        write(ds, folder)
    raw = files[0].read_bytes()
    (folder / "truncated_header.dcm").write_bytes(raw[:200])
    (folder / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "text.txt").write_text("not DICOM at all")
    files[1].write_bytes(files[1].read_bytes()[:-100])  # pixel data cut short, header intact
    result = run_pipeline([folder], "threshold")
    assert result.status in ("done", "skipped", "failed")
    unreadable = [d for d in result.decisions if "not a readable DICOM file" in d.reason]
    assert {d.description.rsplit("/", 1)[-1] for d in unreadable} >= {"garbage.dcm", "empty.dcm", "text.txt"}
    series_a, series_b = str(files and series_uid_of(files[0])), str(other[0].SeriesInstanceUID)
    by_uid = {d.series_uid: d for d in result.decisions}
    # a 200-byte stub parses as an empty data set: it never becomes an acceptable series
    assert {d.series_uid for d in result.decisions if d.accepted} <= {series_a, series_b}
    # the series with the cut-short pixel data is rejected, naming the file; the intact series is still judged
    assert "pixel data cannot be decoded" in by_uid[series_a].reason and files[1].name in by_uid[series_a].reason
    assert series_b in by_uid and "lung" in by_uid[series_b].reason  # assembled and looked at: the tiny
    # synthetic slices show no lung, which is the recorded reason, not a crash
    assert result.reason


def series_uid_of(path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


# -- bounded fuzz ----------------------------------------------------------------------------------------

KEYS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
        "PhotometricInterpretation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
        "SliceThickness", "RescaleSlope", "RescaleIntercept", "Modality", "ImageType", "NumberOfFrames",
        "PixelData", "SOPInstanceUID", "SeriesInstanceUID", "BodyPartExamined", "SOPClassUID"]
VALUES = st.one_of(
    st.none(), st.integers(-70000, 70000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.binary(max_size=600),
    st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(float('nan'))), max_size=7),
    st.lists(st.text(max_size=8), max_size=4),
)
MUTATION = st.tuples(st.integers(0, 3), st.sampled_from(KEYS), st.booleans(), VALUES)
DOCUMENTED = (VolumeError, ValueError)


def _mutate(ds: Dataset, key: str, delete: bool, value) -> Dataset:
    """Apply one mutation and return the dataset as a peer's bytes would decode (write + read back),
    so values have the types the network can produce. An unencodable mutation is dropped."""
    trial = copy.deepcopy(ds)
    try:
        if delete:
            if key in trial:
                delattr(trial, key)
        else:
            setattr(trial, key, value)
        buf = io.BytesIO()
        trial.save_as(buf, enforce_file_format=True)
        return dcmread(io.BytesIO(buf.getvalue()))
    except Exception:
        return ds


# Under CI the fuzzer replays a fixed sequence (derandomize) so a run never fails on a new random example
# unrelated to the change being tested; run it locally (CI unset) to explore. Crashes it found are kept as
# explicit examples below.
@hsettings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck),
           derandomize=os.environ.get("CI") == "true")
@given(st.lists(MUTATION, min_size=1, max_size=6))
@example([(0, "RescaleSlope", False, ["", ""])])  # multi-valued slope: was a TypeError in rescale_of
def test_fuzz_headers(mutations):
    """Only the documented errors (VolumeError/ValueError) escape, for instances the listener accepts."""
    sl = series(4, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, key, delete, value in mutations:
            sl[index] = _mutate(sl[index], key, delete, value)
        accepted = []
        for ds in sl:
            verdict = validate_instance(ds, str(CTImageStorage), str(ExplicitVRLittleEndian))
            assert verdict is None or (isinstance(verdict[0], int) and verdict[1])
            if verdict is None:
                accepted.append(ds)
        if not accepted:
            return
        decision = evaluate_series(accepted)
        assert decision.reason
        if decision.accepted:
            try:
                vol = assemble_volume(accepted)
            except DOCUMENTED:
                return
            assert vol.hu.shape[0] == len(accepted)


@pytest.mark.parametrize("keyword, raw", [
    ("PixelSpacing", b"abc\\1 "), ("ImageOrientationPatient", b"1\\0\\x\\0\\1\\0 "), ("SliceThickness", b"zz"),
    ("RescaleSlope", b"q "), ("RescaleIntercept", b"1\\2 "), ("ImagePositionPatient", b"1\\2\\nan "),
    ("Rows", None), ("PixelRepresentation", None),
])
def test_offline_pipeline_reports_malformed_headers_without_raising(tmp_path, keyword, raw):
    """`ctnode process` reads files the listener never vetted: a malformed value in one slice gives a
    skipped/failed result with a reason, never an exception."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    from node.pipeline.run import run_pipeline
    from tests.builders import ct_slice, write

    files = []
    for z in range(4):
        ds = ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", z=z, size=64)
        if z == 1:
            tag = tag_for_keyword(keyword)
            if raw is None:
                del ds[keyword]
            else:  # bytes as a careless writer would store them, never converted by pydicom on the way
                ds[tag] = RawDataElement(pydicom.tag.Tag(tag), dictionary_VR(tag), len(raw), raw, 0, False, True)
        files.append(write(ds, tmp_path))
    result = run_pipeline(files, "threshold")
    assert result.status in ("skipped", "failed") and result.reason
