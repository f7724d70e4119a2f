"""Real external DICOM peers for tests: DCMTK, Orthanc, dciodvfy and PixelMed's validators.

Plain functions and context managers, called by the test modules.

* Every peer runs on loopback with dynamically chosen ports and temporary storage.
* DCMTK binaries are resolved explicitly: pynetdicom installs Python scripts named
  ``storescu``/``storescp``/``echoscu`` that shadow DCMTK's on ``PATH``.
* Every DCMTK tool and Orthanc gets ``TCP_NODELAY=1`` in its environment; without it
  each instance costs ~44 ms of Nagle delay on loopback.
* A missing peer skips the test, except under ``CI=true`` where it fails: real-peer
  tests must never silently skip in CI.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import pytest

if TYPE_CHECKING:
    from pydicom import Dataset

HOST = "127.0.0.1"
StrPath = str | os.PathLike[str]

# Where distribution packages put the binaries (Orthanc lives in sbin).
_SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/bin", "/sbin")
# Substring (lower-cased) that `<tool> --version` must print for the binary to be accepted.
_VERSION_MARKERS = {"orthanc": "orthanc", "dciodvfy": "dicom3tools", "segimage2itkimage": "dcmqi"}
_DCMTK_MARKER = "dcmtk"  # DCMTK prints "$dcmtk: storescu v3.6.7 ... $"
_UNCOMPRESSED_TS = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")


# --------------------------------------------------------------------------- discovery


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _peer_missing(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: real-peer tests must not skip)", pytrace=False)
    pytest.skip(reason)


def _candidates(tool: str) -> list[str]:
    """System directories first, then every match on PATH (not just the first)."""
    dirs = [*_SYSTEM_DIRS, *os.environ.get("PATH", "").split(os.pathsep)]
    seen: list[str] = []
    for d in dirs:
        p = os.path.join(d, tool) if d else ""
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            real = os.path.realpath(p)
            if real not in seen:
                seen.append(real)
    return seen


@functools.cache
def _locate(tool: str) -> str | None:
    """Path of a genuine ``tool`` (verified through its ``--version`` banner), or None."""
    marker = _VERSION_MARKERS.get(tool.lower(), _DCMTK_MARKER)
    for path in _candidates(tool):
        try:
            out = subprocess.run(
                [path, "--version"] if tool != "dciodvfy" else [path, "-version"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20,
                errors="replace",
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if marker in (out.stdout + out.stderr).lower():
            return path
    return None


def require_peer(tool_name: str) -> str:
    """Absolute path of a DCMTK tool (``storescu``...), ``Orthanc`` or ``dciodvfy``.

    Skips the calling test when absent, or fails it when ``CI=true``.
    """
    path = _locate(tool_name)
    if path is None:
        _peer_missing(f"real peer {tool_name!r} not installed (apt-get install dcmtk orthanc dicom3tools; pip install dcmqi)")
    return path


def peer_env(**extra: str) -> dict[str, str]:
    """Environment for a peer process: ours plus ``TCP_NODELAY=1`` (see module doc)."""
    return {**os.environ, "TCP_NODELAY": "1", **extra}


def free_port() -> int:
    """A TCP port that is free on loopback right now (racy by nature, but good enough)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at startup:\n{_tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on {HOST}:{port} within {timeout} s:\n{_tail(log)}")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------- DCMTK SCUs


def _dicom_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return out


def _storescu_profile(files: Sequence[Path], dest: Path) -> bool:
    """Write a storescu association profile proposing, for every SOP class found, each
    transfer syntax the files are in (one context each) plus an uncompressed fallback.

    storescu picks the accepted context whose syntax equals the file's, so files travel
    in their own (possibly compressed) syntax. Returns False when no DICOM file was found.
    """
    import pydicom  # local: keep module import cheap

    pairs: dict[str, set[str]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            meta = ds.file_meta
            sop = str(meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or "")
            ts = str(meta.TransferSyntaxUID)
        except Exception:  # not DICOM: storescu reports it
            continue
        if not sop:
            continue
        pairs.setdefault(sop, set()).add(ts)
    if not pairs:
        return False
    syntaxes = sorted({ts for tss in pairs.values() for ts in tss})
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(_UNCOMPRESSED_TS, 1)]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    n = 0
    for sop, tss in sorted(pairs.items()):
        for key in [f"TS{syntaxes.index(ts)}" for ts in sorted(tss)] + ["Uncompressed"]:
            n += 1
            lines.append(f"PresentationContext{n} = {sop}\\{key}")
    if n > 128:
        raise ValueError(f"{n} presentation contexts needed, DICOM allows 128: send in batches")
    lines += ["[[Profiles]]", "[Default]", "PresentationContexts = Contexts"]
    dest.write_text("\n".join(lines) + "\n")
    return True


def storescu(
    host: str,
    port: int,
    paths_or_dir: StrPath | Iterable[StrPath],
    *,
    calling_aet: str = "STORESCU",
    called_aet: str = "CTNODE",
    timeout: float = 120,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files and/or directories (recursively) with DCMTK ``storescu`` in one association.

    Each file is sent in its own transfer syntax (JPEG 2000 included): plain storescu
    proposes only uncompressed syntaxes (``-R``/``+C`` do not change that, and it cannot
    decode JPEG 2000), so a generated ``-xf`` profile is used instead. Returns the
    completed process (check ``returncode``; output is in ``stdout``, stderr merged).
    """
    exe = require_peer("storescu")
    items = [Path(paths_or_dir)] if isinstance(paths_or_dir, (str, os.PathLike)) else [
        Path(p) for p in paths_or_dir
    ]
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        cfg = Path(tmp) / "storescu.cfg"
        args = [exe, "-v", "-aet", calling_aet, "-aec", called_aet, "-to", "10"]
        if _storescu_profile(_dicom_files(items), cfg):
            args += ["-xf", str(cfg), "Default"]
        if any(p.is_dir() for p in items):
            args += ["+sd", "+r"]
        args += [*extra_args, host, str(port), *map(str, items)]
        return subprocess.run(
            args, env=peer_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout,
        )


def echoscu(
    host: str,
    port: int,
    *,
    calling_aet: str = "ECHOSCU",
    called_aet: str = "CTNODE",
    timeout: float = 30,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with DCMTK ``echoscu``; ``returncode == 0`` means success."""
    args = [require_peer("echoscu"), "-v", "-aet", calling_aet, "-aec", called_aet, "-to", "10",
            *extra_args, host, str(port)]
    return subprocess.run(
        args, env=peer_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout,
    )


# --------------------------------------------------------------------------- DCMTK SCP

StoreSCPMode = Literal["accept", "refuse", "abort-during", "abort-after"]


class StoreSCP:
    """DCMTK ``storescp`` on a free loopback port, writing into a temporary directory.

    ``mode`` makes it misbehave for fault tests: ``refuse`` refuses every association,
    ``abort-during``/``abort-after`` abort it while/after receiving a C-STORE-RQ.
    Files are kept with unique names (``+uf``), so a duplicate send shows as two files.
    Accepts every storage SOP class (``-pm``) and transfer syntax (``+xa``), written
    bit-preserving (``+B``).

    >>> with StoreSCP("PACS") as scp:
    ...     send_somehow(HOST, scp.port, scp.aet)
    ...     [path] = scp.wait_for(1)
    """

    def __init__(
        self,
        aet: str = "STORESCP",
        *,
        mode: StoreSCPMode = "accept",
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.aet, self.mode, self.host = aet, mode, HOST
        self.port = port or free_port()
        self._extra = list(extra_args)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def output_dir(self) -> Path:
        assert self._tmp is not None, "StoreSCP not started"
        return Path(self._tmp.name) / "in"

    @property
    def _done_log(self) -> Path:
        return self.output_dir.parent / "received.txt"

    @property
    def log_path(self) -> Path:
        return self.output_dir.parent / "storescp.log"

    def __enter__(self) -> StoreSCP:
        exe = require_peer("storescp")
        self._tmp = tempfile.TemporaryDirectory(prefix="storescp-")
        self.output_dir.mkdir()
        mode_args = {"accept": [], "refuse": ["--refuse"], "abort-during": ["--abort-during"],
                     "abort-after": ["--abort-after"]}[self.mode]
        # -xcr runs (synchronously, -xs) once a file is fully written: it is our
        # "complete" signal, so wait_for() never sees half-written files.
        args = [exe, "-v", "-aet", self.aet, "-od", str(self.output_dir), "+uf", "-fe", ".dcm",
                "-pm", "+xa", "+B", "-dhl", "-xcr", f"echo '#f' >> '{self._done_log}'", "-xs",
                *mode_args, *self._extra, str(self.port)]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(args, env=peer_env(), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_port(self.port, self._proc, 15, "storescp", self.log_path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        _stop(self._proc, grace=5)
        if self._tmp is not None:
            self._tmp.cleanup()

    def log(self) -> str:
        return _tail(self.log_path, 1 << 20)

    def received_files(self) -> list[Path]:
        """Completely received files, in arrival order."""
        try:
            names = self._done_log.read_text().split()
        except FileNotFoundError:
            return []
        return [self.output_dir / n for n in names]

    def wait_for(self, n: int, timeout: float = 30) -> list[Path]:
        """Wait until at least ``n`` files have been received; returns them all."""
        deadline = time.monotonic() + timeout
        while len(files := self.received_files()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"storescp got {len(files)}/{n} files in {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        return files


# --------------------------------------------------------------------------- Orthanc

#: Where Debian's orthanc-dicomweb puts the plugin (the second is a link to the first, versioned, file).
_DICOMWEB_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
DICOMWEB_ROOT = "/dicom-web/"


@functools.cache
def _find_dicomweb_plugin() -> str | None:
    for folder in _DICOMWEB_PLUGIN_DIRS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*"))
        if found:
            return str(found[0])
    return None


def dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin; skips (fails under ``CI=true``) when it is not installed."""
    path = _find_dicomweb_plugin()
    if path is None:
        _peer_missing("Orthanc's DICOMweb plugin not installed (apt-get install orthanc-dicomweb)")
    return path



class OrthancError(RuntimeError):
    """A REST call to Orthanc failed; carries the HTTP status and Orthanc's error body."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> HTTP {status}: {body[:2000]}")
        self.status, self.body = status, body


ModalitySpec = Sequence[Any] | Mapping[str, Any]


class Orthanc:
    """A throw-away Orthanc on loopback: temp config and storage, free DICOM/HTTP ports.

    ``modalities`` maps a name to ``(aet, host, port)`` or to Orthanc's object form
    (``{"AET": ..., "Host": ..., "Port": ...}``); ``add_modality`` registers more at
    run time (e.g. once the node's port is known). ``lua_scripts`` are paths of Lua
    scripts to load; ``extra_config`` is merged over the generated configuration.
    ``dicomweb`` loads the DICOMweb plugin (Debian ``orthanc-dicomweb``), served under
    :attr:`dicomweb_url`. ``users`` ({name: password}) turns HTTP basic authentication on;
    the REST helpers then log in as the first user. REST helpers use only the standard
    library.

    Note: Orthanc 1.10 cannot bind to loopback only; its ports listen on all
    interfaces (the HTTP side refuses non-local clients: RemoteAccessAllowed=false).
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, ModalitySpec] | None = None,
        lua_scripts: Sequence[StrPath] = (),
        stable_age: int = 2,
        scu_timeout: int = 10,
        extra_config: Mapping[str, Any] | None = None,
        dicomweb: bool = False,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.aet, self.host = aet, HOST
        self._dicomweb, self._users = dicomweb, dict(users or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.url = f"http://{HOST}:{self.http_port}"
        self.dicomweb_url = f"{self.url}{DICOMWEB_ROOT.rstrip('/')}"
        self._modalities = {k: list(v) if not isinstance(v, Mapping) else dict(v)
                            for k, v in (modalities or {}).items()}
        self._lua = [str(Path(p).resolve()) for p in lua_scripts]
        self._stable_age, self._scu_timeout = stable_age, scu_timeout
        self._extra = dict(extra_config or {})
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle

    @property
    def workdir(self) -> Path:
        assert self._tmp is not None, "Orthanc not started"
        return Path(self._tmp.name)

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is (or will be) started with."""
        storage = str(self.workdir / "db")
        return {
            "Name": "ctnode-test-orthanc",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [dicomweb_plugin()] if self._dicomweb else [],
            "DicomWeb": {"Enable": self._dicomweb, "Root": DICOMWEB_ROOT},
            "LuaScripts": self._lua,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self._users),
            "RegisteredUsers": self._users,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": self._modalities,
            "DicomScuTimeout": self._scu_timeout,
            "DicomAssociationCloseDelay": 0,  # release SCU associations right after a send
            "StableAge": self._stable_age,
            "SaveJobs": False,
            "OverwriteInstances": True,
            "MetricsEnabled": False,
            "HttpThreadsCount": 10,
            **self._extra,
        }

    def __enter__(self) -> Orthanc:
        exe = require_peer("Orthanc")
        self._tmp = tempfile.TemporaryDirectory(prefix="orthanc-")
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen([exe, str(cfg)], cwd=self.workdir, env=peer_env(),
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        try:
            self._wait_ready(30)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system", timeout=2)
                return
            except (OSError, OrthancError):
                time.sleep(0.1)
        raise TimeoutError(f"Orthanc REST API not up within {timeout} s:\n{self.log()[-4000:]}")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        _stop(self._proc)
        if et is not None and self._tmp is not None:
            print(f"--- Orthanc log (tail) ---\n{self.log()[-4000:]}")  # shown by pytest on failure
        if self._tmp is not None:
            self._tmp.cleanup()

    def log(self) -> str:
        return _tail(self.log_path, 1 << 20)

    # ---- raw REST

    def request(self, method: str, path: str, body: bytes | str | Any = None, *,
                timeout: float = 60) -> Any:
        """Call the REST API; ``body`` is sent raw (bytes/str) or as JSON. Returns the
        decoded JSON answer, or bytes when the answer is not JSON."""
        headers: dict[str, str] = {}
        if self._users:
            user, password = next(iter(self._users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        data: bytes | None
        if body is None or isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, ctype = resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raise OrthancError(method, path, e.code, e.read().decode(errors="replace")) from None
        if "json" in ctype and raw:
            return json.loads(raw)
        return raw

    def get(self, path: str, *, timeout: float = 60) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, *, timeout: float = 60) -> Any:
        return self.request("POST", path, b"" if body is None else body, timeout=timeout)

    def put(self, path: str, body: Any, *, timeout: float = 60) -> Any:
        return self.request("PUT", path, body, timeout=timeout)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # ---- helpers

    def upload(self, path: StrPath) -> dict[str, Any]:
        """POST /instances: store one DICOM file; returns Orthanc's answer (``ID``,
        ``ParentStudy``, ``Status`` = Success/AlreadyStored...)."""
        return dict(self.post("/instances", Path(path).read_bytes()))

    def clear(self) -> None:
        """Delete everything stored, so that one Orthanc can serve several tests
        (starting one takes ~0.2 s, but a clean stop takes ~3.5 s)."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or update) a DICOM modality at run time."""
        self.put(f"/modalities/{urllib.parse.quote(name)}", {"AET": aet, "Host": host, "Port": port})

    def echo(self, modality: str) -> bool:
        try:
            self.post(f"/modalities/{urllib.parse.quote(modality)}/echo", {})
            return True
        except OrthancError:
            return False

    def send_to_modality(self, modality: str, resource_ids: str | Sequence[str], *,
                         asynchronous: bool = False, timeout: float = 120) -> dict[str, Any]:
        """C-STORE patients/studies/series/instances (Orthanc IDs) to ``modality``.

        Synchronous: returns the job result (``InstancesCount``, ``FailedInstancesCount``);
        raises OrthancError on failure. Asynchronous: returns ``{"ID": job, "Path": ...}``
        (see ``wait_job``)."""
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        body = {"Resources": ids, "Synchronous": not asynchronous, "Timeout": self._scu_timeout}
        return dict(self.post(f"/modalities/{urllib.parse.quote(modality)}/store", body,
                              timeout=timeout))

    def wait_job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for a job to end; returns its description, raises if it did not succeed."""
        deadline = time.monotonic() + timeout
        while True:
            job = dict(self.get(f"/jobs/{job_id}"))
            if job["State"] == "Success":
                return job
            if job["State"] in ("Failure", "Paused") or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc job {job_id} ended as {job['State']}: {job}")
            time.sleep(0.1)

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        return list(self.get("/studies"))

    def study(self, study_id: str) -> dict[str, Any]:
        return dict(self.get(f"/studies/{study_id}"))

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """Expanded series (``ID``, ``MainDicomTags``, ``Instances``...) of a study."""
        return list(self.get(f"/studies/{study_id}/series"))

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        """Expanded instances (``ID``, ``MainDicomTags``...) of a series."""
        return list(self.get(f"/series/{series_id}/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """All tags of an instance, keyed by keyword (``/simplified-tags``)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte."""
        return bytes(self.get(f"/instances/{instance_id}/file"))

    def find(self, level: Literal["Patient", "Study", "Series", "Instance"],
             query: Mapping[str, str]) -> list[dict[str, Any]]:
        """POST /tools/find (expanded answers)."""
        return list(self.post("/tools/find", {"Level": level, "Query": dict(query), "Expand": True}))

    def find_series_by_modality(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        """Series of the study with that StudyInstanceUID and Modality (e.g. SEG, SR)."""
        return self.find("Series", {"StudyInstanceUID": study_uid, "Modality": modality})

    def wait_for_series(self, study_uid: str, modality: str, *, instances: int = 1,
                        timeout: float = 60) -> list[dict[str, Any]]:
        """Poll until the study holds ``instances`` or more instances of ``modality``."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.find_series_by_modality(study_uid, modality)
            if sum(len(s["Instances"]) for s in series) >= instances:
                return series
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {instances} {modality} instance(s) in study {study_uid} "
                                   f"after {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)


# --------------------------------------------------------------------------- dciodvfy


def dciodvfy(path: StrPath, *, timeout: float = 60) -> tuple[list[str], list[str]]:
    """Validate a DICOM file against its IOD with dicom3tools' ``dciodvfy``.

    Returns ``(errors, warnings)``: the ``Error - ...``/``Warning - ...`` messages
    (prefix stripped). Note that dciodvfy also warns about attributes only needed
    for a DICOMDIR; filter those if irrelevant.
    """
    proc = subprocess.run([require_peer("dciodvfy"), str(path)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=timeout)
    errors: list[str] = []
    warnings: list[str] = []
    for line in proc.stderr.splitlines():
        if line.startswith("Error - "):
            errors.append(line.removeprefix("Error - "))
        elif line.startswith("Warning - "):
            warnings.append(line.removeprefix("Warning - "))
    return errors, warnings


# --------------------------------------------------------------------------- PixelMed

#: Debian's pixelmed-apps / libpixelmed-java put the jars here.
PIXELMED_JAR_DIR = Path("/usr/share/java")
#: PixelMed's validators evaluate large XPath expressions; the JDK's default XPath limits reject them.
_PIXELMED_JVM_OPTIONS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                         "-Djdk.xml.xpathTotalOpLimit=0")
PIXELMED_SR_VALIDATOR = "com.pixelmed.validate.DicomSRValidator"
PIXELMED_IOD_VALIDATOR = "com.pixelmed.validate.DicomInstanceValidator"


@functools.cache
def _pixelmed_command() -> tuple[str, str] | None:
    """(java, classpath) when a JVM and pixelmed.jar are installed, else None."""
    java = next(iter(_candidates("java")), None)
    if java is None or not (PIXELMED_JAR_DIR / "pixelmed.jar").is_file():
        return None
    return java, os.pathsep.join(str(p) for p in sorted(PIXELMED_JAR_DIR.glob("*.jar")))


def pixelmed_validate(path: StrPath, validator: str, *, timeout: float = 900) -> tuple[list[str], list[str]]:
    """Validate a file with PixelMed (``validator``: :data:`PIXELMED_SR_VALIDATOR` for SR content and
    templates, :data:`PIXELMED_IOD_VALIDATOR` for an IOD). Returns ``(errors, warnings)``: the
    ``Error: ...``/``Warning: ...`` lines. Skips (fails under ``CI=true``) without java or pixelmed."""
    command = _pixelmed_command()
    if command is None:
        _peer_missing("PixelMed not installed (apt-get install pixelmed-apps default-jre-headless)")
    java, classpath = command
    proc = subprocess.run([java, *_PIXELMED_JVM_OPTIONS, "-cp", classpath, validator, str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          timeout=timeout)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    if proc.returncode != 0 or not any("validation complete" in line.lower() for line in lines):
        raise RuntimeError(f"PixelMed {validator} did not complete (exit {proc.returncode}):\n"
                           + "\n".join(lines[-40:]))
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])


# --------------------------------------------------------------------------- test data


def write_small_ct(
    path: StrPath,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    instance_number: int = 1,
    size: int = 16,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
) -> Dataset:
    """Write a tiny but complete CT Image Storage file (dciodvfy: no errors); returns it.

    ``transfer_syntax`` other than explicit VR little endian compresses with pydicom
    (JPEG 2000 needs ``size >= 64``).
    """
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    now = _dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Peer^Test", "PEER1", "19700101", "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", "PEER0001"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid or generate_uid(), 1
    ds.PatientPosition, ds.BodyPartExamined = "HFS", "CHEST"  # dciodvfy: Laterality 2C
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "ctnode-tests"
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = 120
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.SliceLocation = float(instance_number)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    ramp = np.linspace(0, 2000, size * size, dtype=np.float64).reshape(size, size)
    ds.PixelData = ramp.astype(np.int16).tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds
