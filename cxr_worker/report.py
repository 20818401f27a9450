"""The result object: a Secondary Capture with the triage result burned in (highdicom).

- same Study Instance UID as the source; a new series whose UID is derived from the study and
  the model version (one AI series per study and model), stable configurable Series Number;
- SOP Instance UID given by the caller: the pipeline derives it from the source, the model
  version and the decision (:func:`cxr_worker.report_sr.decision_uid`), so a replay with the
  same decision resends the same object and another decision is a new object (the earlier
  one is withdrawn with a rejection note, :func:`cxr_worker.report_sr.build_rejection_note`);
  without one, :func:`result_sop_instance_uid` (source and model version);
- Source Image Sequence (purpose 121322 "Source image for image processing operation"),
  Referenced Image Sequence, Derivation Description;
- a banner above a downscaled copy of the radiograph: the result and the population (in
  population / OUTSIDE VALIDATED POPULATION / POPULATION UNKNOWN, as large as the result, on
  an amber strip when not in population), probability and threshold (two decimals), model
  version and "NOT FOR DIAGNOSTIC USE"; Burned In Annotation YES; the same words in
  Image Comments; the worker as Manufacturer / Model Name / Software Versions;
- with a heatmap (Grad-CAM, :mod:`cxr_worker.model.heatmap`; ``[report] heatmap``): the
  radiograph under a translucent colour overlay (blue -> green -> red, opacity rising with
  the heat) and a legend line in the banner, :data:`HEATMAP_LEGEND`, above a colour bar
  from "low" to "high"; the legend is in Image Comments too. :func:`overlay_png` gives the same
  overlay (no banner) as a PNG, and a thumbnail, for the web page;
- Patient and Study modules (and Specific Character Set) copied from the source; a Patient's
  Birth Date, Study Date, Study Time or Patient's Sex that is not a valid value (highdicom
  refuses to build with it) is left empty in the result (they are Type 2) instead of failing
  the image: the flag matters more than a wrong date, and the source keeps the value. A Specific
  Character Set the worker cannot decode (an unknown term) is not copied: the values were read
  with pydicom's fallback and are written as ISO_IR 192 (UTF-8), which encodes all of them.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM

from cxr_worker import __version__, sop_classes
from cxr_worker.labels import Label, Population, format_probability, format_threshold

logger = logging.getLogger(__name__)

SECONDARY_CAPTURE = sop_classes.SECONDARY_CAPTURE  # the result's SOP class
UTF8 = "ISO_IR 192"
MAX_SIDE = 1024
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SERIES_DESCRIPTION = "AI triage result: pneumonia (cxr-worker)"
MODEL_NAME = "cxr-worker pneumonia triage"


@dataclass(frozen=True)
class ReportConfig:
    uid_prefix: str
    series_number: int
    manufacturer: str
    heatmap: bool = True  # [report] heatmap: compute, draw and keep the Grad-CAM heatmap


HEATMAP_LEGEND = "Heatmap: regions that drove the score; not a segmentation"
HEATMAP_OPACITY = 0.45  # of the colour where the heat is 1; it falls to 0 with the heat
THUMBNAIL_SIDE = 160


def _ramp(v: NDArray[np.floating]) -> NDArray[np.float64]:
    """The colour of heat ``v`` in [0, 1]: blue -> green -> red ("jet"-like), as RGB in [0, 1]."""
    v = np.asarray(v, np.float64)
    return np.stack([np.clip(1.5 - abs(4 * v - 3), 0, 1), np.clip(1.5 - abs(4 * v - 2), 0, 1),
                     np.clip(1.5 - abs(4 * v - 1), 0, 1)], axis=-1)


_PALETTE = [int(c) for c in np.rint(_ramp(np.arange(256) / 255.0) * 255).ravel()]
_OPACITY = [round(HEATMAP_OPACITY * v) for v in range(256)]


def _heat_image(heat: NDArray[np.floating] | NDArray[np.uint8]) -> Image.Image:
    """A heatmap (any size; float in [0, 1] or 8-bit) as an 8-bit grey image."""
    arr = np.asarray(heat)
    if arr.ndim != 2:
        raise ValueError(f"a heatmap is 2-D, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L")


def overlay(grey: Image.Image, heat: NDArray[np.floating] | NDArray[np.uint8]) -> Image.Image:
    """RGB: the grey image under the heatmap's colours, the heatmap stretched over the whole
    image (it is in the frame of the squashed model input), opacity
    ``HEATMAP_OPACITY * heat`` (so cold regions show the radiograph untouched)."""
    hm = _heat_image(heat).resize(grey.size, Image.Resampling.BILINEAR)
    colour = hm.copy()
    colour.putpalette(_PALETTE)
    return Image.composite(colour.convert("RGB"), grey.convert("RGB"), hm.point(_OPACITY))


def _grey_image(display: NDArray[np.floating], max_side: int) -> Image.Image:
    """The display image (0..255) as 8-bit grey, downscaled to at most ``max_side`` a side."""
    h, w = display.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = Image.fromarray(np.clip(display, 0, 255).astype(np.float32), mode="F")
    return grey.resize(size, Image.Resampling.BILINEAR).convert("L")


def overlay_png(display: NDArray[np.floating],
                heat: NDArray[np.floating] | NDArray[np.uint8] | None,
                max_side: int = MAX_SIDE) -> bytes:
    """PNG of the radiograph (display values 0..255, e.g. ``decode.display_image``) at most
    ``max_side`` a side, under the heatmap (a :func:`cxr_worker.model.heatmap.load_png` or
    the persisted 8-bit file's pixels); without a heatmap, the radiograph alone. For the web
    page; ``max_side=THUMBNAIL_SIDE`` gives the thumbnail (:func:`thumbnail_png`)."""
    grey = _grey_image(display, max_side)
    img = grey if heat is None else overlay(grey, heat)
    buf = io.BytesIO()
    # zlib level 1: a 1024 px overlay in about 55 ms instead of 200 (level 6), 30% larger
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumbnail_png(display: NDArray[np.floating],
                  heat: NDArray[np.floating] | NDArray[np.uint8] | None) -> bytes:
    """:func:`overlay_png` at most :data:`THUMBNAIL_SIDE` pixels a side."""
    return overlay_png(display, heat, THUMBNAIL_SIDE)


def result_sop_instance_uid(prefix: str, source_sop_uid: str, model_version: str) -> str:
    """Deterministic: the same source and model always give the same result UID."""
    return str(generate_uid(prefix, entropy_srcs=[source_sop_uid, model_version, "sc"]))


def result_series_instance_uid(prefix: str, study_uid: str, model_version: str) -> str:
    return str(generate_uid(prefix, entropy_srcs=[study_uid, model_version, "series"]))


def banner_lines(label: Label, population_text: str, probability: float, threshold: float,
                 model_version: str, *, threshold_source: str = "model card",
                 heatmap: bool = False) -> list[str]:
    """The banner, top to bottom: the label and the population (the two headline lines, as
    large as each other), probability and threshold (two decimals, never 1.00 or 0.00) with
    where the threshold comes from (model card, site calibration, settings), model, the
    disclaimer; with ``heatmap``, the heatmap's legend last."""
    return [
        label,
        population_text,
        f"probability {format_probability(probability)} "
        f"(threshold {format_threshold(threshold)}, {threshold_source})",
        f"model {model_version}",
        f"AI TRIAGE - {NOT_FOR_DIAGNOSTIC_USE}",
        *([HEATMAP_LEGEND] if heatmap else []),
    ]


HEADLINES = 2  # label and population: the large lines
SUSPECTED_COLOUR = (170, 20, 20)
NEGATIVE_COLOUR = (20, 90, 40)
POPULATION_WARNING_COLOUR = (255, 200, 0)  # amber strip, black text: outside / unknown


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size``, loaded once per size (each load parses the font)."""
    return ImageFont.load_default(size=size)


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, size: int,
                  max_width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The default font at ``size``, smaller only if ``text`` would not fit ``max_width``."""
    while True:
        font = _font(size)
        if size <= 10 or draw.textlength(text, font=font) <= max_width:
            return font
        size -= 1


def render(display: NDArray[np.floating], lines: list[str], suspected: bool,
           population_warning: bool = False,
           heat: NDArray[np.floating] | NDArray[np.uint8] | None = None) -> NDArray[np.uint8]:
    """RGB image: the banner above the radiograph downscaled to at most 1024 px a side.

    With ``heat``, the radiograph is under the heatmap's :func:`overlay`, and the last line
    (the legend) gets a colour bar from "low" to "high" on a row of its own below it.

    The first two lines (label, population) are drawn large; a population line too wide for
    the banner keeps its words ("OUTSIDE VALIDATED POPULATION") large and puts its details in
    parentheses on the next line. It sits on an amber strip in black when
    ``population_warning`` (outside or unknown population), apart from the red/green result.
    """
    grey = _grey_image(display, MAX_SIDE)
    size = grey.size
    width = max(size[0], 512)
    font_size = max(14, width // 36)
    big_size = round(font_size * 1.4)
    pad = font_size // 2
    canvas = Image.new("RGB", (width, 1), (0, 0, 0))
    measure = ImageDraw.Draw(canvas)
    rows: list[tuple[str, int, bool]] = []  # text, font size, on the population strip
    for i, text in enumerate(lines):
        big = i < HEADLINES
        head, sep, detail = text.partition(" (")
        too_wide = measure.textlength(text, font=_font(big_size)) > width - 2 * pad
        if i == 1 and too_wide and sep:
            rows += [(head, big_size, True), (f"({detail}", font_size, True)]
        else:
            rows.append((text, big_size if big else font_size, i == 1))
    heights = [int(sz * 1.35) for _, sz, _ in rows]
    bar_h = int(font_size * 1.35) if heat is not None else 0
    banner_h = sum(heights) + bar_h + 2 * pad
    canvas = Image.new("RGB", (width, size[1] + banner_h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, width, banner_h - 1],
                   fill=SUSPECTED_COLOUR if suspected else NEGATIVE_COLOUR)
    y = pad
    for (text, sz, strip), lh in zip(rows, heights, strict=True):
        ink = (255, 255, 255)
        if strip and population_warning:
            draw.rectangle([0, y - pad // 4, width, y + lh - pad // 4],
                           fill=POPULATION_WARNING_COLOUR)
            ink = (0, 0, 0)
        draw.text((pad, y), text, fill=ink, font=_fitting_font(draw, text, sz, width - 2 * pad))
        y += lh
    if heat is not None:
        _colour_bar(canvas, draw, pad, y, font_size)
    picture = grey.convert("RGB") if heat is None else overlay(grey, heat)
    canvas.paste(picture, ((width - size[0]) // 2, banner_h))
    return np.asarray(canvas, dtype=np.uint8)


def _colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int,
                font_size: int) -> None:
    """ "low [blue ... red] high" at (x, y): the heatmap's colours at full strength."""
    font = _font(font_size)
    draw.text((x, y), "low", fill=(255, 255, 255), font=font)
    x0 = x + int(draw.textlength("low ", font=font))
    bar = _bar(font_size)
    canvas.paste(bar, (x0, y + font_size // 6))
    draw.text((x0 + bar.width + font_size // 3, y), "high", fill=(255, 255, 255), font=font)


@functools.lru_cache(maxsize=8)
def _bar(font_size: int) -> Image.Image:
    """The colour bar's pixels: ``12 * font_size`` columns of the heatmap's colours, low to
    high, from ``font_size // 6`` to ``font_size`` (inclusive) below the line's top."""
    bar_w = 12 * font_size
    colours = np.rint(_ramp(np.linspace(0.0, 1.0, bar_w)) * 255).astype(np.uint8)
    rows = font_size - font_size // 6 + 1
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(colours, (rows, bar_w, 3))),
                           mode="RGB")


# Type 2 attributes highdicom copies from the source and validates (raising ValueError), with
# the check it applies
_REPAIRABLE: dict[str, Callable[[Any], object]] = {
    "PatientBirthDate": DA,
    "StudyDate": DA,
    "StudyTime": TM,
    "PatientSex": hd.PatientSexValues,
}


def _reference(source: Dataset) -> Dataset:
    """The source as highdicom should copy it: invalid :data:`_REPAIRABLE` values left out
    (empty in the result), logged by keyword, never by value."""
    ref = Dataset()
    ref.update(source)  # a new element table: deleting from it leaves the source whole
    dropped = []
    for keyword, check in _REPAIRABLE.items():
        value = ref.get(keyword)
        if value is None or value == "":
            continue
        try:
            check(value)
        except (ValueError, TypeError):
            del ref[keyword]
            dropped.append(keyword)
    if dropped:
        logger.warning("result for %s: %s not valid in the source; left empty in the result",
                       source.get("SOPInstanceUID", "?"), ", ".join(dropped))
    return ref


def result_character_set(source: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set when every term is one the worker decodes, else
    ISO_IR 192 (UTF-8): the values were decoded with pydicom's fallback, and a term the
    result cannot declare validly must not be copied. None when the source has none."""
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None
    terms = [value] if isinstance(value, str) else [str(t) for t in value]
    if terms and all(t in python_encoding for t in terms):
        return value if isinstance(value, str) else terms
    logger.warning("result for %s: Specific Character Set not one the worker decodes; the "
                   "result is written as %s", source.get("SOPInstanceUID", "?"), UTF8)
    return UTF8


def _source_reference(source: Dataset, purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if purpose:
        code = Dataset()
        code.CodeValue = "121322"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Source image for image processing operation"
        item.PurposeOfReferenceCodeSequence = Sequence([code])
    return item


def build_secondary_capture(
    source: Dataset,
    display: NDArray[np.floating],
    *,
    probability: float,
    label: Label,
    threshold: float,
    model_version: str,
    cfg: ReportConfig,
    population: str,
    population_text: str,
    threshold_source: str = "model card",
    heatmap: NDArray[np.floating] | NDArray[np.uint8] | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sc.SCImage:
    """The Secondary Capture for one scored source image; valid when this returns.

    ``population`` (:class:`~cxr_worker.labels.Population`) and ``population_text`` (the
    gate's line, e.g. "OUTSIDE VALIDATED POPULATION (age 81 years; validated 1-5 years)")
    are shown as large as the label. ``heatmap`` (2-D, in [0, 1] or 8-bit, in the frame of
    the squashed model input, e.g. 224x224) is drawn over the radiograph with its legend.
    ``sop_instance_uid`` defaults to :func:`result_sop_instance_uid`.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    if label not in (Label.SUSPECTED, Label.NEGATIVE):
        raise ValueError(f"unknown label {label!r}")
    population = Population(population)
    lines = banner_lines(label, population_text, probability, threshold, model_version,
                         threshold_source=threshold_source, heatmap=heatmap is not None)
    pixels = render(display, lines, label == Label.SUSPECTED,
                    population_warning=population != Population.IN, heat=heatmap)
    orientation = tuple(str(v) for v in source.get("PatientOrientation", []) or []) or ("L", "F")
    if len(orientation) != 2:
        orientation = ("L", "F")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_reference(source),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_series_instance_uid(
            cfg.uid_prefix, str(source.StudyInstanceUID), model_version),
        series_number=cfg.series_number,
        sop_instance_uid=sop_instance_uid or result_sop_instance_uid(
            cfg.uid_prefix, str(source.SOPInstanceUID), model_version),
        instance_number=1,
        manufacturer=cfg.manufacturer,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name=MODEL_NAME,
        software_versions=[f"cxr-worker {__version__}", model_version],
        series_description=SERIES_DESCRIPTION,
        # highdicom 0.28 rejects an empty first value (ISO 2022 IR 6, PS3.3 C.12.1.1.2), which
        # Japanese ISO 2022 studies use: build without it and copy the source's value below
        specific_character_set=None,
    )
    charset = result_character_set(source)
    if charset is not None:
        sc.SpecificCharacterSet = charset
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = " / ".join(lines)[:10240]
    sc.DerivationDescription = (
        f"Pneumonia triage by {MODEL_NAME}, model {model_version}: {label}, "
        f"{population_text}, probability {format_probability(probability)}, "
        f"threshold {format_threshold(threshold)}. {NOT_FOR_DIAGNOSTIC_USE}."
        + (f" Grad-CAM overlay. {HEATMAP_LEGEND}." if heatmap is not None else "")
    )[:1024]
    # Only chest images are scored (the gate); naming the body part also settles General
    # Series Laterality (Type 2C, required for paired body parts only)
    sc.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")
    sc.SourceImageSequence = Sequence([_source_reference(source, purpose=True)])
    sc.ReferencedImageSequence = Sequence([_source_reference(source, purpose=False)])
    return sc
