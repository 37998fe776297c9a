"""The nodule API under a real uvicorn on loopback: STOW-RS (PS3.18 answers 200/202/409 as DICOM JSON,
415 and 400 for the request), a study-scoped STOW of another study's instance, a zip upload, tenant
walls on studies and jobs, study detail with per-series state, and clinical data."""

from __future__ import annotations

import io
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from services.nodule import dicom_io
from tests.conftest import Stack
from tests.nodule.conftest import NoduleServer, new_key, part10_bytes, small_series
from tests.nodule.dicom_factory import CtOptions, InstanceGeometry, SeriesIdentity, ct_instance

FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"
RETRIEVE_URL, REFERENCED_SOP_INSTANCE_UID = "00081190", "00081155"


def related(parts: list[tuple[str, bytes]], type_param: str = "application/dicom") -> tuple[bytes, dict[str, str]]:
    """A multipart/related body of (content type, bytes) parts and its Content-Type header."""
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
                    for content_type, data in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="{type_param}"; boundary={boundary}'}


def dicom_parts(datasets: list[Dataset], tmp_path: Path) -> list[tuple[str, bytes]]:
    return [("application/dicom", part10_bytes(dataset, tmp_path)) for dataset in datasets]


def mr_instance() -> Dataset:
    """An MR Image Storage instance (a SOP class this node does not take)."""
    return ct_instance(np.zeros((32, 32), np.int16), InstanceGeometry((0.0, 0.0, 0.0)), identity=SeriesIdentity.new(),
                       options=CtOptions(sop_class_uid=MRImageStorage, modality="MR"))


def sequence(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = answer.get(tag, {}).get("Value", [])
    return items


@pytest.fixture(scope="module")
def tenant(nodule_server: NoduleServer) -> tuple[str, str]:
    return new_key(nodule_server.stack.database_url)


def stow(server: NoduleServer, key: str, body: bytes, headers: dict[str, str],
         study: str | None = None) -> httpx.Response:
    path = "/dicomweb/studies" + (f"/{study}" if study else "")
    return httpx.post(server.base_url + path, content=body, headers={**headers, "X-API-Key": key}, timeout=60)


def test_stow_all_stored_is_200_with_referenced_sops_and_retrieve_urls(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path) -> None:
    datasets = small_series(slices=3)
    body, headers = related(dicom_parts(datasets, tmp_path))
    response = stow(nodule_server, tenant[1], body, headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    study = str(datasets[0].StudyInstanceUID)
    assert answer[RETRIEVE_URL]["Value"] == [f"{nodule_server.base_url}/dicomweb/studies/{study}"]
    referenced = sequence(answer, REFERENCED_SOP_SEQUENCE)
    assert [item[REFERENCED_SOP_INSTANCE_UID]["Value"][0] for item in referenced] == \
        [str(dataset.SOPInstanceUID) for dataset in datasets]
    assert referenced[0][RETRIEVE_URL]["Value"][0].endswith(
        f"/studies/{study}/series/{datasets[0].SeriesInstanceUID}/instances/{datasets[0].SOPInstanceUID}")
    assert FAILED_SOP_SEQUENCE not in answer
    again = stow(nodule_server, tenant[1], body, headers)  # duplicates: already stored, still 200
    assert again.status_code == 200


def test_stow_some_failed_is_202_with_each_failure_reason(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path) -> None:
    good = small_series(slices=2)
    truncated = part10_bytes(small_series(slices=1)[0], tmp_path)[:-100]
    parts = dicom_parts(good, tmp_path) + dicom_parts([mr_instance()], tmp_path) + [("application/dicom", truncated),
                                                                                    ("application/dicom", b"junk")]
    body, headers = related(parts)
    response = stow(nodule_server, tenant[1], body, headers)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert len(sequence(answer, REFERENCED_SOP_SEQUENCE)) == 2
    reasons = [item[FAILURE_REASON]["Value"][0] for item in sequence(answer, FAILED_SOP_SEQUENCE)]
    assert reasons == [dicom_io.SOP_CLASS_NOT_SUPPORTED, dicom_io.CANNOT_UNDERSTAND, dicom_io.CANNOT_UNDERSTAND]


def test_stow_none_stored_is_409_and_another_study_fails_a_study_scoped_post(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path) -> None:
    body, headers = related(dicom_parts([mr_instance()], tmp_path))
    response = stow(nodule_server, tenant[1], body, headers)
    assert response.status_code == 409
    assert [item[FAILURE_REASON]["Value"][0] for item in sequence(response.json(), FAILED_SOP_SEQUENCE)] == [0x0122]

    mine, other = small_series(slices=1), small_series(slices=1)
    body, headers = related(dicom_parts(mine + other, tmp_path))
    study = str(mine[0].StudyInstanceUID)
    response = stow(nodule_server, tenant[1], body, headers, study=study)
    assert response.status_code == 202
    answer = response.json()
    assert answer[RETRIEVE_URL]["Value"] == [f"{nodule_server.base_url}/dicomweb/studies/{study}"]
    failed = sequence(answer, FAILED_SOP_SEQUENCE)
    assert [item[FAILURE_REASON]["Value"][0] for item in failed] == [dicom_io.STUDY_UID_MISMATCH]
    assert failed[0][REFERENCED_SOP_INSTANCE_UID]["Value"] == [str(other[0].SOPInstanceUID)]


def test_stow_refuses_other_media_types_with_415_and_a_malformed_body_with_400(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path) -> None:
    dicom = dicom_parts(small_series(slices=1), tmp_path)
    body, headers = related([*dicom, ("text/plain", b"hello")])
    assert stow(nodule_server, tenant[1], body, headers).status_code == 415
    body, headers = related(dicom, type_param="application/dicom+xml")
    assert stow(nodule_server, tenant[1], body, headers).status_code == 415
    assert stow(nodule_server, tenant[1], dicom[0][1], {"Content-Type": "application/dicom"}).status_code == 415
    body, headers = related(dicom)
    response = stow(nodule_server, tenant[1], body[:-40], headers)  # no closing boundary
    assert response.status_code == 400 and response.headers["content-type"] == "application/problem+json"
    incoming = Path(nodule_server.stack.data_dir) / "nodule" / ".incoming"
    assert not [path for path in incoming.iterdir() if path.suffix == ".part"]


def test_dicomweb_client_stores_instances(nodule_server: NoduleServer, tenant: tuple[str, str]) -> None:
    dicomweb_client = pytest.importorskip("dicomweb_client")
    client = dicomweb_client.DICOMwebClient(url=f"{nodule_server.base_url}/dicomweb",
                                            headers={"X-API-Key": tenant[1]})
    datasets = small_series(slices=2)
    answer = client.store_instances(datasets=datasets)
    assert len(answer.ReferencedSOPSequence) == 2 and "FailedSOPSequence" not in answer


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_zip_upload_stores_each_member_and_lists_what_failed(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path) -> None:
    datasets = small_series(slices=3)
    members = {f"series/{index}.dcm": data for index, (_, data) in enumerate(dicom_parts(datasets, tmp_path))}
    members["series/README.txt"] = b"not dicom"
    with nodule_server.client(tenant[1]) as client:
        response = client.post("/v1/uploads", files={"file": ("series.zip", zipped(members), "application/zip")})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert (answer["stored"], answer["failed"]) == (3, 1)
        failed = next(item for item in answer["items"] if not item["stored"])
        assert failed["member"] == "series/README.txt" and failed["status"] == dicom_io.CANNOT_UNDERSTAND
        study = client.get(f"/v1/studies/{datasets[0].StudyInstanceUID}").json()
        assert study["series"][0]["instance_count"] == 3
        not_zip = client.post("/v1/uploads", files={"file": ("series.zip", b"hello", "application/zip")})
        assert not_zip.status_code == 422


def test_tenant_walls_on_studies_and_jobs_and_the_study_detail(
        nodule_server: NoduleServer, nodule_env: Stack, tmp_path: Path) -> None:
    from datetime import timedelta

    from services.nodule import analysis
    from services.nodule.tasks import analyse_series_job
    from shared.db import session_scope, utcnow

    tenant_a, key_a = new_key(nodule_env.database_url)
    _, key_b = new_key(nodule_env.database_url)
    datasets = small_series(slices=3)
    study = str(datasets[0].StudyInstanceUID)
    body, headers = related(dicom_parts(datasets, tmp_path))
    assert stow(nodule_server, key_a, body, headers).status_code == 200
    with session_scope() as session:  # the beat sweep, run here
        jobs = analysis.queue_complete_series(session, analyse_series_job, now=utcnow() + timedelta(seconds=5),
                                              quiet_period_s=1)
        job_id = next(job.id for job in jobs if job.tenant_id == tenant_a)

    with nodule_server.client(key_a) as a, nodule_server.client(key_b) as b:
        detail = a.get(f"/v1/studies/{study}").json()
        assert detail["status"] == "analysing" and detail["findings"] == []
        assert detail["series"][0]["state"] == "complete" and detail["series"][0]["job_id"] == job_id
        assert study in [summary["study_instance_uid"] for summary in a.get("/v1/studies").json()]
        assert a.get(f"/v1/jobs/{job_id}").json() == {"id": job_id, "status": "pending", "progress": 0.0,
                                                     "error": None}
        assert b.get(f"/v1/studies/{study}").status_code == 404
        assert study not in [summary["study_instance_uid"] for summary in b.get("/v1/studies").json()]
        assert b.get(f"/v1/jobs/{job_id}").status_code == 404
        assert b.post(f"/v1/studies/{study}/clinical", json={"pack_years": 30}).status_code == 404


def test_clinical_data_is_stored_for_a_study(nodule_server: NoduleServer, tenant: tuple[str, str],
                                             tmp_path: Path) -> None:
    datasets = small_series(slices=1)
    study = str(datasets[0].StudyInstanceUID)
    body, headers = related(dicom_parts(datasets, tmp_path))
    assert stow(nodule_server, tenant[1], body, headers).status_code == 200
    clinical = {"pack_years": 32.5, "current_smoker": True, "family_history_lung_cancer": False, "emphysema": None}
    with nodule_server.client(tenant[1]) as client:
        response = client.post(f"/v1/studies/{study}/clinical", json=clinical)
        assert response.status_code == 200, response.text
        assert {key: response.json()[key] for key in clinical} == clinical
        assert client.get(f"/v1/studies/{study}").json()["clinical"] == clinical
        assert client.post(f"/v1/studies/{study}/clinical", json={"pack_years": -1}).status_code == 422
        assert client.post(f"/v1/studies/{study}/clinical", json={"smoker": True}).status_code == 422
        assert client.post("/v1/studies/1.2.3/clinical", json=clinical).status_code == 404


def test_a_list_offset_past_the_documented_bound_is_a_422_not_a_database_overflow(
        nodule_server: NoduleServer, nodule_env: Stack) -> None:
    """Found by schemathesis: an offset past SQLite's integers was a 500."""
    from shared.paging import MAX_OFFSET

    _, key = new_key(nodule_env.database_url)
    with nodule_server.client(key) as client:
        assert client.get("/v1/studies", params={"offset": MAX_OFFSET}).json() == []
        refused = client.get("/v1/studies", params={"offset": 2**63})
        assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
