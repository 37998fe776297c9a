"""Sending results to a real PACS: SR, SEG and key images C-STOREd into Orthanc (Debian's package, on
loopback), read back over its REST API and re-validated with highdicom; refusals and outages are
reported as retryable, refused SOP classes as permanent (simulated data)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from services.nodule import pacs, report
from shared.config import Settings
from shared.jobs import PublicJobError, TransientJobError
from tests.nodule.orthanc import OrthancServer, free_port, run_orthanc
from tests.nodule.test_report import (
    Case,
    assert_same_patient_and_study,
    check_key_image,
    check_risk,
    check_seg,
    check_sr,
    encoded,
    make_case,
)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), ae_title="TEST_PACS") as server:
        yield server


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return make_case(tmp_path_factory.mktemp("pacs-case"), seed=5)


@pytest.fixture(scope="module")
def results(case: Case) -> list[Dataset]:
    return report.build_results(case.findings, case.volume, case.datasets, risk=case.risk)


def destination(server: OrthancServer, **changes: object) -> pacs.PacsDestination:
    fields: dict[str, object] = {"ae_title": server.ae_title, "host": server.host, "port": server.dicom_port,
                                 "calling_ae_title": "TESSERA_TEST", "timeout_s": 10.0}
    return pacs.PacsDestination(**{**fields, **changes})  # type: ignore[arg-type]


def of_unknown_sop_class(dataset: Dataset) -> Dataset:
    """A copy of ``dataset`` under a private SOP class no PACS knows (and a new instance UID)."""
    unknown = pydicom.dcmread(io.BytesIO(encoded(dataset)))
    unknown.SOPClassUID = unknown.file_meta.MediaStorageSOPClassUID = UID("1.2.826.0.1.3680043.8.498.999.1")
    unknown.SOPInstanceUID = unknown.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return unknown


def test_results_stored_in_orthanc_read_back_and_valid(orthanc: OrthancServer, case: Case,
                                                       results: list[Dataset]) -> None:
    started = time.perf_counter()
    sent = pacs.send_results(results, destination(orthanc))
    elapsed = time.perf_counter() - started
    assert sent.all_stored and sent.stored_uids == [str(d.SOPInstanceUID) for d in results], sent.describe()
    assert all(status.status == 0x0000 for status in sent.statuses)
    stored = {str(d.SOPInstanceUID): orthanc.instance_file(str(d.SOPInstanceUID)) for d in results}
    segmentation, sr, images = results[0], results[1], results[2:]
    check_seg(stored[str(segmentation.SOPInstanceUID)], case)
    check_sr(stored[str(sr.SOPInstanceUID)], case, segmentation)
    check_risk(stored[str(sr.SOPInstanceUID)], case)
    for image, nodule in zip(images, case.findings.nodules, strict=True):
        check_key_image(stored[str(image.SOPInstanceUID)], case, nodule)
    for data in stored.values():
        assert_same_patient_and_study(pydicom.dcmread(io.BytesIO(data)), case.datasets[0])
    study = orthanc.get(f"/instances/{orthanc.instance_id(str(sr.SOPInstanceUID))}/study").json()
    assert study["MainDicomTags"]["StudyInstanceUID"] == case.datasets[0].StudyInstanceUID
    print(f"\nC-STORE of {len(results)} result instances into Orthanc: {elapsed * 1000:.0f} ms")


def test_sending_again_is_harmless_and_already_stored_ones_are_skipped(orthanc: OrthancServer,
                                                                       results: list[Dataset]) -> None:
    again = pacs.send_results(results, destination(orthanc))
    assert again.all_stored
    uids = [str(d.SOPInstanceUID) for d in results]
    rest = pacs.send_results(results, destination(orthanc), already_stored=uids[:-1])
    assert [status.sop_instance_uid for status in rest.statuses] == uids[-1:]


def test_files_on_disk_are_sent_too(orthanc: OrthancServer, results: list[Dataset], tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    results[1].save_as(path, enforce_file_format=True)
    assert pacs.send_results([path], destination(orthanc)).all_stored


def test_a_refused_association_is_retryable(orthanc: OrthancServer, results: list[Dataset]) -> None:
    with pytest.raises(pacs.RetryablePacsError) as raised:
        pacs.send_results(results, destination(orthanc, ae_title="NOT_THE_PACS"))
    assert isinstance(raised.value, TransientJobError)
    sent = raised.value.report
    # Orthanc answers A-ASSOCIATE-RJ, but under load its socket may close before pynetdicom reads it
    assert sent.association_error.startswith(("association rejected", "association aborted"))
    assert not sent.stored_uids
    assert all(status.outcome is pacs.Outcome.RETRYABLE for status in sent.statuses)


def test_a_closed_port_is_retryable(results: list[Dataset]) -> None:
    closed = pacs.PacsDestination(ae_title="PACS", host="127.0.0.1", port=free_port(), timeout_s=3.0)
    with pytest.raises(pacs.RetryablePacsError) as raised:
        pacs.send_results(results[:1], closed)
    assert raised.value.report.association_error
    assert "127.0.0.1" in str(raised.value)


def test_a_sop_class_the_pacs_refuses_is_permanent(orthanc: OrthancServer, results: list[Dataset]) -> None:
    with pytest.raises(pacs.PermanentPacsError) as raised:
        pacs.send_results([of_unknown_sop_class(results[2])], destination(orthanc))
    assert isinstance(raised.value, PublicJobError) and not isinstance(raised.value, TransientJobError)
    (status,) = raised.value.report.failed
    assert "accepted none of the SOP classes" in status.reason


def test_a_refused_sop_class_fails_alone_when_others_are_stored(orthanc: OrthancServer,
                                                                 results: list[Dataset]) -> None:
    with pytest.raises(pacs.PermanentPacsError) as raised:
        pacs.send_results([results[1], of_unknown_sop_class(results[2])], destination(orthanc))
    sent = raised.value.report
    assert sent.stored_uids == [str(results[1].SOPInstanceUID)]
    (status,) = sent.failed
    assert "accepted no presentation context" in status.reason


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, pacs.Outcome.STORED), (0xB000, pacs.Outcome.STORED_WITH_WARNING),
    (0xB007, pacs.Outcome.STORED_WITH_WARNING), (0x0001, pacs.Outcome.STORED_WITH_WARNING),
    (0xA700, pacs.Outcome.RETRYABLE), (0xA7FF, pacs.Outcome.RETRYABLE), (0x0110, pacs.Outcome.RETRYABLE),
    (0x0213, pacs.Outcome.RETRYABLE), (0xA900, pacs.Outcome.FAILED), (0xC000, pacs.Outcome.FAILED),
    (0x0122, pacs.Outcome.FAILED), (0x0124, pacs.Outcome.FAILED), (0x0211, pacs.Outcome.FAILED),
])
def test_store_statuses_are_classified_by_ps3_4(status: int, outcome: pacs.Outcome) -> None:
    assert pacs.classify_status(status)[0] is outcome


def test_destination_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESSERA_NODULE_PACS_HOST", raising=False)
    assert pacs.load_destination(Settings(_env_file=None)) is None  # type: ignore[call-arg]
    monkeypatch.setenv("TESSERA_NODULE_PACS_HOST", "pacs.example.org")
    monkeypatch.setenv("TESSERA_NODULE_PACS_PORT", "11112")
    monkeypatch.setenv("TESSERA_NODULE_PACS_AE_TITLE", "MAINPACS")
    monkeypatch.setenv("TESSERA_NODULE_AE_TITLE", "AI_NODE")
    configured = pacs.load_destination(Settings(_env_file=None))  # type: ignore[call-arg]
    assert configured == pacs.PacsDestination(ae_title="MAINPACS", host="pacs.example.org", port=11112,
                                              calling_ae_title="AI_NODE")

