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
    refuse_outside_age_range: bool = False  # default: score, mark "outside validated population"


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
class Settings:
    listener: Listener = field(default_factory=Listener)
    pacs: Pacs = field(default_factory=Pacs)
    database: Database = field(default_factory=Database)
    storage: Storage = field(default_factory=Storage)
    model: Model = field(default_factory=Model)
    gate: Gate = field(default_factory=Gate)
    jobs: Jobs = field(default_factory=Jobs)
    report: Report = field(default_factory=Report)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'worklist.db'}"

    @property
    def pacs_configured(self) -> bool:
        return bool(self.pacs.ae_title)


def _coerce(key: str, value: Any, ftype: Any, from_env: bool) -> Any:
    t = str(ftype)
    if from_env and isinstance(value, str):
        if "list" in t:
            return [v.strip() for v in value.split(",") if v.strip()]
        if "float | None" in t:
            return None if value.strip() == "" else _coerce(key, value, "float", True)
        if t == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        if t == "int":
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if t == "float":
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        return value
    if "float | None" in t:
        if value == "" or value is None:
            return None
        t = "float"
    if t == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if t == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if t == "str" and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if "list" in t and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return value


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
    for key, port in (("listener.port", s.listener.port), ("pacs.port", s.pacs.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a TCP port (0-65535)")
    if s.pacs_configured and not s.pacs.host:
        raise ConfigError("pacs.host: required when pacs.ae_title is set")
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
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    settings = Settings()
    sections = {f.name: f for f in dataclasses.fields(Settings)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown section [{section}] in {path}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in values.items():
            _set(settings, section, key, value, from_env=False)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        _set(settings, parts[0], parts[1], value, from_env=True)
    _validate(settings)
    return settings


def _set(settings: Settings, section: str, key: str, value: Any, from_env: bool) -> None:
    obj = getattr(settings, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"unknown key {section}.{key}")
    setattr(obj, key, _coerce(f"{section}.{key}", value, fields[key].type, from_env))


def as_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
