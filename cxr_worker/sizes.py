"""Size limits of one image (``[limits]``) and bounded inflation of deflated data sets.

Shared by the listener (:mod:`cxr_worker.receive`, which refuses with a DICOM status before
anything is written) and the decoder (:mod:`cxr_worker.decode`, for files the listener did not
bound: replay, ``score``, a limit lowered since), so that neither stage imports the other; like
:mod:`cxr_worker.errors`, it imports no stage. Issue 10: an 8192 x 8192 16-bit RLE image in a
2 MB file took the worker to 1.9 GB, a 0.9 MB deflated data set inflating to 512 MB to 1.3 GB.

Defaults: 64 MiB data set, 64 MiB decoded, 80 MiB inflated. Sized for chest radiographs (a 43 x
43 cm detector at 100 um is 4300 x 4300 at 16 bits, 37 MB) with room for 64 MiB (5792 x 5792
at 16 bits): scored at a peak of 414 MB for the whole worker, under the issue's 600 MB goal.
The inflated limit is the decoded one plus 16 MiB for the rest of a data set (overlays,
private data).

- ``max_dataset_bytes``: a received data set (or a file read later, plus 1 MiB for the
  preamble and file meta);
- ``max_decoded_bytes``: Rows x Columns x Samples per Pixel x Number of Frames x Bits
  Allocated / 8 as the header declares it (:func:`check_decoded_size`), before decoding;
- ``max_inflated_bytes``: a Deflated Explicit VR Little Endian data set, inflated here piece
  by piece (:class:`InflatingReader`), never whole by pydicom.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from cxr_worker.errors import LimitExceededError

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """The ``[limits]`` settings (defaults equal the settings' defaults; a test checks).

    Process-wide (:func:`set_limits`, called by the composition root,
    ``compose.build_pipeline``): the pipeline and ``score`` call
    :func:`cxr_worker.decode.read_file` and :func:`cxr_worker.decode.display_image` without
    them; the listener gets them explicitly (``receive.handlers``).
    """

    max_dataset_bytes: int = 64 * MiB
    max_decoded_bytes: int = 64 * MiB
    max_inflated_bytes: int = 80 * MiB


class _Process:
    limits = Limits()


def set_limits(limits: Limits) -> None:
    """Use ``limits`` from now on in this process (``service`` does it from the settings)."""
    _Process.limits = limits


def current_limits() -> Limits:
    return _Process.limits


class InflatingReader:
    """A Deflated Explicit VR Little Endian data set (PS3.5 A.5) as a read-only stream,
    inflated as it is read and never past ``limit`` bytes.

    Why: pydicom inflates the whole stream at once (``zlib.decompress``) before it reads an
    element, and the listener's ``event.dataset`` does the same: 0.9 MB became 512 MB. Here
    the output is made 64 KiB at a time (``decompressobj`` with ``max_length``), so the count
    is checked before the bytes exist; :class:`LimitExceededError` once it passes ``limit``.
    Only what is read is kept, plus a window of :data:`WINDOW` bytes behind the position for
    pydicom's short backward seeks; a forward seek (a value pydicom defers) inflates and drops
    what it skips. ``read_dataset`` needs no more: ``read``, ``seek`` and ``tell``.

    Memory: the listener defers large values, so it holds the window only;
    :func:`cxr_worker.decode.read_file` reads every value (the pipeline needs Pixel Data), so
    a value being read is held whole, never more than ``limit`` bytes (a bomb is refused with
    at most ``limit`` inflated; one pass, rather than counting first and inflating again for
    every honest deflated image).
    """

    CHUNK = 1 << 16
    WINDOW = 1 << 16
    SETTING = "limits.max_inflated_bytes"

    def __init__(self, source: Iterable[bytes | memoryview], limit: int) -> None:
        self._source: Iterator[bytes | memoryview] = iter(source)
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.limit = limit
        self._buf = bytearray()
        self._start = 0  # offset of _buf[0] in the inflated stream
        self._pos = 0
        self._done = False

    @property
    def inflated(self) -> int:
        """Bytes inflated so far."""
        return self._start + len(self._buf)

    def _more(self) -> bool:
        """Inflate the next piece; False at the end of the deflate stream."""
        if self._done:
            return False
        data: bytes | memoryview = self._z.unconsumed_tail
        if not data and not self._z.eof:
            data = next(self._source, b"")
        if self._z.eof:
            self._done = True
            return False
        room = min(self.limit + 1 - self.inflated, self.CHUNK)  # >= 1: 0 means unlimited
        out = self._z.decompress(data, room)
        if not data and not out:
            raise zlib.error("incomplete or truncated deflate stream")
        self._buf += out
        if self.inflated > self.limit:
            raise LimitExceededError(
                self.SETTING, f"the deflated data set inflates to more than {self.limit} bytes "
                f"({self.SETTING}): not read further")
        self._trim()
        return True

    def _trim(self) -> None:
        cut = min(self._pos - self.WINDOW - self._start, len(self._buf))
        if cut >= self.CHUNK:
            del self._buf[:cut]
            self._start += cut

    def read(self, size: int | None = -1) -> bytes:
        want = None if size is None or size < 0 else size
        end = math.inf if want is None else self._pos + want
        while self.inflated < end and self._more():
            pass
        a = self._pos - self._start
        b = len(self._buf) if want is None else a + want
        with memoryview(self._buf) as view:  # one copy, not a bytearray slice and then bytes
            out = bytes(view[a:b])
        self._pos += len(out)
        self._trim()
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self.finish()
            target = self.inflated + offset
        else:
            target = offset + (self._pos if whence == 1 else 0)
        if target < self._start:
            # ValueError, not OSError: the file's fault, not the disk's
            raise ValueError(f"cannot seek back to {target} in a deflated stream (window "
                             f"from {self._start})")
        self._pos = target
        while self.inflated < target and self._more():
            pass
        return self._pos

    def finish(self) -> int:
        """Inflate (and drop) the rest; the inflated size. Raises as :meth:`read` does."""
        while self._more():
            self._pos = max(self._pos, self.inflated - self.WINDOW)
        return self.inflated


def _chunks(data: bytes, size: int = InflatingReader.CHUNK) -> Iterator[memoryview]:
    view = memoryview(data)
    for i in range(0, len(view), size):
        yield view[i:i + size]


def read_deflated(compressed: bytes | Iterable[bytes | memoryview], limit: int,
                  defer_size: int | None = None) -> Dataset:
    """The data set of a Deflated Explicit VR Little Endian stream, inflated at most to
    ``limit`` bytes (:class:`LimitExceededError` beyond), the rest of the stream checked to
    its end. ``defer_size``: values larger are skipped, not kept (the listener reads only the
    header; Pixel Data is then present but not loaded)."""
    source = _chunks(compressed) if isinstance(compressed, bytes) else compressed
    reader = InflatingReader(source, limit)
    ds = read_dataset(reader, False, True, defer_size=defer_size)  # type: ignore[arg-type]
    reader.finish()
    return ds


def declared_decoded_bytes(ds: Dataset) -> tuple[int, str]:
    """The decoded size the header declares, in bytes, and how it was computed (sizes only:
    the text of the header is never quoted). Raises ValueError, TypeError or AttributeError
    on a missing or malformed value."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    total = (rows * cols * samples * max(frames, 1) * bits + 7) // 8
    return total, (f"{rows} x {cols} x {samples} sample(s) x {frames} frame(s) at {bits} "
                   "bits allocated")


def check_decoded_size(ds: Dataset, limits: Limits | None = None) -> None:
    """Refuse an image whose declared decoded size passes ``limits.max_decoded_bytes``,
    before any pixel is decoded (the listener calls it on the received header, the decoder
    before it decodes). A missing or malformed value raises what pydicom raises (ValueError,
    TypeError, AttributeError, ...): the decoder turns that into a DecodeError."""
    limit = (limits or current_limits()).max_decoded_bytes
    total, what = declared_decoded_bytes(ds)
    if total > limit:
        raise LimitExceededError(
            "limits.max_decoded_bytes", f"decoded size {total} bytes ({what}) is more than "
            f"limits.max_decoded_bytes ({limit} bytes): not decoded")
