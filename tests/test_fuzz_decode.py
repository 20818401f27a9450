"""Bounded fuzzing of what the pipeline does with a received file: read -> gate -> decode.

Whatever the bytes, only the worker's own errors (:class:`CxrWorkerError`: a not-scored
reason) may come out; anything else would be retried as a transient failure, or (a
BaseException such as a Rust panic in a decoder plug-in) stop the worker. Mutations go mostly
into the header, where they change what the decoder is asked to do, and some into the pixel
data. About 200 examples in all, a few seconds (FUZZ_EXAMPLES raises the bound).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import kermany_files, need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from make_samples import upsample, wrap

from cxr_worker import decode, gate
from cxr_worker.errors import CxrWorkerError
from cxr_worker.model.preprocess import load_grey_image, to_model_input

GATE = gate.GateConfig(
    accept_dx_for_processing=False, require_body_part_chest=True, allow_missing_body_part=True,
    view_positions=("PA", "AP"), allow_missing_view_position=True, min_age_years=1.0,
    max_age_years=5.0, refuse_outside_age_range=False,
    uid_prefix="1.2.826.0.1.3680043.10.1187.", manufacturer="cxr-worker", series_number=9901)

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
# 3 bases x 70: about 200 examples; FUZZ_EXAMPLES=5000 for a longer hunt
EXAMPLES_PER_BASE = int(os.environ.get("FUZZ_EXAMPLES", "70"))

# (operation, position, byte value / length): position is taken modulo the file size
Mutation = tuple[str, int, int]


def mutations(header_end: int) -> st.SearchStrategy[list[Mutation]]:
    position = st.one_of(st.integers(0, header_end), st.integers(0, 2**20))
    op = st.tuples(st.sampled_from(["set", "flip", "insert", "delete", "truncate"]), position,
                   st.integers(0, 255))
    return st.lists(op, min_size=1, max_size=8)


def mutate(data: bytes, ops: list[Mutation]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "set":
            buf[i] = value
        elif kind == "flip":
            buf[i] ^= 1 << (value % 8)
        elif kind == "insert":
            buf[i:i] = bytes([value]) * (1 + value % 4)
        elif kind == "delete":
            del buf[i : i + 1 + value % 4]
        else:
            del buf[max(i, 132):]
    return bytes(buf)


def process(path: Path) -> None:
    """The pipeline's steps for one spooled file (pipeline.Pipeline._process, without the
    model): read, gate, decode."""
    ds = decode.read_file(path)
    gate.check(ds, GATE)
    to_model_input(decode.display_image(ds))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", params=["explicit-le", "rle", "jpeg-ls"])
def base(request: pytest.FixtureRequest, fuzz_dir: Path) -> bytes:
    """A real 256x256 12-bit CR, natively encoded or compressed by dcmtk."""
    grey = upsample(load_grey_image(kermany_files("NORMAL", 1)[0]), 256, 256)
    src = fuzz_dir / "base.dcm"
    wrap(grey, bits_stored=12, window=True).save_as(src, enforce_file_format=True)
    if request.param == "explicit-le":
        return src.read_bytes()
    tool = {"rle": ["dcmcrle"], "jpeg-ls": ["dcmcjpls", "+el"]}[request.param]
    dst = fuzz_dir / f"{request.param}.dcm"
    subprocess.run([need(tool[0]), *tool[1:], str(src), str(dst)], check=True, timeout=60)
    return dst.read_bytes()


def test_the_unmutated_bases_decode(base: bytes, fuzz_dir: Path) -> None:
    path = fuzz_dir / "unmutated.dcm"
    path.write_bytes(base)
    process(path)  # no error: the fuzz starts from a valid file
    x = to_model_input(decode.display_image(decode.read_file(path)))
    assert x.shape == (224, 224, 3) and np.isfinite(x).all()


# pydicom warns about much of what it reads here; the worker does not turn warnings into errors
@pytest.mark.filterwarnings("ignore")
def test_mutated_files_give_only_worker_errors(base: bytes, fuzz_dir: Path) -> None:
    header_end = base.find(PIXEL_DATA_TAG, 132) + 16
    assert header_end > 16, "no Pixel Data element in the base file"
    path = fuzz_dir / "mutated.dcm"

    @settings(max_examples=EXAMPLES_PER_BASE, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ops=mutations(header_end))
    def run(ops: list[Mutation]) -> None:
        path.write_bytes(mutate(base, ops))
        # a CxrWorkerError is a recorded, not-scored reason: what a broken file should give
        with contextlib.suppress(CxrWorkerError):
            process(path)

    run()
