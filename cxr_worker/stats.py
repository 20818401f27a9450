"""``cxr-worker stats``: is the site's stream of images drifting away from what the model knows?

Counts images per status and not-scored reasons (by gate rule or fate, the same buckets as
the ``/metrics`` endpoint: :func:`cxr_worker.worklist.reasons.reason_bucket`), and, for the
images scored by the served model version, the positive rate (with a Wilson 95% interval)
and the score histogram beside the model card's validation histogram. A warning is printed
when the positive rate's interval lies wholly outside the expected band:

- with a site threshold (``calibrate --apply``) in force: the band is the Wilson interval of the
  positive rate the site's own labelled images gave at that threshold;
- otherwise the model card's ``positive_rate_band``: the lowest and highest positive rate over
  validation and every simulated acquisition shift, *at the validation prevalence* (74%
  pneumonia). A site whose case mix differs (most sites see far fewer pneumonias) will be
  outside it; that warning is the prompt to run ``calibrate`` on the site's own images.

Only rows are read; nothing about a patient is printed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cxr_worker.labels import Label
from cxr_worker.model import metrics
from cxr_worker.worklist.models import Instance, SiteThreshold, Status
from cxr_worker.worklist.reasons import reason_bucket

MIN_FOR_WARNING = 20
"""Fewer scored images than this: no drift verdict (the interval is too wide to mean much)."""


def compute(engine: Engine, card: dict[str, Any], model_version: str,
            since: dt.datetime | None = None, site: SiteThreshold | None = None
            ) -> dict[str, Any]:
    cond = [Instance.received_at >= since] if since is not None else []
    scored_cond = [Instance.probability.is_not(None), *cond]
    bucket = reason_bucket().label("bucket")
    with Session(engine) as s:
        by_status = dict(s.execute(select(Instance.status, func.count()).where(*cond)
                                   .group_by(Instance.status)).all())
        reasons: dict[str, int] = dict(s.execute(
            select(bucket, func.count()).where(Instance.status == Status.NOT_SCORED, *cond)
            .group_by(bucket).order_by(func.count().desc(), bucket)).all())
        current = s.execute(select(Instance.probability, Instance.label).where(
            *scored_cond, Instance.model_version == model_version)).all()
        others = s.scalar(select(func.count()).where(
            *scored_cond, Instance.model_version != model_version)) or 0
    probs = np.array([p for p, _ in current], dtype=np.float64)
    positives = sum(1 for _, lab in current if lab == Label.SUSPECTED)
    n = len(current)
    rate = positives / n if n else None
    ci = metrics.wilson_interval(positives, n) if n else None
    if site is not None:
        n_site = site.n_normal + site.n_pneumonia
        band = list(metrics.wilson_interval(round(site.positive_rate * n_site), n_site))
        band_source = "site calibration"
    else:
        band = list(card.get("validation", {}).get("positive_rate_band", [0.0, 1.0]))
        band_source = "model card (validation prevalence)"
    warning = None
    if ci is not None and n >= MIN_FOR_WARNING and (ci[1] < band[0] or ci[0] > band[1]):
        warning = (f"positive rate {rate:.2f} (95% CI {ci[0]:.2f}-{ci[1]:.2f}, {n} images) is "
                   f"outside the expected band {band[0]:.2f}-{band[1]:.2f} ({band_source}): "
                   "the site's images or case mix differ from validation; check the not-scored "
                   "reasons and run 'cxr-worker calibrate' on labelled site images")
    return {
        "since": since.isoformat() if since else None,
        "model_version": model_version,
        "images_by_status": {str(k): int(v) for k, v in sorted(by_status.items())},
        "not_scored_reasons": {str(k): int(v) for k, v in reasons.items()},
        "scored_by_other_model_versions": int(others),
        "scored": n,
        "positive": positives,
        "positive_rate": rate,
        "positive_rate_ci95": list(ci) if ci else None,
        "expected_band": band,
        "expected_band_source": band_source,
        "histogram": metrics.histogram(probs) if n else None,
        "validation_histogram": card.get("validation", {}).get("histogram"),
        "warning": warning,
    }


def render(st: dict[str, Any]) -> list[str]:
    """The report as lines for a terminal."""
    lines = [f"model {st['model_version']}" + (f", since {st['since']}" if st["since"] else "")]
    lines.append("images by status: " + (", ".join(
        f"{k} {v}" for k, v in st["images_by_status"].items()) or "none"))
    for reason, count in st["not_scored_reasons"].items():
        lines.append(f"  not scored, {reason}: {count}")
    if st["scored"]:
        lo, hi = st["positive_rate_ci95"]
        lines.append(f"positive rate {st['positive_rate']:.2f} ({st['positive']} of "
                     f"{st['scored']}; 95% CI {lo:.2f}-{hi:.2f}); expected "
                     f"{st['expected_band'][0]:.2f}-{st['expected_band'][1]:.2f} "
                     f"({st['expected_band_source']})")
        lines.append("score histogram (site | model card validation):")
        val = st["validation_histogram"] or [None] * len(st["histogram"])
        for i, (a, b) in enumerate(zip(st["histogram"], val, strict=True)):
            bar = "#" * round(a * 40)
            ref = f"{b:5.1%}" if b is not None else "   - "
            lines.append(f"  {i / 10:.1f}-{(i + 1) / 10:.1f} {a:6.1%} | {ref}  {bar}")
    else:
        lines.append("no image scored by this model version yet")
    if st["scored_by_other_model_versions"]:
        lines.append(f"({st['scored_by_other_model_versions']} images scored by other model "
                     "versions not counted)")
    if st["warning"]:
        lines.append(f"WARNING: {st['warning']}")
    return lines
