"""With a PACS configured, an analysis submits one durable send job in its own transaction (key by
tenant, series and model version), and the job C-STOREs the SEG, SR and key image into a real
Orthanc, where highdicom reads them back. (Without a PACS no job is submitted: see
test_ingest_analysis.)"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from services.nodule import analysis
from services.nodule.db import Result
from services.nodule.results import send_key
from services.nodule.tasks import send_results_job
from shared.config import get_settings
from shared.db import session_scope
from shared.jobs import Job
from tests.conftest import Stack
from tests.nodule.dicom_factory import SeriesIdentity
from tests.nodule.orthanc import OrthancServer, run_orthanc
from tests.nodule.test_api_results import analyse, stand_in_detector


@pytest.fixture
def pacs(nodule_env: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OrthancServer]:
    """Orthanc as the configured destination of this process's settings."""
    with run_orthanc(tmp_path / "orthanc") as server:
        for name, value in {"TESSERA_NODULE_PACS_HOST": server.host, "TESSERA_NODULE_PACS_PORT": str(server.dicom_port),
                            "TESSERA_NODULE_PACS_AE_TITLE": server.ae_title}.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            yield server
        finally:
            monkeypatch.delenv("TESSERA_NODULE_PACS_HOST")
            get_settings.cache_clear()


def test_the_send_job_stores_seg_sr_and_key_image_in_the_pacs(pacs: OrthancServer, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analysis, "run_detector", stand_in_detector)
    identity = SeriesIdentity.new()
    analyse(identity, "20260301", (9.0, 7.0), "sender", tmp_path)
    with session_scope() as session:
        [job] = session.scalars(select(Job).where(Job.task_name == "nodule.send_results",
                                                  Job.tenant_id == "sender")).all()
        results = session.scalars(select(Result).where(Result.tenant_id == "sender")).all()
        session.expunge_all()
    assert job.idempotency_key == send_key("sender", identity.series_instance_uid, "stand-in 2")
    assert job.max_attempts == 12 and sorted(job.payload["paths"]) == sorted(row.path for row in results)
    assert sorted(row.kind for row in results) == ["key_image", "seg", "sr"]

    send_results_job.apply(args=[job.id])
    with session_scope() as session:
        finished = session.get(Job, job.id)
        assert finished is not None
        assert finished.status == "succeeded", finished.error
        assert finished.result is not None and finished.result["stored"] == 3
    for row in results:
        content = pacs.instance_file(row.sop_instance_uid)
        assert pydicom.dcmread(io.BytesIO(content)).StudyInstanceUID == identity.study_instance_uid
        if row.kind == "sr":
            assert hd.sr.srread(io.BytesIO(content)).SOPInstanceUID == row.sop_instance_uid
        elif row.kind == "seg":
            assert hd.seg.segread(io.BytesIO(content)).number_of_segments == 1


def test_a_long_model_version_keeps_the_send_key_within_200_characters() -> None:
    uid = "1." + "2" * 62
    key = send_key("t" * 64, uid, "v" * 64)
    assert len(key) <= 200 and key.startswith(f"nodule-send:{'t' * 64}:{uid}:")
    assert send_key("t", "1.2", "nodule-student v1") == "nodule-send:t:1.2:nodule-student v1"
