"""The site's own operating point (``calibrate``) and the drift check (``stats``), run as a
user would: the CLI in a subprocess, on labelled images held out from training."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from conftest import KERMANY, SAMPLES
from conftest import run_cli as run


def _site_folder(root: Path, n_normal: int, n_pneumonia: int) -> Path:
    for cls, n in (("NORMAL", n_normal), ("PNEUMONIA", n_pneumonia)):
        (root / cls).mkdir(parents=True)
        for src in sorted((KERMANY / cls).iterdir())[:n]:
            shutil.copy(src, root / cls / src.name)
    return root


def test_calibrate_refuses_too_few_images_and_says_how_many(env, tmp_path):
    site = _site_folder(tmp_path / "site", 10, 55)
    res = run(env, "calibrate", "--data", str(site), rc=1)
    assert "10 NORMAL and 55 PNEUMONIA" in res.stderr
    assert "at least 50" in res.stderr and "NORMAL 40 more" in res.stderr
    assert "PNEUMONIA" not in res.stderr.split("add", 1)[1]  # only what is missing
    assert not (tmp_path / "data").exists()  # nothing recorded, no database created


def test_calibrate_apply_then_score_and_stats_use_the_site_threshold(env, tmp_path):
    site = _site_folder(tmp_path / "site", 60, 60)
    shutil.copy(SAMPLES / "dx_lateral_refused.dcm", site / "NORMAL" / "lateral.dcm")
    (site / "PNEUMONIA" / "notes.txt").write_text("not an image")
    res = run(env, "calibrate", "--data", str(site), "--json", "--apply")
    rep = json.loads(res.stdout)
    assert rep["n"] == {"NORMAL": 60, "PNEUMONIA": 60, "refused": 1, "skipped_not_images": 1}
    assert rep["refused"][0]["rule"] == "view_position"
    assert rep["auc"] > 0.95  # held-out images of the training population
    th = rep["threshold"]
    lo, hi = rep["threshold_ci95"]
    assert 0 < lo <= th <= hi < 1
    at = rep["at_site_threshold"]
    assert at["sensitivity"] >= 0.98 and at["confusion"]["fn"] <= 1
    assert at["sensitivity_ci95"][0] <= at["sensitivity"] <= at["sensitivity_ci95"][1]
    assert rep["at_model_threshold"]["threshold"] != th
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    assert rep["applied"]["description"] == f"site threshold, calibrated {today} on 120 images"

    img = sorted((KERMANY / "PNEUMONIA").iterdir())[0]
    scored = json.loads(run(env, "score", "--json", str(img)).stdout)
    assert scored["threshold"] == pytest.approx(th)
    assert scored["threshold_source"] == rep["applied"]["description"]
    text = run(env, "score", str(img)).stdout
    assert "site threshold, calibrated" in text

    # an explicit [model] threshold still overrides the site's
    forced = json.loads(run({**env, "CXR_WORKER__MODEL__THRESHOLD": "0.5"}, "score", "--json",
                            str(img)).stdout)
    assert forced["threshold"] == 0.5 and forced["threshold_source"] == "settings model.threshold"

    st = json.loads(run(env, "stats", "--json").stdout)
    assert st["expected_band_source"] == "site calibration"
    assert st["scored"] == 0 and st["warning"] is None


def test_calibrate_from_a_csv(env, tmp_path):
    lines = ["path,label"]
    for cls in ("NORMAL", "PNEUMONIA"):
        lines += [f"{p},{cls.lower()}" for p in sorted((KERMANY / cls).iterdir())[:50]]
    csv = tmp_path / "site.csv"
    csv.write_text("\n".join(lines) + "\n")
    rep = json.loads(run(env, "calibrate", "--data", str(csv), "--json").stdout)
    assert rep["n"]["NORMAL"] == 50 and rep["n"]["PNEUMONIA"] == 50
    assert "applied" not in rep
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png,maybe\n")
    assert "label 'maybe'" in run(env, "calibrate", "--data", str(bad), rc=1).stderr


def test_stats_counts_rates_and_warns_on_drift(env, tmp_path):
    from sqlalchemy.orm import Session

    from cxr_worker.labels import Label
    from cxr_worker.model import card as model_card
    from cxr_worker.score import SHIPPED_MODEL_DIR
    from cxr_worker.worklist import schema
    from cxr_worker.worklist.models import Instance, Status

    version = model_card.load_card(SHIPPED_MODEL_DIR)["model_version"]
    engine = schema.open_database(f"sqlite:///{tmp_path / 'data' / 'worklist.db'}")

    def row(i: int, **kw) -> Instance:
        base = {"sop_instance_uid": f"1.2.3.{i}", "sop_class_uid": "1.2", "study_instance_uid":
                f"1.2.4.{i}", "series_instance_uid": f"1.2.5.{i}", "spool_path": f"/x/{i}"}
        return Instance(**base, **kw)

    with Session(engine) as s:
        # every image of the shift called suspected: far above any plausible band
        s.add_all([row(i, status=Status.SENT, probability=0.95, label=Label.SUSPECTED,
                       threshold=0.3, model_version=version) for i in range(30)])
        s.add_all([row(100 + i, status=Status.NOT_SCORED,
                       reason="out of scope (view_position): View Position LL") for i in range(3)])
        s.add(row(200, status=Status.SCORED, probability=0.1, label=Label.NEGATIVE,
                  threshold=0.3, model_version="an-older-model"))
        s.commit()
    url = {"CXR_WORKER__DATABASE__URL": f"sqlite:///{tmp_path / 'data' / 'worklist.db'}"}
    st = json.loads(run({**env, **url}, "stats", "--json").stdout)
    assert st["images_by_status"] == {"not_scored": 3, "scored": 1, "sent": 30}
    assert st["not_scored_reasons"] == {"view_position": 3}
    assert st["scored"] == 30 and st["positive_rate"] == 1.0
    assert st["scored_by_other_model_versions"] == 1
    assert st["histogram"][9] == 1.0 and len(st["validation_histogram"]) == 10
    assert st["expected_band_source"].startswith("model card")
    assert "outside the expected band" in st["warning"]
    text = run({**env, **url}, "stats").stdout
    assert "WARNING: positive rate 1.00" in text and "not scored, view_position: 3" in text
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    st = json.loads(run({**env, **url}, "stats", "--json", "--since", future).stdout)
    assert st["scored"] == 0 and st["images_by_status"] == {}
