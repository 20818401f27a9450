"""The model card: what the shipped model is, how it was validated, and where it may be used.

The card is JSON (read by the service: version, threshold, file hashes) plus a Markdown
rendering for people. Loading a model always goes through :func:`verify_file`, so a model file
that does not match its card is never served.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cxr_worker.errors import ModelIntegrityError

CARD_FILE = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
KERAS_FILE = "pneumonia.keras"
TFLITE_FILE = "pneumonia.tflite"

INTENDED_USE = (
    "Triage aid that moves chest radiographs with suspected pneumonia forward in the reading "
    "queue. Not a diagnosis: every study is still read by a radiologist, and a negative "
    "result does not remove a study from the queue."
)
POPULATION = (
    "Paediatric frontal (PA/AP) chest radiographs of children aged 1 to 5 years, from the "
    "Guangzhou Women and Children's Medical Center (Kermany et al. 2018). Adults, lateral "
    "views and other institutions' equipment are not validated."
)


def members(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The networks the served score averages (on the logit scale), each with its files and
    its preprocessing contract version. A card without ``members`` (one network) describes
    ``pneumonia.tflite`` / ``pneumonia.keras`` with the card's own contract version."""
    listed = card.get("members")
    if listed:
        return list(listed)
    pre = card.get("preprocessing")
    version = int(pre.get("version", 1)) if isinstance(pre, dict) else 1
    return [{"tflite": TFLITE_FILE, "keras": KERAS_FILE, "preprocessing_version": version}]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CARD_FILE
    try:
        card: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelIntegrityError(f"model card not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelIntegrityError(f"model card {path} is not valid JSON: {exc}") from exc
    for key in ("model_version", "threshold", "files"):
        if key not in card:
            raise ModelIntegrityError(f"model card {path} lacks '{key}'")
    return card


def verify_file(model_dir: str | Path, file_name: str, card: dict[str, Any]) -> Path:
    """Return the model file's path after checking its sha256 against the card."""
    path = Path(model_dir) / file_name
    expected = card["files"].get(file_name, {}).get("sha256")
    if expected is None:
        raise ModelIntegrityError(f"model card names no sha256 for {file_name}")
    if not path.is_file():
        raise ModelIntegrityError(f"model file missing: {path}")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} has sha256 {actual}, the model card expects {expected}: refusing to load"
        )
    return path


def write_card(model_dir: str | Path, card: dict[str, Any]) -> None:
    model_dir = Path(model_dir)
    (model_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (model_dir / CARD_MARKDOWN).write_text(render_markdown(card), encoding="utf-8")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _conditions_table(conditions: dict[str, dict[str, float]]) -> list[str]:
    if not conditions:
        return []
    rows = [f"| {name} | {v['auc']:.4f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | "
            f"{v['ece']:.3f} | {v['ece_uncalibrated']:.3f} |"
            for name, v in conditions.items()]
    return ["### Validation and simulated acquisition shifts, at the shipped threshold", "",
            "| condition | AUC | sensitivity | specificity | ECE | ECE before calibration |",
            "|---|---|---|---|---|---|", *rows, ""]


def _tradeoff_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    names = list(rows[0]["conditions"])
    head = "| threshold | " + " | ".join(names) + " |"
    lines = ["### Trade-off: sensitivity / specificity per condition", "",
             "Each cell is sensitivity / specificity when images scoring at or above the "
             "threshold are called suspected.", "", head,
             "|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r['conditions'][n]['sensitivity']:.3f} / "
                 f"{r['conditions'][n]['specificity']:.3f}" for n in names]
        lines.append(f"| {r['threshold']:.4f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _reliability_table(bins: list[dict[str, Any]]) -> list[str]:
    if not bins:
        return []
    rows = [f"| {b['bin'] / 10:.1f}-{(b['bin'] + 1) / 10:.1f} | {b['mean_probability']:.3f} | "
            f"{b['observed_frequency']:.3f} | {b['count']} |" for b in bins]
    return ["### Reliability (validation, calibrated probabilities)", "",
            "| bin | mean predicted | observed pneumonia frequency | images |",
            "|---|---|---|---|", *rows, ""]


def _members_table(listed: list[dict[str, Any]]) -> list[str]:
    if not listed:
        return []
    rows = []
    for m in listed:
        diff = m.get("max_abs_diff_vs_keras")
        history = json.loads(m.get("training", {}).get("history", "[]"))
        epochs = len(history)
        rows.append(f"| `{m['tflite']}` | {m.get('alpha', '-')} | {m['preprocessing_version']} | "
                    f"{epochs} | {m.get('training', {}).get('seconds_total', '-')} | "
                    f"{f'{diff:.1e}' if isinstance(diff, float) else '-'} |")
    return ["", "Members (the served score is the sigmoid of their mean logit):", "",
            "| network | alpha | contract version | epochs | training s | max abs diff TFLite "
            "vs Keras |", "|---|---|---|---|---|---|", *rows]


def _levers(rows: list[dict[str, Any]]) -> list[str]:
    """What was tried on the way to this model, measured on the same validation split and
    shift battery with the same threshold policy (each row: a network or ensemble)."""
    if not rows:
        return []
    lines = ["## Levers tried (same split, same shift battery, same threshold policy)", "",
             "| candidate | validation AUC | specificity (validation) | specificity under "
             "shifts: mean / worst | shipped |", "|---|---|---|---|---|"]
    lines += [f"| {r['candidate']} | {r['auc']:.4f} | {r['specificity']:.3f} | "
              f"{r['shift_specificity_mean']:.3f} / {r['shift_specificity_worst']:.3f} | "
              f"{'yes' if r.get('shipped') else 'no'} |" for r in rows]
    return [*lines, "", *[f"- {r['candidate']}: {r['note']}" for r in rows if r.get("note")],
            ""]


def render_markdown(card: dict[str, Any]) -> str:
    val = card.get("validation", {})
    at = val.get("at_threshold", {})
    data = card.get("training_data", {})
    pre = card.get("preprocessing", {})
    cal = card.get("calibration", {})
    lines = [
        f"# Model card: {card['model_version']}",
        "",
        "## Intended use",
        card.get("intended_use", INTENDED_USE),
        "",
        "## Population",
        card.get("population", POPULATION),
        "",
        "## Architecture",
        card.get("architecture", ""),
        "",
        "## Preprocessing and calibration",
        f"- preprocessing: {pre.get('description', '')}"
        if isinstance(pre, dict) else f"- preprocessing: {pre}",
        f"- calibration: Platt scaling, p = sigmoid({cal.get('a', 1.0):.4f} * logit(raw) + "
        f"{cal.get('b', 0.0):.4f}), fitted on {cal.get('fitted_on', '-')}" if cal else
        "- calibration: none (raw sigmoid output)",
        *_members_table(card.get("members", [])),
        "",
        "## Files",
        *[f"- `{name}`: sha256 `{meta['sha256']}`" for name, meta in card["files"].items()],
        "",
        "## Training data",
        f"- source: {data.get('source', '')}",
        f"- images per class (train): {data.get('train_counts', {})}",
        f"- images per class (validation): {data.get('validation_counts', {})}",
        f"- split: {data.get('split', '')}",
        f"- file list sha256: `{data.get('file_list_sha256', '')}`",
        "",
        "## Decision threshold",
        f"- threshold: {_fmt(card['threshold'])} (calibrated probability)",
        f"- policy: {card.get('threshold_policy', '')}",
        "",
        "## Validation (patient-grouped split of the training data)",
        f"- ROC AUC: {_fmt(val.get('auc'))} (95% bootstrap CI "
        f"{', '.join(f'{v:.4f}' for v in val.get('auc_ci95', []))})",
        f"- expected calibration error: {_fmt(val.get('expected_calibration_error'))} "
        f"(before calibration {_fmt(val.get('expected_calibration_error_uncalibrated'))})",
        *[f"- {k}: {_fmt(v)}" for k, v in at.items()],
        f"- positive rate band over the conditions below (prevalence "
        f"{_fmt(val.get('prevalence'))}): "
        f"{' - '.join(f'{v:.3f}' for v in val.get('positive_rate_band', []))}",
        "",
        "Validation images come from the same acquisitions as the training images and flatter the "
        "model; expect lower specificity on other sites' images, and calibrate the site's own "
        "threshold with `cxr-worker calibrate`.",
        "",
        *_conditions_table(val.get("conditions", {})),
        *_tradeoff_table(val.get("tradeoff", [])),
        *_reliability_table(val.get("reliability", [])),
        *_levers(card.get("levers", [])),
        "## Training",
        *[f"- {k}: {_fmt(v)}" for k, v in card.get("training", {}).items()],
        "",
    ]
    return "\n".join(lines)
