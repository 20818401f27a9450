"""Serving runtime: the TensorFlow Lite (LiteRT) interpreter, without importing TensorFlow.

Keras ``predict`` costs ~57 ms per single image on the 2-core CPU; the same network as a float32
TFLite flatbuffer runs in a few ms, with outputs equal to 1e-6, and the process skips the
TensorFlow import (seconds, hundreds of MB). The service scores one image at a time.

LiteRT's C++ code prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." straight to
file descriptor 2 when an interpreter is set up; :func:`_native_stderr_logged` catches that
output and passes it to Python logging (DEBUG), so logs stay one format (text or JSON).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)


@contextmanager
def _native_stderr_logged() -> Iterator[None]:
    """Send what native code writes to fd 2 meanwhile to a file, then log it: ``INFO:`` lines
    at DEBUG, others at WARNING (all at DEBUG when the block raises: the error says it).
    Process-wide while it lasts, so used only while an interpreter is created (start-up)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to keep clean
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            for line in filter(str.strip, text.splitlines()):
                quiet = failed or line.startswith("INFO:")
                logger.log(logging.DEBUG if quiet else logging.WARNING, "LiteRT: %s", line)


class TFLiteScorer:
    """One interpreter, one image at a time (calls are serialised: the interpreter is stateful)."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        with _native_stderr_logged():
            self._interp = Interpreter(model_path=str(path), num_threads=num_threads)
            self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]["index"]
        outputs = self._interp.get_output_details()
        # the probability is the one-value output; a second, 4-D output is the feature map
        # that Grad-CAM needs (cxr_worker.model.heatmap), absent from older model files
        probs = [d for d in outputs if int(np.prod(d["shape"])) == 1]
        maps = [d for d in outputs if len(d["shape"]) == 4]
        if len(probs) != 1 or len(outputs) != 1 + len(maps) or len(maps) > 1:
            raise ValueError(f"{Path(path).name}: expected a probability output and at most "
                             f"one feature-map output, got shapes "
                             f"{[tuple(d['shape']) for d in outputs]}")
        self._out = probs[0]["index"]
        self._features: int | None = maps[0]["index"] if maps else None
        self._lock = threading.Lock()

    @property
    def has_features(self) -> bool:
        """Whether the file has the feature-map output (a heatmap can be computed)."""
        return self._features is not None

    def predict(self, x: NDArray[np.float32]) -> float:
        """Probability of pneumonia for one (224, 224, 3) float32 input."""
        return self.predict_with_features(x)[0]

    def predict_with_features(self, x: NDArray[np.float32]
                              ) -> tuple[float, NDArray[np.float32] | None]:
        """The probability and (a copy of) the feature map (H, W, C) from one invocation;
        None for the map when the file has no such output."""
        with self._lock:
            self._interp.set_tensor(self._in, np.ascontiguousarray(x[None], dtype=np.float32))
            self._interp.invoke()
            p = float(self._interp.get_tensor(self._out).ravel()[0])
            feats = None if self._features is None else self._interp.get_tensor(self._features)[0]
            return p, feats
