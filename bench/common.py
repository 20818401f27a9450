"""Paths, the helpers reused from tests/conftest.py, and the statistics the report prints.

Importing this module puts ``tests/`` and ``sample_dicom/`` on ``sys.path`` (conftest's
``Orthanc``, ``Worker``, ``worker_env``...; make_samples' ``upsample`` and ``wrap``).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# the code measured: this checkout, or a snapshot of a commit (``run.py --source REV``, which
# sets this variable and PYTHONPATH, and runs every child from a scratch folder)
SOURCE = Path(os.environ.get("CXR_BENCH_SOURCE") or REPO)
TESTS = SOURCE / "tests"
SAMPLES = SOURCE / "sample_dicom"
for _p in (*([SOURCE] if SOURCE != REPO else []), TESTS, SAMPLES):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from conftest import (  # noqa: E402
    DCMTK_ENV,
    KERMANY,
    Orthanc,
    Worker,
    free_port,
    need,
    wait_until,
    worker_env,
)

__all__ = [
    "BENCH",
    "DCMTK_ENV",
    "KERMANY",
    "REPO",
    "SOURCE",
    "Orthanc",
    "Summary",
    "Worker",
    "free_port",
    "log",
    "need",
    "percentile",
    "summarize",
    "wait_until",
    "worker_env",
]

_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr (the report itself goes to stdout)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; ``inf`` values (a
    result that never arrived) sort last."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    if math.isinf(xs[hi]) or math.isinf(xs[lo]):
        return xs[hi] if pos > lo else xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Summary:
    """Median, p95 and range of some values; a missing value counts as ``inf``."""

    n: int
    missing: int
    p50: float
    p95: float
    lo: float
    hi: float

    def as_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def summarize(values: list[float], missing: int = 0) -> Summary:
    xs = [*values, *([math.inf] * missing)]
    if not xs:
        return Summary(0, 0, math.nan, math.nan, math.nan, math.nan)
    return Summary(len(xs), missing, percentile(xs, 50), percentile(xs, 95), min(xs), max(xs))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan
