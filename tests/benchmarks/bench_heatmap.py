"""Scoring + heatmap time per image, and the Secondary Capture with and without the overlay.

Prints figures; asserts nothing. On held-out images from tests/data, as display images of a
given size (the decode stage's output), with the served scorer (2 threads, as the service):

- score alone: the networks' inference (one per member) and calibration;
- score + heatmap: the same inference keeping the feature map, then Grad-CAM in NumPy;
- + overlay: the heatmap drawn over the radiograph downscaled to the SC's 1024 px;
- the report stage's Secondary Capture build without and with the heatmap, the persisted
  8-bit PNG and the web page's overlay PNG and thumbnail.

The load average is printed: on a shared machine the medians move with it.

    python tests/benchmarks/bench_heatmap.py [--n 20] [--size 2048x1700] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "sample_dicom"))

from conftest import kermany_files, reread  # noqa: E402
from make_samples import upsample, wrap  # noqa: E402

from cxr_worker import decode, report  # noqa: E402
from cxr_worker.labels import Label, Population  # noqa: E402
from cxr_worker.model import heatmap as cam  # noqa: E402
from cxr_worker.model.preprocess import load_grey_image  # noqa: E402
from cxr_worker.score import Scorer  # noqa: E402

CFG = report.ReportConfig("1.2.826.0.1.3680043.10.1187.", 9901, "cxr-worker")


def timed(fn: Callable[[int], object], n: int, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            out.append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", default="2048x1700", help="display image rows x columns")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows, cols = (int(v) for v in args.size.split("x"))

    scorer = Scorer(num_threads=2)
    scorer.warm_up()
    half = max(1, args.n // 2)
    paths = kermany_files("NORMAL", half) + kermany_files("PNEUMONIA", half)
    sources = [reread(wrap(upsample(load_grey_image(p), rows, cols), bits_stored=12,
                           window=True, seed=p.name)) for p in paths]
    displays = [decode.display_image(s) for s in sources]
    prepared = [scorer.prepare(d) for d in displays]
    n = len(paths)
    heats = [scorer.score_and_heatmap(x)[1] for x in prepared]
    greys = [report._grey_image(d, report.MAX_SIDE) for d in displays]

    def score_heat(i: int) -> object:
        prepared[i].features.clear()  # nothing kept from an earlier inference
        return scorer.score_and_heatmap(prepared[i])

    def score_heat_overlay(i: int) -> object:
        score, heat = scorer.score_and_heatmap(prepared[i])
        assert heat is not None
        return score, report.overlay(greys[i], heat)

    kw = {"probability": 0.9, "label": Label.SUSPECTED, "threshold": 0.5,
          "model_version": scorer.model_version, "cfg": CFG, "population": Population.IN,
          "population_text": "IN VALIDATED POPULATION (age 3 years; validated 1-5 years)"}
    figures: dict[str, list[float]] = {}
    figures["prepare (squash to 224; decode stage)"] = timed(
        lambda i: scorer.prepare(displays[i]), n, args.repeats)
    figures["score alone"] = timed(lambda i: scorer.score(prepared[i]), n, args.repeats)
    figures["score + heatmap (one inference)"] = timed(score_heat, n, args.repeats)
    figures["score + heatmap + overlay (1024 px)"] = timed(
        lambda i: (prepared[i].features.clear(), score_heat_overlay(i)), n, args.repeats)
    figures["heatmap alone (NumPy, kept features)"] = timed(
        lambda i: scorer.heatmap(prepared[i]), n, args.repeats)
    figures["persisted 8-bit PNG"] = timed(lambda i: cam.png_bytes(heats[i]), n, args.repeats)
    figures["SC build without heatmap"] = timed(
        lambda i: report.build_secondary_capture(sources[i], displays[i], **kw), n, args.repeats)
    figures["SC build with heatmap"] = timed(
        lambda i: report.build_secondary_capture(sources[i], displays[i], heatmap=heats[i], **kw),
        n, args.repeats)
    figures["web overlay PNG (1024 px)"] = timed(
        lambda i: report.overlay_png(displays[i], heats[i]), n, 1)
    figures["web thumbnail PNG"] = timed(
        lambda i: report.thumbnail_png(displays[i], heats[i]), n, args.repeats)

    print(f"{n} images, display {rows}x{cols}, {scorer.model_version}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, times in figures.items():
        ms = sorted(times)
        print(f"  {name:40s} median {statistics.median(ms):7.2f} ms   "
              f"p95 {ms[int(0.95 * (len(ms) - 1))]:7.2f} ms")


if __name__ == "__main__":
    main()
