"""Shared fixtures: real peers (dcmtk as the modality, Orthanc as the PACS), free ports,
a worker subprocess, DICOM variants built from the training images."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# Committed test data (tests/data/README.md; made by sample_dicom/make_test_data.py): the tests
# need nothing outside the repository.
TEST_DATA = Path(__file__).resolve().parent / "data"
KERMANY = TEST_DATA / "kermany_val"  # 60 held-out validation images per class
KERMANY_PER_CLASS = 60
NIH = TEST_DATA / "nih"
BACKBONE_WEIGHTS_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
SAMPLES = REPO / "sample_dicom"
sys.path.insert(0, str(SAMPLES))

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CLI = [sys.executable, "-m", "cxr_worker.cli"]


def run_cli(env: dict[str, str], *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
    """``cxr-worker ARGS`` as a user runs it (a subprocess); asserts its exit code."""
    res = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == rc, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def need(tool: str) -> str:
    """The Debian package's tool: ``/usr/bin`` first, so that pynetdicom's own ``storescu`` /
    ``echoscu`` in an activated venv never stand in for dcmtk's."""
    system = Path("/usr/bin") / tool
    path = str(system) if system.is_file() else shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (.ci/run installs it with apt-get)")
    return path


# -- Orthanc --------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrthancTls:
    """Orthanc's DICOM port as a TLS PACS (Orthanc >= 1.9): its certificate and key, the CA
    certificates it trusts, and whether a client must present a certificate."""

    certificate: Path
    private_key: Path
    trusted_certificates: Path
    require_client_certificate: bool = True


@dataclass
class Orthanc:
    root: Path
    aet: str = "ORTHANC"
    http_port: int = 0
    dicom_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    worker_port: int = 0
    tls: OrthancTls | None = None  # None: plain DICOM
    extra: dict[str, Any] = field(default_factory=dict)  # more of Orthanc's configuration
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        self.log = self.root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        cfg = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"worker": ["CXR_WORKER", "127.0.0.1", self.worker_port or 104]},
            "Plugins": [],
            "StableAge": 1,
            "HttpTimeout": 10,
            "ConcurrentJobs": 1,
        }
        if self.tls is not None:
            cfg.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls.certificate),
                "DicomTlsPrivateKey": str(self.tls.private_key),
                "DicomTlsTrustedCertificates": str(self.tls.trusted_certificates),
                "DicomTlsRemoteCertificateRequired": self.tls.require_client_certificate,
            })
        cfg.update(self.extra)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "orthanc.json").write_text(json.dumps(cfg))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [need("Orthanc"), str(self.root / "orthanc.json")], stdout=log, stderr=log,
                start_new_session=True)
        wait_until(self._up, 30, "Orthanc's REST API")

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("Orthanc exited:\n" + self.log.read_text()[-3000:]) from None
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def find_instance(self, sop_uid: str) -> str | None:
        found = self.post("/tools/find", {"Level": "Instance",
                                          "Query": {"SOPInstanceUID": sop_uid}})
        return found[0] if found else None

    def instances_in_series_with_description(self, study_uid: str, text: str) -> list[str]:
        out = []
        for st in self.post("/tools/find", {"Level": "Study",
                                            "Query": {"StudyInstanceUID": study_uid}}):
            for series in self.get(f"/studies/{st}/series"):
                if text in series["MainDicomTags"].get("SeriesDescription", ""):
                    out.extend(series["Instances"])
        return out


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    o = Orthanc(tmp_path / "orthanc")
    o.start()
    yield o
    o.stop()


# -- the worker as a subprocess -----------------------------------------------------------
@dataclass
class Worker:
    data_dir: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)
    _log_offset: int = 0

    def __post_init__(self) -> None:
        self.log = self.data_dir.parent / f"worker-{self.port}.log"

    def start(self, timeout: float = 120, max_file_bytes: int | None = None) -> None:
        """Start ``serve``; ``max_file_bytes`` caps the size of any file it writes (RLIMIT_FSIZE),
        which is how a test makes the disk "full" for large images only."""
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        limit = [] if max_file_bytes is None else [need("prlimit"), f"--fsize={max_file_bytes}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*limit, sys.executable, "-m", "cxr_worker.cli", "serve"], env=self.env,
                stdout=log, stderr=log, start_new_session=True)
        wait_until(self._ready, timeout, "the worker to listen")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.text()[-4000:]}")
        return "cxr-worker ready" in self.text()[self._log_offset :]

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self.proc = None
        return rc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "cxr_worker.cli", *args], env=self.env,
                             capture_output=True, text=True, timeout=300, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"cxr-worker {' '.join(args)} exited {res.returncode}:\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def worklist(self) -> list[dict[str, Any]]:
        out = self.cli("worklist", "--json", "--limit", "1000").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def worker_env(data_dir: Path, port: int, pacs: Orthanc | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_WORKER")}
    env.update({
        "CXR_WORKER__LISTENER__PORT": str(port),
        "CXR_WORKER__LISTENER__HOST": "127.0.0.1",
        "CXR_WORKER__STORAGE__DATA_DIR": str(data_dir),
        "CXR_WORKER__JOBS__POLL_SECONDS": "0.1",
        "CXR_WORKER__JOBS__RETRY_BASE_SECONDS": "0.5",
        "CXR_WORKER__JOBS__RETRY_MAX_SECONDS": "2",
        "CXR_WORKER__JOBS__MAX_ATTEMPTS": "1000",
        "CXR_WORKER__JOBS__LEASE_SECONDS": "5",
        # health/metrics server: a free port of its own, never the default 8080
        "CXR_WORKER__HTTP__PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    })
    if pacs is not None:
        env.update({
            "CXR_WORKER__PACS__AE_TITLE": pacs.aet,
            "CXR_WORKER__PACS__HOST": "127.0.0.1",
            "CXR_WORKER__PACS__PORT": str(pacs.dicom_port),
            "CXR_WORKER__PACS__TIMEOUT_SECONDS": "5",
        })
    env.update(extra)
    return env


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def make(pacs: Orthanc | None = None, start: bool = True, max_file_bytes: int | None = None,
             **extra: str) -> Worker:
        port = free_port()
        data_dir = tmp_path / f"worker-data-{len(workers)}"
        data_dir.mkdir()
        w = Worker(data_dir, port, worker_env(data_dir, port, pacs, **extra))
        workers.append(w)
        if start:
            w.start(max_file_bytes=max_file_bytes)
        return w

    yield make
    for w in workers:
        w.stop(signal.SIGKILL, 10)


def storescu(port: int, *files: Path, aet: str = "CXR_WORKER", calling: str = "MODALITY",
             check: bool = True, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [need("storescu"), *(["-v"] if verbose else []), "-aet", calling, "-aec", aet,
         "127.0.0.1", str(port),
         *[str(f) for f in files]],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=300, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"storescu failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


# -- DICOM variants of the training images -----------------------------------------------
def to_bytes(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def reread(ds: Any) -> Any:
    """What a receiver holds: the dataset written and read back."""
    from pydicom import dcmread

    return dcmread(io.BytesIO(to_bytes(ds)))



def kermany_files(cls: str, n: int, offset: int = 0) -> list[Path]:
    """``n`` images of class ``cls`` from tests/data/kermany_val, in file-name order."""
    if offset + n > KERMANY_PER_CLASS:
        raise ValueError(f"tests/data/kermany_val has {KERMANY_PER_CLASS} images per class, "
                         f"asked for {n} from {offset}")
    return sorted((KERMANY / cls).iterdir())[offset : offset + n]


@pytest.fixture(scope="session")
def backbone_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MobileNetV2 (alpha 0.5) "no_top" weights file with random weights, written in the
    legacy Keras HDF5 layout of the ImageNet file (same layer and weight names), so training
    tests go through the real loading path (``keras.applications.MobileNetV2(weights=PATH)``)
    without the 3 MB ImageNet file. Keras 3's ``save_weights`` only writes its own
    ``.weights.h5`` layout, hence h5py."""
    import h5py
    import keras

    model = keras.applications.MobileNetV2(alpha=0.5, include_top=False, weights=None,
                                           input_shape=(224, 224, 3))
    path = tmp_path_factory.mktemp("weights") / BACKBONE_WEIGHTS_NAME
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = keras.backend.backend().encode()
        f.attrs["keras_version"] = keras.__version__.encode()
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        for layer in model.layers:
            group = f.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{w.name}:0" for w in weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, w in zip(names, weights, strict=True):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(w))
    return path


@pytest.fixture
def make_images(tmp_path: Path) -> Callable[..., list[Path]]:
    """Write ``n`` DICOM files made from training images, alternating the classes."""
    from make_samples import upsample, wrap

    from cxr_worker.model.preprocess import load_grey_image

    def make(n: int, study_uid: str | None = None, offset: int = 0, prefix: str = "img",
             shape: tuple[int, int] = (1024, 880), **opts: Any) -> list[Path]:
        out_dir = tmp_path / f"{prefix}-{offset}"
        out_dir.mkdir(exist_ok=True)
        opts.setdefault("bits_stored", 12)
        opts.setdefault("window", True)
        files = []
        for i in range(n):
            cls = "PNEUMONIA" if i % 2 else "NORMAL"
            src = kermany_files(cls, 1, offset + i // 2)[0]
            grey = load_grey_image(src)
            ds = wrap(upsample(grey, *shape), seed=f"{prefix}-{offset}-{i}",
                      study_uid=study_uid, **opts)
            path = out_dir / f"{prefix}{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        return files

    return make


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A worker environment on a fresh data folder and a free port, no PACS."""
    return worker_env(tmp_path / "data", free_port(), None)


# -- PostgreSQL -------------------------------------------------------------------------------
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def postgres_schema(prefix: str = "cxr_test") -> Iterator[str]:
    """A throwaway schema on the PostgreSQL at 127.0.0.1:5432; yields a URL whose search path
    is that schema, drops it afterwards. Skips (with the reason) when no server answers."""
    import uuid

    from sqlalchemy import text

    from cxr_worker.worklist import queue

    base = queue.make_engine(PG_URL)
    try:
        with base.connect() as c:
            c.execute(text("select 1"))
    except Exception as exc:  # no server: the only reason to skip
        base.dispose()
        pytest.skip(f"no PostgreSQL answers at 127.0.0.1:5432 ({type(exc).__name__})")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with base.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{name}"
    finally:
        with base.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        base.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def blank_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An empty database: a new SQLite file, or a throwaway PostgreSQL schema."""
    from cxr_worker.worklist import queue

    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'w.db'}" if request.param == "sqlite"
               else stack.enter_context(postgres_schema()))
        eng = queue.make_engine(url)
        yield eng
        eng.dispose()


@pytest.fixture
def migrated_engine(blank_engine: Any) -> Any:
    """A migrated worklist, once on SQLite and once on PostgreSQL."""
    from cxr_worker.worklist import schema

    schema.upgrade(blank_engine)
    return blank_engine


def secondary_capture(side: int = 64) -> Any:
    """A small Secondary Capture such as the worker sends (8-bit, ``side`` x ``side``): what
    the send tests and benchmarks store to a PACS."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "SEND", "Send^Test"
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(range(256)) * (side * side // 256)
    return ds


@pytest.fixture
def sqlite_worklist(tmp_path: Path) -> Iterator[Any]:
    """A migrated SQLite worklist in ``tmp_path`` (in-process pipeline tests)."""
    from cxr_worker.worklist import queue, schema

    eng = queue.make_engine(f"sqlite:///{tmp_path / 'worklist.db'}")
    schema.upgrade(eng)
    yield eng
    eng.dispose()


def spool_and_enqueue(engine: Any, spool: Any, seed: str, cls: str = "NORMAL",
                      shape: tuple[int, int] = (256, 224)) -> str:
    """What the C-STORE handler does with an image (a Kermany image of ``cls`` as a 12-bit
    CR): the file, then the row. Returns its SOP Instance UID."""
    from make_samples import upsample, wrap

    from cxr_worker.model.preprocess import load_grey_image
    from cxr_worker.spool import atomic_write
    from cxr_worker.worklist import queue

    ds = wrap(upsample(load_grey_image(kermany_files(cls, 1)[0]), *shape),
              bits_stored=12, window=True, seed=seed)
    path = spool.image_path(ds.StudyInstanceUID, ds.SOPInstanceUID)
    atomic_write(path, lambda f: ds.save_as(f, enforce_file_format=True))
    queue.enqueue(engine, sop_instance_uid=str(ds.SOPInstanceUID),
                  sop_class_uid=str(ds.SOPClassUID),
                  study_instance_uid=str(ds.StudyInstanceUID),
                  series_instance_uid=str(ds.SeriesInstanceUID), accession_number="A1",
                  calling_ae_title="MODALITY", spool_path=str(path),
                  transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    return str(ds.SOPInstanceUID)
