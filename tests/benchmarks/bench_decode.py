"""Decode time per transfer syntax: the whole frame against the reduced decode (issue 12).

Prints figures; asserts nothing (the scores are checked in tests/test_reduced_decode.py). One
held-out validation image from tests/data, upsampled to a detector's 2500 x 2048 at 12 bits
(10 MB uncompressed) with detector-like noise, written in each transfer syntax. For each, N
runs of each way, interleaved (full, service, score, full, ...) so that a busy machine slows
them alike; median [min-max] in ms of:

- decode+prepare: ``decode.display_image`` on the read data set, then ``Scorer.prepare`` (the
  pipeline's "decode" stage);
- SC render: the Secondary Capture's picture drawn from that display image (``report.render``:
  the downscale to 1024 px and the banner);
- time-to-score: from the file on disk: ``decode.read_file``, decode+prepare, the score.

Ways: ``full`` (``need=None``: the whole frame, as before), ``service``
(``decode.FOR_SCORE_AND_REPORT``: what the pipeline, ``score`` and ``calibrate`` use), ``score``
(``decode.FOR_SCORE``: the model's floor alone).

    python tests/benchmarks/bench_decode.py [--n 7] [--syntaxes jpeg2000-lossless,rle]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "sample_dicom"))

from conftest import kermany_files  # noqa: E402
from make_samples import upsample  # noqa: E402
from test_decode import ENCODINGS  # noqa: E402

from cxr_worker import decode, report  # noqa: E402
from cxr_worker.model.preprocess import load_grey_image  # noqa: E402
from cxr_worker.score import Scorer  # noqa: E402

SHAPE = (2500, 2048)
DEFAULT = ("explicit-vr-le", "deflated", "jpeg-baseline-8bit", "jpeg-extended-12bit",
           "jpeg-lossless-sv1", "jpeg-ls-lossless", "jpeg2000-lossless", "jpeg2000-lossy-20to1",
           "rle")
WAYS: dict[str, decode.Need | None] = {"full": None, "service": decode.FOR_SCORE_AND_REPORT,
                                       "score": decode.FOR_SCORE}


def ms(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return 1000 * (time.perf_counter() - t), out


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} [{min(values):.1f}-{max(values):.1f}]"


def bench(path: Path, scorer: Scorer, n: int) -> dict[str, tuple[str, dict[str, list[float]]]]:
    """way -> (display size, {"dp": decode+prepare, "sc": SC render, "tts": time-to-score})."""
    ds = decode.read_file(path)
    lines = ["banner", "population", "probability", "model", "disclaimer"]
    out: dict[str, tuple[str, dict[str, list[float]]]] = {}
    for _ in range(n):
        for way, need in WAYS.items():
            def stage(need: decode.Need | None = need) -> object:
                shown = decode.display_image(ds, need=need)
                scorer.prepare(shown)
                return shown

            took, display = ms(stage)
            assert isinstance(display, np.ndarray)

            def to_score(need: decode.Need | None = need) -> object:
                shown = decode.display_image(decode.read_file(path), need=need)
                return scorer.score(scorer.prepare(shown))

            _, times = out.setdefault(way, ("x".join(map(str, display.shape)),
                                              {"dp": [], "sc": [], "tts": []}))
            times["dp"].append(took)
            times["sc"].append(ms(lambda d=display: report.render(d, lines, True))[0])
            times["tts"].append(ms(to_score)[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--syntaxes", default=",".join(DEFAULT))
    args = ap.parse_args()
    wanted = args.syntaxes.split(",")
    scorer = Scorer()
    scorer.warm_up()
    grey = upsample(load_grey_image(kermany_files("PNEUMONIA", 1, 1)[0]), *SHAPE)
    grey = np.clip(grey + np.random.default_rng(0).normal(0, 1.5, SHAPE).astype(np.float32),
                   0, 255)
    print(f"{SHAPE[0]} x {SHAPE[1]}, 12 bits, n = {args.n} per way, load average "
          f"{os.getloadavg()[0]:.2f}; ms, median [min-max]")
    print(f"{'syntax':26} {'way':8} {'display':>9} {'decode+prepare':>22} {'SC render':>20} "
          f"{'time-to-score':>22}")
    with tempfile.TemporaryDirectory() as tmp:
        for enc in ENCODINGS:
            if enc.name not in wanted:
                continue
            out = Path(tmp) / enc.name
            out.mkdir()
            path, _ = enc.build(grey, out)
            label = f"{enc.name} ({path.stat().st_size / 1e6:.1f} MB)"
            for way, (size, t) in bench(path, scorer, args.n).items():
                print(f"{label if way == 'full' else '':26} {way:8} {size:>9} "
                      f"{fmt(t['dp']):>22} {fmt(t['sc']):>20} {fmt(t['tts']):>22}")


if __name__ == "__main__":
    main()
