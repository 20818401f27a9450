"""``cxr-worker train``: fine-tune the reference architecture and write model + card.

Schedule (chosen by measurement on the 2-core CPU, see the model card for figures):

1. head only: the ImageNet backbone frozen, Adam 1e-3, ``head_epochs`` epochs;
2. fine-tune: the whole backbone trainable except BatchNorm statistics (kept frozen: small
   batches on a shifted domain make them drift), Adam with cosine decay from 1e-4,
   ``finetune_epochs`` epochs.

Both stages use class weights (the set is 74% pneumonia) and the acquisition-imitating
augmentation of :mod:`cxr_worker.training.augment`. Validation is a stratified, patient-grouped
split of the given data (fixed seed). The decision threshold is chosen on validation by
:func:`cxr_worker.model.metrics.select_threshold`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_worker.model import card as model_card
from cxr_worker.model import metrics
from cxr_worker.training import data

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path
    weights: Path
    out_dir: Path
    alpha: float = 0.5
    head_epochs: int = 2
    finetune_epochs: int = 3
    batch_size: int = 32
    seed: int = 0
    val_fraction: float = 0.15
    min_sensitivity: float = 0.98
    max_images: int | None = None  # for smoke runs: a stratified subset of this size
    steps_per_epoch: int | None = None  # for smoke runs: cap the batches per epoch


def _subset(samples: list[data.Sample], n: int, seed: int) -> list[data.Sample]:
    rng = np.random.default_rng(seed)
    by_class = [[s for s in samples if s.label == c] for c in (0, 1)]
    half = n // 2
    picked: list[data.Sample] = []
    for group in by_class:
        idx = rng.permutation(len(group))[:half]
        picked.extend(group[i] for i in sorted(idx))
    return picked


def _dataset(images: Any, labels: Any, cfg: TrainConfig, augment: Any) -> Any:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.shuffle(len(labels), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)

    def prepare(x: Any, y: Any) -> Any:
        x = tf.cast(x[..., None], tf.float32)
        x = augment(x)
        return tf.repeat(x, 3, axis=-1), y

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def _as_input(images: Any) -> Any:
    return np.repeat(images[..., None].astype(np.float32), 3, axis=-1)


def _predict(model: Any, images: Any, batch_size: int = 64) -> Any:
    out = [
        model.predict_on_batch(_as_input(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).ravel()


def export_tflite(model: Any, path: Path) -> None:
    """Convert to a float32 TensorFlow Lite flatbuffer (no quantisation)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    path.write_bytes(converter.convert())


def run(cfg: TrainConfig) -> dict[str, Any]:
    import keras

    from cxr_worker.model.architecture import build_model
    from cxr_worker.model.runtime import TFLiteScorer
    from cxr_worker.training.augment import make_augmenter
    from cxr_worker.training.robustness import shift_report

    t_start = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    samples = data.list_samples(cfg.data_dir)
    if cfg.max_images:
        samples = _subset(samples, cfg.max_images, cfg.seed)
    train_s, val_s = data.split_by_patient(samples, cfg.val_fraction, cfg.seed)
    print(f"data: {len(train_s)} train / {len(val_s)} validation images, split by patient",
          flush=True)
    x_tr, y_tr = data.load_arrays(train_s)
    x_va, y_va = data.load_arrays(val_s)
    n_pos = float(y_tr.sum())
    class_weight = {0: len(y_tr) / (2 * (len(y_tr) - n_pos)), 1: len(y_tr) / (2 * n_pos)}

    model = build_model(cfg.alpha, str(cfg.weights), cfg.seed)
    train_ds = _dataset(x_tr, y_tr, cfg, make_augmenter(cfg.seed))
    history, epoch_seconds = _fit(model, train_ds, cfg, n_train=len(y_tr),
                                  class_weight=class_weight, x_va=x_va, y_va=y_va)

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    keras_path = cfg.out_dir / model_card.KERAS_FILE
    tflite_path = cfg.out_dir / model_card.TFLITE_FILE
    # an uncompiled copy: no optimizer slots in the shipped file (a third of its size)
    shipped = build_model(cfg.alpha, None, cfg.seed)
    shipped.set_weights(model.get_weights())
    shipped.save(keras_path)
    export_tflite(shipped, tflite_path)

    # validation figures and the threshold come from the served runtime (TFLite)
    tfl = TFLiteScorer(tflite_path)
    p_keras = _predict(shipped, x_va)
    p_va = np.array([tfl.predict(_as_input(x_va[i : i + 1])[0]) for i in range(len(x_va))])
    tflite_max_diff = float(np.abs(p_va - p_keras).max())
    threshold = metrics.select_threshold(y_va, p_va, cfg.min_sensitivity)
    print("simulated acquisition shifts on validation ...", flush=True)
    shifts = shift_report(tfl.predict, [x.astype(np.float32) for x in x_va], y_va, threshold)
    card = _card(cfg, y_tr=y_tr, y_va=y_va, p_va=p_va, threshold=threshold,
                 samples=train_s + val_s,
                 tflite_max_diff=tflite_max_diff, history=history, epoch_seconds=epoch_seconds,
                 total=time.monotonic() - t_start, class_weight=class_weight, shifts=shifts)
    model_card.write_card(cfg.out_dir, card)
    conf = card["validation"]["at_threshold"]
    print(f"wrote {keras_path} and {tflite_path}; model version {card['model_version']}",
          flush=True)
    print(f"validation AUC {card['validation']['auc']:.4f}; threshold {card['threshold']:.4f}: "
          f"sensitivity {conf['sensitivity']:.4f}, specificity {conf['specificity']:.4f}",
          flush=True)
    return card


def _fit(model: Any, train_ds: Any, cfg: TrainConfig, *, n_train: int,
         class_weight: dict[int, float], x_va: Any, y_va: Any
         ) -> tuple[list[dict[str, float]], list[float]]:
    """Head only, then fine-tune; returns per-epoch history and seconds."""
    import keras

    backbone = model.get_layer("mobilenetv2")
    verbose = 1 if sys.stdout.isatty() else 2
    history: list[dict[str, float]] = []
    epoch_seconds: list[float] = []

    class ValAUC(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seconds = time.monotonic() - self._t
            epoch_seconds.append(seconds)
            p = _predict(self.model, x_va)
            auc = metrics.roc_auc(y_va, p)
            loss = float((logs or {}).get("loss", float("nan")))
            history.append({"epoch": len(history) + 1, "loss": loss, "val_auc": auc,
                            "seconds": seconds})
            print(f"epoch {len(history)}: loss {loss:.4f}  val AUC {auc:.4f}  ({seconds:.0f} s)",
                  flush=True)

    fit_kwargs: dict[str, Any] = {
        "class_weight": class_weight, "verbose": verbose, "callbacks": [ValAUC()],
        "steps_per_epoch": cfg.steps_per_epoch,
    }
    backbone.trainable = False
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    if cfg.head_epochs:
        model.fit(train_ds, epochs=cfg.head_epochs, **fit_kwargs)
    if cfg.finetune_epochs:
        backbone.trainable = True
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        steps = cfg.steps_per_epoch or int(np.ceil(n_train / cfg.batch_size))
        lr = keras.optimizers.schedules.CosineDecay(1e-4, steps * cfg.finetune_epochs, alpha=0.1)
        model.compile(keras.optimizers.Adam(lr), "binary_crossentropy")
        model.fit(train_ds, epochs=cfg.finetune_epochs, **fit_kwargs)
    return history, epoch_seconds


def _card(cfg: TrainConfig, *, y_tr: Any, y_va: Any, p_va: Any, threshold: float,
          samples: list[data.Sample],
          tflite_max_diff: float, history: list[dict[str, float]], epoch_seconds: list[float],
          total: float, class_weight: dict[int, float],
          shifts: dict[str, dict[str, float]]) -> dict[str, Any]:
    keras_path = cfg.out_dir / model_card.KERAS_FILE
    tflite_path = cfg.out_dir / model_card.TFLITE_FILE
    conf = metrics.confusion(y_va, p_va, threshold)
    n_pos = float(y_tr.sum())
    n_neg = float(len(y_tr) - n_pos)
    keras_sha = model_card.sha256_file(keras_path)
    date = dt.datetime.now(dt.UTC)
    version = f"cxr-pneumonia-mnv2-a{cfg.alpha:g}-{date:%Y%m%d}-{keras_sha[:8]}"
    return {
        "model_version": version,
        "created": date.isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_policy": (
            f"highest threshold keeping validation sensitivity >= {cfg.min_sensitivity} "
            "(the most specific operating point that misses at most "
            f"{100 * (1 - cfg.min_sensitivity):.0f}% of validation pneumonias); "
            "probability >= threshold is called SUSPECTED PNEUMONIA; placed midway between the "
            "last pneumonia kept and the next lower score"
        ),
        "files": {
            model_card.KERAS_FILE: {"sha256": keras_sha, "bytes": keras_path.stat().st_size},
            model_card.TFLITE_FILE: {
                "sha256": model_card.sha256_file(tflite_path),
                "bytes": tflite_path.stat().st_size,
                "max_abs_diff_vs_keras": tflite_max_diff,
            },
        },
        "architecture": (
            f"Rescaling([0,255]->[-1,1]) -> MobileNetV2(alpha={cfg.alpha:g}, ImageNet weights, "
            "include_top=False) -> GlobalAveragePooling -> Dense(100, relu) -> Dropout(0.6) -> "
            "Dense(50, relu) -> Dense(1, sigmoid); Adam; binary cross-entropy. Input: whole "
            "radiograph squashed to 224x224, grey replicated to 3 channels, values 0-255."
        ),
        "preprocessing": "cxr_worker.model.preprocess.to_model_input",
        "intended_use": model_card.INTENDED_USE,
        "population": model_card.POPULATION,
        "training_data": {
            "source": "Kermany et al. 2018 (Cell 172(5)), Mendeley Data doi:10.17632/rscbjbr9sj.2, "
            "CC BY 4.0; training split, 224x224 copy",
            "train_counts": {"NORMAL": int(n_neg), "PNEUMONIA": int(n_pos)},
            "validation_counts": {"NORMAL": int((y_va == 0).sum()),
                                  "PNEUMONIA": int(y_va.sum())},
            "split": f"stratified, grouped by patient, {cfg.val_fraction:.0%} validation, "
            f"seed {cfg.seed}; byte-identical duplicates dropped",
            "file_list_sha256": data.file_list_hash(samples),
        },
        "validation": {
            "auc": metrics.roc_auc(y_va, p_va),
            "auc_ci95": list(metrics.bootstrap_auc_ci(y_va, p_va, seed=cfg.seed)),
            "expected_calibration_error": metrics.expected_calibration_error(y_va, p_va),
            "at_threshold": conf.as_dict(),
            "runtime": "TensorFlow Lite (the served runtime)",
            "under_simulated_shifts": shifts,
        },
        "training": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
               if k not in ("data_dir", "out_dir")},
            "weights": cfg.weights.name,
            "class_weight": json.dumps({k: round(v, 4) for k, v in class_weight.items()}),
            "seconds_total": round(total, 1),
            "seconds_per_epoch": json.dumps([round(s, 1) for s in epoch_seconds]),
            "history": json.dumps(history),
            "machine": "CPU",
        },
    }
