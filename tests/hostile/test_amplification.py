"""Decompression amplification and the memory ceiling of one image (issue 10).

Before: an 8192 x 8192 16-bit RLE image in a 2 MB file took ``cxr-worker serve`` to 1,865 MB,
a 0.5 MB deflated data set inflating to 512 MB to 1,339 MB (three at once: 2,983 MB); both
were accepted (and the RLE image scored). Now every size is checked before the bytes are made
(:mod:`cxr_worker.decode`, :mod:`cxr_worker.receive`): the unit tests below bound each path
with ``tracemalloc`` (numpy and pydicom allocations are traced), the end-to-end tests replay
the attacks against a real ``cxr-worker serve`` and read its peak RSS (VmHWM).
"""

from __future__ import annotations

import re
import struct
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attacks
import numpy as np
import pytest
from attacks import send_raw
from bombs import (
    CR,
    radiograph_header,
    rle_frame,
    write_deflate_bomb,
    write_native,
    write_rle_bomb,
)
from conftest import DCMTK_ENV, Worker, free_port, need, storescu, wait_until
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_worker import compose, decode, receive, sizes
from cxr_worker.errors import DecodeError, LimitExceededError
from cxr_worker.score import Scorer
from cxr_worker.settings import Settings, Storage
from cxr_worker.spool import Spool
from cxr_worker.worklist import queue, schema
from cxr_worker.worklist.models import Instance

MiB = 2**20
PEAK_LIMIT_KB = 600 * 1024  # the goal: VmHWM of the serve process under 600 MB
HONEST_SECONDS = 2.0


def traced_peak(func: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes allocated (tracemalloc: Python objects and numpy arrays) while ``func``
    runs, above what was allocated when it started; and its result or exception."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            result: Any = func()
        except Exception as exc:  # the caller asserts which
            result = exc
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


def banded(rows: int, cols: int, bits: int = 16) -> Dataset:
    """A native radiograph in memory, eight bands of grey plus a gradient (contrast)."""
    ds = radiograph_header(rows, cols, ExplicitVRLittleEndian, f"banded-{rows}-{cols}-{bits}")
    dtype = np.uint16 if bits == 16 else np.uint8
    # (7 r + 3 c) mod 2**bits, made in the pixel type (no float64 frame in the test either)
    arr = np.add.outer((np.arange(rows) * 7).astype(dtype), (np.arange(cols) * 3).astype(dtype))
    if bits == 16:
        arr &= 4095
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    return ds


# -- deflate ------------------------------------------------------------------------------
def deflated(data: bytes) -> bytes:
    z = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


def test_the_inflating_reader_stops_at_the_limit_holding_a_window() -> None:
    """20 MiB of zeros (20 kB deflated) read through a 1 MiB limit: refused once past it,
    never holding more than the limit; under the limit, the same bytes zlib gives."""
    bomb = deflated(bytes(20 * MiB))
    reader = sizes.InflatingReader([bomb], 1 * MiB)

    peak, exc = traced_peak(lambda: reader.seek(10 * MiB))
    assert isinstance(exc, LimitExceededError), exc
    assert exc.setting == "limits.max_inflated_bytes"
    assert "1048576" in exc.reason
    assert reader.inflated <= 1 * MiB + sizes.InflatingReader.CHUNK
    assert peak < 1 * MiB

    data = np.random.default_rng(0).integers(0, 4, 3 * MiB, dtype=np.uint8).tobytes()
    ok = sizes.InflatingReader(sizes._chunks(deflated(data), 4096), 4 * MiB)
    assert ok.read(100) == data[:100]
    ok.seek(2 * MiB)  # forward: inflated and dropped
    assert ok.read(5) == data[2 * MiB:2 * MiB + 5]
    ok.seek(-5 - 1000, 1)  # back within the window
    assert ok.read(1000) == data[2 * MiB - 1000:2 * MiB]
    assert ok.read() == data[2 * MiB:]
    assert ok.finish() == len(data)
    with pytest.raises(ValueError, match="cannot seek back"):
        ok.seek(0)
    truncated = sizes.InflatingReader([deflated(data)[:-1000]], 4 * MiB)
    with pytest.raises(zlib.error):
        truncated.finish()


def test_a_deflated_file_reads_as_dcmread_reads_it(tmp_path: Path) -> None:
    ds = banded(300, 256)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    ours, theirs = decode.read_file(path), dcmread(path)
    assert ours.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert [e.tag for e in ours] == [e.tag for e in theirs]
    assert all(ours[e.tag].value == e.value for e in theirs)
    assert ours.filename == str(path)
    np.testing.assert_array_equal(decode.display_image(ours), decode.display_image(theirs))


def test_a_deflate_bomb_file_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """What ``replay`` or ``score`` reads (the listener never saw it): 256 MiB inflated from
    a 0.25 MB file, refused once past ``limits.max_inflated_bytes`` (80 MiB): the value being
    read is held up to the limit, never the bomb's size (dcmread: 256 MiB and its copy)."""
    path = write_deflate_bomb(tmp_path / "bomb.dcm", inflated=256 * MiB)
    assert path.stat().st_size < 1 * MiB
    peak, exc = traced_peak(lambda: decode.read_file(path))
    assert isinstance(exc, LimitExceededError), exc
    assert exc.setting == "limits.max_inflated_bytes"
    assert "limits.max_inflated_bytes" in exc.reason and "83886080" in exc.reason
    assert peak < 80 * MiB + 8 * MiB, f"{peak / MiB:.1f} MiB"
    low = sizes.Limits(max_inflated_bytes=8 * MiB)
    peak, exc = traced_peak(lambda: decode.read_file(path, low))
    assert isinstance(exc, LimitExceededError) and peak < 8 * MiB + 8 * MiB
    # under the limit the same kind of file is read whole
    small = write_deflate_bomb(tmp_path / "small.dcm", inflated=12 * MiB)
    with pytest.raises(LimitExceededError):
        decode.read_file(small, low)
    ds = decode.read_file(small)
    assert int(ds.Rows) == 512 and len(ds.PixelData) == 512 * 512 * 2


def test_a_file_larger_than_a_data_set_may_be_is_not_read(tmp_path: Path) -> None:
    path = write_native(tmp_path / "big.dcm", 1024, 1024)  # 2 MiB of pixels
    limits = sizes.Limits(max_dataset_bytes=1 * MiB // 2)
    with pytest.raises(LimitExceededError, match=r"limits\.max_dataset_bytes") as exc:
        decode.read_file(path, limits)
    assert exc.value.setting == "limits.max_dataset_bytes"
    assert int(decode.read_file(path).Rows) == 1024


# -- declared size ------------------------------------------------------------------------
def test_the_rle_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    """8192 x 8192 at 16 bits declares 128 MiB: refused before decoding (it was 1.9 GB)."""
    ds = decode.read_file(write_rle_bomb(tmp_path / "rle.dcm"))
    peak, exc = traced_peak(lambda: decode.display_image(ds))
    assert isinstance(exc, LimitExceededError), exc
    assert exc.setting == "limits.max_decoded_bytes"
    assert exc.reason == (
        "decoded size 134217728 bytes (8192 x 8192 x 1 sample(s) x 1 frame(s) at 16 bits "
        "allocated) is more than limits.max_decoded_bytes (67108864 bytes): not decoded")
    assert peak < 1 * MiB
    # frames count: 4 frames of 2048 x 2048 at 16 bits are 32 MiB: over a 16 MiB limit
    small = banded(2048, 2048)
    small.NumberOfFrames = 4
    with pytest.raises(LimitExceededError, match="4 frame"):
        sizes.check_decoded_size(small, sizes.Limits(max_decoded_bytes=16 * MiB))
    sizes.check_decoded_size(small, sizes.Limits(max_decoded_bytes=32 * MiB))


def rle_dataset(rows: int, cols: int, frame: bytes) -> Dataset:
    ds = radiograph_header(rows, cols, RLELossless, "rle-mismatch")
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


@pytest.mark.parametrize("plugin", ["pylibjpeg", "pydicom"])
def test_an_rle_segment_that_decodes_larger_than_declared_is_bounded(
        plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header declares 64 x 64; each segment decodes to 16 MiB (a 256 kB frame).
    pylibjpeg-rle stops at the 4,097th byte (a panic, caught); without it the run headers are
    counted first, because pydicom's decoder would decode the 32 MiB before comparing."""
    frame = rle_frame(2048, 8192)  # 2 x 16 MiB of runs
    ds = rle_dataset(64, 64, frame)
    if plugin == "pylibjpeg":
        if decode._plugin(decode.RLELossless) != "pylibjpeg":
            pytest.fail("pylibjpeg-rle is a dependency: it must be installed")
    else:
        monkeypatch.setattr(decode, "_plugin", lambda ts: "")
    peak, exc = traced_peak(lambda: decode.stored_pixels(ds))
    assert isinstance(exc, DecodeError), exc
    if plugin == "pydicom":
        assert "an RLE segment decodes to 16777216 bytes" in exc.reason
    assert peak < 2 * MiB, f"{peak / MiB:.1f} MiB"
    assert decode.rle_segment_lengths(frame) == [2048 * 8192] * 2


def test_the_rle_segment_walk_counts_literal_and_replicate_runs() -> None:
    segment = bytes([2, 1, 2, 3]) + bytes([0xFE, 9]) + bytes([0x80]) + bytes([0, 7])
    header = struct.pack("<16L", 1, 64, *([0] * 14))
    assert decode.rle_segment_lengths(header + segment) == [3 + 3 + 1]
    with pytest.raises(DecodeError, match="16 segments"):
        decode.rle_segment_lengths(struct.pack("<16L", 16, *([64] * 15)))


def jpeg_lossless_file(tmp_path: Path, rows: int = 128, cols: int = 96) -> Path:
    src = tmp_path / "native.dcm"
    banded(rows, cols).save_as(src, enforce_file_format=True)
    out = tmp_path / "jpeg.dcm"
    subprocess.run([need("dcmcjpeg"), "+e1", str(src), str(out)], check=True,
                   capture_output=True, timeout=60)
    return out


def with_frame(ds: Dataset, edit: Callable[[bytes], bytes]) -> Dataset:
    frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([edit(frames[0])])
    return ds


def patch_sof(frame: bytes, rows: int, cols: int) -> bytes:
    """The frame with its SOF's number of lines and samples per line replaced."""
    at = 2  # after SOI: walk the marker segments to the SOF
    while frame[at:at + 2] not in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3"):
        at += 2 + struct.unpack(">H", frame[at + 2:at + 4])[0]
    return frame[:at + 5] + struct.pack(">HH", rows, cols) + frame[at + 9:]


def patch_siz(frame: bytes, rows: int, cols: int) -> bytes:
    at = frame.find(b"\xff\x4f\xff\x51")
    return frame[:at + 8] + struct.pack(">LLLL", cols, rows, 0, 0) + frame[at + 24:]


def test_a_jpeg_codestream_larger_than_declared_is_not_decoded(tmp_path: Path) -> None:
    """A JPEG whose SOF says 65535 x 65535 in a 128 x 96 image: libjpeg would allocate for
    the SOF (8 GiB at 16 bits); refused from the headers."""
    ds = dcmread(jpeg_lossless_file(tmp_path))
    assert decode.stored_pixels(ds).shape == (128, 96)  # as encoded: decodes
    bomb = with_frame(ds, lambda f: patch_sof(f, 65535, 65535))
    peak, exc = traced_peak(lambda: decode.stored_pixels(bomb))
    assert isinstance(exc, DecodeError), exc
    assert "codestream is 65535 x 65535 x 1 sample(s), the header declares 128 x 96 x 1" \
        in exc.reason
    assert peak < 1 * MiB


def test_a_jpeg_2000_codestream_larger_than_declared_is_not_decoded() -> None:
    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.fail("no JPEG 2000 encoder: pylibjpeg-openjpeg is a dependency")
    ds = banded(128, 96)
    ds.compress(JPEG2000Lossless)
    assert decode.stored_pixels(ds).shape == (128, 96)
    bomb = with_frame(ds, lambda f: patch_siz(f, 40000, 40000))
    with pytest.raises(DecodeError, match="codestream is 40000 x 40000 x 1"):
        decode.stored_pixels(bomb)
    unreadable = with_frame(ds, lambda f: b"\x00" * 64 + f[64:])
    with pytest.raises(DecodeError, match="codestream header cannot be read"):
        decode.stored_pixels(unreadable)


# -- the memory ceiling of one decode -----------------------------------------------------
def old_display(ds: Dataset) -> NDArray[np.float64]:
    """The float64 chain display_image was before (issue 10), from the same public steps."""
    stored = decode.stored_pixels(ds)
    mask = decode.padding_mask(ds, stored)
    shown = decode.voi(ds, decode.modality_lut(ds, stored), mask)
    if decode.needs_inversion(ds):
        shown = 1.0 - shown
    if mask is not None:
        shown = np.where(mask, 0.0, shown)
    return np.asarray(shown * 255.0, dtype=np.float64)


@pytest.mark.parametrize("variant", ["auto", "window", "padding", "mono1-signed", "8-bit"])
def test_the_display_table_gives_the_float64_chain_within_1e_3(variant: str) -> None:
    ds = banded(300, 256, bits=8 if variant == "8-bit" else 16)
    if variant == "window":
        ds.WindowCenter, ds.WindowWidth = 1500, 2000
    elif variant == "padding":
        ds.PixelPaddingValue = 0
    elif variant == "mono1-signed":
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    new = decode.display_image(ds)
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, old_display(ds), rtol=0, atol=1e-3)


def test_weighted_percentiles_equal_numpy_percentile() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1000, 500)
    counts = rng.integers(0, 50, 500)
    sample = np.repeat(values, counts)
    got = decode.weighted_percentiles(values, counts, (0.5, 37.0, 99.5))
    np.testing.assert_allclose(got, np.percentile(sample, (0.5, 37.0, 99.5)), rtol=0,
                               atol=1e-9)


def test_one_decode_holds_the_frame_and_a_float32_image_only() -> None:
    """A 4096 x 4096 16-bit image (32 MiB): the decode's peak is the decoded frame, the
    float32 display image (64 MiB) and strips: 109 MiB measured, against 416 MiB for the
    float64 chain it replaced."""
    ds = banded(4096, 4096)
    frame = 4096 * 4096 * 2
    peak, shown = traced_peak(lambda: decode.display_image(ds))
    assert isinstance(shown, np.ndarray) and shown.shape == (4096, 4096)
    assert peak < frame + 4 * 4096 * 4096 + 16 * MiB, f"{peak / MiB:.0f} MiB"
    old_peak, _ = traced_peak(lambda: old_display(ds))
    assert old_peak > 3 * peak, (old_peak / MiB, peak / MiB)  # what was saved, for the record


def test_a_frame_over_the_display_maximum_is_shown_reduced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """More pixels than DISPLAY_MAX_PIXELS: the mean of f x f blocks of the full display
    (here the maximum is lowered to 64 x 64, so 300 x 256 is reduced by 5 to 60 x 51)."""
    ds = banded(300, 256)
    full = decode.display_image(ds)
    monkeypatch.setattr(decode, "DISPLAY_MAX_PIXELS", 64 * 64)
    assert decode.reduction(300, 256) == 5
    reduced = decode.display_image(ds)
    assert reduced.shape == (60, 51)
    expected = full[:300, :255].reshape(60, 5, 51, 5).mean(axis=(1, 3))
    np.testing.assert_allclose(reduced, expected, rtol=0, atol=1e-3)


def test_an_8_bit_frame_of_64_mib_is_displayed_within_its_ceiling() -> None:
    """8192 x 8192 at 8 bits is 64 MiB, within limits.max_decoded_bytes: shown reduced by 2,
    so the decode holds the frame, 64 MiB of float32 and strips."""
    ds = banded(8192, 8192, bits=8)
    peak, shown = traced_peak(lambda: decode.display_image(ds))
    assert isinstance(shown, np.ndarray) and shown.shape == (4096, 4096)
    assert peak < 64 * MiB + 64 * MiB + 24 * MiB, f"{peak / MiB:.0f} MiB"


# -- the listener ---------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Any, Spool]]:
    engine = queue.make_engine(f"sqlite:///{tmp_path / 'worklist.db'}")
    schema.upgrade(engine)
    yield engine, Spool(tmp_path / "data")
    engine.dispose()


def rows(engine: Any) -> list[Instance]:
    with Session(engine) as s:
        return list(s.scalars(select(Instance)))


def test_an_oversize_data_set_is_dropped_as_it_arrives(site: tuple[Any, Spool],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a real association (pynetdicom both ends): with a 1 MiB limit a 2 MiB data set
    is answered 0xC212 and was never held (the handler sees the bounded buffer empty, the
    whole size counted); a 0.5 MiB one is stored byte for byte."""
    engine, spool = site
    seen: list[Any] = []
    real = receive.handle_store

    def spy(event: Any, *args: Any) -> int:
        seen.append(event.request.DataSet)
        return real(event, *args)

    monkeypatch.setattr(receive, "handle_store", spy)
    limits = sizes.Limits(max_dataset_bytes=1 * MiB)
    scp = receive.make_ae(compose.listener_config(Settings()))
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=receive.handlers(engine, spool, lambda: None, limits))
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(CR, ExplicitVRLittleEndian)
    try:
        assoc = scu.associate("127.0.0.1", port, ae_title="CXR_WORKER")
        assert assoc.is_established
        big, small = banded(1024, 1024), banded(512, 512)
        status = assoc.send_c_store(big)
        assert status.Status == receive.STATUS_DATASET_TOO_LARGE
        stream = seen[-1]
        assert isinstance(stream, receive.BoundedDataSet)
        assert stream.exceeded and stream.received > 2 * MiB
        assert stream.getbuffer().nbytes == 0
        assert rows(engine) == [] and not list(spool.spool_dir.rglob("*.dcm"))

        assert assoc.send_c_store(small).Status == receive.STATUS_SUCCESS
        assoc.release()
    finally:
        server.shutdown()
        scu.shutdown()
    (row,) = rows(engine)
    stored = dcmread(row.spool_path)
    assert stored.PixelData == small.PixelData and isinstance(seen[-1], receive.BoundedDataSet)


def test_limits_in_the_pipeline_quarantine_with_the_setting_named(
        site: tuple[Any, Spool], tmp_path: Path) -> None:
    """A file over a limit that reached the spool another way (spooled before the limit was
    lowered, a replay): not scored, the reason naming the limit, the file quarantined."""
    engine, spool = site
    settings = Settings(storage=Storage(data_dir=str(spool.spool_dir.parent)))
    pipeline = compose.build_pipeline(settings, Scorer(), engine)
    for i, (path, setting) in enumerate([
            (write_rle_bomb(tmp_path / "rle.dcm"), "limits.max_decoded_bytes"),
            (write_deflate_bomb(tmp_path / "deflate.dcm", inflated=96 * MiB),
             "limits.max_inflated_bytes")]):
        spooled = spool.image_path(f"1.2.3.{i}", f"1.2.3.{i}.1")
        spooled.parent.mkdir(parents=True, exist_ok=True)
        spooled.write_bytes(path.read_bytes())
        queue.enqueue(engine, sop_instance_uid=f"1.2.3.{i}.1", sop_class_uid=CR,
                      study_instance_uid=f"1.2.3.{i}", series_instance_uid=f"1.2.3.{i}.2",
                      accession_number="", calling_ae_title="MODALITY",
                      transfer_syntax_uid=str(read_file_meta_info(path).TransferSyntaxUID),
                      spool_path=str(spooled), patient_key="k")
        assert pipeline.process_next()
        row = next(r for r in rows(engine) if r.sop_instance_uid == f"1.2.3.{i}.1")
        assert row.status == "not_scored", row.status
        assert setting in (row.reason or ""), row.reason
        assert "quarantine" in (row.reason or "") and not spooled.exists()
        assert Path(row.spool_path).parent == spool.quarantine_dir


# -- end to end: the attacks against cxr-worker serve ----------------------------------------
def vm_hwm_kb(worker: Worker) -> int:
    """The largest peak memory of the service and of each of its worker processes."""
    assert worker.proc is not None
    return round(attacks.peak_mb(worker.proc.pid) * 1024)


def echoscu(port: int) -> float:
    """dcmtk's C-ECHO as a modality sends it; the seconds it took (it must succeed)."""
    ok, took, out = attacks.echoscu(port, timeout=5)
    assert ok, out
    return took


def honest_store(worker: Worker, image: Path) -> float:
    t0 = time.monotonic()
    storescu(worker.port, image)
    return time.monotonic() - t0


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.slow
def test_the_rle_bomb_is_refused_by_the_listener(make_worker: Callable[..., Worker],
                                                  make_images: Callable[..., list[Path]],
                                                  tmp_path: Path) -> None:
    worker = make_worker()
    honest = make_images(1, prefix="honest-rle")[0]
    bomb = write_rle_bomb(tmp_path / "rle-bomb.dcm")
    done = threading.Event()
    echoes: list[float] = []

    def echo_meanwhile() -> None:
        while not done.is_set():
            echoes.append(echoscu(worker.port))

    t = threading.Thread(target=echo_meanwhile)
    t.start()
    try:  # dcmtk's storescu, proposing RLE Lossless (-xr) so that it sends the file as is
        res = subprocess.run(
            [need("storescu"), "-d", "-xr", "-aet", "MODALITY", "-aec", "CXR_WORKER",
             "127.0.0.1", str(worker.port), str(bomb)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False)
    finally:
        done.set()
        t.join()
    out = res.stdout + res.stderr
    assert re.search(r"DIMSE Status\s*: 0xc213", out), out[-3000:]
    assert worker.worklist() == [] and not list((worker.data_dir / "spool").rglob("*.dcm"))
    assert "refused (0xC213): decoded size 134217728 bytes" in worker.text()
    assert echoes and max(echoes) < HONEST_SECONDS, echoes
    assert echoscu(worker.port) < HONEST_SECONDS
    assert honest_store(worker, honest) < HONEST_SECONDS
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["scored"], 60,
               "the honest image scored")
    assert vm_hwm_kb(worker) < PEAK_LIMIT_KB, f"{vm_hwm_kb(worker) // 1024} MB"


@pytest.mark.slow
@pytest.mark.usefixtures("chunked_send")
def test_three_deflate_bombs_at_once_are_refused_by_the_listener(
        make_worker: Callable[..., Worker], make_images: Callable[..., list[Path]],
        tmp_path: Path) -> None:
    """Three associations send the 0.5 MB data set that inflates to 512 MB, at once (before:
    2,983 MB, and all three accepted)."""
    worker = make_worker()
    honest = make_images(1, prefix="honest-deflate")[0]
    bomb = write_deflate_bomb(tmp_path / "deflate-bomb.dcm")
    assert bomb.stat().st_size < 1 * MiB
    statuses: list[int] = []
    senders = [threading.Thread(target=lambda: statuses.append(
        send_raw(worker.port, bomb, DeflatedExplicitVRLittleEndian))) for _ in range(3)]
    for s in senders:
        s.start()
    during = echoscu(worker.port)
    for s in senders:
        s.join(60)
    assert statuses == [receive.STATUS_INFLATES_TOO_LARGE] * 3
    assert during < HONEST_SECONDS
    assert worker.worklist() == [] and not list((worker.data_dir / "spool").rglob("*.dcm"))
    assert worker.text().count("inflates to more than 83886080 bytes") == 3
    assert honest_store(worker, honest) < HONEST_SECONDS
    assert echoscu(worker.port) < HONEST_SECONDS
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["scored"], 60,
               "the honest image scored")
    assert vm_hwm_kb(worker) < PEAK_LIMIT_KB, f"{vm_hwm_kb(worker) // 1024} MB"


@pytest.mark.slow
@pytest.mark.usefixtures("chunked_send")
def test_an_oversize_data_set_is_refused_by_the_listener(make_worker: Callable[..., Worker],
                                                          tmp_path: Path) -> None:
    """A 256 MiB native data set (a 11585 x 11585 16-bit image): dropped as it arrives,
    answered 0xC212; the worker never holds more than the 64 MiB limit of it."""
    worker = make_worker()
    ds = radiograph_header(11585, 11585, ExplicitVRLittleEndian, "oversize")
    path = tmp_path / "oversize.dcm"
    ds.save_as(path, enforce_file_format=True)
    size = 11585 * 11585 * 2
    with open(path, "ab") as f:  # Pixel Data appended: 7FE0,0010 OW, zeros written sparse
        f.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<L", size))
        f.truncate(f.tell() + size)
    t0 = time.monotonic()
    status = send_raw(worker.port, path, ExplicitVRLittleEndian)
    assert status == receive.STATUS_DATASET_TOO_LARGE, hex(status)
    assert time.monotonic() - t0 < 30
    assert worker.worklist() == [] and not list((worker.data_dir / "spool").rglob("*.dcm"))
    assert "more than limits.max_dataset_bytes (67108864)" in worker.text()
    assert echoscu(worker.port) < HONEST_SECONDS
    assert vm_hwm_kb(worker) < PEAK_LIMIT_KB, f"{vm_hwm_kb(worker) // 1024} MB"


def test_the_bombs_are_what_they_claim(tmp_path: Path) -> None:
    """The test data: the RLE bomb's runs decode to its eight bands, 2 MiB per 8192 x 8192;
    the deflate bomb's stream inflates to exactly the size it claims."""
    rle = write_rle_bomb(tmp_path / "rle.dcm", rows=1024, cols=1024)
    arr = decode.stored_pixels(dcmread(rle))
    assert arr.shape == (1024, 1024) and len(np.unique(arr)) == 8
    assert len(rle_frame(8192, 8192)) == 64 + 2 * 8192 * 128
    bomb = write_deflate_bomb(tmp_path / "d.dcm", inflated=8 * MiB)
    _, offset = split_dataset(bomb)
    assert len(zlib.decompress(bomb.read_bytes()[offset:], -zlib.MAX_WBITS)) == 8 * MiB
    ds = decode.read_file(bomb)
    assert int(ds.Rows) == 512 and ds.PixelData[:2] == (300).to_bytes(2, "little")
