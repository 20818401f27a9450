"""Decoding only what the model needs (issue 12): reduced-resolution decoding keeps the scores.

The service (the pipeline, and ``score`` and ``calibrate`` through ``assess.assess_file``)
asks :func:`cxr_worker.decode.display_image` for ``FOR_SCORE_AND_REPORT`` (both sides >= 448,
the longer >= 1024 for the Secondary Capture); ``FOR_SCORE`` is the model's floor alone (both
sides >= 448). JPEG 2000 is decoded at a reduced resolution level and 8-bit JPEG with a scaled
inverse DCT; every syntax is then reduced by block means after the LUTs.

1. Scores: real validation images (tests/data/kermany_val, the ones the shipped model is least
   sure about), upsampled to a detector's 2500 x 2048 at 12 bits with detector-like noise, in
   every transfer syntax of ``test_decode``'s suite and in variants that use the reduced JPEG
   2000 path differently (automatic window, padding, MONOCHROME1, signed, odd sizes): the
   shipped model's score from each reduced decode is within 0.02 of the full decode's.
2. The reduced path is really taken (a 2500 x 2048 JPEG 2000 frame decodes to 625 x 512 for
   scoring), its stored values are the frame's at that scale, and the pipeline asks for it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kermany_files, to_bytes
from make_samples import upsample, wrap
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from sqlalchemy import Engine
from test_decode import ENCODINGS, Encoding, run_tool, save

from cxr_worker import assess, compose, decode, report
from cxr_worker.errors import DecodeError
from cxr_worker.model.preprocess import INPUT_SIZE, load_grey_image
from cxr_worker.score import Scorer
from cxr_worker.settings import Settings, Storage
from cxr_worker.spool import atomic_write
from cxr_worker.worklist import queue

SHAPE = (2500, 2048)  # a 43 x 35 cm detector at ~170 um; 10 MB at 16 bits allocated
ODD = (2501, 2047)  # sides that neither 2 nor 4 divide: the geometry is kept all the same
NOISE = 1.5  # grey levels (of 255): quantum noise of a CR/DX image, ~24 stored units at 12 bits
IMAGES = 2  # the validation images closest to p = 0.5, where a score moves most
SCORE_TOLERANCE = 0.02  # the criterion
# JPEG 2000 level and JPEG scale each need's floor allows for a 2500 x 2048 frame
EXPECTED_SCALE = {"score": 4, "service": 2}
NEEDS = {"score": decode.FOR_SCORE, "service": decode.FOR_SCORE_AND_REPORT}


# -- the images --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer()


@pytest.fixture(scope="module")
def borderline(scorer: Scorer) -> list[tuple[str, NDArray[np.uint8]]]:
    """The validation images the shipped model is least sure about (near 0.5 a sub-grey-level
    change of the input moves the score most; at p = 1.000 nothing would show)."""
    files = kermany_files("PNEUMONIA", 60) + kermany_files("NORMAL", 60)
    images = [load_grey_image(f) for f in files]
    p = np.array([scorer.score_grey(img).probability for img in images])
    order = np.argsort(np.abs(p - 0.5))[:IMAGES]
    assert all(0.2 < p[i] < 0.8 for i in order), f"no borderline images: {p[order]}"
    return [(files[i].name, images[i]) for i in order]


def detector(grey: NDArray[np.uint8], shape: tuple[int, int], seed: int) -> NDArray[np.float32]:
    """A validation image at a detector's size with its noise (display values 0..255)."""
    big = upsample(grey, *shape)
    noise = np.random.default_rng(seed).normal(0.0, NOISE, big.shape).astype(np.float32)
    return np.clip(big + noise, 0, 255)


# -- the encodings: the transfer-syntax suite of test_decode, and JPEG 2000 variants ----------
def _j2k(**variant: Any) -> Callable[[NDArray[np.float32], Path], tuple[Path, Dataset]]:
    """JPEG 2000 lossless from a 12-bit dataset made by ``wrap(**variant)``; ``padding``: a
    collimation border of 96 pixels set to a Pixel Padding Value of 0; ``signed``: Pixel
    Representation 1 with a window over the signed range."""
    padding = variant.pop("padding", False)
    signed = variant.pop("signed", False)

    def build(grey: NDArray[np.float32], out: Path) -> tuple[Path, Dataset]:
        ds = wrap(grey, bits_stored=12, **variant)
        if padding:
            stored = np.frombuffer(ds.PixelData, np.uint16).reshape(grey.shape).copy()
            body = stored[96:-96, 96:-96].copy()
            stored[:] = 0
            stored[96:-96, 96:-96] = np.maximum(body, 1)
            ds.PixelData = stored.tobytes()
            ds.PixelPaddingValue = 0
        if signed:
            stored = np.frombuffer(ds.PixelData, np.uint16).astype(np.int32) - 2048
            ds.PixelData = stored.astype(np.int16).tobytes()
            ds.PixelRepresentation = 1
            ds.WindowCenter, ds.WindowWidth = "0", "4096"
            for name in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                delattr(ds, name)
        source = dcmread(io.BytesIO(to_bytes(ds)))
        ds.compress(uid.JPEG2000Lossless)
        return save(ds, out / "encoded.dcm"), source

    return build


@dataclass(frozen=True)
class Case:
    encoding: Encoding
    shape: tuple[int, int] = SHAPE
    codec_reduces: bool = False  # decoded at a reduced resolution by the codec itself


_BY_CODEC = {"jpeg-baseline-8bit", "jpeg2000-lossless", "jpeg2000-lossy-20to1"}
CASES = [Case(e, codec_reduces=e.name in _BY_CODEC) for e in ENCODINGS] + [
    Case(Encoding("jpeg2000-auto-window", True, _j2k()), codec_reduces=True),
    Case(Encoding("jpeg2000-padding-auto-window", True, _j2k(padding=True)),
         codec_reduces=True),
    Case(Encoding("jpeg2000-monochrome1-dx", True, _j2k(window=True, modality="DX",
                                                        monochrome1=True)),
         codec_reduces=True),
    Case(Encoding("jpeg2000-signed", True, _j2k(signed=True)), codec_reduces=True),
    Case(Encoding("jpeg2000-odd-size", True, _j2k(window=True)), ODD, codec_reduces=True),
    Case(next(e for e in ENCODINGS if e.name == "explicit-vr-le"), ODD),
]


@pytest.mark.parametrize("case", CASES, ids=[
    c.encoding.name + ("-2501x2047" if c.shape == ODD and "odd" not in c.encoding.name else "")
    for c in CASES])
def test_reduced_decode_scores_within_002_of_the_full_decode(
        case: Case, borderline: list[tuple[str, NDArray[np.uint8]]], scorer: Scorer,
        tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    worst: dict[str, float] = {}
    lines = []
    for i, (name, grey) in enumerate(borderline):
        out = tmp_path / str(i)
        out.mkdir()
        path, _ = case.encoding.build(detector(grey, case.shape, i), out)
        ds = dcmread(path)
        full = decode.display_image(ds)
        assert full.shape == case.shape
        p_full = scorer.score_grey(full).probability
        for label, need in NEEDS.items():
            decoded = decode._stored_pixels(ds, None, need)
            if case.codec_reduces and case.shape == SHAPE:
                assert decoded.scale == EXPECTED_SCALE[label], (
                    f"{case.encoding.name}: decoded at 1/{decoded.scale}, not "
                    f"1/{EXPECTED_SCALE[label]}: the reduced decode was not taken")
            elif case.codec_reduces:  # odd sides: the level Pillow sizes right (see decode)
                assert decoded.scale > 1
            else:
                assert decoded.scale == 1
            shown = decode.display_image(ds, need=need)
            assert need.fits(*shown.shape) and max(shown.shape) < max(case.shape) // 1.5
            dp = scorer.score_grey(shown).probability - p_full
            worst[label] = max(worst.get(label, 0.0), abs(dp))
            lines.append(f"  {name} {label} {shown.shape}: full {p_full:.4f}, dp {dp:+.4f}")
    for label, value in worst.items():
        record_property(f"max_abs_dp_{label}", round(value, 4))
    table = "\n".join(lines)
    print(f"\n{case.encoding.name} {case.shape}: max |dp| " + ", ".join(
        f"{k} {v:.4f}" for k, v in worst.items()) + f"\n{table}")
    assert max(worst.values()) <= SCORE_TOLERANCE, (
        f"{case.encoding.name}: a reduced decode moved a score by more than "
        f"{SCORE_TOLERANCE}:\n{table}")


# -- the reduced path is taken, and right ------------------------------------------------------
@pytest.fixture(scope="module")
def j2k_frame(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    grey = detector(load_grey_image(kermany_files("PNEUMONIA", 1)[0]), SHAPE, 0)
    path, _ = _j2k(window=True)(grey, tmp_path_factory.mktemp("j2k"))
    return dcmread(path)


def block_means(a: NDArray[Any], f: int) -> NDArray[np.float64]:
    h, w = a.shape[0] // f, a.shape[1] // f
    out: NDArray[np.float64] = a[:h * f, :w * f].astype(np.float64).reshape(
        h, f, w, f).mean(axis=(1, 3))
    return out


# The low-pass band of a 5/3 wavelet is not a block mean: on this image the two differ by a
# mean of ~14 stored units (of 4095) at level 2. A missing shift (Pillow widens 12 bits to 16)
# errs by 16 times the value, a missing level shift of signed data by 2048: 1 % of the range
# (41 units) tells them apart.
LOWPASS_MEAN = 0.01 * 4095


def test_a_2500x2048_jpeg2000_frame_is_decoded_at_level_2_for_scoring(
        j2k_frame: Dataset) -> None:
    full = decode.stored_pixels(j2k_frame)
    for label, need in NEEDS.items():
        decoded = decode._stored_pixels(j2k_frame, None, need)
        f = EXPECTED_SCALE[label]
        assert decoded.stored.shape == (2500 // f, 2048 // f) and decoded.scale == f
        assert decoded.stored.dtype == full.dtype == np.uint16
        d = np.abs(decoded.stored - block_means(full, f))
        assert d.mean() < LOWPASS_MEAN, (label, d.mean())
    assert decode.display_image(j2k_frame, need=decode.FOR_SCORE).shape == (625, 512)
    assert decode.display_image(j2k_frame, need=decode.FOR_SCORE_AND_REPORT).shape == (1250,
                                                                                       1024)
    assert decode.display_image(j2k_frame).shape == SHAPE  # no need: the whole frame


def test_the_wavelets_lag_is_undone(tmp_path: Path) -> None:
    """A ramp (stored value = row + column) in lossless JPEG 2000: the 5/3 wavelet's low-pass
    keeps an integer ramp exactly, at the even samples, so the level-2 image is the ramp at
    rows and columns 4k, 1.5 pixels before the centres of 4 x 4 blocks (3 stored units, 0.19
    grey level here). After the lag is undone the reduced display image equals the block means
    of the full one, but for float32 rounding (the edges aside: the wavelet's symmetric
    extension there is not a ramp, and the last row and column are not shifted)."""
    rows, cols = 2048, 1792  # level 2: 512 x 448, both sides at least 448
    ramp = np.add.outer(np.arange(rows), np.arange(cols)).astype(np.uint16)
    ds = wrap(np.zeros((rows, cols)), bits_stored=12)
    ds.PixelData = ramp.tobytes()
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.compress(uid.JPEG2000Lossless)
    ds = dcmread(io.BytesIO(to_bytes(ds)))
    full = decode.display_image(ds)
    assert decode._stored_pixels(ds, None, decode.FOR_SCORE).scale == 4
    reduced = decode.display_image(ds, need=decode.FOR_SCORE)
    assert reduced.shape == (512, 448)
    # the last row and column are not shifted, the ones before them interpolate towards them
    d = np.abs(reduced - block_means(full, 4))[1:-2, 1:-2]
    assert d.max() < 1e-3, d.max()


@pytest.mark.parametrize("rows", [2500, 2501, 2502, 2503])
@pytest.mark.parametrize("cols", [2048, 2047])
def test_the_reduced_image_spans_the_whole_frame(rows: int, cols: int) -> None:
    """Whatever the codec's level r, its partial last pixel (ceil), the factor f after the LUTs
    and the blocks it drops (floor), and JPEG 2000's lag: pixel (a, b) of the result holds the
    frame at the centre of the a-th and b-th of round(side / s) equal parts of each side. With
    an image linear in the frame's coordinates (which bilinear resampling keeps exactly) the
    values say where each pixel sits: within 0.01 of a pixel of the result (Pillow's
    resampling drifts by up to 0.0055 of one over a side; float32 rounds values up to ~4600 to
    5e-4 frame pixel), where the errors this guards against are 0.08 of one or more (a lag of
    (2**r - 1) / 2 frame pixels, a partial block of (f - 1) / 2 on average, over s = 2**r f
    frame pixels a pixel); the last two rows and columns (edge repeated) aside."""
    for r in range(4):
        for lag in {0.0, (2**r - 1) / 2}:  # a JPEG-like and a JPEG 2000-like codec
            for f in (1, 2, 3):
                s = 2**r * f
                h, w = (-(-rows // 2**r)) // f, (-(-cols // 2**r)) // f
                y = np.arange(h) * s + s / 2 - lag  # centres, in frame edge coordinates
                x = np.arange(w) * s + s / 2 - lag
                shown = np.add.outer(y, x).astype(np.float32)
                out = decode._whole_extent(shown, rows, cols, s, lag)
                n_r, n_c = round(rows / s), round(cols / s)
                assert out.shape == (n_r, n_c), (r, lag, f)
                want = np.add.outer((np.arange(n_r) + 0.5) * rows / n_r,
                                    (np.arange(n_c) + 0.5) * cols / n_c)
                err = np.abs(out - want)[:-2, :-2].max() / s  # in pixels of the result
                assert err < 0.01, (r, lag, f, err)


def test_the_in_place_shift_is_pillows_bilinear_over_the_shifted_box() -> None:
    """``_whole_extent``'s two ways: where only the lag is to undo it shifts in place; the
    general way is Pillow's bilinear over the box. Equal but for float32 rounding (values up to
    255: a few ulps of 1.5e-5)."""
    img = (np.random.default_rng(0).random((125, 96)) * 255).astype(np.float32)
    shifted = img.copy()
    decode._shift(shifted, 0.375)
    padded = np.pad(img, ((0, 1), (0, 1)), mode="edge")
    pillow = np.asarray(Image.fromarray(padded).resize(
        (96, 125), Image.Resampling.BILINEAR, box=(0.375, 0.375, 96.375, 125.375)))
    assert np.abs(shifted - pillow).max() < 1e-4


def test_signed_jpeg2000_is_decoded_reduced_with_its_sign(tmp_path: Path) -> None:
    grey = detector(load_grey_image(kermany_files("NORMAL", 1)[0]), SHAPE, 1)
    ds = dcmread(_j2k(signed=True)(grey, tmp_path)[0])
    full = decode.stored_pixels(ds)
    decoded = decode._stored_pixels(ds, None, decode.FOR_SCORE)
    assert full.dtype == decoded.stored.dtype == np.int16 and full.min() < 0
    assert decoded.scale == 4
    d = np.abs(decoded.stored - block_means(full, 4))
    assert d.mean() < LOWPASS_MEAN, d.mean()


def test_8_bit_jpeg_is_decoded_with_a_scaled_inverse_dct(tmp_path: Path) -> None:
    grey = detector(load_grey_image(kermany_files("NORMAL", 1)[0]), SHAPE, 2)
    src = save(wrap(grey, bits_stored=8), tmp_path / "source.dcm")
    run_tool("dcmcjpeg", "+eb", src, tmp_path / "jpeg.dcm")
    ds = dcmread(tmp_path / "jpeg.dcm")
    full = decode.stored_pixels(ds)
    decoded = decode._stored_pixels(ds, None, decode.FOR_SCORE)
    assert decoded.stored.shape == (625, 512) and decoded.scale == 4 and decoded.lag == 0
    # a scaled IDCT of quality-90 blocks against the block means of the full IDCT: within
    # about a grey level on average (a wrong scale or offset errs by tens)
    d = np.abs(decoded.stored.astype(np.float64) - block_means(full, 4))
    assert d.mean() < 1.0, d.mean()


def test_the_jpeg2000_header_gives_the_decomposition_levels(j2k_frame: Dataset) -> None:
    frame = next(generate_frames(j2k_frame.PixelData, number_of_frames=1))
    head = decode._j2k_header(frame)
    assert head is not None
    assert (head.rows, head.cols, head.components, head.precision, head.signed) == (
        2500, 2048, 1, 12, False)
    assert head.levels == 5  # OpenJPEG's default: 6 resolutions
    # fewer levels in COD: never asked to skip more than the codestream has
    cod = frame.index(b"\xff\x52")
    one_level = frame[:cod + 9] + b"\x01" + frame[cod + 10:]
    assert decode._j2k_header(one_level).levels == 1  # type: ignore[union-attr]
    ds = j2k_frame.copy()
    ds.PixelData = encapsulate([one_level])
    assert decode._stored_pixels(ds, None, decode.FOR_SCORE).scale == 2


def test_a_side_pillow_would_size_wrongly_is_decoded_one_level_higher(tmp_path: Path) -> None:
    """Pillow rounds a reduced side (2501 / 4 -> 625) where OpenJPEG takes the ceiling (626),
    and then fails: such a frame is decoded at the level where both agree, then reduced after
    the LUTs, to the whole frame's geometry."""
    grey = detector(load_grey_image(kermany_files("NORMAL", 1)[0]), ODD, 3)
    ds = dcmread(_j2k(window=True)(grey, tmp_path)[0])
    decoded = decode._stored_pixels(ds, None, decode.FOR_SCORE)
    assert decoded.scale == 2 and decoded.stored.shape == (1251, 1024)
    assert decode.display_image(ds, need=decode.FOR_SCORE).shape == (625, 512)


def test_a_broken_jpeg2000_frame_is_still_a_decode_error(j2k_frame: Dataset) -> None:
    """The reduced decode fails on it and gives way to the full decoder, which says why."""
    frame = next(generate_frames(j2k_frame.PixelData, number_of_frames=1))
    ds = j2k_frame.copy()
    ds.PixelData = encapsulate([frame[:len(frame) // 3]])
    with pytest.raises(DecodeError):
        decode.display_image(ds, need=decode.FOR_SCORE)


def test_a_small_frame_is_not_reduced() -> None:
    """1024 x 880: halving would put a side under 448 (scoring) or the longer under 1024 (the
    Secondary Capture), so the frame is used whole."""
    ds = dcmread(io.BytesIO(to_bytes(wrap(np.full((1024, 880), 100.0), bits_stored=12,
                                          window=True))))
    for need in NEEDS.values():
        assert decode.display_image(ds, need=need).shape == (1024, 880)


@pytest.mark.parametrize(("shape", "need", "factor", "level"), [
    ((2500, 2048), decode.FOR_SCORE, 4, 2),
    ((2500, 2048), decode.FOR_SCORE_AND_REPORT, 2, 1),
    ((4300, 3500), decode.FOR_SCORE, 7, 2),
    ((4300, 3500), decode.FOR_SCORE_AND_REPORT, 4, 2),
    ((1024, 880), decode.FOR_SCORE, 1, 0),
    ((447, 2000), decode.FOR_SCORE, 1, 0),
])
def test_the_factor_and_level_are_the_largest_that_meet_the_need(
        shape: tuple[int, int], need: decode.Need, factor: int, level: int) -> None:
    rows, cols = shape
    assert decode.need_factor(rows, cols, need) == factor
    assert factor == 1 or need.fits(rows // factor, cols // factor)
    assert not need.fits(rows // (factor + 1), cols // (factor + 1))
    assert decode.resolution_level(rows, cols, need, 5) == level


def test_the_floors_are_the_model_input_and_the_secondary_capture() -> None:
    assert decode.MODEL_SIDE == 2 * INPUT_SIZE
    assert decode.REPORT_SIDE == report.MAX_SIDE


# -- the callers ask for it ------------------------------------------------------------------
@pytest.fixture
def engine(sqlite_worklist: Engine) -> Engine:
    return sqlite_worklist


def test_the_service_and_score_ask_for_the_reduced_decode(
        engine: Engine, tmp_path: Path, scorer: Scorer, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[decode.Need | None] = []
    real = decode.display_image

    def spy(ds: Dataset, limits: Any = None, *, need: decode.Need | None = None) -> Any:
        asked.append(need)
        return real(ds, limits, need=need)

    monkeypatch.setattr(decode, "display_image", spy)
    ds = wrap(upsample(load_grey_image(kermany_files("NORMAL", 1)[0]), 256, 224),
              bits_stored=12, window=True)
    path = save(ds, tmp_path / "image.dcm")
    assess.assess_file(path, scorer, compose.gate_config(Settings()))
    assert asked == [decode.FOR_SCORE_AND_REPORT]

    asked.clear()
    pipe = compose.build_pipeline(Settings(storage=Storage(data_dir=str(tmp_path / "d"))),
                                  scorer, engine)
    spooled = pipe.spool.image_path(ds.StudyInstanceUID, ds.SOPInstanceUID)
    atomic_write(spooled, lambda f: ds.save_as(f, enforce_file_format=True))
    queue.enqueue(engine, sop_instance_uid=str(ds.SOPInstanceUID),
                  sop_class_uid=str(ds.SOPClassUID), study_instance_uid=str(ds.StudyInstanceUID),
                  series_instance_uid=str(ds.SeriesInstanceUID), accession_number="A1",
                  calling_ae_title="MODALITY", spool_path=str(spooled),
                  transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    assert pipe.drain() == 1
    assert asked == [decode.FOR_SCORE_AND_REPORT]

