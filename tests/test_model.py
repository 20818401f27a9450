"""The shipped model, the preprocessing contract, train/evaluate end to end, Grad-CAM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import KERMANY, KERMANY_PER_CLASS

from cxr_worker.model import card as model_card
from cxr_worker.model import metrics
from cxr_worker.model.preprocess import INPUT_SIZE, load_grey_image, to_model_input
from cxr_worker.score import SHIPPED_MODEL_DIR, Scorer


def _validation_images(per_class: int = KERMANY_PER_CLASS) -> list[tuple[Path, int]]:
    """Held-out images (tests/data/kermany_val): the first of each class of the
    patient-grouped validation split, which the shipped model did not train on."""
    out: list[tuple[Path, int]] = []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        out.extend((p, label) for p in sorted((KERMANY / cls).iterdir())[:per_class])
    return out


def test_test_images_are_held_out_from_the_shipped_model():
    """tests/data/kermany_val was drawn from the validation side of the split with
    sample_dicom/make_test_data.py's seed and fraction; a model trained on another split may
    have trained on these images (then regenerate the test data for its split)."""
    from make_test_data import SEED, VAL_FRACTION

    card = model_card.load_card(SHIPPED_MODEL_DIR)
    assert int(card["training_data"]["seed"]) == SEED
    assert float(card["training_data"]["val_fraction"]) == pytest.approx(VAL_FRACTION)
    for cls in ("NORMAL", "PNEUMONIA"):
        assert len(list((KERMANY / cls).glob("*.jpeg"))) == KERMANY_PER_CLASS


def test_shipped_model_matches_its_card():
    card = model_card.load_card(SHIPPED_MODEL_DIR)
    for member in model_card.members(card):
        for name in (member["keras"], member["tflite"]):
            path = model_card.verify_file(SHIPPED_MODEL_DIR, name, card)
            assert path.stat().st_size < 15 * 2**20
    assert 0 < card["threshold"] < 1
    assert card["validation"]["auc"] > 0.9
    assert card["validation"]["at_threshold"]["sensitivity"] >= 0.98
    assert "not a diagnosis" in card["intended_use"].lower()
    assert "aged 1 to 5" in card["population"]
    assert (SHIPPED_MODEL_DIR / model_card.CARD_MARKDOWN).read_text().startswith("# Model card")


def test_shipped_model_separates_the_held_out_images():
    """Bounds any decent triage model meets on the 120 held-out images, not this model's
    figures: AUC >= 0.95 and, at the threshold in force, most pneumonias flagged."""
    scorer = Scorer()
    scorer.warm_up()
    assert scorer.ready
    items = _validation_images()
    scores = [scorer.score_grey(load_grey_image(p)) for p, _ in items]
    y = [label for _, label in items]
    probs = [s.probability for s in scores]
    auc = metrics.roc_auc(y, probs)
    assert auc >= 0.95, f"AUC {auc:.3f} on {len(items)} held-out images: is the model broken?"
    cm = metrics.confusion(y, probs, scorer.threshold)
    sensitivity = cm.tp / (cm.tp + cm.fn)
    assert sensitivity >= 0.9, (
        f"sensitivity {sensitivity:.3f} at threshold {scorer.threshold:.3f} ({cm})")


def test_tflite_equals_keras_on_real_images():
    """Each member's TFLite file (served) computes what its Keras file (trained) computes,
    on its own preprocessing contract."""
    import keras

    from cxr_worker.model.runtime import TFLiteScorer

    card = model_card.load_card(SHIPPED_MODEL_DIR)
    for member in model_card.members(card):
        model = keras.models.load_model(
            model_card.verify_file(SHIPPED_MODEL_DIR, member["keras"], card))
        tfl = TFLiteScorer(SHIPPED_MODEL_DIR / member["tflite"])
        xs = np.stack([to_model_input(load_grey_image(p), member["preprocessing_version"])
                       for p, _ in _validation_images(8)])
        keras_p = model.predict(xs, verbose=0).ravel()
        tfl_p = np.array([tfl.predict(x) for x in xs])
        assert np.abs(keras_p - tfl_p).max() < 1e-5, member["tflite"]


def test_card_figures_are_recomputed_from_the_scores_behind_them():
    """The card's validation figures follow from the raw served-runtime scores it records, and
    the shipped model still gives those scores on the held-out images in tests/data."""
    from cxr_worker.model.calibration import Platt, fit_platt

    card = model_card.load_card(SHIPPED_MODEL_DIR)
    val = card["validation"]
    stored = val["scores"]
    y = np.array(stored["labels"])
    raw = np.array(stored["raw"])
    fit = fit_platt(y, raw)
    served = Platt.from_card(card)
    assert (fit.a, fit.b) == (pytest.approx(served.a), pytest.approx(served.b))
    p = served(raw)
    assert metrics.roc_auc(y, p) == pytest.approx(val["auc"])
    assert metrics.expected_calibration_error(y, p) == pytest.approx(
        val["expected_calibration_error"])
    assert val["expected_calibration_error"] <= 0.05
    assert metrics.confusion(y, p, card["threshold"]).as_dict() == pytest.approx(
        val["at_threshold"])
    assert metrics.histogram(p) == pytest.approx(val["histogram"])
    assert metrics.select_threshold(y, p, 0.98) == pytest.approx(
        card["threshold_validation_only"])
    # the shift-robust policy can only be as strict as validation alone, or stricter
    assert card["threshold"] <= card["threshold_validation_only"]
    assert val["conditions"][card["threshold_binding_condition"]]["sensitivity"] >= 0.98
    assert all(c["sensitivity"] >= 0.98 for c in val["conditions"].values())

    scorer = Scorer()
    by_file = dict(zip(stored["files"], stored["raw"], strict=True))
    checked = 0
    for path, label in _validation_images():
        key = f"{('NORMAL', 'PNEUMONIA')[label]}/{path.name}"
        if key in by_file:
            assert scorer.score_grey(load_grey_image(path)).raw == pytest.approx(
                by_file[key], abs=1e-5), key
            checked += 1
    assert checked == 2 * KERMANY_PER_CLASS, "tests/data is not from the card's validation split"


def test_jpeg_and_the_same_pixels_as_dicom_score_the_same(tmp_path):
    from make_samples import wrap
    from pydicom import dcmread

    from cxr_worker import decode

    scorer = Scorer()
    for jpeg in [sorted((KERMANY / c).iterdir())[5] for c in ("NORMAL", "PNEUMONIA")]:
        grey = load_grey_image(jpeg)
        path = tmp_path / f"{jpeg.stem}.dcm"
        wrap(grey, modality="DX", bits_stored=8).save_as(path, enforce_file_format=True)
        p_jpeg = scorer.score_grey(grey).probability
        p_dicom = scorer.score_grey(decode.display_image(dcmread(path))).probability
        assert p_dicom == pytest.approx(p_jpeg, abs=1e-6)


def test_contract_squashes_the_whole_image():
    img = np.zeros((400, 100), np.float32)
    img[:, :50] = 255  # left half white: stays the left half after the squash
    x = to_model_input(img)
    assert x.shape == (INPUT_SIZE, INPUT_SIZE, 3) and x.dtype == np.float32
    assert x[:, :100].min() > 250 and x[:, 124:].max() < 5
    assert np.array_equal(x[..., 0], x[..., 2])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir()
        for src in sorted((KERMANY / cls).iterdir())[:16]:
            (root / cls / src.name).symlink_to(src)
    return root


def test_build_model_loads_a_no_top_weights_file(backbone_weights):
    """The backbone gets the file's weights (the path the ImageNet file takes in training)."""
    import h5py

    from cxr_worker.model.architecture import BACKBONE_NAME, build_model

    backbone = build_model(0.5, str(backbone_weights)).get_layer(BACKBONE_NAME)
    untouched = build_model(0.5, None).get_layer(BACKBONE_NAME)  # same seed, nothing loaded
    assert not np.array_equal(backbone.get_layer("Conv1").get_weights()[0],
                              untouched.get_layer("Conv1").get_weights()[0])
    with h5py.File(backbone_weights, "r") as f:
        for layer_name in ("Conv1", "bn_Conv1", "Conv_1"):
            group = f[layer_name]
            stored = [np.asarray(group[n]) for n in group.attrs["weight_names"]]
            loaded = [np.asarray(w) for w in backbone.get_layer(layer_name).get_weights()]
            assert len(stored) == len(loaded) > 0
            for a, b in zip(stored, loaded, strict=True):
                assert np.array_equal(a, b), layer_name


def test_train_and_evaluate_end_to_end_on_a_tiny_subset(tiny_data, backbone_weights, tmp_path):
    out = tmp_path / "model"
    res = subprocess.run(
        [sys.executable, "-m", "cxr_worker.cli", "train", "--data", str(tiny_data),
         "--weights", str(backbone_weights), "--out", str(out), "--members", "0.5:2,0.5:1",
         "--head-epochs", "1",
         "--finetune-epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8",
         "--val-fraction", "0.25"],
        capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "val AUC" in res.stdout
    card = json.loads((out / model_card.CARD_FILE).read_text())
    counts = card["training_data"]
    assert counts["train_counts"]["NORMAL"] + counts["validation_counts"]["NORMAL"] == 16
    assert [m["preprocessing_version"] for m in card["members"]] == [2, 1]
    assert all(m["max_abs_diff_vs_keras"] < 1e-5 for m in card["members"])
    assert "calibration" in card and 0 < card["threshold"] < 1
    scorer = Scorer(out)  # the card's hashes match the files written
    assert 0 <= scorer.score_grey(np.zeros((300, 200), np.float32)).probability <= 1
    # finalize gave each member its feature-map output and head file (the heatmap)
    assert all(m["head"] in card["files"] for m in card["members"])
    assert scorer.heatmap_available
    _, heat = scorer.score_and_heatmap(scorer.prepare(load_grey_image(
        sorted((KERMANY / "PNEUMONIA").iterdir())[0])))
    assert heat is not None and heat.shape == (INPUT_SIZE, INPUT_SIZE)

    ev = tmp_path / "eval"
    res = subprocess.run(
        [sys.executable, "-m", "cxr_worker.cli", "evaluate", "--data", str(tiny_data),
         "--out", str(ev), "--json", "--shifts"],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "CXR_WORKER__MODEL__PATH": str(out)}, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == {"NORMAL": 16, "PNEUMONIA": 16}
    assert set(m["confusion_matrix"]) == {"tn (healthy)", "fn (missed pneumonia)",
                                          "fp (just to be safe)", "tp (caught)"}
    assert sum(m["confusion_matrix"].values()) == 32
    assert "black border 15%" in m["under_simulated_shifts"]
    for png in ("roc.png", "confusion_matrix.png", "reliability.png"):
        assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradcam_heatmap():
    import keras

    from cxr_worker.training.gradcam import gradcam, overlay

    card = model_card.load_card(SHIPPED_MODEL_DIR)
    member = model_card.members(card)[0]
    model = keras.models.load_model(
        model_card.verify_file(SHIPPED_MODEL_DIR, member["keras"], card))
    grey = load_grey_image(sorted((KERMANY / "PNEUMONIA").iterdir())[3])
    heat = gradcam(model, to_model_input(grey, member["preprocessing_version"]))
    assert heat.shape == (224, 224) and heat.min() >= 0 and 0.9 < heat.max() <= 1.0
    assert heat.std() > 0.01, "a flat heatmap explains nothing"
    rgb = overlay(grey.astype(np.float32), heat)
    assert rgb.shape == (224, 224, 3) and rgb.dtype == np.uint8
