"""``cxr-worker evaluate``: metrics and plots of the model on a ``NORMAL/`` ``PNEUMONIA/`` folder.

Scores with the served runtime (TensorFlow Lite, checked against the model card), through the
same preprocessing contract as the service. Writes ``metrics.json`` and three PNGs: ROC with
the operating point, the confusion matrix named as a clinician reads it, and a reliability
diagram.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cxr_worker.model import metrics
from cxr_worker.model.preprocess import load_grey_image
from cxr_worker.score import Scorer
from cxr_worker.training.data import list_samples

CASE_NAMES = {
    "tn": "healthy",
    "fn": "missed pneumonia",
    "fp": "just to be safe",
    "tp": "caught",
}


def score_folder(data_dir: Path, scorer: Scorer,
                 progress: bool | None = None) -> tuple[Any, Any, list[str]]:
    """Labels, probabilities and paths; a progress bar on a terminal (``progress`` None)."""
    from tqdm import tqdm

    samples = list_samples(data_dir)
    show = sys.stderr.isatty() if progress is None else progress
    probs = np.array([scorer.score_grey(load_grey_image(s.path)).probability
                      for s in tqdm(samples, desc="scoring", unit="image", disable=not show)])
    labels = np.array([s.label for s in samples])
    return labels, probs, [str(s.path) for s in samples]


def evaluate(data_dir: Path, out_dir: Path | None, model_dir: str | None = None,
             threshold: float | None = None, shifts: bool = False, *,
             progress: bool | None = None) -> dict[str, Any]:
    scorer = Scorer(model_dir, threshold)
    y, p, _ = score_folder(data_dir, scorer, progress)
    conf = metrics.confusion(y, p, scorer.threshold)
    result: dict[str, Any] = {
        "model_version": scorer.model_version,
        "data": str(data_dir),
        "n": {"NORMAL": int((y == 0).sum()), "PNEUMONIA": int((y == 1).sum())},
        "threshold": scorer.threshold,
        "auc": metrics.roc_auc(y, p),
        "auc_ci95": list(metrics.bootstrap_auc_ci(y, p)),
        **{k: v for k, v in conf.as_dict().items() if k not in CASE_NAMES},
        "confusion_matrix": {f"{k} ({CASE_NAMES[k]})": getattr(conf, k) for k in CASE_NAMES},
        "expected_calibration_error": metrics.expected_calibration_error(y, p),
        "reliability": metrics.reliability_bins(y, p),
    }
    if shifts:
        from cxr_worker.training.robustness import shift_report

        images = [load_grey_image(s.path).astype(np.float32) for s in list_samples(data_dir)]
        result["under_simulated_shifts"] = shift_report(
            lambda g: scorer.score_grey(g).probability, images, y, scorer.threshold)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_all(y, p, conf=conf, threshold=scorer.threshold, out_dir=out_dir,
                 title=scorer.model_version)
        result["files"] = sorted(str(f) for f in out_dir.iterdir())
    return result


def plot_all(y: Any, p: Any, *, conf: metrics.Confusion, threshold: float, out_dir: Path,
             title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fpr, tpr, _ = metrics.roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC {metrics.roc_auc(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - conf.specificity], [conf.sensitivity], c="red", zorder=3,
               label=f"operating point t={threshold:.3f}\nsens {conf.sensitivity:.3f}, "
                     f"spec {conf.specificity:.3f}")
    ax.set(xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=f"ROC\n{title}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    cells = [[conf.tn, conf.fp], [conf.fn, conf.tp]]
    names = [["healthy\n(true negative)", "just to be safe\n(false positive)"],
             ["missed pneumonia\n(false negative)", "caught\n(true positive)"]]
    colours = [["#d8ecd8", "#fff1c9"], ["#f4c6c6", "#d8ecd8"]]
    for i in range(2):
        for j in range(2):
            ax.add_patch(Rectangle((j, 1 - i), 1, 1, color=colours[i][j]))
            ax.text(j + 0.5, 1.5 - i, f"{cells[i][j]}\n{names[i][j]}", ha="center",
                    va="center", fontsize=11)
    ax.set(xlim=(0, 2), ylim=(0, 2), xticks=[0.5, 1.5], yticks=[0.5, 1.5],
           title=f"At threshold {threshold:.3f}")
    ax.set_xticklabels(["model: no pneumonia", "model: suspected"])
    ax.set_yticklabels(["truth: pneumonia", "truth: normal"])
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=110)
    plt.close(fig)

    bins = metrics.reliability_bins(y, p)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.plot([b["mean_probability"] for b in bins], [b["observed_frequency"] for b in bins],
            marker="o", label=f"model (ECE {metrics.expected_calibration_error(y, p):.3f})")
    for b in bins:
        ax.annotate(str(b["count"]), (b["mean_probability"], b["observed_frequency"]),
                    fontsize=7, xytext=(3, -10), textcoords="offset points")
    ax.set(xlabel="predicted probability of pneumonia", ylabel="observed frequency",
           title="Reliability diagram (n per bin)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)
