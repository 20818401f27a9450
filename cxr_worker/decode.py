"""Pixel data to the model's input: pure functions, each step testable alone.

``stored values -> Modality LUT -> VOI (window or LUT) -> inversion -> padding -> [0, 255]``;
the scorer then applies its model's preprocessing contract (``Scorer.prepare``).

Decisions (see README "Decoding"):

- Multi-frame images: the first frame is scored.
- Colour (anything but MONOCHROME1/2, Samples per Pixel 1) is refused with a reason.
- VOI: the first window (or first VOI LUT) is used; LINEAR, LINEAR_EXACT and SIGMOID follow
  PS3.3 C.11.2.1.2. With no VOI information, 8-bit data is taken as display values already
  (it is what a JPEG of the radiograph would hold); deeper data gets a robust window from the
  0.5th to the 99.5th percentile of the non-padding pixels, which one hot pixel cannot ruin.
- Inversion: MONOCHROME1 (minimum is white) is inverted; so is MONOCHROME2 with Presentation
  LUT Shape INVERSE. MONOCHROME1 with INVERSE (what DX requires) is inverted once.
- Padding (Pixel Padding Value / Range Limit) is excluded from the automatic window and shown
  black.

Bounded resources (issue 10: an 8192x8192 RLE image in a 2 MB file took the worker to 1.9 GB,
a 0.9 MB deflated data set inflating to 512 MB to 1.3 GB; both were scored). Every size is
checked before the bytes are made, against :class:`cxr_worker.sizes.Limits` (``[limits]`` in
the settings; set process-wide by the composition root, :func:`cxr_worker.sizes.set_limits`):

- the file (``limits.max_dataset_bytes``, the listener's limit on a received data set);
- the decoded size the header declares, Rows x Columns x Samples per Pixel x Number of Frames
  x Bits Allocated / 8 (``limits.max_decoded_bytes``), before any pixel is decoded;
- a Deflated Explicit VR Little Endian data set is inflated piece by piece, never past
  ``limits.max_inflated_bytes`` (:class:`cxr_worker.sizes.InflatingReader`), not by pydicom
  (which inflates the whole stream at once, however large);
- declared against actual: a compressed frame whose own header (JPEG SOF, JPEG-LS SOF55,
  JPEG 2000 SIZ) gives another size than Rows x Columns x Samples is refused before the
  decoder allocates for it; RLE is decoded by pylibjpeg-rle, whose output buffer is sized from
  Rows x Columns and which stops (panics, caught) at the first byte beyond it. pydicom's own
  RLE decoder decodes a whole segment before it compares its length (a 2-byte run gives 128
  bytes: 64 times the file), so it is only used after the segment lengths are checked.

Memory ceiling of one decode (:func:`display_image`): the whole chain stored value -> Modality
LUT -> VOI -> inversion -> padding -> [0, 255] is a function of the stored value alone, so it
is computed once per possible stored value (a table of 256 or 65,536 entries; the automatic
window's percentiles come from the histogram of stored values, exactly) and applied to the
frame strip by strip into a float32 image (within 1e-5 of float64 arithmetic on the pixels).
Peak: the file's Pixel Data + the decoded frame + 4 bytes per displayed pixel + about 12 MiB
of strips and tables; measured with tracemalloc on a 4096 x 4096 16-bit frame: 109 MiB,
against 416 MiB for the float64 chain it replaces (13 bytes per pixel). A frame of more than
:data:`DISPLAY_MAX_PIXELS` (4096 x 4096; a 43 x 35 cm detector at 100 um is 4300 x 3500, under
it) is shown reduced by an integer factor (mean of f x f blocks, the last partial row and
column of blocks dropped), so that the display image, and the copies the scorer and the
report make of it, stay under 64 MiB.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import (  # _get_jpg_parameters: private, pydicom's only SOF parser
    _get_jpg_parameters,
    pixel_array,
)
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from cxr_worker.errors import (
    CxrWorkerError,
    DecodeError,
    LimitExceededError,
    UnsupportedTransferSyntaxError,
)
from cxr_worker.sizes import (
    InflatingReader,
    Limits,
    MiB,
    check_decoded_size,
    current_limits,
    read_deflated,
)

logger = logging.getLogger(__name__)

MIN_SIDE = 64
MAX_SIDE = 8192
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)

FloatImage = NDArray[np.float64]
DisplayImage = NDArray[np.float32]

# a frame with more pixels is displayed (and scored) reduced by an integer factor; 4096 x 4096
DISPLAY_MAX_PIXELS = 1 << 24
_STRIP_PIXELS = 1 << 20  # pixels gathered per strip (a float32 strip is 4 MiB)
# allowance for the preamble and file meta on top of ``max_dataset_bytes`` for a file
_FILE_META_ALLOWANCE = 1 * MiB

# What pydicom, numpy and the decoder plug-ins raise on malformed headers or pixel data (a value
# that does not convert, a missing or mistyped element, a short buffer). Anything else is a
# programming error and is left to propagate.
_MALFORMED = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError, struct.error,
              EOFError, OSError, RuntimeError, BytesLengthException, InvalidDicomError)
_REASON_MAX = 300

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reason(prefix: str, exc: BaseException) -> str:
    return f"{prefix}: {type(exc).__name__}: {exc}"[:_REASON_MAX]


def _decode_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn what malformed input makes pydicom or numpy raise into :class:`DecodeError`.

    Why: pydicom converts element values lazily, so a broken header surfaces as ValueError,
    TypeError, struct.error, ... wherever a value is first read (``int(ds.Rows)``,
    ``ds.WindowWidth``). The pipeline quarantines a DecodeError with its reason but retries
    anything else as a transient failure, which a broken file never recovers from.
    """

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except CxrWorkerError:
            raise
        except _MALFORMED as exc:
            raise DecodeError(_reason("malformed header or pixel data", exc)) from exc

    return wrapper


def _is_panic(exc: BaseException) -> bool:
    # pyo3 extensions (pylibjpeg-rle) raise ``pyo3_runtime.PanicException`` on malformed input;
    # it derives from BaseException, so neither pydicom's plug-in fallback (``except
    # Exception``) nor the pipeline's ``except Exception`` catches it: one RLE file whose
    # Rows or Columns do not match its segments would take the worker down.
    return type(exc).__name__ == "PanicException"


def _convert_all(ds: Dataset) -> None:
    """Convert every element now, not on first access.

    Why: pydicom converts values lazily, so a structurally broken element (an unknown VR, a
    US value of odd length) raised NotImplementedError or BytesLengthException wherever it
    was first read: in the gate (Image Type, Body Part Examined) or in the report, where
    nothing maps it to a reason. Values that are merely invalid (a DS of "75kg") only warn
    and stay strings. A broken private element is dropped: nothing here reads one.
    """
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
        except (NotImplementedError, BytesLengthException, ValueError, TypeError,
                struct.error, LookupError) as exc:
            if tag.is_private:
                del ds[tag]
                continue
            raise DecodeError(_reason(f"unreadable element {tag}", exc)) from exc
        if elem.VR == "SQ":
            for item in elem.value or []:
                _convert_all(item)


def _not_group_2(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 2


def _read_deflated_file(path: str | Path, limits: Limits) -> FileDataset | None:
    """The file, read as :func:`dcmread` would, when it is deflated; None when it is not."""
    with open(path, "rb") as f:
        preamble = f.read(128)
        if f.read(4) != b"DICM":
            return None  # dcmread says why
        meta = read_dataset(f, False, True, stop_when=_not_group_2)
        if str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            return None
        dataset = read_deflated(iter(functools.partial(f.read, InflatingReader.CHUNK), b""),
                                limits.max_inflated_bytes)
    ds = FileDataset(str(path), dataset, preamble, FileMetaDataset(meta), False, True)
    ds.set_original_encoding(False, True, dataset.original_character_set)
    return ds


def check_file_size(path: str | Path, limits: Limits | None = None) -> None:
    """A file larger than a received data set may be (``limits.max_dataset_bytes`` plus
    1 MiB for the preamble and file meta) is not read: replay and ``score`` read files the
    listener never bounded."""
    lim = limits or current_limits()
    size = os.stat(path).st_size
    if size > lim.max_dataset_bytes + _FILE_META_ALLOWANCE:
        raise LimitExceededError(
            "limits.max_dataset_bytes", f"the file is {size} bytes, more than "
            f"limits.max_dataset_bytes ({lim.max_dataset_bytes} bytes) allows: not read")


def read_file(path: str | Path, limits: Limits | None = None) -> Dataset:
    """Read a Part 10 file; anything that is not a readable DICOM object is a DecodeError,
    a file or inflated data set larger than ``limits`` a :class:`LimitExceededError`."""
    lim = limits or current_limits()
    check_file_size(path, lim)
    try:
        ds = _read_deflated_file(path, lim) or dcmread(path)
        _convert_all(ds)
        sop_class = ds.get("SOPClassUID")
    except (InvalidDicomError, EOFError, ValueError, LookupError, TypeError, ArithmeticError,
            AttributeError, NotImplementedError, struct.error, zlib.error,
            BytesLengthException) as exc:
        # zlib.error: a truncated or corrupt Deflated Explicit VR Little Endian body;
        # BytesLengthException (not a ValueError): e.g. a File Meta Group Length of odd size.
        # OSError stays out: a missing file or a disk error is not the file's fault.
        raise DecodeError(_reason("unreadable DICOM file", exc)) from exc
    if not sop_class:
        raise DecodeError("unreadable DICOM file: no SOP Class UID (truncated, or not a DICOM "
                          "object?)")
    return ds


@_decode_errors
def check_header(ds: Dataset) -> None:
    """Refuse what cannot be a grey radiograph before touching the pixel data."""
    if "PixelData" not in ds:
        raise DecodeError("no Pixel Data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(f"colour or unsupported Photometric Interpretation {photometric!r}; "
                          "only MONOCHROME1/MONOCHROME2 radiographs are scored")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DecodeError(f"{samples} samples per pixel (colour?): only grey images are scored")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if not (MIN_SIDE <= rows <= MAX_SIDE and MIN_SIDE <= cols <= MAX_SIDE):
        raise DecodeError(f"image size {rows}x{cols} outside {MIN_SIDE}..{MAX_SIDE} pixels a side")
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16):
        raise DecodeError(f"Bits Allocated {bits} not supported (8 or 16)")


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        # pydicom raises AttributeError here, which no caller expected
        raise DecodeError("no Transfer Syntax UID in the file meta information")
    ts = UID(str(ts))
    if not ts.is_transfer_syntax:
        raise UnsupportedTransferSyntaxError(f"unknown transfer syntax {ts}")
    return ts


def _check_native_length(ds: Dataset, frames: int) -> None:
    """Native Pixel Data must hold exactly Rows x Columns x frames samples (+1 pad byte).

    Why: pydicom only warns when there is more data than the header describes and decodes the
    start of it, so a Columns value that is off (or a Rows value that is halved) gives a
    sheared or partial radiograph that would be scored as if it were fine.
    """
    value = ds.PixelData
    actual = len(value) if value is not None else 0
    expected = (int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1) or 1)
                * int(ds.BitsAllocated) // 8)
    if actual not in (expected, expected + (expected % 2)):
        raise DecodeError(
            f"Pixel Data is {actual} bytes, but {ds.Rows} x {ds.Columns} x {frames} frame(s) at "
            f"{ds.BitsAllocated} bits needs {expected}")


# Plug-in preferred per transfer syntax where the default order picks a slower one: pydicom
# tries pylibjpeg first, but CharLS (pyjpegls) decodes a 2500x2048 JPEG-LS image in ~91 ms
# against ~340 ms (measured on the 2-core CPU).
# RLE: pylibjpeg-rle sizes its output from Rows x Columns and stops at the first byte beyond
# it; pydicom's own decoder decodes a whole segment first (see the module docstring).
_PREFERRED_PLUGIN = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls",
                     RLELossless: "pylibjpeg"}


def _plugin(ts: UID) -> str:
    name = _PREFERRED_PLUGIN.get(ts, "")
    if name and get_decoder(ts).available_plugins and name in get_decoder(ts).available_plugins:
        return name
    return ""


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ marker segment
    (ISO/IEC 15444-1 A.5.1: SOC then SIZ; a JP2 wrapper's boxes may precede them)."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
    if at < 0 or len(frame) < at + 4 + 38:
        return None
    (_, _, x, y, x0, y0, _, _, _, _, components) = struct.unpack(
        ">HHLLLLLLLLH", frame[at + 4:at + 42])
    return y - y0, x - x0, components


def _codestream_size(ts: UID, frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, samples) the frame's own codestream header declares, or None when
    it cannot be read."""
    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        info = _get_jpg_parameters(frame)
        return (info["height"], info["width"], info["components"]) if info else None
    if ts in JPEG2000TransferSyntaxes:
        return _j2k_size(frame)
    return None


def rle_segment_lengths(frame: bytes) -> list[int]:
    """Decoded length of each segment of an RLE frame (PS3.5 G.3.1), from its run headers.

    Used only when pylibjpeg-rle is missing, before pydicom's decoder: a pure-Python walk of
    the run headers (slow, but it holds no decoded byte)."""
    count = struct.unpack("<L", frame[:4])[0]
    if not 1 <= count <= 15:
        raise DecodeError(f"RLE header declares {count} segments")
    offsets = [*struct.unpack(f"<{count}L", frame[4:4 + 4 * count]), len(frame)]
    out = []
    for start, end in itertools.pairwise(offsets):
        total, pos = 0, start
        while pos < end:
            header = frame[pos]
            if header < 128:  # literal run of header + 1 bytes
                total += header + 1
                pos += header + 2
            elif header > 128:  # the next byte repeated 257 - header times
                total += 257 - header
                pos += 2
            else:
                pos += 1
        out.append(total)
    return out


def _check_frame(ds: Dataset, ts: UID, frames: int) -> None:
    """Declared against actual, before decoding: the first frame's codestream must describe
    Rows x Columns x Samples per Pixel (a decoder allocates what its codestream says)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    if ts == RLELossless:
        if _plugin(ts) != "pylibjpeg":
            longest = max(rle_segment_lengths(frame), default=0)
            if longest > rows * cols + 1:  # one pad byte allowed
                raise DecodeError(f"an RLE segment decodes to {longest} bytes, the header "
                                  f"declares {rows} x {cols}: not decoded")
        return
    size = _codestream_size(ts, frame)
    if size is None:
        raise DecodeError(f"the frame's {ts.name} codestream header cannot be read (its "
                          "size is checked before decoding): not decoded")
    if size != (rows, cols, samples):
        raise DecodeError(
            f"the frame's {ts.name} codestream is {size[0]} x {size[1]} x {size[2]} "
            f"sample(s), the header declares {rows} x {cols} x {samples}: not decoded")


def _decode_first_frame(ds: Dataset, index: int | None, ts: UID) -> NDArray[Any]:
    try:
        return pixel_array(ds, index=index, decoding_plugin=_plugin(ts))
    except Exception:
        raise
    except BaseException as exc:
        if not _is_panic(exc):
            raise
        # No retry with the other plug-ins: the panics seen come from segments that do not
        # match Rows x Columns, which pydicom's own RLE plug-in would "decode" into a cropped
        # or sheared image with only a warning.
        raise DecodeError(_reason(f"pixel data cannot be decoded ({ts})", exc)) from exc


@_decode_errors
def stored_pixels(ds: Dataset, limits: Limits | None = None) -> NDArray[Any]:
    """The first frame's stored values, decoded with the installed plug-ins, once the sizes
    are checked (:func:`check_decoded_size`, and declared against actual)."""
    check_header(ds)
    check_decoded_size(ds, limits)
    ts = _transfer_syntax(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 1:
        raise DecodeError(f"Number of Frames {frames}")
    if not ts.is_encapsulated:
        _check_native_length(ds, frames)
    else:
        _check_frame(ds, ts, frames)
    try:
        arr = _decode_first_frame(ds, 0 if frames > 1 else None, ts)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            f"no installed decoder for transfer syntax {ts}: {exc}") from exc
    except _MALFORMED as exc:
        raise DecodeError(_reason(f"pixel data cannot be decoded ({ts})", exc)) from exc
    if arr.ndim != 2:
        raise DecodeError(f"decoded pixel data has shape {arr.shape}, expected one grey frame")
    # native byte order (Explicit VR Big Endian gives >u2): a copy only then
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


@_decode_errors
def padding_mask(ds: Dataset, stored: NDArray[Any]) -> NDArray[np.bool_] | None:
    """True where a pixel is padding (PS3.3 C.7.5.1.1.2), on stored values."""
    if "PixelPaddingValue" not in ds:
        return None
    value = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return np.asarray(stored == value, dtype=np.bool_)
    lo, hi = sorted((value, int(limit)))
    return np.asarray((stored >= lo) & (stored <= hi), dtype=np.bool_)


@_decode_errors
def modality_lut(ds: Dataset, stored: NDArray[Any]) -> FloatImage:
    """Rescale slope/intercept, or the Modality LUT Sequence (PS3.3 C.11.1)."""
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        return _apply_lut(ds, ds.ModalityLUTSequence[0], stored)
    slope, intercept = rescale(ds)
    return stored.astype(np.float64) * slope + intercept


def _rescale_value(ds: Dataset, keyword: str, name: str, default: float) -> float:
    value = ds.get(keyword)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default  # absent or empty: the identity
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{name} ({keyword}) is not a number") from exc
    if not np.isfinite(number):
        raise DecodeError(f"{name} ({keyword}) is not finite ({number})")
    return number


def rescale(ds: Dataset) -> tuple[float, float]:
    """Rescale Slope and Intercept; absent or empty means 1 and 0.

    Why: a slope of 0 (or NaN, inf) was taken as 1 (``value or 1.0``) and the image scored
    as if the header said nothing; a slope of 0 maps every pixel to one value, so the header
    is wrong, and which way is unknown: refused with the attribute named.
    """
    slope = _rescale_value(ds, "RescaleSlope", "Rescale Slope", 1.0)
    intercept = _rescale_value(ds, "RescaleIntercept", "Rescale Intercept", 0.0)
    if slope == 0:
        raise DecodeError("Rescale Slope (RescaleSlope) is 0: every pixel would map to the "
                          "intercept")
    return slope, intercept


def _little_endian(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts and UID(str(ts)).is_transfer_syntax:
        return bool(UID(str(ts)).is_little_endian)
    return ds.original_encoding[1] is not False


def _lut_table(ds: Dataset, data: bytes, n_entries: int, bits: int) -> NDArray[Any]:
    """LUT Data held as OW bytes, in the byte order of the dataset's transfer syntax.

    Why: pydicom keeps OW values as the file's raw bytes, so reading them as native
    little-endian words scrambled every LUT received in Explicit VR Big Endian.
    """
    words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if _little_endian(ds) else ">u2")
    if bits <= 8 and len(data) < 2 * n_entries:
        # 8-bit entries packed two to a word (PS3.3 C.11.1.1.1: "equivalent to 8 bits
        # allocated"); entries stored one per word are the other common form
        return words.astype("<u2").view(np.uint8)
    return words


def _apply_lut(ds: Dataset, item: Dataset, values: NDArray[Any]) -> FloatImage:
    desc = [int(v) for v in item.LUTDescriptor]
    n_entries = desc[0] or 65536
    first = desc[1]
    if first > 32767 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        # the first mapped value of a signed image is SS (PS3.3 C.11.1.1.1); written with VR
        # US it arrives as 65408 for -128, and every pixel fell below the LUT
        first -= 65536
    data = item.LUTData if "LUTData" in item else None
    if data is None:
        raise DecodeError("LUT without LUT Data")
    table = np.asarray(data if not isinstance(data, bytes) else _lut_table(
        ds, data, n_entries, desc[2]), dtype=np.float64).ravel()
    if table.size < n_entries:
        raise DecodeError(f"LUT Data has {table.size} entries, descriptor says {n_entries}")
    idx = np.clip(np.round(values).astype(np.int64) - first, 0, n_entries - 1)
    return table[idx]


def voi_window(values: FloatImage, center: float, width: float, function: str = "LINEAR"
               ) -> FloatImage:
    """Window to [0, 1] (PS3.3 C.11.2.1.2)."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise DecodeError(f"window width {width} must be > 0")
        # the exponent is clipped so that far-off values give 0 or 1 without an overflow
        # (exp(710) is inf, and numpy warns on every image)
        exponent = np.clip(-4.0 * (values - center) / width, -700.0, 700.0)
        return 1.0 / (1.0 + np.exp(exponent))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise DecodeError(f"window width {width} must be > 0")
        return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    if width < 1:
        raise DecodeError(f"window width {width} must be >= 1 for LINEAR")
    if width == 1:
        # the formula divides by w - 1: a width of 1 (allowed) is the threshold x > c - 0.5
        return (values > center - 0.5).astype(np.float64)
    return np.clip(((values - (center - 0.5)) / (width - 1.0)) + 0.5, 0.0, 1.0)


def _first(value: Any) -> float:
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) \
            else float(value)
    except (TypeError, ValueError, IndexError) as exc:
        raise DecodeError(f"unreadable window value {value!r}") from exc


def _has_value(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is not None and (not hasattr(value, "__len__") or len(value) > 0)


@_decode_errors
def voi(ds: Dataset, values: FloatImage, mask: NDArray[np.bool_] | None) -> FloatImage:
    """Display values in [0, 1] from modality values."""

    def auto_window() -> tuple[float, float]:
        sample = values[~mask] if mask is not None and (~mask).any() else values.ravel()
        lo, hi = np.percentile(sample, AUTO_WINDOW_PERCENTILES)
        return float(lo), float(hi)

    return _voi(ds, values, auto_window)


def _voi(ds: Dataset, values: FloatImage, auto_window: Callable[[], tuple[float, float]]
         ) -> FloatImage:
    """:func:`voi`, the automatic window's (lo, hi) from ``auto_window`` (asked only when
    the image has no VOI information)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        out = _apply_lut(ds, item, values)
        bits = int(item.LUTDescriptor[2])
        return np.clip(out / float(2**bits - 1), 0.0, 1.0)
    # Window Center/Width are Type 1C but arrive empty from some consoles: that is no window
    # (it was "unreadable window value None", and the image was not scored)
    if _has_value(ds, "WindowCenter") and _has_value(ds, "WindowWidth"):
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        return voi_window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    has_rescale = "ModalityLUTSequence" in ds or rescale(ds) != (1.0, 0.0)
    if bits_stored <= 8 and not has_rescale and int(ds.get("PixelRepresentation", 0)) == 0:
        return values / 255.0
    lo, hi = auto_window()
    if hi <= lo:
        raise DecodeError("image has no contrast (all pixels equal)")
    shown: FloatImage = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return shown


def needs_inversion(ds: Dataset) -> bool:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation (``numpy.lib._function_base_impl._lerp``), so that the
    percentiles below equal ``np.percentile``'s to the last bit but rounding."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def weighted_percentiles(values: FloatImage, counts: NDArray[np.int64],
                         percentiles: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile`` (linear method) of the sample holding ``counts[i]`` copies of
    ``values[i]``, without making the sample: the automatic window from a histogram."""
    order = np.argsort(values, kind="stable")
    keep = counts[order] > 0
    v, cum = values[order][keep], np.cumsum(counts[order][keep])
    n = int(cum[-1])
    out = []
    for q in np.asarray(percentiles, dtype=np.float64) / 100.0:
        virtual = n * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's, alpha = beta = 1
        below = min(max(math.floor(virtual), 0), n - 1)
        a = float(v[np.searchsorted(cum, below, side="right")])
        b = float(v[np.searchsorted(cum, min(below + 1, n - 1), side="right")])
        out.append(_lerp(a, b, float(virtual - below)))
    return tuple(out)


_TABLE_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16)}


def _indices(stored: NDArray[Any]) -> NDArray[Any]:
    """The stored values' bit patterns (uint8/uint16): the index into a display table."""
    if stored.dtype not in _TABLE_DTYPES:
        raise DecodeError(f"decoded pixel type {stored.dtype} not supported")
    return stored.view(np.dtype(f"u{stored.dtype.itemsize}"))


def _strips(rows: int, cols: int, unit: int = 1) -> Iterator[slice]:
    step = max(1, _STRIP_PIXELS // max(cols * unit, 1))
    for r in range(0, rows, step):
        yield slice(r, min(r + step, rows))


def histogram(stored: NDArray[Any]) -> NDArray[np.int64]:
    """How many pixels hold each bit pattern (256 or 65,536 counts), strip by strip."""
    index = _indices(stored)
    size = 1 << (8 * index.dtype.itemsize)
    counts = np.zeros(size, np.int64)
    flat = index.reshape(index.shape[0], -1)
    for rows in _strips(flat.shape[0], flat.shape[1]):
        counts += np.bincount(flat[rows].ravel(), minlength=size)
    return counts


@_decode_errors
def display_table(ds: Dataset, stored: NDArray[Any]) -> FloatImage:
    """Display value (0..255) of every possible stored value, indexed by its bit pattern.

    The same functions as on a frame (:func:`modality_lut`, :func:`voi`, inversion,
    padding), applied to the 256 or 65,536 values instead of the pixels: every step maps a
    pixel by its stored value alone. The automatic window's percentiles come from the
    frame's histogram, padding values excluded (unless every pixel is padding), which is the
    sample ``np.percentile`` was given before.
    """
    index = _indices(stored)
    domain = np.arange(1 << (8 * index.dtype.itemsize), dtype=index.dtype).view(stored.dtype)
    counts = histogram(stored)
    mask = padding_mask(ds, domain)
    values = modality_lut(ds, domain)
    window_counts = counts if mask is None else np.where(mask, 0, counts)
    if not window_counts.any():
        window_counts = counts

    def auto_window() -> tuple[float, float]:
        lo, hi = weighted_percentiles(values, window_counts, AUTO_WINDOW_PERCENTILES)
        return lo, hi

    shown = _voi(ds, values, auto_window)
    if needs_inversion(ds):
        shown = 1.0 - shown
    if mask is not None:
        shown = np.where(mask, 0.0, shown)
    if not np.isfinite(shown[counts > 0]).all():
        raise DecodeError("pixel values are not finite after the LUTs")
    table: FloatImage = shown * 255.0
    return table


def reduction(rows: int, cols: int) -> int:
    """The integer factor a frame is reduced by for display: 1 up to DISPLAY_MAX_PIXELS."""
    return max(1, math.ceil(math.sqrt(rows * cols / DISPLAY_MAX_PIXELS)))


def apply_table(table: FloatImage, stored: NDArray[Any]) -> DisplayImage:
    """``table[stored]`` as float32, strip by strip (never an int64 or float64 copy of the
    frame), reduced by :func:`reduction` (mean of f x f blocks)."""
    lut = table.astype(np.float32)
    index = _indices(stored)
    rows, cols = index.shape
    f = reduction(rows, cols)
    if f == 1:
        out = np.empty((rows, cols), np.float32)
        for strip in _strips(rows, cols):
            np.take(lut, index[strip], out=out[strip])
        return out
    h, w = rows // f, cols // f
    out = np.empty((h, w), np.float32)
    for strip in _strips(h, cols, f):
        block = np.take(lut, index[strip.start * f:strip.stop * f, :w * f])
        out[strip] = block.reshape(-1, f, w, f).mean(axis=(1, 3), dtype=np.float64)
    return out


@_decode_errors
def display_image(ds: Dataset, limits: Limits | None = None) -> DisplayImage:
    """The radiograph as a radiologist would see it: [0, 255], bone bright, padding black;
    float32, reduced when it has more than DISPLAY_MAX_PIXELS (see the module docstring)."""
    stored = stored_pixels(ds, limits)
    return apply_table(display_table(ds, stored), stored)
