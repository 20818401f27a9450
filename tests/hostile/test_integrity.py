"""Integrity under a hostile or careless sender (issue 10): parallel C-STOREs of one image,
malformed UIDs, a SOP Instance UID re-used for another study or patient, a Rescale Slope of 0,
header values highdicom refuses, an unknown Specific Character Set."""

from __future__ import annotations

import io
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import numpy as np
import pytest
from attacks import parallel_stores
from conftest import free_port, kermany_files, need, to_bytes
from make_samples import upsample, wrap
from numpy.typing import NDArray
from pydicom import config, dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_worker import compose, decode, receive, report
from cxr_worker.errors import DecodeError
from cxr_worker.labels import Label, Population
from cxr_worker.model.preprocess import load_grey_image
from cxr_worker.pipeline import Pipeline
from cxr_worker.score import Scorer
from cxr_worker.settings import Settings, Storage
from cxr_worker.spool import Spool, atomic_write, is_valid_uid
from cxr_worker.worklist import queue, schema
from cxr_worker.worklist.models import Instance

# what cxr_worker.logs.configure does in the service: pydicom's value warnings are dropped (they
# quote the value); here they would fail the test (filterwarnings = error)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
    pytest.mark.filterwarnings("ignore:The value length"),
    pytest.mark.filterwarnings("ignore:Unknown encoding"),
    pytest.mark.filterwarnings("ignore:Incorrect value for Specific Character Set"),
]

SHAPE = (256, 224)
BIRTH_DATE = "19800230x"


@pytest.fixture(scope="module")
def grey() -> NDArray[np.float32]:
    return upsample(load_grey_image(kermany_files("NORMAL", 1)[0]), *SHAPE)


def radiograph(grey: NDArray[np.float32], seed: str = "integrity", **kw: Any) -> Dataset:
    return wrap(grey, bits_stored=12, window=True, seed=seed, **kw)


def set_raw(ds: Dataset, keyword: str, value: str) -> None:
    """``ds.<keyword> = value`` without pydicom's validation: what a careless sender writes."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE))


@dataclass
class Site:
    engine: Engine
    spool: Spool
    data_dir: Path

    def rows(self) -> list[Instance]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def files(self, folder: str = "spool") -> list[Path]:
        return sorted(p for p in (self.data_dir / folder).rglob("*") if p.is_file())


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    engine = queue.make_engine(f"sqlite:///{tmp_path / 'worklist.db'}")
    schema.upgrade(engine)
    data = tmp_path / "data"
    yield Site(engine, Spool(data), data)
    engine.dispose()


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer()


def pipeline(site: Site, scorer: Scorer) -> Pipeline:
    return compose.build_pipeline(Settings(storage=Storage(data_dir=str(site.data_dir))), scorer,
                                  site.engine)


def c_store_event(ds: Dataset) -> Any:
    """What pynetdicom hands the C-STORE handler for ``ds`` sent in Explicit VR Little
    Endian; lets a test send values pynetdicom's SCU would not put on the wire."""
    ts = UID(ExplicitVRLittleEndian)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        value = str(ds.get(keyword, ""))
        setattr(meta, meta_keyword, value if is_valid_uid(value) else "1.2.3")
    request = SimpleNamespace(DataSet=io.BytesIO(buf.getvalue()),
                              AffectedSOPClassUID=meta.MediaStorageSOPClassUID)
    return SimpleNamespace(context=SimpleNamespace(transfer_syntax=ts), request=request,
                           file_meta=meta, dataset=None,
                           assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY")))


def store(site: Site, ds: Dataset) -> int:
    return receive.handle_store(c_store_event(ds), site.engine, site.spool, lambda: None)


# -- 1. parallel C-STOREs of one SOP Instance UID --------------------------------------------
def test_parallel_stores_of_one_instance_all_succeed(site: Site, grey: NDArray[np.float32]
                                                     ) -> None:
    """Eight associations sending the same image three times each, all at once: every
    C-STORE is answered 0x0000 (it was 0xA700 for 9 of 24: one temp file name per process)."""
    ds = radiograph(grey, seed="parallel")
    port = free_port()
    ae = receive.make_ae(receive.ListenerConfig("CXR_WORKER", (), False))
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=receive.handlers(site.engine, site.spool, lambda: None))
    try:
        statuses, errors = parallel_stores(port, ds, associations=8, each=3)
    finally:
        server.shutdown()
    assert not errors, errors
    assert statuses == [0x0000] * 24, [hex(s) for s in statuses]
    rows = site.rows()
    assert [r.sop_instance_uid for r in rows] == [ds.SOPInstanceUID]
    files = site.files()
    assert [f.name for f in files] == [f"{ds.SOPInstanceUID}.dcm"], files  # no .tmp left
    assert dcmread(files[0]).SOPInstanceUID == ds.SOPInstanceUID


def write_x(f: BinaryIO) -> None:
    f.write(b"x")


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_spool_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        spool = Spool(tmp_path / "data")
        path = atomic_write(spool.image_path("1.2.3", "1.2.3.4"), write_x)
        spool.quarantine(path, "test")
    finally:
        os.umask(old)
    for p in (tmp_path / "data").rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p}: {mode:o}"
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700


# -- 2. UIDs validated before anything is written ---------------------------------------------
BAD_UIDS = [
    pytest.param("SOPInstanceUID", "../../x", id="sop-dotdot"),
    pytest.param("SOPInstanceUID", "1.2.3/4/5", id="sop-slash"),
    pytest.param("SOPInstanceUID", "1." * 149 + "1", id="sop-300-chars"),
    pytest.param("SOPInstanceUID", "1.2..3", id="sop-empty-component"),
    pytest.param("SOPInstanceUID", "1.2.03", id="sop-leading-zero"),
    pytest.param("SOPInstanceUID", "1.2.3.", id="sop-trailing-dot"),
    pytest.param("StudyInstanceUID", "../../etc", id="study-dotdot"),
    pytest.param("StudyInstanceUID", "1.2.3/4", id="study-slash"),
    pytest.param("SeriesInstanceUID", "1.2.x", id="series-letter"),
    pytest.param("SOPClassUID", "1.2.840.10008.5.1.4.1.1.1a", id="class-letter"),
    pytest.param("SOPClassUID", "", id="class-empty"),
]


@pytest.mark.parametrize(("keyword", "value"), BAD_UIDS)
def test_invalid_uid_refused_before_anything_is_written(site: Site, grey: NDArray[np.float32],
                                                        keyword: str, value: str) -> None:
    ds = radiograph(grey, seed="bad-uid")
    set_raw(ds, keyword, value)

    assert store(site, ds) == receive.STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert site.rows() == []
    assert site.files() == []


def test_valid_uids_pass(site: Site, grey: NDArray[np.float32]) -> None:
    """The other side of the test above: the same data set with its UIDs is stored."""
    ds = radiograph(grey, seed="bad-uid")
    set_raw(ds, "SOPInstanceUID", "1.2.0.10")
    assert store(site, ds) == 0x0000
    assert [f.name for f in site.files()] == ["1.2.0.10.dcm"]


def test_spool_never_builds_a_path_from_a_separator(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    for study, sop in (("../..", "../../etc/passwd"), ("1.2/3", "1.2.3\\4"), ("1.2\x00", "..")):
        for path in (spool.image_path(study, sop), spool.result_path(study, sop)):
            assert path.parent.parent in (spool.spool_dir, spool.results_dir), path
            assert path.name.endswith(".dcm") and "/" not in path.name and ".." not in path.name
    assert spool.image_path("1.2.3", "1.2.3.4") == spool.spool_dir / "1.2.3" / "1.2.3.4.dcm"


# -- 3. a SOP Instance UID held for another study or patient ----------------------------------
def test_uid_of_another_study_or_patient_is_refused(site: Site, grey: NDArray[np.float32],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    first = radiograph(grey, seed="conflict")
    first.PatientID = "PID-FIRST-1"
    assert store(site, first) == 0x0000
    [held] = site.files()
    held_bytes = held.read_bytes()

    other_study = radiograph(grey, seed="conflict")
    other_study.PatientID = "PID-FIRST-1"
    other_study.StudyInstanceUID = "1.2.826.0.1.3680043.10.1187.99"
    other_patient = radiograph(grey, seed="conflict")
    other_patient.PatientID = "PID-SECOND-2"
    with caplog.at_level(logging.INFO):
        assert store(site, other_study) == receive.STATUS_UID_CONFLICT == 0xC211
        assert store(site, other_patient) == receive.STATUS_UID_CONFLICT

    [row] = site.rows()
    assert row.study_instance_uid == first.StudyInstanceUID
    assert row.patient_key == queue.patient_key(first.SOPInstanceUID, "PID-FIRST-1")
    assert site.files() == [held] and held.read_bytes() == held_bytes
    conflicts = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(conflicts) == 2 and all(first.SOPInstanceUID in m for m in conflicts), conflicts
    assert "1.2.826.0.1.3680043.10.1187.99" in conflicts[0]
    for value in ("PID-FIRST", "PID-SECOND"):
        assert value not in caplog.text


@pytest.mark.slow
def test_resend_for_the_same_study_is_processed_again(site: Site, grey: NDArray[np.float32],
                                                      scorer: Scorer) -> None:
    ds = radiograph(grey, seed="resend")
    worker = pipeline(site, scorer)
    assert store(site, ds) == 0x0000
    worker.drain()
    [row] = site.rows()
    assert row.status == "scored"
    first_result = row.result_sop_instance_uid

    assert store(site, ds) == 0x0000  # re-sent: the file replaced, the row re-queued
    [row] = site.rows()
    assert row.status == "received" and row.result_path is not None
    worker.drain()

    [row] = site.rows()
    assert row.status == "scored" and row.result_sop_instance_uid == first_result
    results = site.files("results")  # one result and its heatmap, not two of either
    assert len(site.files()) == 1
    assert sorted(p.name.removeprefix(ds.SOPInstanceUID) for p in results) == [
        ".dcm", ".heatmap.png"]


# -- 4. Rescale Slope 0 or not finite ---------------------------------------------------------
@pytest.mark.parametrize(("keyword", "value"), [
    ("RescaleSlope", "0"), ("RescaleSlope", "0.0"), ("RescaleSlope", "NaN"),
    ("RescaleSlope", "inf"), ("RescaleIntercept", "NaN"), ("RescaleIntercept", "-inf"),
])
def test_rescale_slope_zero_or_not_finite_is_refused(grey: NDArray[np.float32], keyword: str,
                                                     value: str) -> None:
    ds = radiograph(grey, seed="rescale")
    set_raw(ds, keyword, value)
    source = dcmread(io.BytesIO(to_bytes(ds)))

    with pytest.raises(DecodeError, match=keyword):
        decode.display_image(source)


def test_absent_or_empty_rescale_is_the_identity(grey: NDArray[np.float32]) -> None:
    ds = radiograph(grey, seed="rescale")
    expected = decode.display_image(dcmread(io.BytesIO(to_bytes(ds))))
    set_raw(ds, "RescaleSlope", "")
    set_raw(ds, "RescaleIntercept", "")
    np.testing.assert_array_equal(decode.display_image(dcmread(io.BytesIO(to_bytes(ds)))),
                                  expected)


@pytest.mark.slow
def test_rescale_slope_zero_ends_not_scored_in_quarantine(site: Site, grey: NDArray[np.float32],
                                                          scorer: Scorer) -> None:
    ds = radiograph(grey, seed="slope0", rescale=(0.0, 0.0))
    assert store(site, ds) == 0x0000
    pipeline(site, scorer).drain()

    [row] = site.rows()
    assert row.status == "not_scored" and row.attempts == 0
    assert row.reason is not None and "RescaleSlope" in row.reason
    quarantined = Path(row.spool_path)
    assert quarantined.parent == site.spool.quarantine_dir and quarantined.is_file()
    assert "RescaleSlope" in quarantined.with_suffix(".reason.txt").read_text()
    assert site.files("results") == []


# -- 5. header values highdicom refuses: not retried, not quoted ------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", [
    ("PatientBirthDate", BIRTH_DATE), ("StudyDate", "20261399"), ("StudyTime", "256199"),
    ("PatientSex", "X"),
], ids=lambda c: c[0])
def test_invalid_optional_value_is_left_out_of_the_result(
        site: Site, grey: NDArray[np.float32], scorer: Scorer, case: tuple[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    keyword, value = case
    ds = radiograph(grey, seed=f"invalid-{keyword}")
    set_raw(ds, keyword, value)
    assert store(site, ds) == 0x0000
    with caplog.at_level(logging.DEBUG):
        pipeline(site, scorer).drain()

    [row] = site.rows()
    assert (row.status, row.attempts, row.reason) == ("scored", 0, None)
    assert row.result_path is not None
    sc = dcmread(row.result_path)
    assert keyword in sc and sc[keyword].value in ("", None), "Type 2: present, empty"
    assert dcmread(row.spool_path)[keyword].value == value, "the source keeps its value"
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("pydicom"))
    assert keyword in ours
    assert value not in ours


@pytest.mark.slow
def test_result_that_cannot_be_built_is_not_scored_once_without_the_value(
        site: Site, grey: NDArray[np.float32], scorer: Scorer,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever else highdicom refuses in a source (a ValueError quoting the value) ends
    not_scored at once, the value in neither the reason nor the log."""
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise ValueError(f"Unable to convert '{BIRTH_DATE}' to 'DA' object")

    monkeypatch.setattr(report, "build_secondary_capture", refuse)
    assert store(site, radiograph(grey, seed="refused")) == 0x0000
    with caplog.at_level(logging.DEBUG):
        pipeline(site, scorer).drain()

    [row] = site.rows()
    assert row.status == "not_scored" and row.attempts == 0
    assert row.reason is not None and "ValueError" in row.reason
    assert "19800230" not in row.reason and "19800230" not in caplog.text


# -- 6. a Specific Character Set the worker cannot decode -------------------------------------
def test_unknown_character_set_is_not_copied_into_the_result(
        grey: NDArray[np.float32], tmp_path: Path) -> None:
    ds = radiograph(grey, seed="charset", patient_name="Müller^Zoë")
    ds.SpecificCharacterSet = "ISO_IR 100"
    raw = to_bytes(ds)
    assert raw.count(b"ISO_IR 100") == 1
    source = dcmread(io.BytesIO(raw.replace(b"ISO_IR 100", b"ISO_IR 999")))
    assert source.SpecificCharacterSet == "ISO_IR 999"

    sc = report.build_secondary_capture(
        source, decode.display_image(source), probability=0.7, label=Label.SUSPECTED,
        threshold=0.5, model_version="test-1",
        cfg=report.ReportConfig("1.2.826.0.1.3680043.10.1187.", 9901, "cxr-worker"),
        population=Population.IN, population_text="IN VALIDATED POPULATION")
    path = tmp_path / "sc.dcm"
    path.write_bytes(to_bytes(sc))

    back = dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Müller^Zoë"  # read with the Latin-1 fallback, kept
    res = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    errors = [line for line in (res.stdout + res.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, "dciodvfy:\n" + "\n".join(errors)
