"""After training: calibrate, choose the operating point, measure, and write the model card.

Everything here is computed with the served runtime (TensorFlow Lite) on the validation split
that training held out (the same deterministic, patient-grouped split), so the card describes
what the service will do:

1. raw validation scores, unshifted and under each simulated acquisition shift
   (:mod:`cxr_worker.training.robustness`);
2. Platt scaling fitted on the unshifted validation scores (:mod:`cxr_worker.model.calibration`);
3. the threshold, on the calibrated scale, by the shift-robust policy
   (:func:`cxr_worker.model.metrics.select_threshold_robust`): the highest threshold that keeps
   sensitivity >= the target on validation *and* under every shift;
4. per condition: AUC, sensitivity and specificity at the threshold, ECE before and after
   calibration; the trade-off table (threshold -> sensitivity/specificity per condition); the
   reliability bins; the validation score histogram and positive-rate band that
   ``cxr-worker stats`` compares a site against.

It can be re-run on trained member directories (``training.json`` beside each network's
files) without training again.

Each member's served file gets a second output for the heatmap (:func:`export_heatmap`): the
exported flatbuffer with its last feature map (MobileNetV2 ``out_relu``) added to the graph's
outputs, nothing else changed (the weights are the same bytes, so the probability is the same
to the bit), and the dense head's weights, read from that flatbuffer, as ``memberN_head.npz``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_worker.model import card as model_card
from cxr_worker.model import metrics
from cxr_worker.model.calibration import fit_platt

HEAD_SUFFIX = "_head.npz"

TRADEOFF_THRESHOLDS = (0.05, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95)


@dataclass(frozen=True)
class FinalizeConfig:
    data_dir: Path
    seed: int = 0
    val_fraction: float = 0.15
    max_images: int | None = None
    min_sensitivity: float = 0.98


def add_features_output(tflite: bytes) -> tuple[bytes, dict[str, np.ndarray]]:
    """The flatbuffer with the feature map that feeds the head's global average pooling added
    as a second output (named :data:`~cxr_worker.model.heatmap.FEATURES_OUTPUT`, also in the
    serving signature), and the head's weights as :class:`~cxr_worker.model.heatmap.Head`
    arrays. The graph must end MEAN -> FULLY_CONNECTED(relu) ... -> FULLY_CONNECTED -> LOGISTIC
    (the architecture of :mod:`cxr_worker.model.architecture`); anything else is refused."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from cxr_worker.model.heatmap import FEATURES_OUTPUT, HEAD_KEYS

    model = fbu.read_model_from_bytearray(bytearray(tflite))
    graph = model.subgraphs[0]
    ops = [(fbu.opcode_to_name(model, op.opcodeIndex), op) for op in graph.operators]
    n_dense = len(HEAD_KEYS) // 2
    tail = [name for name, _ in ops[-(n_dense + 2):]]
    if tail != ["MEAN", *["FULLY_CONNECTED"] * n_dense, "LOGISTIC"]:
        raise ValueError(f"the graph ends {tail}, not global average pooling, {n_dense} dense "
                         "layers and a sigmoid: no heatmap outputs for it")
    mean = ops[-(n_dense + 2)][1]
    features = int(mean.inputs[0])
    if len(graph.tensors[features].shape) != 4 or list(graph.outputs) != [ops[-1][1].outputs[0]]:
        raise ValueError("unexpected feature-map shape or graph outputs")

    def const(index: int) -> np.ndarray:
        tensor = graph.tensors[index]
        if tensor.type != schema.TensorType.FLOAT32:
            raise ValueError("the head's weights are not float32")
        data = np.asarray(model.buffers[tensor.buffer].data, np.uint8)
        return data.view("<f4").reshape(list(tensor.shape)).astype(np.float32)

    head: dict[str, np.ndarray] = {}
    relu, none = schema.ActivationFunctionType.RELU, schema.ActivationFunctionType.NONE
    for i, (_, op) in enumerate(ops[-(n_dense + 1):-1]):
        act = op.builtinOptions.fusedActivationFunction
        if act != (none if i == n_dense - 1 else relu):
            raise ValueError(f"dense layer {i} has activation {act}, not the architecture's")
        head[f"kernel_{i}"] = const(int(op.inputs[1])).T  # TFLite stores (out, in)
        head[f"bias_{i}"] = const(int(op.inputs[2]))
    graph.outputs = [*graph.outputs, features]
    graph.tensors[features].name = FEATURES_OUTPUT.encode()
    for sig in model.signatureDefs or []:
        out = schema.TensorMapT()
        out.name, out.tensorIndex = FEATURES_OUTPUT.encode(), features
        sig.outputs.append(out)
    return bytes(fbu.convert_object_to_bytearray(model)), head


def export_heatmap(model_dir: Path, tflite_name: str) -> str:
    """Rewrite ``model_dir / tflite_name`` with the feature-map output (see
    :func:`add_features_output`) and write the head beside it; returns the head's file name."""
    import io

    path = model_dir / tflite_name
    two_outputs, head = add_features_output(path.read_bytes())
    head_name = Path(tflite_name).stem + HEAD_SUFFIX
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **head)  # np.load(allow_pickle=False) reads it
    path.write_bytes(two_outputs)
    (model_dir / head_name).write_bytes(buf.getvalue())
    return head_name


def _gather_members(model_dir: Path, member_dirs: list[Path]) -> list[dict[str, Any]]:
    """Copy each trained network into ``model_dir`` (``member1.tflite`` ...), with the
    heatmap outputs and head (:func:`export_heatmap`), and describe it."""
    from cxr_worker.training.train import TRAINING_RECORD

    out: list[dict[str, Any]] = []
    for i, src in enumerate(member_dirs, start=1):
        record = json.loads((src / TRAINING_RECORD).read_text())
        names = {"tflite": f"member{i}.tflite", "keras": f"member{i}.keras"}
        shutil.copyfile(src / model_card.TFLITE_FILE, model_dir / names["tflite"])
        shutil.copyfile(src / model_card.KERAS_FILE, model_dir / names["keras"])
        names["head"] = export_heatmap(model_dir, names["tflite"])
        out.append({**names, "alpha": float(record["alpha"]),
                    "preprocessing_version": int(record["preprocessing_version"]),
                    "record": record})
    return out


def finalize(model_dir: Path, cfg: FinalizeConfig, member_dirs: list[Path]) -> dict[str, Any]:
    """Write ``model_dir``'s model (``member1.tflite`` ...) and card for the networks trained
    in ``member_dirs`` (each with ``training.json`` beside its files)."""
    from cxr_worker.model.preprocess import to_model_input
    from cxr_worker.model.runtime import TFLiteScorer
    from cxr_worker.score import Scorer
    from cxr_worker.training import data
    from cxr_worker.training.robustness import VALIDATION, condition_scores
    from cxr_worker.training.train import load_split

    model_dir.mkdir(parents=True, exist_ok=True)
    members = _gather_members(model_dir, member_dirs)
    files = {}
    for m in members:
        for kind in ("tflite", "keras", "head"):
            path = model_dir / m[kind]
            files[m[kind]] = {"sha256": model_card.sha256_file(path),
                              "bytes": path.stat().st_size}
    # a provisional card lets the serving code itself score: what the card says is what runs
    provisional = {"model_version": "provisional", "threshold": 0.5, "files": files,
                   "members": [{k: m[k] for k in ("tflite", "keras", "head",
                                                  "preprocessing_version")}
                               for m in members]}
    model_card.write_card(model_dir, provisional)
    scorer = Scorer(model_dir)

    train_s, val_s = load_split(cfg.data_dir, cfg.seed, cfg.val_fraction, cfg.max_images)
    x_va, y_va = data.load_arrays(val_s)
    print("scoring validation under each simulated acquisition shift ...", flush=True)
    raw = condition_scores(lambda g: scorer.raw_score(scorer.prepare(g)),
                           [x.astype(np.float32) for x in x_va])
    for m in members:  # TFLite against Keras, per network, on unshifted validation
        p_keras = np.asarray(m["record"].get("validation_probabilities_keras", []))
        if p_keras.size == len(x_va):
            rt = TFLiteScorer(model_dir / m["tflite"])
            p_tfl = np.array([rt.predict(to_model_input(x, m["preprocessing_version"]))
                              for x in x_va])
            m["max_abs_diff_vs_keras"] = float(np.abs(p_tfl - p_keras).max())

    platt = fit_platt(y_va, raw[VALIDATION])
    cal = {name: platt(p) for name, p in raw.items()}
    threshold, binding = metrics.select_threshold_robust(y_va, cal, cfg.min_sensitivity)
    validation_only = metrics.select_threshold(y_va, cal[VALIDATION], cfg.min_sensitivity)

    conditions: dict[str, dict[str, Any]] = {}
    for name, p in cal.items():
        c = metrics.confusion(y_va, p, threshold)
        conditions[name] = {
            "auc": metrics.roc_auc(y_va, p),
            "sensitivity": c.sensitivity,
            "specificity": c.specificity,
            "ece": metrics.expected_calibration_error(y_va, p),
            "ece_uncalibrated": metrics.expected_calibration_error(y_va, raw[name]),
            "positive_rate": float((p >= threshold).mean()),
        }
    table_thresholds = sorted({*TRADEOFF_THRESHOLDS, round(threshold, 4),
                               round(validation_only, 4)})
    val_p = cal[VALIDATION]
    conf = metrics.confusion(y_va, val_p, threshold)
    rates = [v["positive_rate"] for v in conditions.values()]
    digest = hashlib.sha256("".join(files[m["keras"]]["sha256"] for m in members).encode())
    date = dt.datetime.now(dt.UTC)
    alphas = "-".join(f"a{m['alpha']:g}v{m['preprocessing_version']}" for m in members)
    card: dict[str, Any] = {
        "model_version": f"cxr-pneumonia-mnv2-{alphas}-{date:%Y%m%d}-{digest.hexdigest()[:8]}",
        "created": date.isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_policy": (
            f"highest threshold (on the calibrated probability) that keeps sensitivity >= "
            f"{cfg.min_sensitivity} on validation and under every simulated acquisition shift "
            f"of the battery; set by '{binding}'. Probability >= threshold is called SUSPECTED "
            "PNEUMONIA. The validation-only threshold for the same sensitivity would be "
            f"{validation_only:.4f}."),
        "threshold_binding_condition": binding,
        "threshold_validation_only": validation_only,
        "calibration": {**platt.as_dict(), "fitted_on": "validation (unshifted)"},
        "preprocessing": {
            "function": "cxr_worker.model.preprocess.to_model_input",
            "versions": sorted({m["preprocessing_version"] for m in members}),
            "description": "squash to 224x224, grey x3; contract version 2 adds global "
            "histogram equalisation after the squash (per member, see members)",
        },
        "members": [
            {"tflite": m["tflite"], "keras": m["keras"], "head": m["head"],
             "alpha": m["alpha"],
             "preprocessing_version": m["preprocessing_version"],
             "max_abs_diff_vs_keras": m.get("max_abs_diff_vs_keras"),
             "training": m["record"]["training"]}
            for m in members],
        "files": files,
        "architecture": (
            f"{len(members)} network(s), each Rescaling([0,255]->[-1,1]) -> MobileNetV2(alpha "
            f"{', '.join(format(m['alpha'], 'g') for m in members)}, ImageNet weights, "
            "include_top=False) -> GlobalAveragePooling -> Dense(100, relu) -> Dropout(0.6) -> "
            "Dense(50, relu) -> Dense(1, sigmoid); Adam; binary cross-entropy. Served "
            "probability: sigmoid of the members' mean logit, Platt-scaled."),
        "intended_use": model_card.INTENDED_USE,
        "population": model_card.POPULATION,
        "training_data": {
            "source": "Kermany et al. 2018 (Cell 172(5)), Mendeley Data doi:10.17632/rscbjbr9sj.2, "
            "CC BY 4.0; training split, 224x224 copy",
            "train_counts": members[0]["record"]["train_counts"],
            "validation_counts": {"NORMAL": int((y_va == 0).sum()),
                                  "PNEUMONIA": int(y_va.sum())},
            "split": f"stratified, grouped by patient, {cfg.val_fraction:.0%} validation, "
            f"seed {cfg.seed}; byte-identical duplicates dropped",
            "file_list_sha256": data.file_list_hash(train_s + val_s),
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
        },
        "validation": {
            "auc": metrics.roc_auc(y_va, val_p),
            "auc_ci95": list(metrics.bootstrap_auc_ci(y_va, val_p, seed=cfg.seed)),
            "expected_calibration_error": conditions[VALIDATION]["ece"],
            "expected_calibration_error_uncalibrated": conditions[VALIDATION]["ece_uncalibrated"],
            "at_threshold": conf.as_dict(),
            "reliability": metrics.reliability_bins(y_va, val_p),
            "histogram": metrics.histogram(val_p),
            "positive_rate_band": [min(rates), max(rates)],
            "prevalence": float(y_va.mean()),
            "runtime": "TensorFlow Lite (the served runtime)",
            "conditions": conditions,
            "tradeoff": metrics.tradeoff_table(y_va, cal, table_thresholds),
            # the raw served-runtime scores behind every figure above, so that a test can
            # recompute the card (and check the model still gives them) without the data
            "scores": {
                "files": [f"{data.CLASSES[s.label]}/{s.path.name}" for s in val_s],
                "labels": [int(v) for v in y_va],
                "raw": [float(v) for v in raw[VALIDATION]],
            },
        },
        "training": {"seconds_total": round(sum(
            float(m["record"]["training"]["seconds_total"]) for m in members), 1)},
    }
    model_card.write_card(model_dir, card)
    print(f"model version {card['model_version']}; validation AUC "
          f"{card['validation']['auc']:.4f}; threshold {threshold:.4f} (set by {binding}): "
          f"sensitivity {conf.sensitivity:.4f}, specificity {conf.specificity:.4f}; "
          f"ECE {conditions[VALIDATION]['ece']:.4f}", flush=True)
    return card
