"""Latency from the end of a C-STORE to the Secondary Capture stored in Orthanc.

Prints figures; asserts nothing. Sends N images one at a time with dcmtk storescu (one
association each, as a modality does), to a ``cxr-worker serve`` subprocess that forwards to an
Orthanc started here; for each image, the clock starts when storescu returns (the C-STORE
response was received) and stops when Orthanc's REST API lists the result's SOP Instance UID
(derived, so known in advance). As a peer figure in the same run, the same image is sent
straight to Orthanc with storescu (the receive cost the worker adds to).

    python tests/benchmarks/bench_latency.py [--n 20] [--size 2048x1700]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", default="2048x1700")
    args = ap.parse_args()
    rows, cols = map(int, args.size.split("x"))

    from pydicom import dcmread

    from cxr_worker.model import card
    from cxr_worker.report import result_sop_instance_uid
    from cxr_worker.score import SHIPPED_MODEL_DIR
    from cxr_worker.settings import Settings

    version = card.load_card(SHIPPED_MODEL_DIR)["model_version"]
    prefix = Settings().report.uid_prefix
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        files = _make_images(tmp, args.n, rows, cols)
        orthanc = Orthanc(tmp / "orthanc")
        orthanc.start()
        port = free_port()
        (tmp / "w").mkdir()
        worker = Worker(tmp / "w", port, worker_env(tmp / "w", port, orthanc))
        worker.start()
        try:
            # warm the whole path once
            warm = tmp / "warm.dcm"
            wds = dcmread(files[0])
            wds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242.99." + str(time.time_ns())
            wds.save_as(warm, enforce_file_format=True)
            _send(port, warm)
            warm_target = result_sop_instance_uid(prefix, str(wds.SOPInstanceUID), version)
            wait_until(lambda: orthanc.find_instance(warm_target), 60, "warm-up result")
            latencies, store_times, direct = [], [], []
            for f in files:
                sop = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                target = result_sop_instance_uid(prefix, sop, version)
                t0 = time.perf_counter()
                _send(port, f)
                t1 = time.perf_counter()
                wait_until(lambda t=target: orthanc.find_instance(t), 60, "result",
                           interval=0.005)
                t2 = time.perf_counter()
                store_times.append(t1 - t0)
                latencies.append(t2 - t1)
                t3 = time.perf_counter()
                _send(orthanc.dicom_port, f, aet=orthanc.aet)
                direct.append(time.perf_counter() - t3)
            wl_rows = worker.worklist()
        finally:
            worker.stop()
            orthanc.stop()
    _print(args.n, rows, cols, latencies=latencies, store_times=store_times, direct=direct,
           wl_rows=wl_rows)


def _print(n: int, rows: int, cols: int, *, latencies: list[float], store_times: list[float],
           direct: list[float], wl_rows: list[dict[str, str]]) -> None:
    ms = [x * 1000 for x in latencies]
    print(f"images: {n} x {rows}x{cols} 12-bit CR, explicit VR LE "
          f"({rows * cols * 2 / 1e6:.1f} MB each)")
    print(f"end of C-STORE -> Secondary Capture in Orthanc: median {statistics.median(ms):.0f} ms,"
          f" worst {max(ms):.0f} ms, best {min(ms):.0f} ms")
    print("per image, ms:", " ".join(f"{x:.0f}" for x in ms))
    stages = _stage_times(wl_rows)
    for name, values in stages.items():
        print(f"  {name}: median {statistics.median(values):.0f} ms, worst {max(values):.0f} ms")
    print(f"storescu -> worker (one association per image): median "
          f"{statistics.median(store_times) * 1000:.0f} ms")
    print(f"storescu -> Orthanc directly (peer, same image): median "
          f"{statistics.median(direct) * 1000:.0f} ms; worker/Orthanc receive ratio "
          f"{statistics.median(store_times) / statistics.median(direct):.2f}")


def _stage_times(rows: list[dict[str, str]]) -> dict[str, list[float]]:
    """From the worklist's own clocks: row insert -> scored (queue wait, decode, score,
    report) and scored -> sent (C-STORE to Orthanc)."""
    import datetime as dt

    def t(v: str) -> float:
        return dt.datetime.fromisoformat(v).timestamp() * 1000

    out: dict[str, list[float]] = {"received -> scored": [], "scored -> sent": []}
    for r in rows:
        if r["scored_at"] and r["sent_at"]:
            out["received -> scored"].append(t(r["scored_at"]) - t(r["received_at"]))
            out["scored -> sent"].append(t(r["sent_at"]) - t(r["scored_at"]))
    return out


def _make_images(tmp: Path, n: int, rows: int, cols: int) -> list[Path]:
    from make_samples import upsample, wrap

    from cxr_worker.model.preprocess import load_grey_image

    files = []
    for i in range(n):
        cls = "PNEUMONIA" if i % 2 else "NORMAL"
        src = sorted((KERMANY / cls).iterdir())[i // 2]
        ds = wrap(upsample(load_grey_image(src), rows, cols), bits_stored=12, window=True,
                  seed=f"bench-{i}-{time.time()}")
        path = tmp / f"b{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _send(port: int, path: Path, aet: str = "CXR_WORKER") -> None:
    subprocess.run([need("storescu"), "-aec", aet, "127.0.0.1", str(port), str(path)],
                   env=DCMTK_ENV, check=True, capture_output=True, timeout=120)


if __name__ == "__main__":
    main()
