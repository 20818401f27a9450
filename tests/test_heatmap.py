"""The heatmap without TensorFlow in the service: the served TFLite file's second output (the
last feature map) and the head's gradient in NumPy give the TensorFlow Grad-CAM of the Keras
model; adding that output changed no probability; the Secondary Capture carries the overlay
and its legend and stays valid; the worker keeps the heatmap beside the result."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import KERMANY_PER_CLASS, kermany_files, need, reread, storescu, wait_until
from make_samples import upsample, wrap
from PIL import Image
from pydicom import dcmread

from cxr_worker import decode, report
from cxr_worker.errors import ModelIntegrityError
from cxr_worker.labels import Label, Population
from cxr_worker.model import card as model_card
from cxr_worker.model import heatmap as cam
from cxr_worker.model.calibration import sigmoid_one
from cxr_worker.model.preprocess import INPUT_SIZE, load_grey_image
from cxr_worker.score import SHIPPED_MODEL_DIR, Scorer

# Grad-CAM equality with TensorFlow, on the [0, 1] map at 224x224. Measured: max |diff| 5.6e-6,
# correlation 1 - 1e-11 on these 20 images (float32 TFLite features against Keras'); the
# bounds leave room for another CPU's float32 rounding, not for another method.
MAX_ABS_DIFF = 1e-3
MIN_CORRELATION = 0.9999
N_PER_CLASS = 10

CFG = report.ReportConfig("1.2.826.0.1.3680043.10.1187.", 9901, "cxr-worker")
IN_POPULATION = "IN VALIDATED POPULATION (age 3 years; validated 1-5 years)"


def _images() -> list[Path]:
    return kermany_files("NORMAL", N_PER_CLASS) + kermany_files("PNEUMONIA", N_PER_CLASS)


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    s = Scorer()
    assert s.heatmap_available, "the shipped model has no heatmap outputs"
    return s


@pytest.fixture(scope="module")
def keras_model() -> Any:
    import keras

    card = model_card.load_card(SHIPPED_MODEL_DIR)
    member = model_card.members(card)[0]
    return keras.models.load_model(
        model_card.verify_file(SHIPPED_MODEL_DIR, member["keras"], card))


def test_heatmap_equals_the_tensorflow_gradcam(scorer: Scorer, keras_model: Any) -> None:
    from cxr_worker.training.gradcam import gradcam

    diffs, corrs = [], []
    for path in _images():
        x = scorer.prepare(load_grey_image(path))
        _, heat = scorer.score_and_heatmap(x)
        assert heat is not None
        ref = gradcam(keras_model, x.by_version[1])
        assert heat.shape == ref.shape == (INPUT_SIZE, INPUT_SIZE) and heat.dtype == np.float32
        # normalised to a maximum of 1 on the 7x7 grid; upsampling samples near it
        assert heat.min() >= 0 and 0.9 < heat.max() <= 1.0, path.name
        assert ref.max() > 0.9, f"TensorFlow map blank: {path.name}"
        diffs.append(float(np.abs(heat - ref).max()))
        corrs.append(float(np.corrcoef(heat.ravel(), ref.ravel())[0, 1]))
    assert max(diffs) <= MAX_ABS_DIFF, f"max |NumPy - TensorFlow| {max(diffs):.2e}"
    assert min(corrs) >= MIN_CORRELATION, f"correlation {min(corrs):.6f}"


def test_adding_the_feature_output_changed_no_probability(scorer: Scorer) -> None:
    """The card's raw validation scores were computed with the single-output file: the
    two-output file gives each held-out image in tests/data the same float32 probability."""
    stored = model_card.load_card(SHIPPED_MODEL_DIR)["validation"]["scores"]
    by_file = dict(zip(stored["files"], stored["raw"], strict=True))
    checked = mismatched = 0
    for path in (kermany_files("NORMAL", KERMANY_PER_CLASS)
                 + kermany_files("PNEUMONIA", KERMANY_PER_CLASS)):
        key = f"{path.parent.name}/{path.name}"
        if key not in by_file:
            continue
        raw = scorer.score_grey(load_grey_image(path)).raw
        mismatched += int(np.float32(raw) != np.float32(by_file[key]))
        checked += 1
    assert checked == 2 * KERMANY_PER_CLASS, "tests/data is not from the card's split"
    assert mismatched == 0, f"{mismatched} of {checked} probabilities changed"


def test_the_head_file_is_the_networks_head(scorer: Scorer, keras_model: Any) -> None:
    """The NumPy head holds the Keras Dense weights exactly and, on the TFLite feature map,
    recomputes the TFLite probability."""
    card = model_card.load_card(SHIPPED_MODEL_DIR)
    head = cam.Head.load(SHIPPED_MODEL_DIR / model_card.members(card)[0]["head"])
    for i, name in enumerate(("fc100", "fc50", "pneumonia")):
        kernel, bias = keras_model.get_layer(name).get_weights()
        assert np.array_equal(head.kernels[i], kernel) and np.array_equal(head.biases[i], bias)
    from cxr_worker.model.runtime import TFLiteScorer

    rt = TFLiteScorer(SHIPPED_MODEL_DIR / model_card.members(card)[0]["tflite"])
    worst = 0.0
    for path in _images():
        p, feats = rt.predict_with_features(scorer.prepare(load_grey_image(path)).by_version[1])
        assert feats is not None and feats.shape == (7, 7, head.channels)
        worst = max(worst, abs(sigmoid_one(head.logit(feats)) - p))
    # the bound test_model holds TFLite to against Keras (float32 against float64 here)
    assert worst < 1e-5, f"the head's probability differs from the network's by {worst:.2e}"


def test_analytic_gradient_matches_finite_differences(scorer: Scorer) -> None:
    """channel_weights is d(logit)/d(features) averaged over positions: checked against
    central differences of Head.logit on a real feature map."""
    card = model_card.load_card(SHIPPED_MODEL_DIR)
    head = cam.Head.load(SHIPPED_MODEL_DIR / model_card.members(card)[0]["head"])
    x = scorer.prepare(load_grey_image(kermany_files("PNEUMONIA", 1)[0]))
    scorer.score(x)
    feats = x.features[0].astype(np.float64)
    w = head.channel_weights(feats)
    rng = np.random.default_rng(0)
    eps = 1e-4
    for k in rng.choice(feats.shape[-1], 20, replace=False):
        up, down = feats.copy(), feats.copy()
        up[..., k] += eps
        down[..., k] -= eps
        # the same shift at every position gives the gradient summed over the positions,
        # i.e. (number of positions) x (its spatial mean)
        positions = feats.shape[0] * feats.shape[1]
        numeric = (head.logit(up) - head.logit(down)) / (2 * eps) / positions
        assert w[k] == pytest.approx(numeric, rel=1e-4, abs=1e-9), k


def test_score_and_heatmap_run_each_network_once(scorer: Scorer, monkeypatch) -> None:
    from cxr_worker.model.runtime import TFLiteScorer

    calls = []
    original = TFLiteScorer.predict_with_features

    def counted(self: TFLiteScorer, x: Any) -> Any:
        calls.append(1)
        return original(self, x)

    monkeypatch.setattr(TFLiteScorer, "predict_with_features", counted)
    grey = load_grey_image(kermany_files("NORMAL", 1)[0])
    x = scorer.prepare(grey)
    score, heat = scorer.score_and_heatmap(x)
    assert len(calls) == 1 and heat is not None
    assert score == scorer.score_grey(grey)  # the same score as without the heatmap
    calls.clear()
    x = scorer.prepare(grey)
    scorer.score(x)
    again = scorer.heatmap(x)  # the pipeline's order: score, then (report stage) heatmap
    assert len(calls) == 1 and again is not None and np.array_equal(again, heat)
    assert scorer.heatmap(scorer.prepare(grey)) is not None  # not scored yet: runs it
    assert len(calls) == 2


def _single_output_model(dst: Path, keep_head_in_card: bool) -> Path:
    """The shipped model as an older one: a TFLite file with the probability only."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    dst.mkdir()
    card = model_card.load_card(SHIPPED_MODEL_DIR)
    member = model_card.members(card)[0]
    model = fbu.read_model(str(SHIPPED_MODEL_DIR / member["tflite"]))
    model.subgraphs[0].outputs = model.subgraphs[0].outputs[:1]
    for sig in model.signatureDefs:
        sig.outputs = sig.outputs[:1]
    fbu.write_model(model, str(dst / member["tflite"]))
    shutil.copyfile(SHIPPED_MODEL_DIR / member["head"], dst / member["head"])
    card["files"][member["tflite"]]["sha256"] = model_card.sha256_file(dst / member["tflite"])
    if not keep_head_in_card:
        del card["members"][0]["head"]
    (dst / model_card.CARD_FILE).write_text(json.dumps(card))
    return dst


def test_a_model_without_heatmap_outputs_scores_as_before(tmp_path: Path,
                                                          scorer: Scorer) -> None:
    old = Scorer(_single_output_model(tmp_path / "old", keep_head_in_card=False))
    assert not old.heatmap_available
    grey = load_grey_image(kermany_files("PNEUMONIA", 1)[0])
    x = old.prepare(grey)
    score, heat = old.score_and_heatmap(x)
    assert heat is None
    assert score.raw == scorer.score_grey(grey).raw
    # a card that names a head for a file without the feature map is refused
    with pytest.raises(ModelIntegrityError, match="no feature-map output"):
        Scorer(_single_output_model(tmp_path / "lying", keep_head_in_card=True))


def test_finalize_export_adds_the_output_and_keeps_the_probability(tmp_path: Path,
                                                                   scorer: Scorer) -> None:
    """training.finalize.export_heatmap on a single-output file (what training writes): the
    probability is the same float32, the head file is the shipped one's."""
    from cxr_worker.model.runtime import TFLiteScorer
    from cxr_worker.training.finalize import export_heatmap

    old = _single_output_model(tmp_path / "m", keep_head_in_card=False)
    name = model_card.members(model_card.load_card(old))[0]["tflite"]
    shutil.copyfile(old / name, tmp_path / "single.tflite")
    single = TFLiteScorer(tmp_path / "single.tflite")
    assert not single.has_features
    head_name = export_heatmap(old, name)
    both = TFLiteScorer(old / name)
    assert both.has_features
    for path in _images()[::4]:
        x = scorer.prepare(load_grey_image(path)).by_version[1]
        p, feats = both.predict_with_features(x)
        assert p == single.predict(x) and feats is not None
    shipped = np.load(SHIPPED_MODEL_DIR / head_name)
    exported = np.load(old / head_name)
    for key in cam.HEAD_KEYS:
        assert np.array_equal(shipped[key], exported[key]), key


# -- the Secondary Capture and the PNGs --------------------------------------------------------
@pytest.fixture(scope="module")
def source_and_heat(scorer: Scorer) -> tuple[Any, Any, np.ndarray]:
    grey = upsample(load_grey_image(kermany_files("PNEUMONIA", 1)[0]), 640, 560)
    source = reread(wrap(grey, bits_stored=12, window=True, seed="heatmap"))
    display = decode.display_image(source)
    heat = scorer.heatmap(scorer.prepare(display))
    assert heat is not None
    return source, display, heat


def _build(source: Any, display: Any, heat: np.ndarray | None) -> Any:
    return reread(report.build_secondary_capture(
        source, display, probability=0.93, label=Label.SUSPECTED, threshold=0.5,
        model_version="pneumonia-test-1", cfg=CFG, population=Population.IN,
        population_text=IN_POPULATION, heatmap=heat))


def _picture(sc: Any, source: Any) -> np.ndarray:
    """The radiograph part of the SC (below the banner), RGB."""
    pixels = sc.pixel_array
    return pixels[pixels.shape[0] - source.Rows:, :source.Columns]


def test_secondary_capture_shows_the_overlay_and_its_legend(source_and_heat) -> None:
    source, display, heat = source_and_heat
    plain, hot = _build(source, display, None), _build(source, display, heat)
    assert report.HEATMAP_LEGEND in hot.ImageComments
    assert report.HEATMAP_LEGEND not in plain.ImageComments
    assert report.HEATMAP_LEGEND in hot.DerivationDescription
    assert hot.PhotometricInterpretation == "RGB" and hot.SamplesPerPixel == 3
    # without a heatmap the radiograph is grey; with it, coloured where the heat is high and
    # as it was where there is no heat
    pic_plain, pic_hot = _picture(plain, source).astype(int), _picture(hot, source).astype(int)
    assert np.all(pic_plain[..., 0] == pic_plain[..., 2])
    big = np.asarray(Image.fromarray(cam.to_uint8(heat)).resize(
        (source.Columns, source.Rows), Image.Resampling.BILINEAR))
    colour_shift = np.abs(pic_hot - pic_plain).max(axis=-1)
    assert colour_shift[big >= 230].mean() > 40, "no visible colour where the heat is high"
    # the legend row with its colour bar makes the banner taller, the picture is the same size
    assert hot.Rows > plain.Rows and hot.Columns == plain.Columns


def test_no_heat_leaves_the_radiograph_as_it_is() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (40, 1))
    grey = Image.fromarray(ramp, mode="L")
    cold = np.asarray(report.overlay(grey, np.zeros((INPUT_SIZE, INPUT_SIZE), np.float32)))
    assert np.array_equal(cold, np.repeat(ramp[..., None], 3, axis=-1))
    hot = np.asarray(report.overlay(grey, np.ones((INPUT_SIZE, INPUT_SIZE), np.float32)))
    red = np.array([128, 0, 0])  # the ramp's colour at heat 1 (dark red)
    expected = (1 - report.HEATMAP_OPACITY) * ramp[..., None] + report.HEATMAP_OPACITY * red
    assert np.abs(hot - expected).max() <= 1.5


def test_secondary_capture_with_heatmap_passes_dciodvfy(source_and_heat, tmp_path) -> None:
    source, display, heat = source_and_heat
    path = tmp_path / "sc.dcm"
    _build(source, display, heat).save_as(path, enforce_file_format=True)
    res = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    errors = [line for line in (res.stdout + res.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, "dciodvfy:\n" + "\n".join(errors)


def test_overlay_and_thumbnail_pngs(source_and_heat) -> None:
    import io

    _, display, heat = source_and_heat
    stored = cam.load_png(cam.png_bytes(heat))  # what the worker keeps, read back
    assert np.abs(stored - heat).max() <= 0.5 / 255 + 1e-6
    for data, side in ((report.overlay_png(display, stored), max(display.shape)),
                       (report.thumbnail_png(display, stored), report.THUMBNAIL_SIDE),
                       (report.overlay_png(display, None, 300), 300)):
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            assert max(im.size) == side
            assert im.size[0] / im.size[1] == pytest.approx(display.shape[1] / display.shape[0],
                                                            rel=0.02)


# -- the worker -----------------------------------------------------------------------------------
def test_the_worker_keeps_the_heatmap_beside_the_result(make_worker, make_images) -> None:
    files = make_images(2, prefix="heat")
    on, off = make_worker(), make_worker(CXR_WORKER__REPORT__HEATMAP="false")
    for w in (on, off):
        storescu(w.port, *files)
    for w in (on, off):
        wait_until(lambda w=w: sorted(r["status"] for r in w.worklist()) == ["scored"] * 2,
                   60, "both scored")
    results = sorted((on.data_dir / "results").rglob("*.dcm"))
    assert len(results) == 2
    for sc_path in results:
        heat_path = sc_path.with_name(sc_path.stem + ".heatmap.png")
        assert stat.S_IMODE(heat_path.stat().st_mode) == 0o600
        with Image.open(heat_path) as im:
            assert (im.mode, im.size) == ("L", (INPUT_SIZE, INPUT_SIZE))
            assert np.asarray(im).max() == 255
        assert report.HEATMAP_LEGEND in dcmread(sc_path).ImageComments
    assert not list((off.data_dir / "results").rglob("*.heatmap.png"))
    for sc_path in (off.data_dir / "results").rglob("*.dcm"):
        assert report.HEATMAP_LEGEND not in dcmread(sc_path).ImageComments
