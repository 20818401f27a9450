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

Decoding only what is used (issue 12: JPEG 2000 decode was 435 ms of a 589-600 ms time-to-flag
for a 2500 x 2048 image). The model sees the image squashed to 224 x 224 and the Secondary
Capture draws it at 1024 px a side, so :func:`display_image` takes a :class:`Need`; the service
asks for :data:`FOR_SCORE_AND_REPORT` (both sides >= 448, twice the model input, so that the
squash still averages; the longer side >= 1024: the result looks as it always did):

- JPEG 2000 (lossless and lossy, Part 1) is decoded at the deepest resolution level that meets
  it (OpenJPEG's ``reduce``, through Pillow: pylibjpeg-openjpeg has no such option): 2500 x
  2048 at level 1, 1250 x 1024; the level is capped by the codestream's decomposition levels,
  and a frame the reduced decode cannot handle is decoded in full as before;
- 8-bit JPEG with a scaled inverse DCT (1/2, 1/4, 1/8: libjpeg-turbo through Pillow's draft
  mode). 12-bit JPEG (pylibjpeg-libjpeg cannot scale), JPEG lossless, JPEG-LS and RLE have no
  reduced decode (predictive or run-length codes): decoded in full;
- then every frame, native ones included, is reduced after the LUTs by the largest integer
  factor that still meets the need (block means, as above), and resampled where needed so that
  it spans exactly the frame (:func:`_whole_extent`). Reducing the stored values before the
  LUTs would change what a non-linear window or LUT gives and was no faster: a block sum of the
  uint16 frame took 70 ms, the table lookup and float32 block mean of the full frame 17-23 ms;
  the gain is downstream (the squash to 224 and the SC's downscale on 1/4 of the pixels).

The window and LUTs are those of the header, unchanged: the low-pass band of JPEG 2000 and the
scaled DCT keep the stored values' scale, and the automatic window's percentiles come from the
reduced image's histogram. Scores stay within 0.02 of the full decode's on the whole
transfer-syntax suite (tests/test_reduced_decode.py; figures there and in the README).
``need=None`` (the default) decodes the whole frame as before.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image, Jpeg2KImagePlugin
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
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
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
from cxr_worker.model.preprocess import INPUT_SIZE
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


# -- how much of the frame a caller needs ----------------------------------------------------
@dataclass(frozen=True)
class Need:
    """The least a caller needs of the display image: ``min_side`` pixels on both sides and
    ``min_long_side`` on the longer one. :func:`display_image` decodes (JPEG 2000, 8-bit
    JPEG) or reduces (every transfer syntax) the frame by the largest factor that keeps both.
    """

    min_side: int
    min_long_side: int = 0

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.min_long_side < 0:
            raise ValueError(f"{self}: min_side must be >= 1 and min_long_side >= 0")

    def fits(self, rows: int, cols: int) -> bool:
        return min(rows, cols) >= self.min_side and max(rows, cols) >= self.min_long_side


MODEL_SIDE = 2 * INPUT_SIZE
"""Both sides at least twice the model's 224 input (448): the squash to 224x224 (Pillow's
antialiased bilinear) still averages 2 x 2 source pixels or more per input pixel, so it filters
the same way as from the full frame; at 224 it would only interpolate."""
REPORT_SIDE = 1024
"""The longest side the Secondary Capture draws the radiograph at (``report.MAX_SIDE``; a test
checks they agree; the web page's largest picture is the same)."""
FOR_SCORE_AND_REPORT = Need(MODEL_SIDE, REPORT_SIDE)
"""What the service uses (the pipeline, and ``score`` and ``calibrate`` through
``assess.assess_file``, so that they give the service's scores): scoring and the Secondary
Capture, which shows the radiograph at the size it always had. A 2500 x 2048 frame is used at
1250 x 1024 (JPEG 2000 level 1); its score moved by at most 0.0033 from the full decode's
(tests/test_reduced_decode.py)."""
FOR_SCORE = Need(MODEL_SIDE)
"""The model's floor alone, for a caller that draws nothing: a 2500 x 2048 frame is used at
625 x 512 (JPEG 2000 level 2), 3-4x faster again for JPEG 2000, but its scores move more (at
most 0.017 from the full decode's on the same suite: the block means or the wavelet's
low-pass add to the squash's own filtering). Not used by the service."""


def need_factor(rows: int, cols: int, need: Need) -> int:
    """The largest integer factor f >= 1 such that (rows // f) x (cols // f) still meets
    ``need`` (a frame that does not meet it at full size is not reduced)."""
    f = min(rows, cols) // need.min_side
    if need.min_long_side:
        f = min(f, max(rows, cols) // need.min_long_side)
    return max(1, f)


def resolution_level(rows: int, cols: int, need: Need, deepest: int) -> int:
    """The largest r <= ``deepest`` such that a codec's image reduced by 2**r,
    ceil(rows / 2**r) x ceil(cols / 2**r), still meets ``need``; 0 when none does."""
    r = 0
    while r < deepest and need.fits(-(-rows // 2 ** (r + 1)), -(-cols // 2 ** (r + 1))):
        r += 1
    return r


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


def _check_frame(ds: Dataset, ts: UID, frames: int) -> bytes:
    """Declared against actual, before decoding: the first frame's codestream must describe
    Rows x Columns x Samples per Pixel (a decoder allocates what its codestream says).
    Returns the frame."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    if ts == RLELossless:
        if _plugin(ts) != "pylibjpeg":
            longest = max(rle_segment_lengths(frame), default=0)
            if longest > rows * cols + 1:  # one pad byte allowed
                raise DecodeError(f"an RLE segment decodes to {longest} bytes, the header "
                                  f"declares {rows} x {cols}: not decoded")
        return frame
    size = _codestream_size(ts, frame)
    if size is None:
        raise DecodeError(f"the frame's {ts.name} codestream header cannot be read (its "
                          "size is checked before decoding): not decoded")
    if size != (rows, cols, samples):
        raise DecodeError(
            f"the frame's {ts.name} codestream is {size[0]} x {size[1]} x {size[2]} "
            f"sample(s), the header declares {rows} x {cols} x {samples}: not decoded")
    return frame


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


# -- decoding at a reduced resolution ---------------------------------------------------------
# JPEG 2000 (Part 1, lossless and lossy): the codestream holds the image at every resolution
# level of its wavelet transform; OpenJPEG decodes up to level r only (``reduce``), skipping the
# code-blocks of the finer levels: the LL band of level r, the frame low-pass filtered and
# reduced by 2**r, at the scale of the stored values. pylibjpeg-openjpeg (2.6) has no such
# option; Pillow's JPEG 2000 plug-in (the same OpenJPEG) has. High-Throughput JPEG 2000 is not
# reduced: no encoder or sample here to test it with, so it is decoded in full as before.
_J2K_REDUCIBLE = (JPEG2000Lossless, JPEG2000)
# 8-bit JPEG (baseline, or extended at 8 bits): libjpeg(-turbo) scales the inverse DCT by 1/2,
# 1/4 or 1/8 (Pillow's ``draft``). 12-bit JPEG (pylibjpeg-libjpeg has no scaling), JPEG
# lossless, JPEG-LS and RLE are predictive or run-length codes with no reduced decode: they are
# decoded in full, then reduced after the LUTs (:func:`apply_table`).
_JPEG_REDUCIBLE = (JPEGBaseline8Bit, JPEGExtended12Bit)
_JPEG_DEEPEST = 3  # 1/8
_MARKER_SOT = 0x90  # start of tile-part: the end of a JPEG 2000 main header


class _Decoded(NamedTuple):
    stored: NDArray[Any]
    scale: int  # frame pixels per decoded pixel, a side
    lag: float  # the decoded samples' centres behind those of scale x scale blocks, in frame px


@dataclass(frozen=True)
class _J2KHeader:
    rows: int
    cols: int
    components: int
    precision: int  # of the first component
    signed: bool
    levels: int  # the fewest decomposition levels the main header gives any component
    origin: tuple[int, int]  # the image area's offset on the reference grid (YOsiz, XOsiz)


def _j2k_header(frame: bytes) -> _J2KHeader | None:
    """What a JPEG 2000 main header says (SIZ, COD, COC: ISO/IEC 15444-1 A.5.1, A.6.1, A.6.2),
    or None where it cannot be read; only a plain codestream (SOC first, as DICOM requires)."""
    if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 43:
        return None
    (lsiz, _, x, y, x0, y0, _, _, _, _, components) = struct.unpack(">HHLLLLLLLLH", frame[4:42])
    ssiz = frame[42]
    levels: int | None = None
    pos = 4 + lsiz
    while pos + 4 <= len(frame) and frame[pos] == 0xFF and frame[pos + 1] != _MARKER_SOT:
        length = struct.unpack(">H", frame[pos + 2:pos + 4])[0]
        if length < 2 or pos + 2 + length > len(frame):
            return None
        if frame[pos + 1] == 0x52 and length >= 8:  # COD: Scod, SGcod (4), SPcod: levels first
            levels = min(levels if levels is not None else 255, frame[pos + 9])
        elif frame[pos + 1] == 0x53:  # COC: Ccoc (1 or 2 bytes), Scoc, SPcoc: levels first
            at = pos + 4 + (1 if components < 257 else 2) + 1
            if at < pos + 2 + length:
                levels = min(levels if levels is not None else 255, frame[at])
        pos += 2 + length
    if levels is None:
        return None
    return _J2KHeader(y - y0, x - x0, components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels,
                      (y0, x0))


def _fallback(what: str, exc: BaseException) -> None:
    # the full decode follows; it says what is wrong with the frame, if anything is
    logger.warning("reduced %s decode failed (%s: %s); decoding at full resolution", what,
                   type(exc).__name__, str(exc)[:_REASON_MAX])


def _j2k_level(ds: Dataset, head: _J2KHeader | None, need: Need) -> int:
    """The resolution level to decode a JPEG 2000 frame at; 0 (decode it in full) where
    there is no level to skip or the codestream is unusual: pydicom's corrections for a
    precision or sign that differs from the header apply then."""
    if head is None or head.components != 1 or not 1 <= head.precision <= 16:
        return 0
    if head.precision != int(ds.get("BitsStored", 0) or 0) or head.signed != bool(
            int(ds.get("PixelRepresentation", 0) or 0)) or head.origin != (0, 0):
        return 0
    r = resolution_level(head.rows, head.cols, need, head.levels)
    while r and not (_pillow_side(head.rows, r) == -(-head.rows // 2**r)
                     and _pillow_side(head.cols, r) == -(-head.cols // 2**r)):
        r -= 1
    return r


def _pillow_side(side: int, r: int) -> int:
    """The side Pillow gives an image reduced by 2**r (``Jpeg2KImageFile.load``: rounded, not
    ceil as OpenJPEG decodes it): where they differ (a side of 4k + 1 at r = 2, ...) Pillow's
    decoder fails ("broken data stream"), so a level where they agree is used."""
    power = 1 << r
    return int((side + (power >> 1)) / power)


def _j2k_reduced(ds: Dataset, frame: bytes, need: Need) -> _Decoded | None:
    """The frame decoded at the resolution level ``need`` allows (:func:`_j2k_level`), as
    pydicom would give its stored values (the dtype follows the codestream's precision and
    sign); None where it cannot be (a failed decode included): decode it in full.

    Sample k of level r is the low-pass coefficient at position 2**r k of the frame (the
    wavelet keeps the even samples at each level), not the centre of a 2**r block: it lags
    (2**r - 1) / 2 frame pixels behind a block mean. Left so, the 224x224 input came out
    shifted by 1.5 frame pixels at r = 2 (mean 1.1 grey levels; a score moved by 0.021 on a
    borderline image); :func:`display_image` moves it back (:func:`_whole_extent`)."""
    head = _j2k_header(frame)
    r = _j2k_level(ds, head, need)
    if head is None or r == 0:
        return None
    expected = (-(-head.rows // 2**r), -(-head.cols // 2**r))
    try:
        with Image.open(io.BytesIO(frame), formats=("JPEG2000",)) as im:
            cast(Jpeg2KImagePlugin.Jpeg2KImageFile, im).reduce = r
            im.load()
            got: NDArray[Any] = np.asarray(im)
        if got.ndim != 2 or abs(got.shape[0] - expected[0]) > 1 or abs(
                got.shape[1] - expected[1]) > 1:
            raise ValueError(f"decoded shape {got.shape}, expected about {expected}")
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        _fallback("JPEG 2000", exc)
        return None
    # Pillow widens N-bit samples to 8 or 16 bits (shifted left) and level-shifts signed ones
    # (Jpeg2KDecode.c, j2ku_gray_l / j2ku_gray_i), as pydicom's Pillow plug-in undoes
    width = 8 if head.precision <= 8 else 16
    stored: NDArray[Any] = np.right_shift(got, width - head.precision).astype(
        f"u{width // 8}", copy=False)
    if head.signed:
        stored = (stored.astype(np.int32) - (1 << (head.precision - 1))).astype(
            f"i{width // 8}")
    return _Decoded(stored, 2**r, (2**r - 1) / 2)


def _jpeg_reduced(ds: Dataset, frame: bytes, need: Need) -> _Decoded | None:
    """An 8-bit grey JPEG frame decoded with its inverse DCT scaled down by 2, 4 or 8, as far
    as ``need`` allows; None where it cannot be: decode it in full. (A scaled inverse DCT
    gives each output pixel the centre of its part of the 8 x 8 block: no lag.)"""
    info = _get_jpg_parameters(frame)
    if not info or info.get("precision") != 8 or info.get("components") != 1:
        return None
    if int(ds.get("PixelRepresentation", 0) or 0):
        return None
    rows, cols = int(info["height"]), int(info["width"])
    r = resolution_level(rows, cols, need, _JPEG_DEEPEST)
    if r == 0:
        return None
    expected = (-(-rows // 2**r), -(-cols // 2**r))
    try:
        with Image.open(io.BytesIO(frame), formats=("JPEG",)) as im:
            # Pillow picks the largest scale s in 1, 2, 4, 8 with s <= side // asked side
            im.draft("L", (cols >> r, rows >> r))
            im.load()
            got: NDArray[Any] = np.asarray(im)
        if got.dtype != np.uint8 or got.shape != expected:
            raise ValueError(f"decoded {got.dtype} {got.shape}, expected uint8 {expected}")
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        _fallback("JPEG", exc)
        return None
    return _Decoded(got, 2**r, 0.0)


def _reduced(ds: Dataset, ts: UID, frame: bytes, need: Need) -> _Decoded | None:
    """The first frame decoded at a reduced resolution where its codec allows it, else None."""
    if ts in _J2K_REDUCIBLE:
        return _j2k_reduced(ds, frame, need)
    if ts in _JPEG_REDUCIBLE:
        return _jpeg_reduced(ds, frame, need)
    return None


@_decode_errors
def stored_pixels(ds: Dataset, limits: Limits | None = None) -> NDArray[Any]:
    """The first frame's stored values, decoded with the installed plug-ins, once the sizes
    are checked (:func:`check_decoded_size`, and declared against actual)."""
    return _stored_pixels(ds, limits, None).stored


def _stored_pixels(ds: Dataset, limits: Limits | None, need: Need | None) -> _Decoded:
    """:func:`stored_pixels`; with ``need``, at a reduced resolution where the codec allows
    (:func:`_reduced`): the same checks come first."""
    check_header(ds)
    check_decoded_size(ds, limits)
    ts = _transfer_syntax(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 1:
        raise DecodeError(f"Number of Frames {frames}")
    if not ts.is_encapsulated:
        _check_native_length(ds, frames)
    else:
        frame = _check_frame(ds, ts, frames)
        if need is not None and (reduced := _reduced(ds, ts, frame, need)) is not None:
            return reduced
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
    return _Decoded(arr.astype(arr.dtype.newbyteorder("="), copy=False), 1, 0.0)


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
    sample ``np.percentile`` was given before. The histogram (13-20 ms for 2500 x 2048) is
    only made when it is needed: for the automatic window, or to see whether a value that is
    not finite after the LUTs is one the frame holds.
    """
    index = _indices(stored)
    domain = np.arange(1 << (8 * index.dtype.itemsize), dtype=index.dtype).view(stored.dtype)
    mask = padding_mask(ds, domain)
    values = modality_lut(ds, domain)

    @functools.cache
    def counts() -> NDArray[np.int64]:
        return histogram(stored)

    def auto_window() -> tuple[float, float]:
        window_counts = counts() if mask is None else np.where(mask, 0, counts())
        if not window_counts.any():
            window_counts = counts()
        lo, hi = weighted_percentiles(values, window_counts, AUTO_WINDOW_PERCENTILES)
        return lo, hi

    shown = _voi(ds, values, auto_window)
    if needs_inversion(ds):
        shown = 1.0 - shown
    if mask is not None:
        shown = np.where(mask, 0.0, shown)
    finite = np.isfinite(shown)
    if not finite.all() and not finite[counts() > 0].all():
        raise DecodeError("pixel values are not finite after the LUTs")
    table: FloatImage = shown * 255.0
    return table


def reduction(rows: int, cols: int) -> int:
    """The integer factor a frame is reduced by for display: 1 up to DISPLAY_MAX_PIXELS."""
    return max(1, math.ceil(math.sqrt(rows * cols / DISPLAY_MAX_PIXELS)))


def apply_table(table: FloatImage, stored: NDArray[Any], factor: int = 1) -> DisplayImage:
    """``table[stored]`` as float32, strip by strip (never an int64 or float64 copy of the
    frame), reduced by ``factor`` or :func:`reduction`, whichever is larger (the mean of
    f x f blocks, summed in float32; the last partial row and column of blocks dropped)."""
    lut = table.astype(np.float32)
    index = _indices(stored)
    rows, cols = index.shape
    f = max(reduction(rows, cols), factor)
    if f == 1:
        out = np.empty((rows, cols), np.float32)
        for strip in _strips(rows, cols):
            np.take(lut, index[strip], out=out[strip])
        return out
    h, w = rows // f, cols // f
    out = np.empty((h, w), np.float32)
    for strip in _strips(h, cols, f):
        # the rows of each block added first (contiguous), then its columns (strided)
        block = np.take(lut, index[strip.start * f:strip.stop * f, :w * f])
        lines = block.reshape(-1, f, w * f)
        summed = lines[:, 0].copy()
        for i in range(1, f):
            summed += lines[:, i]
        columns = summed.reshape(-1, w, f)
        acc = out[strip]
        np.copyto(acc, columns[:, :, 0])
        for j in range(1, f):
            acc += columns[:, :, j]
        acc *= np.float32(1 / (f * f))
    return out


def _whole_extent(shown: DisplayImage, rows: int, cols: int, s: int, lag: float
                  ) -> DisplayImage:
    """``shown``, whose pixel k is centred ``lag`` frame pixels before the centre of the
    frame's k-th block of s pixels, resampled to round(rows / s) x round(cols / s) pixels
    that span the whole rows x cols frame (Pillow's bilinear over the matching box).

    Why: the model squashes whatever array it gets to 224x224, so its geometry must be the
    frame's. Blocks dropped at the end (2501 rows by 4: 625 blocks span 2500), a codec's
    partial last pixel (626 then span 2504) or the lag of JPEG 2000's low-pass samples (1.5
    frame pixels at r = 2) each shift the input by a fraction of its pixel; on a borderline
    image that moved the score by up to 0.02 (measured on the Kermany validation images).
    Returned as it is where the geometry is already the frame's (s divides both sides, no lag).
    """
    size = (max(1, round(cols / s)), max(1, round(rows / s)))
    box = (lag / s, lag / s, (cols + lag) / s, (rows + lag) / s)
    h, w = shown.shape
    if (rows, cols) == (h * s, w * s):  # the extent is right: at most the lag to undo
        if lag:
            _shift(shown, lag / s)
        return shown
    # the box may pass the last row or column (a dropped partial block, the lag): by less than
    # 1.5 pixels; that edge is repeated, as Pillow will not read past the image
    over = (max(0, math.ceil(box[3] - h)), max(0, math.ceil(box[2] - w)))
    if any(over):
        shown = np.pad(shown, ((0, over[0]), (0, over[1])), mode="edge")
    img = Image.fromarray(shown).resize(size, Image.Resampling.BILINEAR, box=box)
    return np.array(img, dtype=np.float32)


def _shift(img: DisplayImage, t: float) -> None:
    """``img`` moved up and left by ``t`` (< 1) of its pixel, in place: each value becomes
    the linear interpolation at (i + t, j + t), the last row and column keeping theirs (what
    Pillow's bilinear gives over a box shifted by ``t``, at a third of its cost)."""
    for axis in (0, 1):
        if img.shape[axis] > 1:
            head = (slice(None, -1),) if axis == 0 else (slice(None), slice(None, -1))
            tail = (slice(1, None),) if axis == 0 else (slice(None), slice(1, None))
            ahead = img[tail] * np.float32(t)
            img[head] *= np.float32(1 - t)
            img[head] += ahead


@_decode_errors
def display_image(ds: Dataset, limits: Limits | None = None, *, need: Need | None = None
                  ) -> DisplayImage:
    """The radiograph as a radiologist would see it: [0, 255], bone bright, padding black;
    float32, reduced when it has more than DISPLAY_MAX_PIXELS (see the module docstring).

    ``need`` (:data:`FOR_SCORE`, :data:`FOR_SCORE_AND_REPORT`): only that much resolution is
    made. A JPEG 2000 or 8-bit JPEG frame is decoded at the reduced resolution its codec gives
    (by 2, 4, 8, ...); any frame is then reduced after the LUTs by the integer factor that
    still meets ``need`` (:func:`need_factor`). None: the full frame.
    """
    decoded = _stored_pixels(ds, limits, need)
    stored = decoded.stored
    if need is None:
        return apply_table(display_table(ds, stored), stored)
    rows, cols = stored.shape
    f = max(reduction(rows, cols), need_factor(rows, cols, need))
    shown = apply_table(display_table(ds, stored), stored, f)
    s = decoded.scale * f
    return _whole_extent(shown, int(ds.Rows), int(ds.Columns), s, decoded.lag)
