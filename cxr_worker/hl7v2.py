"""The result as an HL7 v2.5.1 ORU^R01 to the RIS or reading worklist, sent over MLLP.

:func:`build_oru` makes the message from the source image's header and the score;
:func:`send_oru` sends it and waits for the acknowledgement. The message::

    MSH|^~\\&|CXR_WORKER|<fac>|<RIS>|<fac>|<now>||ORU^R01^ORU_R01|<id>|P|2.5.1||||||UNICODE UTF-8
    PID|1||<PatientID>^^^<assigning authority>^MR          (only what Hl7Config.patient_fields adds)
    ORC|RE|<accession>|<accession>||CM[|||^^^^^<priority>]                  (priority: "ORC-7")
    OBR|1|<accession>|<accession>|36554-4^XR Chest Single view^LN|||<acquired>|...
        |<now>|||F||[^^^^^<priority>]              (OBR-22 now, OBR-25 F or C, "OBR-27")
    NTE|1|L|AI triage - NOT FOR DIAGNOSTIC USE
    [TQ1|1||||||||<priority>^Stat^HL70485]                                        ("TQ1-9")
    OBX|1|CWE|233604007^Pneumonia^SCT||52101004^Present^SCT|||A|||F|||<now>   (Absent: N)
    OBX|2|NM|probability^Pneumonia probability (calibrated)^99CXRW||0.930000|1^no units^UCUM|..F
    OBX|3|NM|threshold^Decision threshold^99CXRW||0.364530|1^no units^UCUM|...F
    OBX|4|ST|model^AI model version^99CXRW||cxr-pneumonia-mnv2-...|...F
    OBX|5|ST|110180^Study Instance UID^DCM||<Study Instance UID>|...F
    [OBX|6|ST|population^Validated population^99CXRW||OUTSIDE VALIDATED POPULATION (...)|...F]

Decisions:

- python-hl7 (``hl7``) places every value by position (``Segment.assign_field``), parses the
  ACK, and its asyncio MLLP server is the listener in the tests. It was chosen over hl7apy
  because hl7apy's encoder cannot carry an escaped CR: it re-escapes ``\\X0D\\`` to
  ``\\E\\X0D\\E\\`` and leaves a literal ``\\F\\`` in a value unescaped, so a hostile accession
  could still change the message's structure;
- every value from the DICOM header (and from the settings) goes through :func:`escape`:
  HL7 2.5.1 section 2.7.4, ``| ^ & ~ \\`` as ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` and every
  control character (CR, LF, ...) as hexadecimal data ``\\Xhh\\``. python-hl7's own
  ``escape`` is not used: it writes CR as the formatted-text ``\\.br\\`` (FT/TX only), a
  control character below 0x10 as ``\\X a\\`` (a space for the leading zero) and hex-escapes
  all non-ASCII text, which MSH-18 UNICODE UTF-8 carries as it is;
- PID carries only PID-3 (Patient ID with the configured assigning authority and identifier
  type) unless ``patient_fields`` adds ``name`` (PID-5), ``birth_date`` (PID-7) or ``sex``
  (PID-8): the RIS matches the result by patient identifier and order, and nothing else about
  the patient need leave the worker. (PID-5 is required by the standard's segment table; a RIS
  that insists gets ``patient_fields = ("name",)``);
- placer and filler order numbers (ORC-2/3, OBR-2/3) are the Accession Number;
- the priority goes where the site's RIS reads it (``priority_fields``: OBR-27.6 and ORC-7.6,
  TQ component 6, table 0027, deprecated in 2.5.1 but still what most RIS read; TQ1-9, its
  2.5.1 successor, table 0485) with the code the site maps per label (``priorities``,
  default ``S`` stat for SUSPECTED PNEUMONIA, ``R`` routine otherwise);
- MSH-10 (message control ID) is derived from the source image, the model version and the
  decision: a resend of the same result carries the same ID (a receiver may detect the
  duplicate), another decision another ID. Original-mode acknowledgement (MSH-15/16 empty):
  ``AA`` (or an enhanced-mode ``CA``) for this control ID is delivered; ``AE``/``AR``/``CE``/
  ``CR``, an ACK for another message, no ACK within the timeout, a refused or broken connection
  are :class:`Hl7SendError` for the caller to retry or dead-letter, like a failed C-STORE.
  Its message carries no patient data: the ACK's free text (MSA-3, ERR) is kept in ``detail``.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import hl7  # type: ignore[import-untyped]
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM

from cxr_worker.errors import SendError
from cxr_worker.labels import Label

logger = logging.getLogger(__name__)

VERSION = "2.5.1"
SB, EB, CR = b"\x0b", b"\x1c", b"\r"
ENCODING_CHARACTERS = "^~\\&"
FIELD_SEPARATOR = "|"
CHARACTER_SET = "UNICODE UTF-8"  # MSH-18; the message is sent as UTF-8
NOT_FOR_DIAGNOSTIC_USE = "AI triage - NOT FOR DIAGNOSTIC USE"

LOCAL_SYSTEM = "99CXRW"  # local coding system, the same as the SR's
FINDING = ("233604007", "Pneumonia", "SCT")
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("272519000", "Absent", "SCT")
PROBABILITY = ("probability", "Pneumonia probability (calibrated)", LOCAL_SYSTEM)
THRESHOLD = ("threshold", "Decision threshold", LOCAL_SYSTEM)
MODEL = ("model", "AI model version", LOCAL_SYSTEM)
STUDY_UID = ("110180", "Study Instance UID", "DCM")
POPULATION = ("population", "Validated population", LOCAL_SYSTEM)
NO_UNITS = ("1", "no units", "UCUM")

PATIENT_FIELDS = frozenset({"name", "birth_date", "sex"})
PRIORITY_FIELDS = frozenset({"OBR-27", "ORC-7", "TQ1-9"})
# HL7 table 0485 (extended priority codes), for the text of TQ1-9
PRIORITY_TEXT = {"S": "Stat", "A": "ASAP", "R": "Routine", "P": "Preop", "C": "Callback",
                 "T": "Timing critical", "PRN": "As needed"}
DELIVERED = frozenset({"AA", "CA"})
RESULT_STATUSES = ("F", "C")  # final; corrected (a result that replaces one sent before)


def _default_priorities() -> dict[str, str]:
    return {Label.SUSPECTED.value: "S", Label.NEGATIVE.value: "R"}


@dataclass(frozen=True)
class Hl7Config:
    """Where the ORU goes and what it says (``[hl7]``: :func:`cxr_worker.settings.hl7_config`).

    ``host`` empty: no HL7 output. ``assigning_authority`` is PID-3.4.1 (namespace ID),
    ``assigning_authority_oid`` PID-3.4.2 (with PID-3.4.3 ``ISO``), ``identifier_type`` PID-3.5.
    ``priorities`` maps each :class:`~cxr_worker.labels.Label` value to the code written in
    each of ``priority_fields``.
    """

    host: str = ""
    port: int = 2575
    sending_application: str = "CXR_WORKER"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    assigning_authority: str = ""
    assigning_authority_oid: str = ""
    identifier_type: str = "MR"
    patient_fields: tuple[str, ...] = ()
    priority_fields: tuple[str, ...] = ("OBR-27",)
    priorities: Mapping[str, str] = field(default_factory=_default_priorities)
    universal_service_id: tuple[str, str, str] = ("36554-4", "XR Chest Single view", "LN")
    processing_id: str = "P"
    connect_timeout_seconds: float = 10.0
    timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        unknown = set(self.patient_fields) - PATIENT_FIELDS
        if unknown:
            raise ValueError(f"hl7.patient_fields: unknown {sorted(unknown)}; "
                             f"use {sorted(PATIENT_FIELDS)}")
        unknown = set(self.priority_fields) - PRIORITY_FIELDS
        if unknown:
            raise ValueError(f"hl7.priority_fields: unknown {sorted(unknown)}; "
                             f"use {sorted(PRIORITY_FIELDS)}")
        missing = {label.value for label in Label} - set(self.priorities)
        if missing:
            raise ValueError(f"hl7.priorities: no code for {sorted(missing)}")
        if self.timeout_seconds <= 0 or self.connect_timeout_seconds <= 0:
            raise ValueError("hl7 timeouts must be positive")


class Hl7SendError(SendError):
    """The ORU was not acknowledged as accepted. ``ack_code``: MSA-1 when an ACK came back
    (``AE``, ``AR``, ...), else None (no connection, no ACK within the timeout, a broken
    frame); ``detail``: the ACK's own text (MSA-3, ERR), which may name the patient and is
    therefore not part of the message."""

    def __init__(self, message: str, ack_code: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.ack_code = ack_code
        self.detail = detail


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    message_control_id: str  # MSA-2


# -- values -----------------------------------------------------------------------------------
_ESCAPES = {"|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\", "\\": "\\E\\"}


def escape(value: str) -> str:
    """``value`` as HL7 v2.5.1 text with the default delimiters (section 2.7.4): the
    delimiters and the escape character as escape sequences, control characters (CR, LF, ...)
    as hexadecimal data ``\\Xhh\\``; everything else, non-ASCII included, as it is."""
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\X{ord(ch):02X}\\")
        else:
            out.append(ch)
    return "".join(out)


def _text(source: Dataset, keyword: str) -> str:
    """A header value as text; a value pydicom split at DICOM's backslash (VM > 1, or a hostile
    single value) is joined back with the backslash."""
    value: Any = source.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _number(x: float) -> str:
    return f"{float(x):.6f}"


def _hl7_datetime(when: datetime.datetime) -> str:
    if when.tzinfo is None:
        return when.strftime("%Y%m%d%H%M%S")
    return when.strftime("%Y%m%d%H%M%S%z")


def observation_datetime(source: Dataset) -> datetime.datetime | None:
    """When the image was acquired: Acquisition DateTime, else Acquisition Date/Time, Content
    Date/Time, Study Date/Time (the first valid pair); None when none is usable."""
    adt = source.get("AcquisitionDateTime")
    if adt:
        try:
            return DT(str(adt))
        except ValueError:
            pass
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"),
                             ("ContentDate", "ContentTime"), ("StudyDate", "StudyTime")):
        d, t = source.get(date_kw), source.get(time_kw)
        if not d:
            continue
        try:
            day = DA(str(d))
            clock = TM(str(t)) if t else None
        except ValueError:
            continue
        if day is None:
            continue
        return datetime.datetime.combine(day, clock or datetime.time())
    return None


def message_control_id(source_sop_uid: str, model_version: str, label: Label,
                       threshold: float) -> str:
    """MSH-10 (20 characters): the same for a resend of the same result, new for another
    decision."""
    key = "|".join([source_sop_uid, model_version, "oru", str(label), repr(float(threshold))])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


# -- the message ------------------------------------------------------------------------------
class _Message:
    """An ORU being built with python-hl7: segments appended in order, every value placed by
    position and escaped on the way in."""

    def __init__(self) -> None:
        self.msg = hl7.parse(f"MSH{FIELD_SEPARATOR}{ENCODING_CHARACTERS}{FIELD_SEPARATOR}")
        self.msh = self.msg.segment("MSH")

    def segment(self, name: str) -> Any:
        seg = self.msg.create_segment([self.msg.create_field([name])])
        self.msg.append(seg)
        return seg

    @staticmethod
    def put(seg: Any, number: int, *components: str, subcomponents: int | None = None,
            raw: bool = False) -> None:
        """Field ``number`` of ``seg``: its components in order (empty ones left empty); with
        ``subcomponents`` the values are subcomponents of that component instead."""
        for i, value in enumerate(components, start=1):
            if not value:
                continue
            text = value if raw else escape(value)
            if subcomponents is None:
                seg.assign_field(text, number, 1, i)
            else:
                seg.assign_field(text, number, 1, subcomponents, i)

    def __str__(self) -> str:
        return str(self.msg)


def _patient(m: _Message, source: Dataset, cfg: Hl7Config) -> None:
    pid = m.segment("PID")
    m.put(pid, 1, "1")
    m.put(pid, 3, _text(source, "PatientID"), "", "", "", cfg.identifier_type)
    if cfg.assigning_authority or cfg.assigning_authority_oid:
        m.put(pid, 3, cfg.assigning_authority, cfg.assigning_authority_oid,
              "ISO" if cfg.assigning_authority_oid else "", subcomponents=4)
    if "name" in cfg.patient_fields:
        name = source.get("PatientName")
        if name is not None:
            # DICOM family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
            parts = (str(name).split("=")[0].split("^") + [""] * 5)[:5]
            m.put(pid, 5, parts[0], subcomponents=1)
            m.put(pid, 5, "", parts[1], parts[2], parts[4], parts[3])
    if "birth_date" in cfg.patient_fields:
        try:
            born = DA(_text(source, "PatientBirthDate")) if source.get("PatientBirthDate") \
                else None
        except ValueError:
            born = None
        if born is not None:
            m.put(pid, 7, born.strftime("%Y%m%d"))
    if "sex" in cfg.patient_fields:
        sex = _text(source, "PatientSex").strip().upper()
        m.put(pid, 8, sex if sex in ("M", "F", "O") else "U")


_Observation = tuple[str, tuple[str, str, str], tuple[str, ...], tuple[str, ...], str]


def _header(m: _Message, cfg: Hl7Config, stamp: str, control: str) -> None:
    msh = m.msh
    m.put(msh, 3, cfg.sending_application)
    m.put(msh, 4, cfg.sending_facility)
    m.put(msh, 5, cfg.receiving_application)
    m.put(msh, 6, cfg.receiving_facility)
    m.put(msh, 7, stamp)
    m.put(msh, 9, "ORU", "R01", "ORU_R01")
    m.put(msh, 10, control)
    m.put(msh, 11, cfg.processing_id)
    m.put(msh, 12, VERSION)
    m.put(msh, 18, CHARACTER_SET)


def _order(m: _Message, source: Dataset, cfg: Hl7Config, priority: str, stamp: str, *,
           result_status: str = "F") -> None:
    """ORC, OBR, the disclaimer (NTE) and, when configured, TQ1 (in ORU_R01's order)."""
    accession = _text(source, "AccessionNumber")
    orc = m.segment("ORC")
    m.put(orc, 1, "RE")
    m.put(orc, 2, accession)
    m.put(orc, 3, accession)
    m.put(orc, 5, "CM")
    if "ORC-7" in cfg.priority_fields:
        m.put(orc, 7, "", "", "", "", "", priority)

    obr = m.segment("OBR")
    m.put(obr, 1, "1")
    m.put(obr, 2, accession)
    m.put(obr, 3, accession)
    m.put(obr, 4, *cfg.universal_service_id)
    acquired = observation_datetime(source)
    if acquired is not None:
        m.put(obr, 7, _hl7_datetime(acquired))
    m.put(obr, 22, stamp)
    m.put(obr, 25, result_status)
    if "OBR-27" in cfg.priority_fields:
        m.put(obr, 27, "", "", "", "", "", priority)

    nte = m.segment("NTE")
    m.put(nte, 1, "1")
    m.put(nte, 2, "L")
    m.put(nte, 3, NOT_FOR_DIAGNOSTIC_USE)

    if "TQ1-9" in cfg.priority_fields:
        tq1 = m.segment("TQ1")
        m.put(tq1, 1, "1")
        m.put(tq1, 9, priority, PRIORITY_TEXT.get(priority, ""),
              "HL70485" if priority in PRIORITY_TEXT else "")


def _observations(m: _Message, observations: list[_Observation], stamp: str,
                  result_status: str = "F") -> None:
    for set_id, (value_type, identifier, value, units, flag) in enumerate(observations, 1):
        obx = m.segment("OBX")
        m.put(obx, 1, str(set_id))
        m.put(obx, 2, value_type)
        m.put(obx, 3, *identifier)
        m.put(obx, 5, *value)
        m.put(obx, 6, *units)
        m.put(obx, 8, flag)
        m.put(obx, 11, result_status)
        m.put(obx, 14, stamp)


def build_oru(
    source: Dataset,
    *,
    probability: float,
    label: Label,
    threshold: float,
    model_version: str,
    cfg: Hl7Config,
    population_text: str | None = None,
    control_id: str | None = None,
    now: datetime.datetime | None = None,
    result_status: str = "F",
) -> str:
    """The ORU^R01 for one scored image, segments separated by CR (no MLLP framing).

    ``label`` is a :class:`~cxr_worker.labels.Label`; ``population_text`` (the gate's line)
    adds an OBX when given; ``control_id`` defaults to :func:`message_control_id`; ``now``
    (the message time, OBR-22, OBX-14) to the current local time. ``result_status`` (OBR-25
    and each OBX-11, tables 0123 / 0085): ``F`` final, ``C`` a correction of a result sent
    before with another decision.
    """
    if result_status not in RESULT_STATUSES:
        raise ValueError(f"result status {result_status!r} is not one of {RESULT_STATUSES}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    if label not in (Label.SUSPECTED, Label.NEGATIVE):
        raise ValueError(f"unknown label {label!r}")
    suspected = label == Label.SUSPECTED
    stamp = _hl7_datetime(now or datetime.datetime.now().astimezone())
    control = control_id or message_control_id(
        str(source.SOPInstanceUID), model_version, label, threshold)
    priority = cfg.priorities[str(Label(label).value)]

    m = _Message()
    _header(m, cfg, stamp, control)
    _patient(m, source, cfg)
    _order(m, source, cfg, priority, stamp, result_status=result_status)
    observations: list[_Observation] = [
        ("CWE", FINDING, PRESENT if suspected else ABSENT, (), "A" if suspected else "N"),
        ("NM", PROBABILITY, (_number(probability),), NO_UNITS, ""),
        ("NM", THRESHOLD, (_number(threshold),), NO_UNITS, ""),
        ("ST", MODEL, (model_version,), (), ""),
        ("ST", STUDY_UID, (_text(source, "StudyInstanceUID"),), (), ""),
    ]
    if population_text:
        observations.append(("ST", POPULATION, (population_text,), (), ""))
    _observations(m, observations, stamp, result_status)
    return str(m).rstrip("\r")


# -- MLLP -------------------------------------------------------------------------------------
def frame(message: str) -> bytes:
    """MLLP: <SB> message <EB><CR>, the message's segments ending in CR, UTF-8."""
    return SB + message.rstrip("\r").encode("utf-8") + CR + EB + CR


def _control_id(message: str) -> str:
    parsed = hl7.parse(message)
    return str(parsed.segment("MSH")(10))


def _read_frame(sock: socket.socket, deadline: float, where: str) -> bytes:
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Hl7SendError(f"HL7 to {where}: no ACK within the timeout")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError as exc:
            raise Hl7SendError(f"HL7 to {where}: no ACK within the timeout") from exc
        except OSError as exc:
            raise Hl7SendError(f"HL7 to {where}: connection lost waiting for the ACK "
                               f"({type(exc).__name__})") from exc
        if not chunk:
            raise Hl7SendError(f"HL7 to {where}: connection closed without an ACK")
        buf += chunk
        start = buf.find(SB)
        end = buf.find(EB + CR, start + 1) if start >= 0 else -1
        if end >= 0:
            return buf[start + 1:end]
        if len(buf) > 1 << 20:
            raise Hl7SendError(f"HL7 to {where}: answer is not an MLLP frame")


def _err_codes(ack: Any) -> list[str]:
    """ERR-3.1 of each ERR segment (table 0357 codes: no patient data)."""
    out = []
    for i, seg in enumerate(ack.segments("ERR"), start=1):
        if len(seg) > 3:
            code = str(ack.extract_field("ERR", i, 3, 1, 1))
            if code:
                out.append(code[:20])
    return out


def parse_ack(payload: bytes, expected_control_id: str, where: str) -> Ack:
    """An ACK's MSA: AA/CA for ``expected_control_id`` is returned, anything else raises."""
    text = payload.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r")
    try:
        ack = hl7.parse(text)
        msa = ack.segment("MSA")
    except Exception as exc:  # python-hl7 raises KeyError, ParseException, IndexError...
        raise Hl7SendError(f"HL7 to {where}: the answer is not an ACK with MSA "
                           f"({type(exc).__name__})") from exc
    code = str(msa(1)).strip().upper() if len(msa) > 1 else ""
    acked = str(msa(2)).strip() if len(msa) > 2 else ""
    errors = [str(seg) for seg in ack if str(seg(0)) == "ERR"]
    detail = " ".join([str(msa(3)) if len(msa) > 3 else "", *errors]).strip()
    if acked != expected_control_id:
        raise Hl7SendError(f"HL7 to {where}: ACK {code[:4] or '?'} for message "
                           f"{acked[:40] or '?'}, not {expected_control_id}", code or None,
                           detail)
    if code not in DELIVERED:
        err_codes = ",".join(_err_codes(ack) if errors else [])
        suffix = f" (ERR-3 {err_codes})" if err_codes else ""
        raise Hl7SendError(f"HL7 to {where} answered {code[:4] or 'no code'}{suffix}",
                           code or None, detail)
    return Ack(code, acked)


def send_oru(message: str, host: str, port: int, timeout: float,
             connect_timeout: float | None = None) -> Ack:
    """Send one message over MLLP and wait for its ACK (one connection per message).

    ``timeout`` bounds the wait for the ACK after sending (seconds), ``connect_timeout`` the
    TCP connection (default ``min(timeout, 10)``). Returns the :class:`Ack` when MSA-1 is
    AA (or CA) for this message's control ID; raises :class:`Hl7SendError` otherwise.
    """
    where = f"{host}:{port}"
    control = _control_id(message)
    try:
        sock = socket.create_connection(
            (host, port), timeout=connect_timeout or min(timeout, 10.0))
    except OSError as exc:
        raise Hl7SendError(f"HL7 to {where}: cannot connect ({type(exc).__name__}: "
                           f"{exc.strerror or exc})") from exc
    with sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(frame(message))
        except OSError as exc:
            raise Hl7SendError(f"HL7 to {where}: sending failed ({type(exc).__name__})") \
                from exc
        ack = parse_ack(_read_frame(sock, time.monotonic() + timeout, where), control, where)
    logger.info("HL7 ORU %s to %s: %s", control, where, ack.code)
    return ack


def send(cfg: Hl7Config, message: str) -> Ack:
    """:func:`send_oru` to ``cfg.host``:``cfg.port`` with its timeouts."""
    if not cfg.host:
        raise Hl7SendError("HL7 output has no host configured (hl7.host)")
    return send_oru(message, cfg.host, cfg.port, cfg.timeout_seconds,
                    connect_timeout=cfg.connect_timeout_seconds)
