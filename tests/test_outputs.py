"""The outputs end to end (issue 9), with real peers: dcmtk storescu (modality) -> cxr-worker
serve -> Orthanc (PACS, at its default OverwriteInstances false) and python-hl7's MLLP server
(the RIS): the Secondary Capture, the Structured Report and the ORU of a suspected and a normal
image; a PACS down past max_attempts, the suspected study first in the list throughout and
delivered after `cxr-worker retry`; an RIS that answers AE, then AA; a threshold change and
a replay: new results with new UIDs, the old ones withdrawn by a rejection note, the worklist
and the PACS agreeing."""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from conftest import (
    CLI,
    DCMTK_ENV,
    SAMPLES,
    Orthanc,
    Worker,
    need,
    storescu,
    wait_until,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from test_hl7v2 import Listener

from cxr_worker import report, report_sr
from cxr_worker.labels import Label
from cxr_worker.worklist import deliveries, queue
from cxr_worker.worklist.models import Instance

pytestmark = pytest.mark.slow

SUSPECTED = SAMPLES / "cr_pa_pneumonia_12bit_rescale.dcm"  # p 0.99998 (shipped model)
NORMAL = SAMPLES / "cr_pa_normal_12bit.dcm"  # p 0.013
# RLE-compressed (storescu -xr), p 0.9976: SUSPECTED at the card's threshold, NO PNEUMONIA
# DETECTED at 0.999 (the replay's), so a threshold change flips the decision
BORDERLINE = SAMPLES / "dx_ap_pneumonia_14bit_mono1_rle.dcm"
REPLAY_THRESHOLD = "0.999"


@pytest.fixture
def ris() -> Iterator[Callable[..., Listener]]:
    """The RIS: python-hl7's MLLP server (tests/test_hl7v2.py's Listener), answering the given
    MSA-1 codes in turn, then AA."""
    made: list[Listener] = []

    def make(*answers: str | None) -> Listener:
        made.append(Listener(list(answers)))
        return made[-1]

    yield make
    for lst in made:
        lst.stop()


def header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


def outputs_env(orthanc: Orthanc | None = None, ris: Listener | None = None,
                kinds: str = "sc,sr,hl7", **extra: str) -> dict[str, str]:
    env = {"CXR_WORKER__OUTPUTS__KINDS": kinds, **extra}
    if ris is not None:
        env.update({"CXR_WORKER__HL7__HOST": "127.0.0.1", "CXR_WORKER__HL7__PORT": str(ris.port),
                    "CXR_WORKER__HL7__TIMEOUT_SECONDS": "5",
                    "CXR_WORKER__HL7__RECEIVING_APPLICATION": "RIS",
                    "CXR_WORKER__HL7__ASSIGNING_AUTHORITY": "HOSP",
                    "CXR_WORKER__HL7__PRIORITY_FIELDS": "OBR-27,TQ1-9"})
    return env


def outputs_of(worker: Worker) -> dict[str, list[Any]]:
    """Every delivery of every image, by source SOP Instance UID (the worklist database)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    engine = queue.make_engine(f"sqlite:///{worker.data_dir / 'worklist.db'}")
    try:
        with Session(engine) as s:
            ids = dict(s.execute(select(Instance.id, Instance.sop_instance_uid)).all())
        by_id = deliveries.of_instances(engine, list(ids))
        return {ids[i]: rows for i, rows in by_id.items()}
    finally:
        engine.dispose()


def current(rows: list[Any]) -> dict[str, Any]:
    return {r.kind: r for r in rows if r.superseded_at is None and r.kind != "kos"}


def study_row(worker: Worker, study_uid: str) -> dict[str, Any]:
    [row] = [r for r in worker.worklist() if r["study_instance_uid"] == study_uid]
    return row


def all_sent(worker: Worker, n: int) -> bool:
    rows = worker.worklist()
    return len(rows) == n and all(r["status"] == "sent" for r in rows)


def orthanc_file(orthanc: Orthanc, sop_uid: str, tmp_path: Path) -> Path:
    found = orthanc.find_instance(sop_uid)
    assert found, f"Orthanc does not hold {sop_uid}"
    path = tmp_path / f"{sop_uid}.dcm"
    path.write_bytes(orthanc.get(f"/instances/{found}/file"))
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def series_instances(orthanc: Orthanc, study_uid: str, description: str) -> list[Dataset]:
    """The instances of the study's series with ``description``, as Orthanc holds them."""
    out = []
    for inst in orthanc.instances_in_series_with_description(study_uid, description):
        out.append(dcmread(io.BytesIO(orthanc.get(f"/instances/{inst}/file"))))
    return out


def sr_decision(sr: Any) -> tuple[Any, float]:
    content = hd.sr.srread(sr) if isinstance(sr, Path) else sr
    [group] = content.content.get_image_measurement_groups(finding_type=report_sr.PNEUMONIA)
    [evaluation] = group.get_qualitative_evaluations(name=report_sr.PNEUMONIA)
    [probability] = group.get_measurements(name=codes.DCM.Probability)
    return evaluation.value, probability.value


# -- SC + SR + ORU --------------------------------------------------------------------------------
def test_sc_sr_and_oru_for_a_suspected_and_a_normal_image(make_worker, orthanc, ris,
                                                          tmp_path):
    lst = ris()
    worker = make_worker(pacs=orthanc, **outputs_env(orthanc, lst))
    storescu(worker.port, SUSPECTED, NORMAL)
    wait_until(lambda: all_sent(worker, 2), 90, "both studies' outputs delivered")

    outputs = outputs_of(worker)
    messages = {str(m.segment("MSH")(10)): m for m in lst.messages()}
    assert len(lst.received) == 2 and len(messages) == 2, "one ORU per image, once each"
    for path, label, finding, priority in (
            (SUSPECTED, Label.SUSPECTED, ("52101004", "Present", "A"), "S"),
            (NORMAL, Label.NEGATIVE, ("272519000", "Absent", "N"), "R")):
        src = header(path)
        row = study_row(worker, str(src.StudyInstanceUID))
        assert row["label"] == label and row["status"] == "sent"
        assert [(d["kind"], d["status"], d["attempts"]) for d in row["deliveries"]] == [
            ("sc", "sent", 0), ("sr", "sent", 0), ("hl7", "sent", 0)]
        mine = current(outputs[str(src.SOPInstanceUID)])
        assert set(mine) == {"sc", "sr", "hl7"}

        # the PACS: the SC and the SR in the source's study, the SR valid and readable
        sc = dcmread(orthanc_file(orthanc, mine["sc"].result_uid, tmp_path))
        assert sc.StudyInstanceUID == src.StudyInstanceUID and label in sc.ImageComments
        sr_path = orthanc_file(orthanc, mine["sr"].result_uid, tmp_path)
        assert not dciodvfy_errors(sr_path), "dciodvfy on the SR Orthanc holds"
        value, probability = sr_decision(sr_path)
        assert value == (report_sr.PRESENT if label == Label.SUSPECTED else report_sr.ABSENT)
        assert probability == pytest.approx(row["probability"], abs=1e-9)
        dump = subprocess.run([need("dsrdump"), str(sr_path)], capture_output=True, text=True,
                              timeout=60, check=True).stdout
        print(dump)  # the SR as the PACS holds it (pytest -s)
        assert f'=({finding[0]},SCT,"{finding[1]}")' in dump

        # the RIS: the ORU field by field
        oru = messages[mine["hl7"].result_uid]
        print(str(oru).replace("\r", "\n"))  # the ORU as received (pytest -s)
        msh, obr = oru.segment("MSH"), oru.segment("OBR")
        assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(5)) == "RIS"
        assert str(oru.segment("PID")) == f"PID|1||{src.PatientID}^^^HOSP^MR"  # only PID-3
        assert (str(obr(2)), str(obr(3)), str(obr(25))) == (
            src.AccessionNumber, src.AccessionNumber, "F")
        assert str(obr(27)(1)(6)) == priority
        assert str(oru.segment("TQ1")(9)).split("^")[0] == priority
        obx = {str(seg(3)(1)(1)): seg for seg in oru.segments("OBX")}
        assert str(obx["233604007"](5)) == f"{finding[0]}^{finding[1]}^SCT"
        assert str(obx["233604007"](8)) == finding[2]
        assert str(obx["probability"](5)) == f"{row['probability']:.6f}"
        assert str(obx["110180"](5)) == src.StudyInstanceUID
    assert len(orthanc.get("/instances")) == 4  # two SCs, two SRs: nothing else, nothing twice
    assert worker.stop() == 0
    log = worker.text()
    for path in (SUSPECTED, NORMAL):
        src = header(path)
        for value in (str(src.PatientName), str(src.PatientID)):
            assert value not in log, f"patient data {value!r} in the worker log"


# -- the PACS down past max_attempts, then retry ----------------------------------------------
def _api_first(worker: Worker, token: str) -> dict[str, Any]:
    port = worker.env["CXR_WORKER__HTTP__PORT"]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/studies",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.loads(r.read())
    return body["studies"][0]


def test_pacs_down_past_max_attempts_then_retry(make_worker, tmp_path):
    orthanc = Orthanc(tmp_path / "pacs")  # configured, not started: the PACS is down
    # attempts at 0, 2 and 6 s: the list is looked at while they go on, and after
    worker = make_worker(pacs=orthanc, **outputs_env(
        kinds="sc,sr", CXR_WORKER__JOBS__MAX_ATTEMPTS="3",
        CXR_WORKER__JOBS__RETRY_BASE_SECONDS="2", CXR_WORKER__JOBS__RETRY_MAX_SECONDS="4",
        CXR_WORKER__PACS__CONNECT_TIMEOUT_SECONDS="1"))
    token = worker.cli("token", "create", "--name", "ops", "--role", "admin").stdout.strip()
    suspected = str(header(SUSPECTED).StudyInstanceUID)
    storescu(worker.port, NORMAL)  # the normal study arrives first
    storescu(worker.port, SUSPECTED)
    seen: set[str] = set()

    def first_is_suspected() -> list[dict[str, Any]]:
        rows = worker.worklist()
        assert rows and rows[0]["study_instance_uid"] == suspected, rows
        assert rows[0]["label"] == Label.SUSPECTED and rows[0]["probability"] > 0.99
        api = _api_first(worker, token)
        assert (api["study_instance_uid"], api["label"]) == (suspected, Label.SUSPECTED)
        seen.add(rows[0]["status"])
        return rows

    wait_until(lambda: len(worker.worklist()) == 2
               and all(r["label"] != "PENDING" for r in worker.worklist()), 60, "both scored")
    first_is_suspected()
    rows = wait_until(lambda: (r := first_is_suspected()) and all(
        x["status"] == "undelivered" for x in r) and r, 90,
        "every delivery dead-lettered while the PACS is down")
    assert seen - {"undelivered"}, "never looked at while the deliveries were retried"
    top = rows[0]
    assert top["band"] == "suspected" and top["probability"] is not None
    assert [(d["kind"], d["status"], d["attempts"]) for d in top["deliveries"]] == [
        ("sc", "failed", 3), ("sr", "failed", 3)]
    assert all("association" in d["last_error"] for d in top["deliveries"])
    assert top["reason"].startswith("sending failed 3 times")
    listed = worker.cli("worklist", "--json", "--status", "suspected").stdout.splitlines()
    assert [json.loads(line)["study_instance_uid"] for line in listed] == [suspected]
    time.sleep(1.5)  # a dead letter is not retried by itself
    assert all(d["attempts"] == 3 for d in first_is_suspected()[0]["deliveries"])

    orthanc.start()
    try:
        out = worker.cli("retry", "--all-failed").stdout
        assert "4 deliveries to send" in out, out
        wait_until(lambda: first_is_suspected() and all_sent(worker, 2), 60,
                   "delivery after the retry")
        for path in (SUSPECTED, NORMAL):
            mine = current(outputs_of(worker)[str(header(path).SOPInstanceUID)])
            for kind in ("sc", "sr"):
                assert orthanc.find_instance(mine[kind].result_uid), (path.name, kind)
        assert len(orthanc.get("/instances")) == 4
        assert worker.cli("retry", "--all-failed", check=False).returncode == 1  # nothing left
    finally:
        orthanc.stop()


# -- the RIS answers AE, then AA -------------------------------------------------------------------
def test_hl7_listener_answering_ae_then_aa(make_worker, ris):
    lst = ris("AE")  # then AA
    worker = make_worker(**outputs_env(ris=lst, kinds="hl7",
                                       CXR_WORKER__JOBS__RETRY_BASE_SECONDS="0.5"))
    storescu(worker.port, SUSPECTED)
    wait_until(lambda: all_sent(worker, 1), 60, "the ORU accepted on its second try")
    [row] = worker.worklist()
    assert [(d["kind"], d["status"]) for d in row["deliveries"]] == [("hl7", "sent")]
    [rows] = outputs_of(worker).values()
    [hl7] = rows
    assert hl7.attempts == 1 and hl7.sent_at is not None  # one failed attempt, then sent
    assert len(lst.received) == 2 and lst.received[0] == lst.received[1], (
        "the retry was not the same message")
    assert str(lst.messages()[0].segment("MSH")(10)) == hl7.result_uid
    log = worker.text()
    assert "answered AE (ERR-3 207)" in log
    assert "DOE" not in log  # the ACK's free text (it may name the patient) is never logged
    assert worker.stop() == 0


# -- a threshold change and a replay ---------------------------------------------------------------
def rejected_by(kos: Dataset) -> set[str]:
    """The SOP Instance UIDs a rejection note lists in its evidence."""
    return {str(item.ReferencedSOPInstanceUID)
            for study in kos.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence}


def _undisputed(orthanc: Orthanc, study_uid: str, description: str) -> list[Dataset]:
    """The study's results in ``description``'s series that no rejection note withdraws."""
    rejected = set().union(*(rejected_by(kos) for kos in series_instances(
        orthanc, study_uid, report_sr.KOS_SERIES_DESCRIPTION)))
    return [ds for ds in series_instances(orthanc, study_uid, description)
            if str(ds.SOPInstanceUID) not in rejected]


def _replay(worker: Worker, study_uid: str, threshold: str | None) -> list[dict[str, Any]]:
    env = dict(worker.env)
    if threshold is not None:
        env["CXR_WORKER__MODEL__THRESHOLD"] = threshold
    res = subprocess.run([*CLI, "replay", "--study", study_uid, "--json"],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_threshold_change_and_replay_supersede_the_results_in_orthanc(
        make_worker, orthanc, ris, tmp_path):
    lst = ris()
    worker = make_worker(pacs=orthanc, **outputs_env(orthanc, lst))
    src = header(BORDERLINE)
    study, sop = str(src.StudyInstanceUID), str(src.SOPInstanceUID)
    res = subprocess.run([need("storescu"), "-xr", "-aec", "CXR_WORKER", "127.0.0.1",
                          str(worker.port), str(BORDERLINE)], env=DCMTK_ENV,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: all_sent(worker, 1), 90, "the first result delivered")
    assert study_row(worker, study)["label"] == Label.SUSPECTED
    first = current(outputs_of(worker)[sop])
    assert worker.stop() == 0  # the replay alone processes the study (not serve's threshold)

    # the site raises the threshold and replays the study: the decision changes
    [report_] = _replay(worker, study, REPLAY_THRESHOLD)
    assert (report_["status"], report_["label"]) == ("sent", Label.NEGATIVE)
    kinds = {d["kind"]: d for d in report_["deliveries"]}
    assert set(kinds) == {"sc", "sr", "hl7", "kos"}
    assert all(d["status"] == "sent" for d in kinds.values())
    replaced = {d["kind"]: d for d in report_["superseded"]}
    assert set(replaced) == {"sc", "sr", "hl7"}
    for kind in ("sc", "sr", "hl7"):
        assert replaced[kind]["result_uid"] == first[kind].result_uid
        assert replaced[kind]["superseded_by"] == kinds[kind]["result_uid"] != \
            first[kind].result_uid
    kos_uid = kinds["kos"]["result_uid"]
    assert replaced["sc"]["rejected_by"] == replaced["sr"]["rejected_by"] == kos_uid
    assert replaced["hl7"]["rejected_by"] is None  # the RIS gets a corrected result instead

    _check_the_pacs_after_the_change(orthanc, study, first, kinds, tmp_path)

    # the worklist shows what the newest result in the PACS says
    [sc_now] = _undisputed(orthanc, study, report.SERIES_DESCRIPTION)
    [sr_now] = _undisputed(orthanc, study, report_sr.SR_SERIES_DESCRIPTION)
    row = study_row(worker, study)
    assert row["label"] == Label.NEGATIVE and row["status"] == "sent"
    assert str(sc_now.SOPInstanceUID) == kinds["sc"]["result_uid"]
    assert sc_now.ImageComments.startswith(row["label"])
    assert sr_decision(hd.sr.Comprehensive3DSR.from_dataset(sr_now))[0] == report_sr.ABSENT
    # the RIS got a correction with another control ID
    oru_first, oru_now = lst.messages()
    assert str(oru_first.segment("OBR")(25)) == "F" and str(oru_now.segment("OBR")(25)) == "C"
    assert str(oru_now.segment("MSH")(10)) == kinds["hl7"]["result_uid"]
    assert str(oru_now.segment("OBX")(5)).startswith("272519000^Absent")

    # the same decision again: the same objects, nothing new at the PACS
    n = len(orthanc.get("/instances"))
    [again] = _replay(worker, study, REPLAY_THRESHOLD)
    assert {d["kind"]: d["result_uid"] for d in again["deliveries"]} == {
        k: d["result_uid"] for k, d in kinds.items()}
    assert len(orthanc.get("/instances")) == n == 5

    # back to the card's threshold: the first decision again, under fresh UIDs (the first
    # ones were withdrawn), and the second decision withdrawn in turn
    [back] = _replay(worker, study, None)
    assert back["label"] == Label.SUSPECTED
    now = {d["kind"]: d["result_uid"] for d in back["deliveries"] if d["kind"] != "kos"}
    assert now["sc"] not in (first["sc"].result_uid, kinds["sc"]["result_uid"])
    [sc_now] = _undisputed(orthanc, study, report.SERIES_DESCRIPTION)
    assert str(sc_now.SOPInstanceUID) == now["sc"]
    assert sc_now.ImageComments.startswith(Label.SUSPECTED)
    assert study_row(worker, study)["label"] == Label.SUSPECTED
    assert len(series_instances(orthanc, study, report_sr.KOS_SERIES_DESCRIPTION)) == 2


def _check_the_pacs_after_the_change(orthanc: Orthanc, study: str, first: dict[str, Any],
                                     kinds: dict[str, Any], tmp_path: Path) -> None:
    """Orthanc holds both decisions (OverwriteInstances false) and the rejection note of the
    first; the new SR names the first as its predecessor; both pass dciodvfy."""
    kos_uid = kinds["kos"]["result_uid"]
    scs = series_instances(orthanc, study, report.SERIES_DESCRIPTION)
    srs = series_instances(orthanc, study, report_sr.SR_SERIES_DESCRIPTION)
    [kos] = series_instances(orthanc, study, report_sr.KOS_SERIES_DESCRIPTION)
    assert len(scs) == 2 and len(srs) == 2
    assert str(kos.SOPInstanceUID) == kos_uid
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
    assert rejected_by(kos) == {first["sc"].result_uid, first["sr"].result_uid}
    for uid in (kos_uid, kinds["sr"]["result_uid"]):
        assert not dciodvfy_errors(orthanc_file(orthanc, uid, tmp_path)), f"dciodvfy: {uid}"
    new_sr = dcmread(orthanc_file(orthanc, kinds["sr"]["result_uid"], tmp_path))
    pred = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first["sr"].result_uid
