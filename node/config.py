"""Node settings: one TOML file plus environment overrides, validated once at start.

Every key has a default (the demo runs with none of them set). An environment variable
``CTNODE_<SECTION>_<KEY>`` (upper case) overrides ``[section] key``; for example
``CTNODE_NODE_PORT=11113`` or ``CTNODE_STORAGE_DATABASE_URL=postgresql+psycopg://...``.
Errors name the offending key, e.g. ``node.port: must be an integer between 1 and 65535``.
"""
from __future__ import annotations

import enum
import ipaddress
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from node.storage import Storage

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; the message names the key."""


#: What one ``ctnode serve`` process does (``node.roles``): receive and record (listener, with study readiness,
#: reference comparison and retention), process jobs (worker), send results (exporter).
ROLES = ("listener", "worker", "exporter")


@dataclass
class NodeSettings:
    ae_title: str = "CTNODE"
    # This process's identity on what it claims (jobs, exports), unique among the processes sharing a
    # database; "" = <host name>:<port>. A process restarting under the same name releases its old claims.
    name: str = ""
    # What this process does: any of "listener", "worker", "exporter" (default: all three, one node).
    roles: list[str] = field(default_factory=lambda: list(ROLES))
    host: str = "127.0.0.1"
    port: int = 11112
    # Calling AE titles allowed to associate; empty = accept any caller (demo only).
    allowed_calling_aets: list[str] = field(default_factory=list)
    max_associations: int = 10
    # Connections one peer address may hold at once (associations and connections not yet associated).
    max_associations_per_peer: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    # Peer-address binding: "AET@address" or "AET@network/prefix". An AE title listed here is accepted only
    # from those addresses (and is allowed even if not in allowed_calling_aets). Empty: no address binding.
    allowed_peers: list[str] = field(default_factory=list)
    # Refuse associations whose called AE title is not ae_title.
    require_called_aet: bool = True
    # Largest P-DATA PDU the node accepts (bytes; 0 = unlimited, not recommended).
    max_pdu_size: int = 65536
    # Largest single instance accepted (MB); larger ones are refused with 0xA700 and an ErrorComment.
    max_instance_mb: float = 1024.0
    # Largest study accepted (GB of spooled instances); instances beyond it are refused with 0xA700.
    max_study_gb: float = 20.0
    # Write each incoming data set to a temporary file while it arrives instead of memory (pynetdicom
    # STORE_RECV_CHUNKED_DATASET; process-wide). The spooled bytes are identical in both modes.
    receive_to_disk: bool = False
    # Disk guard: new associations are refused while the spool filesystem has less than min_free_gb free
    # or more than max_used_percent used (0 disables that check).
    min_free_gb: float = 2.0
    max_used_percent: float = 95.0

    def peer_bindings(self) -> dict[str, list[str]]:
        """{AE title: [address or network, ...]} from ``allowed_peers``."""
        out: dict[str, list[str]] = {}
        for item in self.allowed_peers:
            aet, _, host = item.rpartition("@")
            out.setdefault(aet, []).append(host)
        return out

    def effective_calling_aets(self) -> list[str]:
        """Calling AE titles accepted (empty: any)."""
        return list(dict.fromkeys([*self.allowed_calling_aets, *self.peer_bindings()]))


@dataclass
class TLSSettings:
    # DICOM TLS on the listener (PS3.15 B.1-style). When enabled, every association must use TLS.
    enabled: bool = False
    cert_file: str = ""           # the node's certificate (PEM), with its chain
    key_file: str = ""            # its private key (PEM, unencrypted; file mode 0600)
    ca_file: str = ""             # CAs that sign client certificates (needed for require_client_cert)
    require_client_cert: bool = False  # mutual TLS: callers must present a certificate signed by ca_file
    crl_file: str = ""            # certificate revocation list(s) of ca_file (PEM); re-read when it changes
    min_version: str = "1.2"      # "1.2" or "1.3"


@dataclass
class StorageSettings:
    spool_dir: str = "var/spool"
    results_dir: str = "var/results"
    database_url: str = "sqlite:///var/ctnode.db"
    retention_days: float = 30.0


@dataclass
class ProcessingSettings:
    stable_after: float = 10.0
    engine: str = "auto"          # infnet when shipped weights load, else threshold; see config/node.toml
    min_slices: int = 1
    device: str = "auto"          # auto | cpu | cuda
    lung_method: str = "auto"     # auto (node.pipeline.lungs.DEFAULT_METHOD) | hu | net; see docs/lungs.md
    workers: int = 1
    job_timeout: float = 1800.0   # a worker running longer is killed and its job failed
    worker_memory_gb: float = 8.0  # memory (data) cap of each worker process (0 = none)
    max_decoded_mb: float = 1024.0  # decoded pixel data a series may declare (checked before decoding)
    max_decoded_instance_mb: float = 64.0  # the same, per instance
    max_attempts: int = 2         # a job whose worker died is retried this many times in all
    check_interval: float = 1.0   # seconds between scheduler ticks (the poll for ready jobs and due exports)
    # A claimed job or export belongs to its process for lease_s seconds, renewed every check_interval while
    # it runs; a lease not renewed (the process died) is taken over by another process after it expires.
    lease_s: float = 60.0
    seg_series_number: int = 901
    sr_series_number: int = 902
    key_images: int = 0           # Secondary Capture key images with the overlay burned in (0 = none)
    key_images_series_number: int = 903


@dataclass
class ExportSettings:
    max_attempts: int = 5
    backoff_base: float = 10.0
    backoff_max: float = 600.0
    calling_ae_title: str = "CTNODE"
    timeout: float = 30.0


class Transport(enum.StrEnum):
    """How results reach a destination."""

    DIMSE = "dimse"        # C-STORE over a DICOM association (optionally DICOM TLS)
    STOW_RS = "stow-rs"    # DICOMweb STOW-RS over HTTP(S)


class HttpAuth(enum.StrEnum):
    """Authentication towards a STOW-RS destination."""

    NONE = "none"
    BEARER = "bearer"      # Authorization: Bearer <token from the environment variable token_env>
    BASIC = "basic"        # username + the password from the environment variable password_env


@dataclass
class HttpSettings:
    # /healthz, /readyz and /metrics (Prometheus) over plain HTTP; loopback only unless host says otherwise.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 11180             # 0: any free port


@dataclass
class Destination:
    name: str
    transport: Transport = Transport.DIMSE
    # DIMSE (C-STORE)
    ae_title: str = ""
    host: str = ""
    port: int = 0
    # STOW-RS: the DICOMweb service root (the node POSTs to <url>/studies)
    url: str = ""
    auth: HttpAuth = HttpAuth.NONE
    username: str = ""            # basic
    password_env: str = ""        # basic: environment variable holding the password
    token_env: str = ""           # bearer: environment variable holding the token
    tls_verify: bool = True       # STOW-RS over https: verify the server certificate (never disable in production)
    # Optional TLS towards this destination (DIMSE: tls = true; STOW-RS: an https:// url).
    tls: bool = False
    tls_ca_file: str = ""         # CA that signed the peer's certificate ("" = DIMSE: the system trust store;
    #                               STOW-RS: the certifi bundle)
    tls_cert_file: str = ""       # client certificate for mutual TLS ("" = none)
    tls_key_file: str = ""
    tls_server_name: str = ""     # DIMSE: name checked against the peer certificate ("" = host)
    # STOW-RS: the password or token, read from the environment at start (never from the file, never logged)
    secret: str = field(default="", repr=False)


#: The keys each transport needs, with a value of their type.
DESTINATION_REQUIRED: dict[Transport, dict[str, Any]] = {
    Transport.DIMSE: {"name": "", "ae_title": "", "host": "", "port": 0},
    Transport.STOW_RS: {"name": "", "url": ""},
}
DESTINATION_OPTIONAL: dict[Transport, dict[str, Any]] = {
    Transport.DIMSE: {"tls": False, "tls_ca_file": "", "tls_cert_file": "", "tls_key_file": "",
                      "tls_server_name": ""},
    Transport.STOW_RS: {"auth": "none", "username": "", "password_env": "", "token_env": "", "tls_verify": True,
                        "tls_ca_file": "", "tls_cert_file": "", "tls_key_file": ""},
}
#: The field that holds the environment variable of each authentication's secret.
SECRET_ENV_KEY = {HttpAuth.BEARER: "token_env", HttpAuth.BASIC: "password_env"}


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    destinations: list[Destination] = field(default_factory=list)
    source: str = "<defaults>"

    @property
    def spool_dir(self) -> Path:
        return Path(self.storage.spool_dir)

    @property
    def results_dir(self) -> Path:
        return Path(self.storage.results_dir)

    @property
    def files(self) -> Storage:
        """The spool and results folders, and how the database names the files in them."""
        return Storage(self.spool_dir, self.results_dir)


_SECTIONS = {
    "node": NodeSettings,
    "storage": StorageSettings,
    "processing": ProcessingSettings,
    "export": ExportSettings,
    "tls": TLSSettings,
    "http": HttpSettings,
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` (from TOML or an environment string) to the type of ``default``."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}") from None
    return value


def _validate(s: Settings) -> None:
    def check(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    check(bool(AE_TITLE_RE.match(s.node.ae_title)) and s.node.ae_title.strip() != "", "node.ae_title",
          "must be 1-16 printable ASCII characters without backslash")
    check(0 <= s.node.port <= 65535, "node.port", "must be an integer between 1 and 65535 (0: any free port)")
    for aet in s.node.allowed_calling_aets:
        check(bool(AE_TITLE_RE.match(aet)), "node.allowed_calling_aets", f"invalid AE title {aet!r}")
    check(s.node.max_associations >= 1, "node.max_associations", "must be at least 1")
    check(s.node.max_associations_per_peer >= 1, "node.max_associations_per_peer", "must be at least 1")
    for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
        check(getattr(s.node, name) > 0, f"node.{name}", "must be positive")
    for item in s.node.allowed_peers:
        aet, at, host = item.rpartition("@")
        check(bool(at) and bool(AE_TITLE_RE.match(aet)) and aet.strip() != "", "node.allowed_peers",
              f"{item!r}: expected \"AET@address\" (e.g. \"ORTHANC@10.0.0.5\" or \"ORTHANC@10.0.0.0/24\")")
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            check(False, "node.allowed_peers", f"{item!r}: {host!r} is not an IP address or network")
    check(s.node.max_pdu_size == 0 or 4096 <= s.node.max_pdu_size <= 2**32 - 1, "node.max_pdu_size",
          "must be 0 (unlimited) or between 4096 and 4294967295 bytes")
    check(0 < s.node.max_instance_mb <= 4096, "node.max_instance_mb", "must be between 0 and 4096 MB")
    check(0 < s.node.max_study_gb <= 10240, "node.max_study_gb", "must be between 0 and 10240 GB")
    check(s.node.max_instance_mb <= s.node.max_study_gb * 1024, "node.max_instance_mb",
          "must not exceed node.max_study_gb")
    check(s.node.min_free_gb >= 0, "node.min_free_gb", "must be >= 0 (0 disables the free-space check)")
    check(0 <= s.node.max_used_percent <= 100, "node.max_used_percent",
          "must be between 0 and 100 (0 disables the used-percent check)")
    check(s.tls.min_version in ("1.2", "1.3"), "tls.min_version", "must be \"1.2\" or \"1.3\"")
    if s.tls.enabled:
        check(bool(s.tls.cert_file and s.tls.key_file), "tls.cert_file", "tls.enabled needs cert_file and key_file")
        for key in ("cert_file", "key_file", "ca_file", "crl_file"):
            value = getattr(s.tls, key)
            check(not value or Path(value).is_file(), f"tls.{key}", f"file not found: {value}")
    check(not s.tls.require_client_cert or bool(s.tls.ca_file), "tls.require_client_cert",
          "needs tls.ca_file (the CA that signs client certificates)")
    check(not s.tls.crl_file or s.tls.require_client_cert, "tls.crl_file",
          "revocation is checked for client certificates: set tls.require_client_cert = true")
    check("://" in s.storage.database_url, "storage.database_url", "must be an SQLAlchemy URL such as sqlite:///var/ctnode.db")
    check(s.storage.retention_days >= 0, "storage.retention_days", "must be >= 0")
    check(s.processing.stable_after >= 0, "processing.stable_after", "must be >= 0 seconds")
    check(s.processing.min_slices >= 1, "processing.min_slices", "must be at least 1")
    check(s.processing.device in ("auto", "cpu", "cuda"), "processing.device", "must be auto, cpu or cuda")
    check(s.processing.lung_method in ("auto", "hu", "net"), "processing.lung_method", "must be auto, hu or net")
    check(s.processing.workers >= 1, "processing.workers", "must be at least 1")
    check(s.processing.job_timeout > 0, "processing.job_timeout", "must be positive")
    check(s.processing.worker_memory_gb == 0 or s.processing.worker_memory_gb >= 1, "processing.worker_memory_gb",
          "must be 0 (no cap) or at least 1 GB (a worker needs about 1 GB before it reads a study)")
    check(s.processing.max_decoded_mb > 0, "processing.max_decoded_mb", "must be positive (MB)")
    check(0 < s.processing.max_decoded_instance_mb <= s.processing.max_decoded_mb,
          "processing.max_decoded_instance_mb", "must be positive (MB) and not above processing.max_decoded_mb")
    check(s.processing.max_attempts >= 1, "processing.max_attempts", "must be at least 1")
    check(s.processing.check_interval > 0, "processing.check_interval", "must be positive")
    check(s.processing.lease_s >= 3 * s.processing.check_interval, "processing.lease_s",
          "must be at least 3 x processing.check_interval (a lease is renewed every check_interval)")
    check(bool(s.node.roles) and all(r in ROLES for r in s.node.roles), "node.roles",
          f"must be a non-empty list of {', '.join(ROLES)}")
    check(len(s.node.name) <= 64, "node.name", "must be at most 64 characters")
    check(0 <= s.http.port <= 65535, "http.port", "must be an integer between 0 (any free port) and 65535")
    check(0 <= s.processing.key_images <= 50, "processing.key_images", "must be between 0 (none) and 50")
    check(s.export.max_attempts >= 1, "export.max_attempts", "must be at least 1")
    check(0 < s.export.backoff_base <= s.export.backoff_max, "export.backoff_base",
          "must be positive and not above export.backoff_max")
    check(bool(AE_TITLE_RE.match(s.export.calling_ae_title)), "export.calling_ae_title", "invalid AE title")
    names = set()
    for i, d in enumerate(s.destinations):
        key = f"destinations[{i}]"
        check(bool(d.name) and d.name not in names, f"{key}.name", "must be present and unique")
        names.add(d.name)
        check(bool(d.tls_cert_file) == bool(d.tls_key_file), f"{key}.tls_cert_file",
              "tls_cert_file and tls_key_file go together")
        if d.transport == Transport.DIMSE:
            _validate_dimse(d, key, check)
        else:
            _validate_stow(d, key, check)


def _validate_dimse(d: Destination, key: str, check: Callable[[bool, str, str], None]) -> None:
    check(bool(AE_TITLE_RE.match(d.ae_title)), f"{key}.ae_title", "invalid AE title")
    check(bool(d.host), f"{key}.host", "must be present")
    check(1 <= d.port <= 65535, f"{key}.port", "must be an integer between 1 and 65535")
    for attr in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(d, attr)
        check(not value or not d.tls or Path(value).is_file(), f"{key}.{attr}", f"file not found: {value}")


def _validate_stow(d: Destination, key: str, check: Callable[[bool, str, str], None]) -> None:
    url = urllib.parse.urlsplit(d.url)
    check(url.scheme in ("http", "https") and bool(url.hostname), f"{key}.url",
          "must be an http:// or https:// URL (the DICOMweb service root, e.g. https://pacs.example.org/dicom-web)")
    check(not url.username and not url.password, f"{key}.url",
          "must not hold credentials: use auth with username / password_env or token_env")
    if d.auth == HttpAuth.BASIC:
        check(bool(d.username), f"{key}.username", "auth = \"basic\" needs a username")
    if d.auth in SECRET_ENV_KEY:
        env_key = SECRET_ENV_KEY[d.auth]
        check(bool(getattr(d, env_key)), f"{key}.{env_key}",
              f"auth = \"{d.auth}\" needs the name of the environment variable that holds the secret")
        check(bool(d.secret), f"{key}.{env_key}", f"environment variable {getattr(d, env_key)} is not set or empty")
    for attr in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(d, attr)
        check(not value or Path(value).is_file(), f"{key}.{attr}", f"file not found: {value}")


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Read ``path`` (optional), apply ``overrides`` then environment variables, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        if section == "destinations":
            raw[section] = list(values)
        else:
            raw.setdefault(section, {}).update(values)

    settings = Settings(source=str(path) if path else "<defaults>")
    for key in raw:
        if key not in _SECTIONS and key != "destinations":
            raise ConfigError(f"{key}: unknown section (known: {', '.join([*_SECTIONS, 'destinations'])})")
    for section, cls in _SECTIONS.items():
        target = getattr(settings, section)
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a table")
        known = {f.name for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(sorted(known))})")
            setattr(target, key, _coerce(f"{section}.{key}", value, getattr(target, key)))
        for key in known:
            env_name = f"CTNODE_{section}_{key}".upper()
            if env_name in env:
                setattr(target, key, _coerce(f"{section}.{key} (from {env_name})", env[env_name], getattr(target, key)))

    dests = raw.get("destinations", [])
    if not isinstance(dests, list):
        raise ConfigError("destinations: must be an array of tables ([[destinations]])")
    for i, d in enumerate(dests):
        settings.destinations.append(_destination(i, d, env))
    _validate(settings)
    return settings


def _destination(i: int, d: Any, env: Mapping[str, str]) -> Destination:
    """``[[destinations]]`` entry ``i``, its keys checked against its transport; the STOW-RS secret is read
    from the environment variable the entry names."""
    key = f"destinations[{i}]"
    if not isinstance(d, dict):
        raise ConfigError(f"{key}: must be a table")
    try:
        transport = Transport(d.get("transport", Transport.DIMSE))
    except ValueError:
        raise ConfigError(f"{key}.transport: must be one of {', '.join(Transport)}") from None
    required, optional = DESTINATION_REQUIRED[transport], DESTINATION_OPTIONAL[transport]
    missing = set(required) - set(d)
    if missing:
        raise ConfigError(f"{key}: missing {', '.join(sorted(missing))} (transport {transport})")
    unknown = set(d) - set(required) - set(optional) - {"transport"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key for transport {transport}")
    values = {k: _coerce(f"{key}.{k}", d[k], kind) for k, kind in (required | optional).items() if k in d}
    if transport == Transport.STOW_RS:
        try:
            values["auth"] = HttpAuth(values.get("auth", HttpAuth.NONE))
        except ValueError:
            raise ConfigError(f"{key}.auth: must be one of {', '.join(HttpAuth)}") from None
        env_key = SECRET_ENV_KEY.get(values["auth"])
        values["tls"] = values["url"].lower().startswith("https://")
        if env_key and values.get(env_key):
            values["secret"] = env.get(values[env_key], "")
    return Destination(transport=transport, **values)
