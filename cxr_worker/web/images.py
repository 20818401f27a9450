"""The pixels the web worklist shows: an image's thumbnail and its heatmap, as PNG.

The two endpoints (``/api/v1/instances/{sop}/thumbnail.png`` and ``.../heatmap.png``) read
through :func:`thumbnail_png` and :func:`heatmap_png` only, so what they show is decided here:

- thumbnail: the received (spooled) image as a radiologist sees it (``decode.display_image``:
  LUTs, window, inversion), downscaled to at most ``size`` pixels a side;
- heatmap: the same radiograph under the image's Grad-CAM heatmap, which the pipeline keeps
  beside its result (:func:`heatmap_file`: ``results/<study>/<sop>.heatmap.png``, 8-bit grey
  in the frame of the squashed model input, so stretched over the whole radiograph), drawn
  by :func:`cxr_worker.report.overlay_png`, the overlay of the Secondary Capture (one
  drawing: same colours, same opacity).
  No heatmap file (not scored, ``[report] heatmap = false``, a model without heatmap outputs,
  an image scored before heatmaps existed): :class:`UnavailableError`, the API answers 404.

Decoding a 2500x2048 radiograph takes 0.1-0.3 s and ~100 MB: at most :data:`MAX_RENDERING`
run at once, and the last :data:`CACHE_ENTRIES` PNGs are kept in memory (keyed by the
files' paths, sizes and modification times, so a replaced file is never shown stale).
Nothing is written to disk (``cxr-worker web`` may run on a host that only reads).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from cxr_worker.errors import CxrWorkerError
from cxr_worker.spool import heatmap_path_for

MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 64, 1024, 256
MAX_RENDERING = 2
CACHE_ENTRIES = 256

_render_slots = threading.BoundedSemaphore(MAX_RENDERING)
_cache: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
_cache_lock = threading.Lock()


class UnavailableError(Exception):
    """No such picture (the reason is for the API's 404, and names no patient data)."""


def heatmap_file(result_path: str | None) -> Path | None:
    """Where an image's heatmap is kept: beside its result, ``<sop>.dcm`` ->
    ``<sop>.heatmap.png`` (:func:`cxr_worker.spool.heatmap_path_for`); None when the image
    has no result."""
    return heatmap_path_for(result_path) if result_path else None


def has_heatmap(result_path: str | None) -> bool:
    path = heatmap_file(result_path)
    return path is not None and path.is_file()


def _stamp(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise UnavailableError("the image file is no longer kept (retention) or not on this host"
                          ) from exc
    return str(path), st.st_size, st.st_mtime_ns


def _cached(key: tuple[object, ...]) -> bytes | None:
    with _cache_lock:
        png = _cache.get(key)
        if png is not None:
            _cache.move_to_end(key)
        return png


def _keep(key: tuple[object, ...], png: bytes) -> None:
    with _cache_lock:
        _cache[key] = png
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)


def _display(spool_path: str) -> NDArray[np.floating]:
    from cxr_worker import decode

    try:
        return decode.display_image(decode.read_file(spool_path),
                                    need=decode.FOR_SCORE_AND_REPORT)  # <= 1024 px shown
    except CxrWorkerError as exc:
        raise UnavailableError("the image cannot be shown (it could not be decoded)") from exc


def _overlay_png(display: NDArray[np.floating], heat: NDArray[np.uint8] | None,
                 size: int) -> bytes:
    from cxr_worker import report  # highdicom: not needed until a picture is asked for

    return report.overlay_png(display, heat, max_side=size)


def thumbnail_png(spool_path: str, size: int = DEFAULT_SIZE) -> bytes:
    """The received image, at most ``size`` pixels a side."""
    if not spool_path:
        raise UnavailableError("the image file is no longer kept")
    key = ("thumbnail", *_stamp(Path(spool_path)), size)
    png = _cached(key)
    if png is None:
        with _render_slots:
            png = _overlay_png(_display(spool_path), None, size)
        _keep(key, png)
    return png


def heatmap_png(spool_path: str, result_path: str | None, size: int = DEFAULT_SIZE) -> bytes:
    """The received image under its heatmap, at most ``size`` pixels a side."""
    heat_path = heatmap_file(result_path)
    if heat_path is None or not heat_path.is_file():
        raise UnavailableError("no heatmap for this image (not scored, or scored without one)")
    if not spool_path:
        raise UnavailableError("the image file is no longer kept")
    key = ("heatmap", *_stamp(Path(spool_path)), *_stamp(heat_path), size)
    png = _cached(key)
    if png is None:
        with _render_slots:
            try:
                with Image.open(heat_path) as im:
                    heat = np.asarray(im.convert("L"), dtype=np.uint8)
                png = _overlay_png(_display(spool_path), heat, size)
            except (OSError, ValueError) as exc:
                raise UnavailableError("the heatmap file cannot be read") from exc
        _keep(key, png)
    return png
