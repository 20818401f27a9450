"""The command line: outputs, JSON and exit codes (run as a user would, in a subprocess)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from conftest import KERMANY, SAMPLES, free_port
from conftest import run_cli as run
from PIL import Image
from pydicom import dcmread


def test_help_for_every_command(env):
    for cmd in ("serve", "echo", "worklist", "retry", "replay", "score", "db", "train",
                "evaluate"):
        assert "usage: cxr-worker" in run(env, cmd, "--help").stdout


def test_config_error_names_the_key_and_exits_2(env):
    res = run({**env, "CXR_WORKER__LISTENER__PORT": "eighty"}, "worklist", rc=2)
    assert "listener.port" in res.stderr


def test_score_json_dicom_png_and_refusals(env, tmp_path):
    png = tmp_path / "n.png"
    Image.open(sorted((KERMANY / "PNEUMONIA").iterdir())[0]).save(png)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    inputs = [SAMPLES / "cr_pa_normal_12bit.dcm", SAMPLES / "dx_lateral_refused.dcm", png, junk]
    res = run(env, "score", "--json", *map(str, inputs), rc=1)  # two not scored
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["path"] for x in lines] == [str(p) for p in inputs]
    ok, lateral, from_png, bad = lines
    assert ok["scored"] and 0 <= ok["probability"] <= 1
    assert ok["label"] in ("SUSPECTED PNEUMONIA", "NO PNEUMONIA DETECTED")
    assert ok["threshold"] > 0 and ok["model_version"]
    assert (ok["probability"] >= ok["threshold"]) == (ok["label"] == "SUSPECTED PNEUMONIA")
    assert not lateral["scored"] and lateral["rule"] == "view_position"
    assert from_png["scored"]
    assert not bad["scored"] and "unreadable" in bad["reason"]
    assert ok["population"] == "in_population"  # the samples are 3 years old
    assert from_png["population"] == "unknown"  # no header, no age
    # all scored: exit 0; the text shows the population beside the label, two decimals
    text = run(env, "score", str(inputs[0])).stdout
    assert re.search(r": (SUSPECTED PNEUMONIA|NO PNEUMONIA DETECTED) \| IN VALIDATED "
                     r"POPULATION \(age 3 years; validated 1-5 years\) \| "
                     r"p=(0\.\d\d|> 0\.99|< 0\.01) \(threshold 0\.\d\d", text), text


def test_score_labels_the_nih_adults_outside_population(env):
    nih = Path(__file__).parent / "data" / "nih"
    paths = [nih / f"test{i}.dcm" for i in (1, 2, 3)]
    res = run(env, "score", "--json", *map(str, paths))
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["population"] for x in lines] == ["outside"] * 3
    assert [x["population_text"].split(";")[0] for x in lines] == [
        f"OUTSIDE VALIDATED POPULATION (age {age} years" for age in (81, 58, 77)]
    text = run(env, "score", *map(str, paths)).stdout
    assert text.count("| OUTSIDE VALIDATED POPULATION (age ") == 3, text
    refused = run({**env, "CXR_WORKER__GATE__REFUSE_OUTSIDE_AGE_RANGE": "true"}, "score",
                  "--json", str(paths[0]), rc=1)
    row = json.loads(refused.stdout)
    assert not row["scored"] and row["rule"] == "patient_age" and row["population"] == "outside"


def test_db_upgrade_and_current(env):
    from cxr_worker.worklist.schema import head_revision

    head = head_revision()
    assert head >= "0002"  # 0002: the population column
    assert f"database at revision {head}" in run(env, "db", "upgrade").stdout
    assert f"revision {head} (head {head})" in run(env, "db", "current").stdout


def test_echo_without_pacs_is_a_usage_error_and_unreachable_pacs_fails(env):
    assert "no PACS configured" in run(env, "echo", rc=2).stderr
    dead = {**env, "CXR_WORKER__PACS__AE_TITLE": "PACS", "CXR_WORKER__PACS__PORT":
            str(free_port()), "CXR_WORKER__PACS__TIMEOUT_SECONDS": "2"}
    assert "failed" in run(dead, "echo", rc=1).stderr


def test_replay_files_then_study_with_stable_result_uids(env, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("cr_pa_normal_12bit.dcm", "dx_pa_normal_8bit.dcm", "dx_lateral_refused.dcm"):
        shutil.copy(SAMPLES / name, src / name)
    dry = run(env, "replay", str(src), "--dry-run", "--json").stdout
    assert len(dry.splitlines()) == 3
    assert run(env, "worklist", "--json").stdout == ""  # dry run changed nothing

    res = run(env, "replay", str(src), "--json", rc=1)  # the lateral is not scored
    first = {r["sop_instance_uid"]: r for r in map(json.loads, res.stdout.splitlines())}
    statuses = sorted(r["status"] for r in first.values())
    assert statuses == ["not_scored", "scored", "scored"]

    study = dcmread(src / "cr_pa_normal_12bit.dcm").StudyInstanceUID
    again = run(env, "replay", "--study", study, "--json").stdout
    (row,) = [json.loads(x) for x in again.splitlines()]
    assert row["result_sop_instance_uid"] == first[row["sop_instance_uid"]][
        "result_sop_instance_uid"]

    since = run(env, "replay", "--since", "2000-01-01", "--dry-run", "--json").stdout
    assert len(since.splitlines()) == 3
    assert run(env, "replay", "--since", "2999-01-01", "--dry-run", rc=1).stdout == ""

    held = run(env, "replay", "--study", study, "--no-send", "--json").stdout
    assert json.loads(held)["status"] == "held"

    wl = [json.loads(x) for x in run(env, "worklist", "--json").stdout.splitlines()]
    assert len(wl) == 3
    assert {r["status"] for r in wl} == {"held", "scored", "not_scored"}
    assert {r["status"]: r["population"] for r in wl} == {
        "held": "in_population", "scored": "in_population", "not_scored": "unknown"}
    table = run(env, "worklist").stdout
    assert "NOT SCORED" in table and "view_position" in table
    assert table.splitlines()[0].startswith("RESULT                 POPULATION  ")
    scored_lines = [x for x in table.splitlines()[1:] if "NOT SCORED" not in x]
    assert len(scored_lines) == 2 and all(
        re.search(r"(PNEUMONIA|DETECTED) +IN VALIDATED POPULATION +(0\.\d\d|> 0\.99|< 0\.01) ",
                  x) for x in scored_lines), table


def test_replay_needs_a_selection(env):
    assert "replay needs" in run(env, "replay", rc=2).stderr
    assert "--since" in run(env, "replay", "--since", "yesterday", rc=2).stderr


def test_retry_needs_a_selection_and_says_when_nothing_failed(env):
    assert "one of the arguments" in run(env, "retry", rc=2).stderr
    assert "no worklist database" in run(env, "retry", "--all-failed", rc=2).stderr
    run(env, "db", "upgrade")
    assert "nothing failed" in run(env, "retry", "--all-failed", rc=1).stderr
    assert "no study 1.2.3" in run(env, "retry", "--study", "1.2.3", rc=1).stderr
    assert "no image 1.2.4" in run(env, "retry", "--sop", "1.2.4", rc=1).stderr
    run(env, "worklist", "--status", "undelivered")


def test_worklist_empty_and_filters(env):
    run(env, "db", "upgrade")  # worklist never creates the database (tests/test_api.py)
    assert "(no studies)" in run(env, "worklist").stdout
    assert "(no studies)" in run(env, "worklist", "--since", "2026-01-01T08:00").stdout
    assert "--since" in run(env, "worklist", "--since", "monday", rc=2).stderr
    assert run(env, "worklist", "--status", "suspected", "--json").stdout == ""
    run(env, "worklist", "--status", "bogus", rc=2)


def test_shipped_model_integrity_failure_is_reported(env, tmp_path):
    from cxr_worker.model import card as model_card
    from cxr_worker.score import SHIPPED_MODEL_DIR

    broken = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL_DIR, broken)
    tfl = broken / model_card.members(model_card.load_card(broken))[0]["tflite"]
    tfl.write_bytes(tfl.read_bytes()[:-1] + b"\x00")
    res = run({**env, "CXR_WORKER__MODEL__PATH": str(broken)}, "score",
              str(SAMPLES / "cr_pa_normal_12bit.dcm"), rc=1)
    assert "sha256" in res.stderr and "refusing to load" in res.stderr


def test_broken_file_is_quarantined_with_its_reason(env, tmp_path):
    data = (SAMPLES / "cr_pa_normal_12bit.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 2])  # header intact, half the pixels
    res = run(env, "replay", str(truncated), "--json", rc=1)
    (row,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert row["status"] == "not_scored"
    assert "quarantine" in row["reason"]
    data_dir = Path(env["CXR_WORKER__STORAGE__DATA_DIR"])
    kept = list((data_dir / "quarantine").glob("*.dcm"))
    assert len(kept) == 1 and kept[0].stat().st_size == len(data) // 2
    assert kept[0].with_suffix(".reason.txt").read_text().strip()
    (study,) = [json.loads(x) for x in run(env, "worklist", "--json").stdout.splitlines()]
    assert study["label"] == "NOT SCORED" and study["probability"] is None
    # the row follows the file: a replay of the study reads it from quarantine, and says why
    again = run(env, "replay", "--study", study["study_instance_uid"], "--json", rc=1).stdout
    assert json.loads(again)["status"] == "not_scored"
    assert "missing" not in json.loads(again)["reason"]
    assert kept[0].exists()
