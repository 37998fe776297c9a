"""Findings with risk, result objects, WADO-RS and key images over a real uvicorn.

Two studies of one patient a year apart are analysed in this process (a stand-in for the detector:
one solid nodule that grew from 6 mm to 8 mm mean diameter); the API then shows the follow-up
Lung-RADS category, the match against the prior with growth and doubling time, Brock once the
clinical data is posted, the SR/SEG/key image objects, each retrievable over WADO-RS (multipart or
single part, 406 for a transfer syntax we would have to transcode to), the PNG key image, and
nothing of it to another tenant."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from services.nodule import analysis, results
from services.nodule.findings import DetectedNodule, SeriesFindings
from services.nodule.schemas import NoduleType
from services.nodule.volume import SeriesVolume
from tests.conftest import Stack
from tests.nodule.conftest import NoduleServer, new_key
from tests.nodule.dicom_factory import CtOptions, SeriesIdentity, ct_series
from tests.nodule.test_ingest_analysis import run_job, store, sweep

SIZES_BY_STUDY: dict[str, tuple[float, float]] = {}
NODULE_VOXEL = (9.0, 16.0, 16.0)  # slice k lies at z = -50 + 2k: the cranial half of the lungs


def chest_series(identity: SeriesIdentity, study_date: str) -> list[pydicom.Dataset]:
    """14 axial 32 x 32 slices: soft tissue (40 HU) around lung (-850 HU) on slices 2..11."""
    hu = np.full((14, 32, 32), -1000, np.int16)
    hu[:, 2:-2, 2:-2] = 40
    hu[2:12, 6:-6, 6:-6] = -850
    hu[8:11, 14:19, 14:19] = 30  # the nodule
    return ct_series((hu + 1024).astype(np.int16), identity=identity, slice_spacing=2.0,
                     options=CtOptions(extra={"StudyDate": study_date}))


def stand_in_detector(volume: SeriesVolume, on_progress: Any = None) -> SeriesFindings:
    long_mm, short_mm = SIZES_BY_STUDY[volume.study_instance_uid]
    labels = np.zeros(volume.shape, np.uint16)
    labels[8:11, 14:19, 14:19] = 1
    centre = tuple(float(v) for v in volume.voxel_to_lps(NODULE_VOXEL))
    nodule = DetectedNodule(label=1, centre_voxel=NODULE_VOXEL, centre_lps_mm=centre,  # type: ignore[arg-type]
                            long_axis_mm=long_mm, short_axis_mm=short_mm,
                            volume_mm3=math.pi / 6 * ((long_mm + short_mm) / 2) ** 3, mean_hu=30.0,
                            nodule_type=NoduleType.SOLID, confidence=0.9)
    return SeriesFindings(volume.series_instance_uid, volume.study_instance_uid, (nodule,), labels, "stand-in 2")


def analyse(identity: SeriesIdentity, study_date: str, size: tuple[float, float], tenant_id: str,
            tmp_path: Any) -> None:
    SIZES_BY_STUDY[identity.study_instance_uid] = size
    store(chest_series(identity, study_date), tmp_path, tenant_id)
    job = next(job for job in sweep() if job.payload["series_instance_uid"] == identity.series_instance_uid)
    run_job(job.id)


@pytest.fixture(scope="module")
def analysed(nodule_server: NoduleServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Prior and follow-up studies of one patient analysed for a new tenant; their UIDs and keys."""
    from tests.conftest import apply_stack_in_process

    monkeypatch = pytest.MonkeyPatch()
    try:
        apply_stack_in_process(nodule_server.stack, monkeypatch)
        monkeypatch.setattr(analysis, "run_detector", stand_in_detector)
        tenant_id, key = new_key(nodule_server.stack.database_url)
        _other, other_key = new_key(nodule_server.stack.database_url)
        patient = {"patient_id": "PAT-RESULTS-1"}
        prior, current = SeriesIdentity.new(**patient), SeriesIdentity.new(**patient)
        tmp_path = tmp_path_factory.mktemp("results")
        analyse(prior, "20250601", (6.0, 6.0), tenant_id, tmp_path)
        analyse(current, "20260601", (9.0, 7.0), tenant_id, tmp_path)
        storage = results.storage_root()
    finally:
        monkeypatch.undo()
    return {"prior": prior, "current": current, "key": key, "other_key": other_key, "storage": storage}


def get(server: NoduleServer, key: str, path: str, **headers: str) -> httpx.Response:
    return httpx.get(server.base_url + path, headers={"X-API-Key": key, **headers}, timeout=60)


def test_the_follow_up_study_shows_growth_lung_rads_and_brock_once_clinical_data_arrives(
        nodule_server: NoduleServer, analysed: dict[str, Any]) -> None:
    current, key = analysed["current"], analysed["key"]
    detail = get(nodule_server, key, f"/v1/studies/{current.study_instance_uid}").json()
    assert detail["status"] == "done" and detail["baseline"] is False
    assert detail["prior_study_instance_uid"] == analysed["prior"].study_instance_uid
    assert detail["interval_days"] == 365.0
    [finding] = detail["findings"]
    assert (finding["label"], finding["long_axis_mm"], finding["upper_lobe"]) == (1, 9.0, True)
    # Mean 8.0 mm, up 2.0 mm (> 1.5 mm) within 12 months: growing solid >= 8 mm is 4B.
    assert finding["lung_rads_category"] == "4B" and detail["lung_rads_category"] == "4B"
    prior = finding["prior"]
    assert prior["matched"] and prior["growth"] == "growing" and prior["diameter_change_mm"] == 2.0
    assert prior["volume_doubling_time_days"] == pytest.approx(365 * math.log(2) / math.log((8 / 6) ** 3), abs=0.1)
    assert finding["malignancy_probability"] is None and "family history" in finding["malignancy_note"]

    posted = httpx.post(f"{nodule_server.base_url}/v1/studies/{current.study_instance_uid}/clinical",
                        json={"family_history_lung_cancer": True, "emphysema": False},
                        headers={"X-API-Key": key}, timeout=30)
    assert posted.status_code == 200
    [finding] = get(nodule_server, key, f"/v1/studies/{current.study_instance_uid}").json()["findings"]
    assert 0 < finding["malignancy_probability"] < 1 and finding["brock_model"] == "2a"
    assert finding["malignancy_note"] is None

    listed = get(nodule_server, key, "/v1/studies").json()
    categories = {study["study_instance_uid"]: study["lung_rads_category"] for study in listed}
    assert categories[current.study_instance_uid] == "4B"
    assert categories[analysed["prior"].study_instance_uid] == "3"  # 6.0 mm solid at baseline


def test_result_objects_are_listed_and_retrievable_over_wado_rs(nodule_server: NoduleServer,
                                                                analysed: dict[str, Any]) -> None:
    current, key = analysed["current"], analysed["key"]
    objects = get(nodule_server, key, f"/v1/studies/{current.study_instance_uid}/results").json()
    assert sorted(item["kind"] for item in objects) == ["key_image", "seg", "sr"]
    sr = next(item for item in objects if item["kind"] == "sr")
    path = sr["retrieve_url"].removeprefix(nodule_server.base_url)

    multipart = get(nodule_server, key, path)
    assert multipart.status_code == 200
    assert multipart.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    dataset = pydicom.dcmread(io.BytesIO(single_part(multipart)))
    assert dataset.SOPInstanceUID == sr["sop_instance_uid"] and dataset.Modality == "SR"

    single = get(nodule_server, key, path, Accept="application/dicom")
    assert single.status_code == 200 and single.headers["content-type"].startswith("application/dicom")
    assert pydicom.dcmread(io.BytesIO(single.content)).SOPInstanceUID == sr["sop_instance_uid"]

    jpeg_only = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert get(nodule_server, key, path, Accept=jpeg_only).status_code == 406
    ct = get(nodule_server, key, f"/dicomweb/studies/{current.study_instance_uid}/series/"
                                 f"{current.series_instance_uid}/instances/{sr['sop_instance_uid']}")
    assert ct.status_code == 404  # the right SOP UID under another series is not found


def related_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related answer's parts."""
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
    parts = [part for part in response.content.split(f"--{boundary}".encode()) if part.strip(b"-\r\n")]
    return [part.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n") for part in parts]


def single_part(response: httpx.Response) -> bytes:
    [body] = related_parts(response)
    return body


def test_a_series_is_retrieved_one_part_per_instance(nodule_server: NoduleServer, analysed: dict[str, Any]) -> None:
    current, key = analysed["current"], analysed["key"]
    study = current.study_instance_uid
    received = get(nodule_server, key, f"/dicomweb/studies/{study}/series/{current.series_instance_uid}")
    assert received.status_code == 200
    datasets = [pydicom.dcmread(io.BytesIO(part)) for part in related_parts(received)]
    assert len(datasets) == 14 and {d.SeriesInstanceUID for d in datasets} == {current.series_instance_uid}
    objects = get(nodule_server, key, f"/v1/studies/{study}/results").json()
    seg = next(item for item in objects if item["kind"] == "seg")
    made = get(nodule_server, key, f"/dicomweb/studies/{study}/series/{seg['series_instance_uid']}")
    assert [pydicom.dcmread(io.BytesIO(part)).Modality for part in related_parts(made)] == ["SEG"]
    assert get(nodule_server, key, f"/dicomweb/studies/{study}/series/{seg['series_instance_uid']}",
               Accept="application/dicom").status_code == 406
    assert get(nodule_server, analysed["other_key"],
               f"/dicomweb/studies/{study}/series/{current.series_instance_uid}").status_code == 404


def test_the_key_image_is_a_png_of_the_nodule(nodule_server: NoduleServer, analysed: dict[str, Any]) -> None:
    current, key = analysed["current"], analysed["key"]
    answer = get(nodule_server, key, f"/v1/studies/{current.study_instance_uid}/nodules/1/key-image.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    assert image.mode == "RGB" and min(image.size) >= 32
    assert answer.headers["etag"] and "max-age" in answer.headers["cache-control"]
    made = [path for path in Path(analysed["storage"]).rglob("key-image-1.png")
            if current.series_instance_uid in str(path)]
    assert [path.read_bytes() for path in made] == [answer.content]  # made with the results, not re-assembled
    assert get(nodule_server, key, f"/v1/studies/{current.study_instance_uid}/nodules/7/key-image.png"
               ).status_code == 404


def test_another_tenant_sees_none_of_it(nodule_server: NoduleServer, analysed: dict[str, Any],
                                        nodule_env: Stack) -> None:
    current, other = analysed["current"], analysed["other_key"]
    study = current.study_instance_uid
    objects = get(nodule_server, analysed["key"], f"/v1/studies/{study}/results").json()
    for path in (f"/v1/studies/{study}", f"/v1/studies/{study}/results", f"/v1/studies/{study}/nodules/1/key-image.png",
                 objects[0]["retrieve_url"].removeprefix(nodule_server.base_url)):
        assert get(nodule_server, other, path).status_code == 404, path


def test_wado_accept_negotiation() -> None:
    from services.nodule.wado import choose_representation

    explicit = "1.2.840.10008.1.2.1"
    assert choose_representation(None, explicit) == "multipart"
    assert choose_representation('multipart/related; type="application/dicom"', explicit) == "multipart"
    assert choose_representation("application/dicom", explicit) == "single"
    assert choose_representation("application/dicom;q=0.5, multipart/related; type=application/dicom",
                                 explicit) == "multipart"
    assert choose_representation(f"application/dicom; transfer-syntax={explicit}", explicit) == "single"
    assert choose_representation("application/dicom; transfer-syntax=*", "1.2.840.10008.1.2.4.90") == "single"
    assert choose_representation("application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50", explicit) is None
    assert choose_representation('multipart/related; type="image/jpeg"', explicit) is None
    assert choose_representation("application/json", explicit) is None


def test_the_new_endpoints_need_a_key_with_the_nodule_scope(nodule_server: NoduleServer,
                                                             analysed: dict[str, Any]) -> None:
    study = analysed["current"].study_instance_uid
    _tenant, fraud_key = new_key(nodule_server.stack.database_url, scopes=("fraud",))
    for path in (f"/v1/studies/{study}/results", f"/v1/studies/{study}/nodules/1/key-image.png",
                 f"/dicomweb/studies/{study}/series/1.2/instances/1.2.3"):
        assert httpx.get(nodule_server.base_url + path, timeout=30).status_code == 401, path
        assert get(nodule_server, fraud_key, path).status_code == 403, path
    paths = httpx.get(nodule_server.base_url + "/openapi.json", timeout=30).json()["paths"]
    assert "/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}" in paths
