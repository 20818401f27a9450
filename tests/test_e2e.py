"""End to end with real peers: dcmtk storescu (modality) -> cxr-worker serve -> Orthanc (PACS)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import DCMTK_ENV, REPO, SAMPLES, Orthanc, need, postgres_schema, storescu, wait_until
from pydicom import dcmread

from cxr_worker.report import SERIES_DESCRIPTION

pytestmark = pytest.mark.slow


def _results_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[str]:
    return orthanc.instances_in_series_with_description(study_uid, "AI triage result")


def test_results_reach_the_source_study_in_orthanc(make_worker, orthanc, make_images, tmp_path):
    study_uid = "1.2.826.0.1.3680043.8.498.4242.1.1"
    files = make_images(3, study_uid=study_uid)
    # the modality sends the study to the PACS and to the worker
    storescu(orthanc.dicom_port, *files, aet=orthanc.aet)
    worker = make_worker(pacs=orthanc)
    storescu(worker.port, *files)

    wait_until(lambda: len(_results_in_orthanc(orthanc, study_uid)) == 3, 60,
               "three results in Orthanc")
    studies = orthanc.post("/tools/find", {"Level": "Study",
                                           "Query": {"StudyInstanceUID": study_uid}})
    assert len(studies) == 1, "the results were filed in another study"
    series = orthanc.get(f"/studies/{studies[0]}/series")
    source_series = {dcmread(f).SeriesInstanceUID for f in files}
    result_series = [s for s in series
                     if s["MainDicomTags"].get("SeriesDescription") == SERIES_DESCRIPTION]
    assert len(result_series) == 1
    assert result_series[0]["MainDicomTags"]["SeriesInstanceUID"] not in source_series
    assert result_series[0]["MainDicomTags"]["SeriesNumber"] == "9901"

    # the stored object, as PACS holds it, is a valid Secondary Capture
    inst = result_series[0]["Instances"][0]
    blob = orthanc.get(f"/instances/{inst}/file")
    sc_path = tmp_path / "from-orthanc.dcm"
    sc_path.write_bytes(blob)
    sc = dcmread(sc_path)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == study_uid
    assert sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {
        dcmread(f).SOPInstanceUID for f in files}
    res = subprocess.run([need("dciodvfy"), str(sc_path)], capture_output=True, text=True,
                         check=False)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)

    rows = worker.worklist()
    assert len(rows) == 1 and rows[0]["status"] == "sent" and rows[0]["images"] == 3
    assert rows[0]["study_instance_uid"] == study_uid
    assert worker.stop() == 0
    # patient data never reaches the log or the worklist; UIDs do
    source = dcmread(files[0], stop_before_pixels=True)
    log = worker.text()
    assert study_uid in log
    for value in (str(source.PatientName), str(source.PatientID), "Sample"):
        assert value not in log, f"patient data {value!r} in the worker log"
        assert value not in json.dumps(rows)


def test_pacs_down_results_delivered_when_it_returns(make_worker, tmp_path, make_images):
    orthanc = Orthanc(tmp_path / "pacs")  # configured, not started: the PACS is down
    worker = make_worker(pacs=orthanc)
    files = make_images(4, prefix="down")
    storescu(worker.port, *files)
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["retrying"] * 4, 60,
               "four studies retrying while the PACS is down")
    orthanc.start()
    try:
        wait_until(lambda: [r["status"] for r in worker.worklist()] == ["sent"] * 4, 60,
                   "delivery after the PACS came back")
        for f in files:
            study_uid = dcmread(f, stop_before_pixels=True).StudyInstanceUID
            assert len(_results_in_orthanc(orthanc, study_uid)) == 1
        assert len(orthanc.get("/instances")) == 4
    finally:
        orthanc.stop()


def _acknowledged(storescu_output: str) -> set[str]:
    """Files storescu -v saw answered with Success."""
    done, current = set(), None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.add(current)
    return done


def _results_per_source(orthanc: Orthanc) -> dict[str, int]:
    per_source: dict[str, int] = {}
    for inst in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{inst}/simplified-tags")
        src = tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
        per_source[src] = per_source.get(src, 0) + 1
    return per_source


def test_kill_9_mid_batch_loses_nothing_and_duplicates_nothing(make_worker, orthanc,
                                                               make_images):
    n = 12
    files = make_images(n, prefix="crash", shape=(2048, 1700))
    uid_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    worker = make_worker(pacs=orthanc)
    sender = subprocess.Popen(
        [need("storescu"), "-v", "-aet", "MODALITY", "-aec", "CXR_WORKER", "127.0.0.1",
         str(worker.port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    # kill the worker once some results went out but the batch is not done
    wait_until(lambda: len(orthanc.get("/instances")) >= 2, 90, "first results in Orthanc")
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)
    worker.proc = None
    out, _ = sender.communicate(timeout=120)
    acked = {uid_of[f] for f in _acknowledged(out)}
    assert len(acked) >= 2, out
    assert len(_results_per_source(orthanc)) < n, "the kill came too late to test anything"

    # restart: every acknowledged image is scored and delivered without being sent again
    # (a job claimed at the kill is taken over when its lease expires: 5 s here)
    worker.start()
    wait_until(lambda: acked <= set(_results_per_source(orthanc)), 120,
               "every acknowledged image delivered after the restart")

    # the modality re-sends what was not acknowledged, plus one that was (a re-delivery)
    resend = [f for f in files if uid_of[str(f)] not in acked] + [
        next(f for f in files if uid_of[str(f)] in acked)]
    storescu(worker.port, *resend)
    wait_until(lambda: len(_results_per_source(orthanc)) == n
               and all(r["status"] == "sent" for r in worker.worklist()), 120,
               "every image scored and delivered")
    time.sleep(1.0)  # let any duplicate delivery land before counting
    per_source = _results_per_source(orthanc)
    assert set(per_source) == set(uid_of.values())
    assert all(c == 1 for c in per_source.values()), per_source
    assert len(orthanc.get("/instances")) == n


def test_sigterm_exits_0_and_echo_works(make_worker):
    worker = make_worker()
    res = subprocess.run([need("echoscu"), "-aec", "CXR_WORKER", "127.0.0.1", str(worker.port)],
                         env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    assert worker.cli("echo", "--self").returncode == 0
    assert worker.stop(signal.SIGTERM) == 0


def test_the_readme_storescu_line_sends_every_sample(make_worker):
    """The README's "send it the samples" line, run as written (port substituted)."""
    import re
    import shlex

    readme = (REPO / "README.md").read_text()
    line = re.search(r"^storescu -aec CXR_WORKER .*$", readme, re.M)
    assert line, "the README lost its storescu line"
    words = shlex.split(line.group(0).split("&&")[0])
    worker = make_worker()
    samples = sorted(str(p.relative_to(REPO)) for p in SAMPLES.glob("*.dcm"))
    args = [w for w in words[1:] if w != "sample_dicom/*.dcm"]
    args[args.index("11112")] = str(worker.port)
    res = subprocess.run([need("storescu"), *args, *samples], cwd=REPO, env=DCMTK_ENV,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    rows = wait_until(lambda: (r := worker.worklist()) and len(r) == len(samples)
                      and all(x["status"] != "pending" for x in r) and r, 60, "every sample")
    assert sorted(r["status"] for r in rows).count("not_scored") == 1  # the lateral view
    assert any("view_position" in (r["reason"] or "") for r in rows)


def test_calling_ae_title_outside_allow_list_is_rejected(make_worker, make_images):
    worker = make_worker(CXR_WORKER__LISTENER__ALLOWED_CALLING_AE_TITLES="MODALITY,CR1")
    files = make_images(1, prefix="ae")
    res = storescu(worker.port, *files, calling="INTRUDER", check=False)
    assert res.returncode != 0
    assert "reject" in (res.stdout + res.stderr).lower()
    assert worker.worklist() == []
    storescu(worker.port, *files, calling="MODALITY")
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["scored"], 30,
               "the allowed modality's image scored")


def test_results_stay_local_without_pacs(make_worker, make_images):
    worker = make_worker()
    files = make_images(2, prefix="local")
    storescu(worker.port, *files)
    wait_until(lambda: sorted(r["status"] for r in worker.worklist()) == ["scored", "scored"],
               30, "both scored")
    results = list((worker.data_dir / "results").rglob("*.dcm"))
    assert len(results) == 2
    for p in results:
        assert dcmread(p).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def test_bad_input_gets_a_status_and_the_service_keeps_going(make_worker, make_images, tmp_path):
    worker = make_worker()
    good = make_images(1, prefix="good")[0]
    ds = dcmread(good)
    del ds.PixelData
    no_pixels = tmp_path / "nopixels.dcm"
    ds.save_as(no_pixels, enforce_file_format=True)
    res = storescu(worker.port, no_pixels, check=False, verbose=True)
    assert "DataSetDoesNotMatchSOPClass" in res.stdout + res.stderr, res.stdout + res.stderr
    lateral = make_images(1, prefix="lat", view_position="LL")[0]
    storescu(worker.port, lateral, good)
    wait_until(lambda: sorted(r["status"] for r in worker.worklist()) == ["not_scored", "scored"],
               30, "the lateral refused and the good image scored")
    refused = next(r for r in worker.worklist() if r["status"] == "not_scored")
    assert refused["label"] == "NOT SCORED"
    assert "view_position" in refused["reason"]
    assert refused["probability"] is None


def test_out_of_disk_answers_a700_and_keeps_serving(make_worker, make_images):
    # files over 3 MB cannot be written (RLIMIT_FSIZE): the spool write fails like a full disk
    worker = make_worker(max_file_bytes=3 * 2**20)
    big = make_images(1, prefix="big", shape=(2048, 1700))  # 7 MB
    small = make_images(1, prefix="small", shape=(512, 512))
    res = storescu(worker.port, *big, check=False, verbose=True)
    assert "Refused: OutOfResources" in res.stdout + res.stderr, res.stdout + res.stderr
    assert worker.worklist() == [], "a refused image must not appear as received"
    storescu(worker.port, *small)
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["scored"], 30,
               "the next image scored")
    assert "out of resources" in worker.text()


def test_serve_on_postgresql(make_worker, make_images):
    from sqlalchemy import text

    from cxr_worker.worklist import queue

    with postgres_schema("cxr_e2e") as url:
        worker = make_worker(CXR_WORKER__DATABASE__URL=url)
        storescu(worker.port, *make_images(2, prefix="pg"))
        wait_until(lambda: sorted(r["status"] for r in worker.worklist()) == ["scored"] * 2,
                   30, "two images scored with the PostgreSQL worklist")
        assert worker.stop() == 0
        engine = queue.make_engine(url)
        with engine.connect() as c:
            n = c.execute(text("SELECT count(*) FROM instances")).scalar()
        engine.dispose()
        assert n == 2


@pytest.mark.parametrize(("dcmconv_flag", "storescu_flag"), [
    ("+te", "-xe"), ("+ti", "-xi"), ("+tb", "-xb"), ("+td", "-xd"),
], ids=["explicit-le", "implicit-le", "explicit-be", "deflated"])
def test_every_uncompressed_association_syntax_is_spooled_and_scored(
        make_worker, make_images, tmp_path, dcmconv_flag, storescu_flag):
    # the C-STORE handler reads the header in the association's transfer syntax
    worker = make_worker()
    src = make_images(1, prefix=dcmconv_flag.strip("+"))[0]
    converted = tmp_path / "converted.dcm"
    subprocess.run([need("dcmconv"), dcmconv_flag, str(src), str(converted)], check=True,
                   capture_output=True)
    res = subprocess.run([need("storescu"), "-v", storescu_flag, "-aec", "CXR_WORKER",
                          "127.0.0.1", str(worker.port), str(converted)],
                         env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60, check=False)
    assert "Received Store Response (Success)" in res.stdout + res.stderr, res.stderr
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["scored"], 30, "scored")
    (spooled,) = (worker.data_dir / "spool").rglob("*.dcm")
    assert dcmread(spooled).SOPInstanceUID == dcmread(src).SOPInstanceUID
