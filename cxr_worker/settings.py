"""Settings: a TOML file, every key overridable by ``CXR_WORKER__<SECTION>__<KEY>``.

Read once by the composition root (``cli``/``service``) and passed down; no module reads
settings on its own. Unknown sections or keys, and values of the wrong type or range, stop
start-up with a :class:`~cxr_worker.errors.ConfigError` naming the key. The documented
example is ``deploy/cxr-worker.toml``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_worker.errors import ConfigError

ENV_PREFIX = "CXR_WORKER__"
CONFIG_ENV = "CXR_WORKER_CONFIG"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


@dataclass
class Listener:
    ae_title: str = "CXR_WORKER"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_ae_titles: list[str] = field(default_factory=list)  # empty: any
    accept_dx_for_processing: bool = False
    # bounded resources: a peer that connects and goes quiet holds an association slot only
    # until a timeout, and the slots are more than a site's modalities, so that an honest
    # modality still gets through while hostile or broken peers hold some
    max_pdu_bytes: int = 1048576  # advertised maximum PDU length (A-ASSOCIATE-AC)
    max_associations: int = 32  # simultaneous associations; more are refused
    network_timeout_seconds: float = 10.0  # an idle association is released after this
    acse_timeout_seconds: float = 10.0  # wait for A-ASSOCIATE-RQ / A-RELEASE
    dimse_timeout_seconds: float = 30.0  # wait for the next DIMSE message


MIN_PDU_BYTES = 16384
MAX_PDU_BYTES = 16777216


@dataclass
class Pacs:
    ae_title: str = ""  # empty: no PACS; results stay in the worklist and data_dir/results
    host: str = "127.0.0.1"
    port: int = 104
    timeout_seconds: float = 30.0


@dataclass
class Database:
    url: str = ""  # empty: SQLite file <data_dir>/worklist.db


@dataclass
class Storage:
    data_dir: str = "cxr-worker-data"
    retention_days: float = 30.0  # spooled images and results of finished studies


@dataclass
class Model:
    path: str = ""  # empty: the model bundled in the package
    threshold: float | None = None  # empty: the model card's
    num_threads: int = 2


@dataclass
class Gate:
    require_body_part_chest: bool = True
    allow_missing_body_part: bool = True
    view_positions: list[str] = field(default_factory=lambda: ["PA", "AP"])
    allow_missing_view_position: bool = True
    min_age_years: float = 1.0
    max_age_years: float = 5.0
    # the validated population is min_age_years-max_age_years (paediatric 1-5); every scored
    # image is labelled in population / OUTSIDE VALIDATED POPULATION / POPULATION UNKNOWN
    refuse_outside_age_range: bool = False  # true: refuse "outside" (rule patient_age)
    refuse_unknown_age: bool = False  # true: refuse images without a usable patient age


@dataclass
class Jobs:
    poll_seconds: float = 0.25
    lease_seconds: float = 120.0
    max_attempts: int = 10
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 900.0
    retention_interval_seconds: float = 3600.0


@dataclass
class Report:
    series_number: int = 9901
    uid_prefix: str = "1.2.826.0.1.3680043.8.498.7717."
    manufacturer: str = "cxr-worker"


@dataclass
class Http:
    # health (/healthz, /readyz) and Prometheus metrics (/metrics); no token needed
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080


LOG_FORMATS = ("text", "json")


@dataclass
class Logging:
    # "text": one readable line per record; "json": one JSON object per line (time, level,
    # logger, message, exception) for log shippers, third-party libraries' records included
    format: str = "text"


@dataclass
class Settings:
    listener: Listener = field(default_factory=Listener)
    pacs: Pacs = field(default_factory=Pacs)
    database: Database = field(default_factory=Database)
    storage: Storage = field(default_factory=Storage)
    model: Model = field(default_factory=Model)
    gate: Gate = field(default_factory=Gate)
    jobs: Jobs = field(default_factory=Jobs)
    report: Report = field(default_factory=Report)
    logging: Logging = field(default_factory=Logging)
    http: Http = field(default_factory=Http)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'worklist.db'}"

    @property
    def pacs_configured(self) -> bool:
        return bool(self.pacs.ae_title)


def _env_bool(key: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _env_number(kind: type[int] | type[float]) -> Any:
    def parse(key: str, value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            name = "an integer" if kind is int else "a number"
            raise ConfigError(f"{key}: expected {name}, got {value!r}") from None

    return parse


# how an environment string becomes each field type
_FROM_ENV: dict[str, Any] = {
    "str": lambda key, v: v,
    "bool": _env_bool,
    "int": _env_number(int),
    "float": _env_number(float),
    "float | None": lambda key, v: None if not v.strip() else _env_number(float)(key, v),
    "list[str]": lambda key, v: [x.strip() for x in v.split(",") if x.strip()],
}

# what a TOML value must be for each field type
_TOML_CHECK: dict[str, tuple[str, Any]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "list[str]": ("a list of strings",
                  lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def _coerce(key: str, value: Any, ftype: str, from_env: bool) -> Any:
    if from_env:
        return _FROM_ENV[ftype](key, value)
    if ftype == "float | None":
        if value == "" or value is None:
            return None
        ftype = "float"
    what, ok = _TOML_CHECK[ftype]
    if not ok(value):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    return float(value) if ftype == "float" else value


def _validate(s: Settings) -> None:
    for key, ae, optional in (
        ("listener.ae_title", s.listener.ae_title, False),
        ("pacs.ae_title", s.pacs.ae_title, True),
    ):
        if (ae or not optional) and not _AE_RE.match(ae):
            raise ConfigError(f"{key}: {ae!r} is not a DICOM AE title (1-16 characters, no '\\')")
    for ae in s.listener.allowed_calling_ae_titles:
        if not _AE_RE.match(ae):
            raise ConfigError(f"listener.allowed_calling_ae_titles: {ae!r} is not an AE title")
    for key, port in (("listener.port", s.listener.port), ("pacs.port", s.pacs.port),
                      ("http.port", s.http.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a TCP port (0-65535)")
    _validate_limits(s)
    if s.http.enabled and not s.http.host:
        raise ConfigError("http.host: required when http.enabled is true")
    if s.pacs_configured and not s.pacs.host:
        raise ConfigError("pacs.host: required when pacs.ae_title is set")
    _validate_processing(s)


def _validate_limits(s: Settings) -> None:
    li = s.listener
    if not MIN_PDU_BYTES <= li.max_pdu_bytes <= MAX_PDU_BYTES:
        raise ConfigError(f"listener.max_pdu_bytes: {li.max_pdu_bytes} is not in "
                          f"{MIN_PDU_BYTES}-{MAX_PDU_BYTES}")
    if li.max_associations < 1:
        raise ConfigError("listener.max_associations: must be at least 1")
    for name in ("network_timeout_seconds", "acse_timeout_seconds", "dimse_timeout_seconds"):
        if not getattr(li, name) > 0:
            raise ConfigError(f"listener.{name}: must be positive")


def _validate_processing(s: Settings) -> None:
    if s.model.threshold is not None and not 0.0 < s.model.threshold < 1.0:
        raise ConfigError(f"model.threshold: {s.model.threshold} is not in (0, 1)")
    if not re.fullmatch(r"([1-9]\d*|0)(\.([1-9]\d*|0))*\.", s.report.uid_prefix) or len(
        s.report.uid_prefix
    ) > 40:
        raise ConfigError(
            f"report.uid_prefix: {s.report.uid_prefix!r} must be a UID root ending in '.', "
            "at most 40 characters"
        )
    if not 1 <= s.report.series_number <= 2**31 - 1:
        raise ConfigError(f"report.series_number: {s.report.series_number} out of range")
    if s.jobs.max_attempts < 1:
        raise ConfigError("jobs.max_attempts: must be at least 1")
    for name in ("poll_seconds", "lease_seconds", "retry_base_seconds", "retry_max_seconds"):
        if getattr(s.jobs, name) <= 0:
            raise ConfigError(f"jobs.{name}: must be positive")
    if s.gate.min_age_years > s.gate.max_age_years:
        raise ConfigError("gate.min_age_years: greater than gate.max_age_years")
    if s.model.num_threads < 1:
        raise ConfigError("model.num_threads: must be at least 1")
    if s.logging.format not in LOG_FORMATS:
        raise ConfigError(f"logging.format: {s.logging.format!r} is not one of "
                          f"{', '.join(LOG_FORMATS)}")


def load_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Defaults, then the TOML file (``path`` or ``$CXR_WORKER_CONFIG``), then the environment."""
    env = dict(os.environ if environ is None else environ)
    path = path or env.get(CONFIG_ENV) or None
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, not text
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"config file {path}: cannot read it ({reason})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    settings = Settings()
    sections = {f.name for f in dataclasses.fields(Settings)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown section [{section}] in {path}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in values.items():
            _set(settings, section, key, value, from_env=False)
    _apply_environment(settings, env, sections)
    _validate(settings)
    return settings


def _apply_environment(settings: Settings, env: dict[str, str], sections: set[str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        _set(settings, parts[0], parts[1], value, from_env=True)


def _set(settings: Settings, section: str, key: str, value: Any, from_env: bool) -> None:
    obj = getattr(settings, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"unknown key {section}.{key}")
    setattr(obj, key, _coerce(f"{section}.{key}", value, str(fields[key].type), from_env))
