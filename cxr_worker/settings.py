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
    # (cxr_worker.listener enforces them and logs every refusal and abort)
    max_pdu_bytes: int = 1048576  # maximum PDU length, advertised and enforced (A-ABORT)
    max_associations: int = 32  # simultaneous associations; more are refused
    # one calling host holds at most this many of max_associations; more are refused
    max_associations_per_host: int = 8
    # an idle association is released after this; a PDU that stops arriving is dropped
    network_timeout_seconds: float = 10.0
    acse_timeout_seconds: float = 10.0  # wait for A-ASSOCIATE-RQ / A-RELEASE
    dimse_timeout_seconds: float = 30.0  # wait for the next DIMSE message
    # refuse an association whose called AE title is not ae_title; false only while a
    # modality that calls another title is being reconfigured
    check_called_ae_title: bool = True
    # DICOM TLS (cxr_worker.tls): a certificate makes the port speak TLS only; modalities
    # must then present a certificate signed by tls_ca_certificates unless
    # tls_require_client_certificate is false
    tls_certificate: str = ""  # PEM certificate (chain); empty: plain DICOM
    tls_private_key: str = ""  # its PEM key, unencrypted, readable by the worker's user only
    tls_ca_certificates: str = ""  # PEM CA bundle that signs the modalities' certificates
    tls_require_client_certificate: bool = True


MIN_PDU_BYTES = 16384
MAX_PDU_BYTES = 16777216


@dataclass
class Limits:
    # Decompression amplification and memory per image (issue 10; cxr_worker.decode, .receive).
    # Sized for chest radiographs: a 43 x 43 cm detector at 100 um is 4300 x 4300 at 16 bits,
    # 37 MB decoded. Refused at the listener with a DICOM status (0xC212-0xC214, nothing
    # written) or, for a file the listener did not bound (replay, score), not scored with
    # the reason naming the key.
    max_dataset_bytes: int = 64 * 2**20  # a C-STORE data set as received (encoded)
    max_decoded_bytes: int = 64 * 2**20  # Rows x Columns x Samples x Frames x Bits Allocated/8
    max_inflated_bytes: int = 80 * 2**20  # a Deflated Explicit VR Little Endian data set


MIN_LIMIT_BYTES = 2**20
MAX_LIMIT_BYTES = 2**31


@dataclass
class Pacs:
    ae_title: str = ""  # empty: no PACS; results stay in the worklist and data_dir/results
    host: str = "127.0.0.1"
    port: int = 104
    timeout_seconds: float = 30.0  # each ACSE/DIMSE answer; an idle connection
    connect_timeout_seconds: float = 5.0  # TCP connect to the PACS
    # the results go over one association kept open; released after this many seconds
    # without a C-STORE (and at shutdown); 0: one association per result
    idle_release_seconds: float = 10.0
    # DICOM TLS to the PACS (cxr_worker.tls): its certificate is always verified
    tls: bool = False
    tls_ca_certificates: str = ""  # PEM CA bundle; empty: the system's trusted CAs
    tls_certificate: str = ""  # the worker's client certificate, if the PACS asks for one
    tls_private_key: str = ""  # its PEM key, unencrypted
    tls_verify_hostname: bool = True  # the certificate must name pacs.host


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
    # what this process does: all, or receive / process / send, comma-separated (scale-out:
    # several processes on one PostgreSQL worklist and one data_dir; `serve --role` too)
    role: str = "all"
    # worker processes that decode and score in parallel; 0: one per core
    workers: int = 0
    # the longest an idle loop sleeps before it looks for work nobody woke it for (SQLite:
    # another process's, e.g. `cxr-worker retry`; PostgreSQL notifies, and the loops look
    # every 30 s at most); new images, results and retries due wake or time the loops
    poll_seconds: float = 2.0
    lease_seconds: float = 120.0
    max_attempts: int = 10
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 900.0
    retention_interval_seconds: float = 3600.0  # retention, then the orphan sweep
    # the sweep removes temporary files (left by a kill -9) and spooled images or results no
    # worklist row references (a store the database refused) once older than this; never
    # less than a minute, so a store or write in progress is never touched
    orphan_grace_seconds: float = 3600.0
    # SIGTERM: how long the running scoring or delivery may take to finish before the worker
    # gives its lease back and exits anyway (it is done again at the next start)
    shutdown_grace_seconds: float = 3.0


MIN_ORPHAN_GRACE_SECONDS = 60.0
MAX_SHUTDOWN_GRACE_SECONDS = 60.0


@dataclass
class Report:
    series_number: int = 9901
    uid_prefix: str = "1.2.826.0.1.3680043.8.498.7717."
    manufacturer: str = "cxr-worker"
    # Grad-CAM heatmap of each score (regions that drove it; not a segmentation): drawn over
    # the radiograph on the Secondary Capture with a legend, and kept beside the result as
    # results/<study>/<sop>.heatmap.png for the web page. false: neither (about 1 ms an image)
    heatmap: bool = True


@dataclass
class Http:
    # the web worklist and its REST API (/api/v1/, cxr_worker.web), and health (/healthz,
    # /readyz) and Prometheus metrics (/metrics), which need no token
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    # "token": the API and the page need a token (cxr-worker token create); "none": no sign-in
    # at all, allowed only with a loopback http.host (127.0.0.1, ::1, localhost)
    auth: str = "token"
    session_hours: float = 12.0  # a page's sign-in lasts this long (a shift)
    # mark the session cookie Secure even on plain HTTP (a TLS proxy in front that does not
    # send X-Forwarded-Proto); it is Secure anyway when the request came over HTTPS
    cookie_secure: bool = False


OUTPUT_KINDS = ("sc", "sr", "hl7")


@dataclass
class Outputs:
    # what each scored image produces and delivers, each delivered and retried on its own
    # (its own status in the worklist): "sc" the Secondary Capture (a picture with the result
    # burned in) and "sr" the Structured Report (TID 1500, IHE AI Results), both to the PACS
    # ([pacs]); "hl7" an HL7 v2.5.1 ORU^R01 to the RIS over MLLP ([hl7]). The Secondary
    # Capture is always built and kept under data_dir/results (the worklist's record)
    kinds: list[str] = field(default_factory=lambda: ["sc"])


@dataclass
class Hl7:
    # the RIS or reading worklist that receives an ORU^R01 per scored image (outputs.kinds
    # "hl7"); one MLLP connection per message, the ACK awaited (AA: delivered; AE/AR, no
    # ACK, no connection: retried as [jobs] says, then undelivered)
    host: str = ""  # required with "hl7" in outputs.kinds
    port: int = 2575
    sending_application: str = "CXR_WORKER"  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    assigning_authority: str = ""  # PID-3.4.1 (namespace of the Patient ID)
    assigning_authority_oid: str = ""  # PID-3.4.2 (with PID-3.4.3 ISO)
    identifier_type: str = "MR"  # PID-3.5
    # what else of the patient goes in PID (PID-3, the Patient ID, always): name (PID-5),
    # birth_date (PID-7), sex (PID-8); empty: nothing else
    patient_fields: list[str] = field(default_factory=list)
    # where the priority goes: OBR-27 (OBR-27.6), ORC-7 (ORC-7.6), TQ1-9
    priority_fields: list[str] = field(default_factory=lambda: ["OBR-27"])
    priority_suspected: str = "S"  # the code for SUSPECTED PNEUMONIA (S: stat)
    priority_negative: str = "R"  # the code for NO PNEUMONIA DETECTED (R: routine)
    processing_id: str = "P"  # MSH-11: P production, T training, D debugging
    connect_timeout_seconds: float = 10.0
    timeout_seconds: float = 30.0  # for the ACK after the message is sent


LOG_FORMATS = ("text", "json")


@dataclass
class Logging:
    # "text": one readable line per record; "json": one JSON object per line (time, level,
    # logger, message, exception) for log shippers, third-party libraries' records included
    format: str = "text"


@dataclass
class Settings:
    listener: Listener = field(default_factory=Listener)
    limits: Limits = field(default_factory=Limits)
    pacs: Pacs = field(default_factory=Pacs)
    database: Database = field(default_factory=Database)
    storage: Storage = field(default_factory=Storage)
    model: Model = field(default_factory=Model)
    gate: Gate = field(default_factory=Gate)
    jobs: Jobs = field(default_factory=Jobs)
    report: Report = field(default_factory=Report)
    logging: Logging = field(default_factory=Logging)
    http: Http = field(default_factory=Http)
    outputs: Outputs = field(default_factory=Outputs)
    hl7: Hl7 = field(default_factory=Hl7)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'worklist.db'}"

    @property
    def pacs_configured(self) -> bool:
        return bool(self.pacs.ae_title)

    @property
    def delivered_kinds(self) -> tuple[str, ...]:
        """The output kinds that have somewhere to go: ``sc`` and ``sr`` with a PACS, ``hl7``
        (its host is then required); each gets a delivery of its own."""
        return tuple(k for k in OUTPUT_KINDS if k in self.outputs.kinds
                     and (k == "hl7" or self.pacs_configured))


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
    _validate_size_limits(s)
    _validate_tls(s)
    if s.http.enabled and not s.http.host:
        raise ConfigError("http.host: required when http.enabled is true")
    _validate_http(s)
    if s.pacs_configured and not s.pacs.host:
        raise ConfigError("pacs.host: required when pacs.ae_title is set")
    _validate_processing(s)
    _validate_outputs(s)


def _validate_outputs(s: Settings) -> None:
    kinds = s.outputs.kinds
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown:
        raise ConfigError(f"outputs.kinds: {unknown[0]!r} is not one of "
                          f"{', '.join(OUTPUT_KINDS)}")
    if not kinds:
        raise ConfigError(f"outputs.kinds: empty; name at least one of {', '.join(OUTPUT_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError("outputs.kinds: a kind is named twice")
    h = s.hl7
    if "hl7" in kinds and not h.host:
        raise ConfigError('hl7.host: required when outputs.kinds has "hl7" (the RIS\'s MLLP '
                          "listener)")
    if not 0 < h.port <= 65535:
        raise ConfigError(f"hl7.port: {h.port} is not a TCP port (1-65535)")
    for name in ("timeout_seconds", "connect_timeout_seconds"):
        if not getattr(h, name) > 0:
            raise ConfigError(f"hl7.{name}: must be positive")
    for name in ("priority_suspected", "priority_negative", "sending_application"):
        if not getattr(h, name):
            raise ConfigError(f"hl7.{name}: must not be empty")
    try:
        hl7_config(s)
    except ValueError as exc:  # the builder's own check names the key (hl7.patient_fields...)
        raise ConfigError(str(exc)) from None


def hl7_config(s: Settings) -> Any:
    """``[hl7]`` as the builder's :class:`cxr_worker.hl7v2.Hl7Config`."""
    from cxr_worker.hl7v2 import Hl7Config
    from cxr_worker.labels import Label

    h = s.hl7
    return Hl7Config(
        host=h.host, port=h.port, sending_application=h.sending_application,
        sending_facility=h.sending_facility, receiving_application=h.receiving_application,
        receiving_facility=h.receiving_facility, assigning_authority=h.assigning_authority,
        assigning_authority_oid=h.assigning_authority_oid, identifier_type=h.identifier_type,
        patient_fields=tuple(h.patient_fields), priority_fields=tuple(h.priority_fields),
        priorities={Label.SUSPECTED.value: h.priority_suspected,
                    Label.NEGATIVE.value: h.priority_negative},
        processing_id=h.processing_id, connect_timeout_seconds=h.connect_timeout_seconds,
        timeout_seconds=h.timeout_seconds)


HTTP_AUTH = ("token", "none")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _validate_http(s: Settings) -> None:
    h = s.http
    if h.auth not in HTTP_AUTH:
        raise ConfigError(f"http.auth: {h.auth!r} is not one of {', '.join(HTTP_AUTH)}")
    if h.auth == "none" and not is_loopback(h.host):
        raise ConfigError(
            f"http.auth: \"none\" (no sign-in) is allowed only with a loopback http.host "
            f"(127.0.0.1, ::1, localhost), not {h.host!r}: keep http.auth = \"token\" and "
            "create tokens with 'cxr-worker token create', or bind http.host to 127.0.0.1")
    if not 0 < h.session_hours <= 24 * 31:
        raise ConfigError(f"http.session_hours: {h.session_hours} is not in (0, 744]")


def _validate_limits(s: Settings) -> None:
    li = s.listener
    if not MIN_PDU_BYTES <= li.max_pdu_bytes <= MAX_PDU_BYTES:
        raise ConfigError(f"listener.max_pdu_bytes: {li.max_pdu_bytes} is not in "
                          f"{MIN_PDU_BYTES}-{MAX_PDU_BYTES}")
    if li.max_associations < 1:
        raise ConfigError("listener.max_associations: must be at least 1")
    if li.max_associations_per_host < 1:
        raise ConfigError("listener.max_associations_per_host: must be at least 1")
    for name in ("network_timeout_seconds", "acse_timeout_seconds", "dimse_timeout_seconds"):
        if not getattr(li, name) > 0:
            raise ConfigError(f"listener.{name}: must be positive")


def _validate_size_limits(s: Settings) -> None:
    for name in ("max_dataset_bytes", "max_decoded_bytes", "max_inflated_bytes"):
        value = getattr(s.limits, name)
        if not MIN_LIMIT_BYTES <= value <= MAX_LIMIT_BYTES:
            raise ConfigError(f"limits.{name}: {value} is not in "
                              f"{MIN_LIMIT_BYTES}-{MAX_LIMIT_BYTES}")


def _validate_tls(s: Settings) -> None:
    """The TLS keys fit together (whether their files can be used is checked at start-up, by
    :mod:`cxr_worker.tls`)."""
    li, p = s.listener, s.pacs
    for section, cert, key in (("listener", li.tls_certificate, li.tls_private_key),
                               ("pacs", p.tls_certificate, p.tls_private_key)):
        if bool(cert) != bool(key):
            missing, given = (("tls_private_key", "tls_certificate") if cert else
                              ("tls_certificate", "tls_private_key"))
            raise ConfigError(f"{section}.{missing}: required when {section}.{given} is set "
                              "(a certificate and its private key, both PEM files)")
    if not li.tls_certificate and li.tls_ca_certificates:
        raise ConfigError("listener.tls_ca_certificates: set, but listener.tls_certificate is "
                          "empty, so the listener speaks plain DICOM: set tls_certificate and "
                          "tls_private_key too, or empty tls_ca_certificates")
    if li.tls_certificate and li.tls_require_client_certificate and not li.tls_ca_certificates:
        raise ConfigError("listener.tls_ca_certificates: required when listener.tls_certificate "
                          "is set and listener.tls_require_client_certificate is true (the "
                          "default): the CA certificates that sign the modalities' "
                          "certificates; or set tls_require_client_certificate = false")
    if not p.tls:
        for name in ("tls_ca_certificates", "tls_certificate"):
            if getattr(p, name):
                raise ConfigError(f"pacs.{name}: set, but pacs.tls is false, so results would "
                                  "go to the PACS unencrypted: set pacs.tls = true, or empty "
                                  f"pacs.{name}")


def _validate_shutdown_and_sweep(s: Settings) -> None:
    if s.jobs.orphan_grace_seconds < MIN_ORPHAN_GRACE_SECONDS:
        raise ConfigError(f"jobs.orphan_grace_seconds: {s.jobs.orphan_grace_seconds} is under "
                          f"{MIN_ORPHAN_GRACE_SECONDS:.0f} (a store in progress could be swept)")
    if not 0 < s.jobs.shutdown_grace_seconds <= MAX_SHUTDOWN_GRACE_SECONDS:
        raise ConfigError(f"jobs.shutdown_grace_seconds: {s.jobs.shutdown_grace_seconds} is not "
                          f"in (0, {MAX_SHUTDOWN_GRACE_SECONDS:.0f}]")
    for name in ("timeout_seconds", "connect_timeout_seconds"):
        if not getattr(s.pacs, name) > 0:
            raise ConfigError(f"pacs.{name}: must be positive")
    if not s.pacs.idle_release_seconds >= 0:
        raise ConfigError("pacs.idle_release_seconds: must be 0 (not kept) or positive")


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
    if s.jobs.workers < 0:
        raise ConfigError("jobs.workers: must be 0 (one per core) or more")
    try:
        job_roles(s)
    except ValueError as exc:
        raise ConfigError(f"jobs.role: {exc}") from exc
    for name in ("poll_seconds", "lease_seconds", "retry_base_seconds", "retry_max_seconds"):
        if getattr(s.jobs, name) <= 0:
            raise ConfigError(f"jobs.{name}: must be positive")
    _validate_shutdown_and_sweep(s)
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


ROLES = ("receive", "process", "send")


def job_roles(s: Settings) -> frozenset[str]:
    """``jobs.role``: ``all``, or a comma-separated set of receive, process, send; raises
    ValueError naming what is wrong."""
    text = s.jobs.role
    words = {w.strip() for w in text.split(",") if w.strip()}
    if words == {"all"}:
        return frozenset(ROLES)
    if not words or words - set(ROLES):
        raise ValueError(f"{text!r} is not all, or one or more of receive, process, send "
                         "(comma-separated)")
    return frozenset(words)


def worker_count(s: Settings) -> int:
    """``jobs.workers``, 0 resolved to the cores this process may use."""
    if s.jobs.workers:
        return s.jobs.workers
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
