"""The HL7 v2.5.1 ORU^R01 result over MLLP, against a real listener: python-hl7's asyncio MLLP
server, started here on 127.0.0.1, records what it receives and answers with scripted ACKs."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import hl7
import hl7.mllp
import pydicom
import pytest
from conftest import SAMPLES, free_port
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from cxr_worker import hl7v2
from cxr_worker.labels import Label

MODEL = "cxr-pneumonia-mnv2-a1v1-20261126-3e76406c"
THRESHOLD = 0.3645303807647971
CFG = hl7v2.Hl7Config(
    sending_application="CXR_WORKER", sending_facility="RADIOLOGY",
    receiving_application="RIS", receiving_facility="HOSP", assigning_authority="HOSP",
    priority_fields=("OBR-27", "ORC-7", "TQ1-9"))
NOW = datetime.datetime(2026, 11, 26, 15, 4, 5, tzinfo=datetime.UTC)
WRONG_ID = "ack for another message"
CLOSE = "close without answering"
SUSPECTED = SAMPLES / "cr_pa_pneumonia_12bit_rescale.dcm"
NORMAL = SAMPLES / "dx_pa_normal_8bit.dcm"
OUTSIDE = "OUTSIDE VALIDATED POPULATION (age 81 years; validated 1-5 years)"


class Listener:
    """python-hl7's ``start_hl7_server`` in a thread of its own on 127.0.0.1 (a free port):
    keeps each received MLLP payload and answers with the next scripted MSA-1 code (AE/AR
    with an ERR segment and patient-like MSA-3 text; None: never answers; ``WRONG_ID``: AA
    for another control ID), then AA."""

    def __init__(self, answers: list[str | None]) -> None:
        self.answers = list(answers)
        self.received: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10) or self.failed is not None:
            self.thread.join(10)
            self.loop.close()
            raise AssertionError(f"the MLLP listener did not start: {self.failed!r}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(hl7.mllp.start_hl7_server(
                self._client, "127.0.0.1", 0, encoding="utf-8"))
            self.port = self.server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported by __init__
            self.failed = exc
            return
        finally:
            self.ready.set()
        self.loop.run_forever()

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            block = await reader.readblock()
            self.received.append(block)
            message = hl7.parse(block.decode("utf-8"))
            code = self.answers.pop(0) if self.answers else "AA"
            if code is None:
                await asyncio.sleep(3600)
                return
            if code == CLOSE:
                return
            ack = message.create_ack("AA" if code == WRONG_ID else code)
            if code == WRONG_ID:
                ack.segment("MSA").assign_field("SOMEONE-ELSE", 2)
            elif code != "AA":
                ack.segment("MSA").assign_field("Patient DOE^JOHN not on file", 3)
                err = ack.create_segment([ack.create_field(["ERR"])])
                if code == "AE":  # ERR-3 as CWE components; AR: the code alone
                    for i, value in enumerate(("207", "Application internal error",
                                               "HL70357"), 1):
                        err.assign_field(value, 3, 1, i)
                else:
                    err.assign_field("207", 3)
                err.assign_field("E", 4)
                ack.append(err)
            writer.writemessage(ack)
            await writer.drain()
        finally:
            writer.close()

    def messages(self) -> list[Any]:
        return [hl7.parse(b.decode("utf-8")) for b in self.received]

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def listener() -> Iterator[Any]:
    made: list[Listener] = []

    def make(*answers: str | None) -> Listener:
        made.append(Listener(list(answers)))
        return made[-1]

    yield make
    for lst in made:
        lst.stop()


def source(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def oru(src: Dataset, label: str = Label.SUSPECTED, probability: float = 0.93,
        cfg: hl7v2.Hl7Config = CFG, **kw: Any) -> str:
    kw.setdefault("model_version", MODEL)
    return hl7v2.build_oru(src, probability=probability, label=label, threshold=THRESHOLD,
                           cfg=cfg, now=NOW, **kw)


def obx_by_code(message: Any) -> dict[str, Any]:
    return {str(seg(3)(1)(1)): seg for seg in message.segments("OBX")}


def value(seg: Any, n: int) -> str:
    """Field ``n`` of a segment as text; empty when the segment ends before it."""
    return str(seg(n)) if len(seg) > n else ""


def names(message: Any) -> list[str]:
    return [str(seg(0)) for seg in message]


class Case(NamedTuple):
    path: Path
    label: str
    probability: float
    finding: tuple[str, str, str, str]  # OBX-5 code, meaning, system; OBX-8
    priority: str


@pytest.mark.parametrize("case", [
    pytest.param(Case(SUSPECTED, Label.SUSPECTED, 0.93, ("52101004", "Present", "SCT", "A"),
                      "S"), id="suspected"),
    pytest.param(Case(NORMAL, Label.NEGATIVE, 0.04, ("272519000", "Absent", "SCT", "N"), "R"),
                 id="normal"),
])
def test_the_listener_receives_the_result_field_by_field(listener: Any, case: Case) -> None:
    path, label, probability, present, priority = case
    src = source(path)
    lst = listener("AA")
    message = oru(src, label, probability, population_text=OUTSIDE)
    print(message.replace("\r", "\n"))  # the ORU as sent, for the test log
    ack = hl7v2.send_oru(message, "127.0.0.1", lst.port, timeout=5)

    [got] = lst.messages()
    assert str(got) == message + "\r", "the listener received something else than was sent"
    msh = got.segment("MSH")
    assert (str(msh(3)), str(msh(4)), str(msh(5)), str(msh(6))) == (
        "CXR_WORKER", "RADIOLOGY", "RIS", "HOSP")
    assert str(msh(7)) == "20261126150405+0000"
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert str(msh(18)) == "UNICODE UTF-8"
    assert ack == hl7v2.Ack("AA", str(msh(10)))
    assert str(msh(10)) == hl7v2.message_control_id(str(src.SOPInstanceUID), MODEL, label,
                                                    THRESHOLD)
    assert names(got) == ["MSH", "PID", "ORC", "OBR", "NTE", "TQ1"] + ["OBX"] * 6

    # PID: the identifier with its assigning authority, nothing else about the patient
    assert str(got.segment("PID")) == f"PID|1||{src.PatientID}^^^HOSP^MR"
    accession = str(src.AccessionNumber)
    orc, obr = got.segment("ORC"), got.segment("OBR")
    assert (str(orc(1)), str(orc(2)), str(orc(3))) == ("RE", accession, accession)
    assert (str(obr(2)), str(obr(3))) == (accession, accession)
    assert str(obr(4)) == "36554-4^XR Chest Single view^LN"
    assert str(obr(7)) == f"{src.StudyDate}{src.StudyTime}"
    assert (str(obr(22)), str(obr(25))) == ("20261126150405+0000", "F")
    # the priority where each RIS may read it: OBR-27.6, ORC-7.6 (TQ), TQ1-9 (CWE)
    assert str(obr(27)(1)(6)) == priority and str(orc(7)(1)(6)) == priority
    tq1_text = {"S": "Stat", "R": "Routine"}[priority]
    assert str(got.segment("TQ1")(9)) == f"{priority}^{tq1_text}^HL70485"

    obx = obx_by_code(got)
    finding = obx["233604007"]
    assert (str(finding(2)), str(finding(3))) == ("CWE", "233604007^Pneumonia^SCT")
    assert str(finding(5)) == "^".join(present[:3]) and str(finding(8)) == present[3]
    assert all(str(seg(11)) == "F" for seg in obx.values())
    p = obx["probability"]
    assert str(p(2)) == "NM" and float(str(p(5))) == probability
    assert str(p(6)) == "1^no units^UCUM"
    assert float(str(obx["threshold"](5))) == pytest.approx(THRESHOLD, abs=5e-7)
    assert (str(obx["model"](2)), str(obx["model"](5))) == ("ST", MODEL)
    assert str(obx["110180"](5)) == src.StudyInstanceUID
    assert str(obx["population"](5)) == OUTSIDE


def test_hostile_values_are_escaped(listener: Any) -> None:
    """Delimiters, the escape character and a CR from the DICOM header (as a modality may
    send them) arrive as escape sequences: the listener's parser gets back the same values and
    the same segments."""
    src = source(SUSPECTED)
    for tag, value in ((0x00080050, b"A|B^C\\D "), (0x00100020, b"P&1~2\r3")):
        del src[tag]  # as read from a file
        vr = "SH" if tag == 0x00080050 else "LO"
        src[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, True, True)
    lst = listener("AA")
    hl7v2.send_oru(oru(src, model_version="m|1&2"), "127.0.0.1", lst.port, timeout=5)

    [raw] = lst.received
    text = raw.decode("utf-8")
    assert "|A\\F\\B\\S\\C\\E\\D|" in text and "|P\\T\\1\\R\\2\\X0D\\3^^^HOSP^MR" in text
    [got] = lst.messages()
    assert names(got) == ["MSH", "PID", "ORC", "OBR", "NTE", "TQ1"] + ["OBX"] * 5, (
        "a value changed the message's structure")
    obr, pid = got.segment("OBR"), got.segment("PID")
    assert got.unescape(str(obr(3))) == "A|B^C\\D"
    assert got.unescape(str(obr(2))) == "A|B^C\\D"
    assert got.unescape(str(pid(3)(1)(1))) == "P&1~2\r3"
    assert got.unescape(str(obx_by_code(got)["model"](5))) == "m|1&2"


def test_escape() -> None:
    assert hl7v2.escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    assert hl7v2.escape("x\ry\nz\x7f") == "x\\X0D\\y\\X0A\\z\\X7F\\"
    # a literal escape sequence in a value is escaped, not passed through
    assert hl7v2.escape("\\F\\") == "\\E\\F\\E\\"
    assert hl7v2.escape("Müller") == "Müller"


def test_application_error_then_accept(listener: Any) -> None:
    """AE and AR are errors the caller retries (or dead-letters); the retry of the same message
    is accepted. The error's text carries the ACK code and ERR-3, not the ACK's free text."""
    lst = listener("AE", "AR", "AA")
    message = oru(source(SUSPECTED))
    for code in ("AE", "AR"):
        with pytest.raises(hl7v2.Hl7SendError) as err:
            hl7v2.send_oru(message, "127.0.0.1", lst.port, timeout=5)
        assert err.value.ack_code == code
        assert str(err.value).endswith(f"answered {code} (ERR-3 207)"), str(err.value)
        assert "DOE" not in str(err.value) and "DOE" in err.value.detail
    assert hl7v2.send_oru(message, "127.0.0.1", lst.port, timeout=5).code == "AA"
    assert len({bytes(b) for b in lst.received}) == 1 and len(lst.received) == 3, (
        "the retries were not the same message")


def test_ack_for_another_message_is_an_error(listener: Any) -> None:
    lst = listener(WRONG_ID)
    with pytest.raises(hl7v2.Hl7SendError, match="not "):
        hl7v2.send_oru(oru(source(SUSPECTED)), "127.0.0.1", lst.port, timeout=5)


def test_a_closed_connection_is_an_error(listener: Any) -> None:
    lst = listener(CLOSE)
    with pytest.raises(hl7v2.Hl7SendError, match="closed without an ACK"):
        hl7v2.send_oru(oru(source(SUSPECTED)), "127.0.0.1", lst.port, timeout=5)


ACK_HEAD = b"MSH|^~\\&|RIS|HOSP|CXR_WORKER|RADIOLOGY|20261126150406||ACK^R01^ACK|9|P|2.5.1"


@pytest.mark.parametrize(("payload", "code"), [
    (ACK_HEAD + b"\rMSA|AA|ID1", "AA"),
    (ACK_HEAD + b"\nMSA|CA|ID1\n", "CA"),  # enhanced-mode commit accept, LF-separated
])
def test_parse_ack_accepts(payload: bytes, code: str) -> None:
    assert hl7v2.parse_ack(payload, "ID1", "ris:2575") == hl7v2.Ack(code, "ID1")


@pytest.mark.parametrize(("payload", "match"), [
    (b"HTTP/1.1 400 Bad Request", "not an ACK"),
    (ACK_HEAD + b"\rMSA|AA", "for message \\?, not ID1"),
    (ACK_HEAD + b"\rMSA|CE|ID1", "answered CE"),
    (ACK_HEAD, "not an ACK"),
])
def test_parse_ack_refuses(payload: bytes, match: str) -> None:
    with pytest.raises(hl7v2.Hl7SendError, match=match):
        hl7v2.parse_ack(payload, "ID1", "ris:2575")


def test_no_ack_is_a_timeout_within_the_timeout(listener: Any) -> None:
    lst = listener(None)
    start = time.monotonic()
    with pytest.raises(hl7v2.Hl7SendError, match="no ACK within the timeout") as err:
        hl7v2.send_oru(oru(source(SUSPECTED)), "127.0.0.1", lst.port, timeout=1.0)
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 2.0, f"gave up after {elapsed:.2f} s with a 1 s timeout"
    assert err.value.ack_code is None
    assert len(lst.received) == 1, "the listener never got the message"


def test_nobody_listening() -> None:
    start = time.monotonic()
    with pytest.raises(hl7v2.Hl7SendError, match="cannot connect"):
        hl7v2.send_oru(oru(source(SUSPECTED)), "127.0.0.1", free_port(), timeout=5)
    assert time.monotonic() - start < 5
    with pytest.raises(hl7v2.Hl7SendError, match="no host"):
        hl7v2.send(hl7v2.Hl7Config(), oru(source(SUSPECTED)))


def test_hl7apy_validates_the_message_against_2_5_1() -> None:
    """An independent implementation (hl7apy, strict) checks the ORU_R01 structure, the
    required fields and the data types, with PID-5 configured (the 2.5.1 segment table
    requires it; by default the worker sends no name)."""
    cfg = hl7v2.Hl7Config(assigning_authority="HOSP", assigning_authority_oid="1.2.3.4",
                          patient_fields=("name", "birth_date", "sex"),
                          priority_fields=("OBR-27", "ORC-7", "TQ1-9"))
    src = source(NORMAL)
    src.PatientBirthDate = "20230102"
    message = oru(src, Label.NEGATIVE, 0.04, cfg, population_text=OUTSIDE)
    parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.validate()
    pid = hl7.parse(message).segment("PID")
    family, given = str(src.PatientName).split("^")[:2]
    assert (str(pid(5)(1)(1)), str(pid(5)(1)(2))) == (family, given)
    assert (str(pid(7)), str(pid(8))) == ("20230102", str(src.PatientSex))
    assert str(pid(3)) == f"{src.PatientID}^^^HOSP&1.2.3.4&ISO^MR"


def test_priority_mapping_is_the_sites() -> None:
    cfg = hl7v2.Hl7Config(priority_fields=("TQ1-9",), priorities={
        Label.SUSPECTED.value: "A", Label.NEGATIVE.value: "LOWPRIO"})
    suspected = hl7.parse(oru(source(SUSPECTED), cfg=cfg))
    assert str(suspected.segment("TQ1")(9)) == "A^ASAP^HL70485"
    assert value(suspected.segment("OBR"), 27) == value(suspected.segment("ORC"), 7) == ""
    normal = hl7.parse(oru(source(NORMAL), Label.NEGATIVE, 0.1, cfg=cfg))
    assert str(normal.segment("TQ1")(9)) == "LOWPRIO"
    plain = hl7.parse(oru(source(SUSPECTED), cfg=hl7v2.Hl7Config()))
    assert "TQ1" not in names(plain) and str(plain.segment("OBR")(27)(1)(6)) == "S"


@pytest.mark.parametrize("kw", [{"priority_fields": ("OBR-5",)},
                                {"patient_fields": ("address",)},
                                {"priorities": {Label.SUSPECTED.value: "S"}},
                                {"timeout_seconds": 0}])
def test_config_refuses_what_it_cannot_do(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        hl7v2.Hl7Config(**kw)


def test_control_id_follows_the_decision() -> None:
    uid = "1.2.3"
    same = hl7v2.message_control_id(uid, MODEL, Label.SUSPECTED, THRESHOLD)
    assert same == hl7v2.message_control_id(uid, MODEL, Label.SUSPECTED, THRESHOLD)
    others = {hl7v2.message_control_id(uid, MODEL, Label.NEGATIVE, THRESHOLD),
              hl7v2.message_control_id(uid, MODEL, Label.SUSPECTED, 0.5),
              hl7v2.message_control_id(uid, "other", Label.SUSPECTED, THRESHOLD),
              hl7v2.message_control_id("1.2.4", MODEL, Label.SUSPECTED, THRESHOLD)}
    assert same not in others and len(others) == 4 and len(same) == 20
