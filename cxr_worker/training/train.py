"""``cxr-worker train``: fine-tune the reference architecture and write model + card.

The model is one or more networks ("members", ``--members alpha:contract_version``; the shipped
recipe :data:`DEFAULT_MEMBERS` is one alpha 1.0 network on contract 1), each trained by
:func:`train_model` into ``out/member-N/``; :func:`cxr_worker.training.finalize.finalize` then
calibrates the ensemble, chooses its operating point and writes the card into ``out``.

Schedule of each member (chosen by measurement on the 2-core CPU, see the model card):

1. head only: the ImageNet backbone frozen, Adam 1e-3, ``head_epochs`` epochs;
2. fine-tune: the whole backbone trainable except BatchNorm statistics (kept frozen: small
   batches on a shifted domain make them drift), Adam with cosine decay from 1e-4,
   ``finetune_epochs`` epochs.

Both stages use class weights (the set is 74% pneumonia) and the acquisition-imitating
augmentation of :mod:`cxr_worker.training.augment`. Validation is a stratified, patient-grouped
split of the given data (fixed seed). The decision threshold is chosen by the finalize step
(:func:`cxr_worker.model.metrics.select_threshold_robust`).
"""

from __future__ import annotations

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
from cxr_worker.model.preprocess import CONTRACT_VERSION, equalize
from cxr_worker.training import data

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path
    weights: Path
    out_dir: Path
    alpha: float = 0.5
    head_epochs: int = 2
    finetune_epochs: int = 4
    batch_size: int = 32
    seed: int = 0
    val_fraction: float = 0.15
    min_sensitivity: float = 0.98
    max_images: int | None = None  # for smoke runs: a stratified subset of this size
    steps_per_epoch: int | None = None  # for smoke runs: cap the batches per epoch
    preprocessing_version: int = CONTRACT_VERSION


@dataclass(frozen=True)
class MemberSpec:
    """One network of the shipped ensemble: backbone width and preprocessing contract."""

    alpha: float = 0.5
    preprocessing_version: int = CONTRACT_VERSION

    @classmethod
    def parse(cls, text: str) -> tuple[MemberSpec, ...]:
        """``"0.5:2,0.5:1"`` -> two members (alpha:contract version)."""
        out = []
        for part in filter(None, (x.strip() for x in text.split(","))):
            alpha, _, version = part.partition(":")
            out.append(cls(float(alpha), int(version or CONTRACT_VERSION)))
        if not out:
            raise ValueError("no member given")
        return tuple(out)


DEFAULT_MEMBERS = (MemberSpec(1.0, 1),)
"""The shipped recipe (see the model card for the measurements behind it)."""

WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224_no_top.h5"


def weights_for(weights: Path, alpha: float) -> Path:
    """The ImageNet file for ``alpha``: ``weights`` itself, or its official name in a folder."""
    if weights.is_dir():
        path = weights / WEIGHTS_FILE.format(alpha=f"{alpha:.2f}".rstrip("0").rstrip(".")
                                             if alpha != 1 else "1.0")
        if not path.is_file():
            raise FileNotFoundError(f"--weights {weights}: no {path.name} for alpha {alpha:g}")
        return path
    return weights


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

    def equalized(x: Any) -> Any:
        # the contract's own NumPy function, so training and serving cannot drift
        out = tf.numpy_function(equalize, [x], tf.float32, stateful=False)
        return tf.ensure_shape(out, x.shape)

    def prepare(x: Any, y: Any) -> Any:
        x = tf.cast(x[..., None], tf.float32)
        x = augment(x)
        if cfg.preprocessing_version >= 2:
            x = equalized(x)
        return tf.repeat(x, 3, axis=-1), y

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def as_input(images: Any, version: int) -> Any:
    """Raw squashed (N, 224, 224) images to the model input of contract ``version``."""
    x = images.astype(np.float32)
    if version >= 2:
        x = equalize(x)
    return np.repeat(x[..., None], 3, axis=-1)


def _predict(model: Any, images: Any, version: int, batch_size: int = 64) -> Any:
    out = [
        model.predict_on_batch(as_input(images[i : i + batch_size], version))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).ravel()


def export_tflite(model: Any, path: Path) -> None:
    """Convert to a float32 TensorFlow Lite flatbuffer (no quantisation)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    path.write_bytes(converter.convert())


TRAINING_RECORD = "training.json"
"""Written beside the model by :func:`train_model`; read by the finalize step for the card."""


def load_split(data_dir: Path, seed: int, val_fraction: float, max_images: int | None
               ) -> tuple[list[data.Sample], list[data.Sample]]:
    """The deterministic patient-grouped split that training and the card both use."""
    samples = data.list_samples(data_dir)
    if max_images:
        samples = _subset(samples, max_images, seed)
    return data.split_by_patient(samples, val_fraction, seed)


def run(cfg: TrainConfig, members: tuple[MemberSpec, ...] = DEFAULT_MEMBERS
        ) -> dict[str, Any]:
    """Train each member (into ``out/member-N/``), then choose the operating point of their
    ensemble and write the model card into ``out``."""
    from dataclasses import replace

    from cxr_worker.training.finalize import FinalizeConfig, finalize

    dirs = []
    for i, m in enumerate(members, start=1):
        member_dir = cfg.out_dir / f"member-{i}"
        print(f"member {i}/{len(members)}: alpha {m.alpha:g}, preprocessing contract "
              f"version {m.preprocessing_version}", flush=True)
        train_model(replace(cfg, alpha=m.alpha, preprocessing_version=m.preprocessing_version,
                            weights=weights_for(cfg.weights, m.alpha), out_dir=member_dir))
        dirs.append(member_dir)
    return finalize(cfg.out_dir, FinalizeConfig(
        data_dir=cfg.data_dir, seed=cfg.seed, val_fraction=cfg.val_fraction,
        max_images=cfg.max_images, min_sensitivity=cfg.min_sensitivity), dirs)


def train_model(cfg: TrainConfig) -> dict[str, Any]:
    """Fit the model; write the ``.keras`` and ``.tflite`` files and the training record."""
    import keras

    from cxr_worker.model.architecture import build_model
    from cxr_worker.training.augment import make_augmenter

    t_start = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    train_s, val_s = load_split(cfg.data_dir, cfg.seed, cfg.val_fraction, cfg.max_images)
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
    p_keras = _predict(shipped, x_va, cfg.preprocessing_version)
    record = {
        "alpha": cfg.alpha,
        "preprocessing_version": cfg.preprocessing_version,
        "train_counts": {"NORMAL": int(len(y_tr) - n_pos), "PNEUMONIA": int(n_pos)},
        "file_list_sha256": data.file_list_hash(train_s + val_s),
        "validation_probabilities_keras": [float(v) for v in p_keras],
        "training": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
               if k not in ("data_dir", "out_dir")},
            "weights": cfg.weights.name,
            "class_weight": json.dumps({k: round(v, 4) for k, v in class_weight.items()}),
            "seconds_total": round(time.monotonic() - t_start, 1),
            "seconds_per_epoch": json.dumps([round(s, 1) for s in epoch_seconds]),
            "history": json.dumps(history),
            "machine": "CPU",
        },
    }
    (cfg.out_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {keras_path} and {tflite_path}", flush=True)
    return record


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
            p = _predict(self.model, x_va, cfg.preprocessing_version)
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
