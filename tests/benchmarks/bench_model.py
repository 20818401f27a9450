"""Model benchmark: training time per epoch; inference images/s for batch 1 and 16 with Keras
``predict`` and with the served runtime (TFLite via LiteRT), and their ratio; time from
process start to the first score and peak memory of each runtime. Prints; asserts nothing.

    python tests/benchmarks/bench_model.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SAMPLE = REPO / "sample_dicom" / "cr_pa_normal_12bit.dcm"

COLD_KERAS = """
import time, json, resource; t0 = time.perf_counter()
import numpy as np, keras
from cxr_worker.model import card
from cxr_worker.score import SHIPPED_MODEL_DIR
from cxr_worker.decode import model_input, read_file
c = card.load_card(SHIPPED_MODEL_DIR)
m = keras.models.load_model(card.verify_file(SHIPPED_MODEL_DIR, card.KERAS_FILE, c))
p = float(m.predict(model_input(read_file({path!r}))[None], verbose=0)[0, 0])
print(json.dumps({{"seconds": time.perf_counter() - t0, "p": p,
  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
COLD_TFLITE = """
import time, json, resource; t0 = time.perf_counter()
from cxr_worker.score import Scorer
from cxr_worker.decode import model_input, read_file
s = Scorer(); p = s.score(model_input(read_file({path!r}))).probability
print(json.dumps({{"seconds": time.perf_counter() - t0, "p": p,
  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def cold(code: str) -> dict[str, float]:
    # process start included: time the interpreter launch too
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code.format(path=str(SAMPLE))],
                         capture_output=True, text=True, check=True).stdout
    res: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def rate(fn, batch: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return batch * repeats / (time.perf_counter() - t)


def main() -> None:
    import numpy as np

    print("cold start (process start -> first score of a 1536x1280 CR):")
    k, t = cold(COLD_KERAS), cold(COLD_TFLITE)
    for name, r in (("Keras", k), ("TFLite (served)", t)):
        print(f"  {name:<16} {r['wall_seconds']:.2f} s, peak RSS {r['peak_mb']:.0f} MB, "
              f"p={r['p']:.6f}")
    print(f"  ratio Keras/TFLite: {k['wall_seconds'] / t['wall_seconds']:.1f}x time, "
          f"{k['peak_mb'] / t['peak_mb']:.1f}x memory")

    import keras

    from cxr_worker.model import card
    from cxr_worker.score import SHIPPED_MODEL_DIR, Scorer

    c = card.load_card(SHIPPED_MODEL_DIR)
    model = keras.models.load_model(card.verify_file(SHIPPED_MODEL_DIR, card.KERAS_FILE, c))
    scorer = Scorer()
    rng = np.random.default_rng(0)
    x16 = rng.uniform(0, 255, (16, 224, 224, 3)).astype(np.float32)
    print("inference, images/s (shipped model, 224x224):")
    results = {}
    for batch in (1, 16):
        xb = x16[:batch]
        kr = rate(lambda xb=xb: model.predict(xb, verbose=0), batch, max(5, 40 // batch))
        tr = rate(lambda xb=xb: [scorer.score(x) for x in xb], batch, max(5, 200 // batch))
        results[batch] = (kr, tr)
        print(f"  batch {batch:>2}: Keras predict {kr:7.1f}  TFLite {tr:7.1f}  "
              f"ratio {tr / kr:5.1f}x")

    print("training time per epoch (4449 training images, batch 32, 140 steps):")
    from cxr_worker.model.architecture import build_model

    m = build_model(0.5, None)  # the time per step does not depend on the weights' values
    xs = rng.uniform(0, 255, (32 * 4, 224, 224, 3)).astype(np.float32)
    ys = rng.integers(0, 2, len(xs)).astype(np.float32)
    for stage in ("head only", "fine-tune"):
        m.get_layer("mobilenetv2").trainable = stage == "fine-tune"
        if stage == "fine-tune":
            for layer in m.get_layer("mobilenetv2").layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        m.compile(keras.optimizers.Adam(1e-4), "binary_crossentropy")
        m.fit(xs[:32], ys[:32], batch_size=32, verbose=0)
        t0 = time.perf_counter()
        m.fit(xs, ys, batch_size=32, verbose=0)
        per_step = (time.perf_counter() - t0) / 4
        print(f"  {stage:<10} {per_step * 140:.0f} s/epoch (measured {per_step:.2f} s/step; "
              "augmentation not included)")
    print(f"  shipped model's card: {c['training']['seconds_per_epoch']} s per epoch, "
          f"{c['training']['seconds_total']} s in all")
    print(f"peak RSS of this benchmark process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
