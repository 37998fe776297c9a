"""End to end with real parts: a simulated chest CT pushed by dcmtk's storescu into `tessera listen
nodule dicom`, a worker with beat analysing it with a detector trained here (`tessera train nodule
--quick`), risk and findings in the API, the SR / SEG / key images C-STOREd into a real Orthanc,
read back over Orthanc's REST API and re-validated with highdicom, one of them fetched over our
WADO-RS, and nothing of it visible to another tenant.

The quick detector "detects nothing useful"; trained for 40 steps per network instead of 2 (about
10 s in all) it reports a nodule or two, true or not, on most small simulated studies, so the SEG
and key images go through the real pipeline too. The test holds whatever it finds to the contract
(a SEG and a key image per nodule when there are nodules, an SR always), not to a count.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from services.nodule.simulate import SimulationConfig, simulate_study, write_dicom_series
from shared.db import session_scope
from shared.jobs import Job
from tests.conftest import apply_stack_in_process, sqlite_stack_at
from tests.nodule.conftest import new_key, serve_nodule
from tests.nodule.orthanc import run_orthanc
from tests.nodule.test_api_results import single_part
from tests.scaffold import migrate
from tests.support import ManagedProcess, free_port, port_open, python_argv, wait_until


@pytest.fixture(scope="session")
def quick_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding a nodule detector trained with `tessera train nodule --quick` (~10 s)."""
    from services.nodule.training import main

    root = tmp_path_factory.mktemp("models")
    assert main(["--quick", "--teacher-steps", "40", "--student-steps", "40", "--output", str(root / "nodule"),
                 "--version", "e2e"]) == 0
    return root


def test_a_pushed_study_comes_back_to_the_pacs_as_sr_seg_and_key_images(
        quick_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (scripts/ensure_services.sh installs it)")
    started = time.monotonic()
    with run_orthanc(tmp_path / "orthanc") as pacs:
        (tmp_path / "stack").mkdir()
        stack = sqlite_stack_at(tmp_path / "stack")
        port = free_port()
        stack.extra_env.update({
            "TESSERA_NODULE_DICOM_PORT": str(port), "TESSERA_NODULE_QUIET_PERIOD_S": "1",
            "TESSERA_MODELS_DIR": str(quick_models), "TESSERA_DEVICE": "cpu", "TESSERA_LOG_LEVEL": "INFO",
            "TESSERA_NODULE_PACS_HOST": pacs.host, "TESSERA_NODULE_PACS_PORT": str(pacs.dicom_port),
            "TESSERA_NODULE_PACS_AE_TITLE": pacs.ae_title})
        migrate(stack.database_url)
        apply_stack_in_process(stack, monkeypatch)
        _tenant, key = new_key(stack.database_url, "default")
        _other, other_key = new_key(stack.database_url)
        listener = ManagedProcess(python_argv("-m", "services.cli", "listen", "nodule", "dicom"), stack.env, "dicom")
        worker = ManagedProcess(python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker",
                                            "-Q", "default,nodule", "--concurrency", "1", "-B",
                                            "--schedule", str(tmp_path / "beat"),
                                            "--without-gossip", "--without-mingle", "--loglevel", "INFO"),
                                stack.env, "worker")
        try:
            with serve_nodule(stack) as api:
                study = simulate_study(SimulationConfig(seed=11, shape=(16, 64, 64)))
                write_dicom_series(study, tmp_path / "series")
                wait_until(lambda: port_open("127.0.0.1", port), 60, "the DICOM listener to accept connections")
                pushed = subprocess.run([storescu, "-aet", "CT-SCANNER", "-aec", "TESSERA", "+sd", "127.0.0.1",
                                         str(port), str(tmp_path / "series")],
                                        capture_output=True, text=True, timeout=60, check=False)
                assert pushed.returncode == 0, pushed.stderr[-2000:]
                study_uid = str(pydicom.dcmread(next((tmp_path / "series").iterdir()),
                                                stop_before_pixels=True).StudyInstanceUID)
                client = api.client(key)

                def state() -> str:
                    answer = client.get(f"/v1/studies/{study_uid}")
                    return str(answer.json()["status"]) if answer.status_code == 200 else "absent"

                wait_until(lambda: state() in ("done", "failed"), 60, f"the analysis\n{worker.output[-3000:]}")
                detail = client.get(f"/v1/studies/{study_uid}").json()
                assert detail["status"] == "done", detail
                check_findings(detail)
                objects = client.get(f"/v1/studies/{study_uid}/results").json()
                check_result_objects(objects, len(detail["findings"]))
                print(f"found {len(detail['findings'])} nodule(s), Lung-RADS {detail['lung_rads_category']}; "
                      f"results {sorted(item['kind'] for item in objects)}")

                wait_until(lambda: send_job_status() == "succeeded", 60,
                           f"the results to be sent\n{worker.output[-3000:]}")
                for item in objects:
                    check_in_orthanc(pacs.instance_file(item["sop_instance_uid"]), item)

                sr = next(item for item in objects if item["kind"] == "sr")
                wado = client.get(sr["retrieve_url"].removeprefix(api.base_url))
                assert wado.status_code == 200
                assert pydicom.dcmread(io.BytesIO(single_part(wado))).SOPInstanceUID == sr["sop_instance_uid"]

                other = api.client(other_key)
                assert other.get(f"/v1/studies/{study_uid}").status_code == 404
                assert other.get(f"/v1/studies/{study_uid}/results").status_code == 404
                assert other.get(sr["retrieve_url"].removeprefix(api.base_url)).status_code == 404
        finally:
            worker.stop()
            assert listener.stop() == 0, listener.output[-3000:]
    print(f"end to end: {time.monotonic() - started:.1f} s (training excluded)")


def send_job_status() -> str | None:
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.task_name == "nodule.send_results")).first()
        return job.status if job is not None else None


def check_findings(detail: dict[str, Any]) -> None:
    """Measurements, Lung-RADS and the Brock note (no clinical data was posted) for whatever was found."""
    assert detail["baseline"] is True and detail["lung_rads_category"] is not None
    for finding in detail["findings"]:
        assert finding["long_axis_mm"] >= finding["short_axis_mm"] >= 0
        assert finding["lung_rads_category"] is not None
        assert finding["malignancy_probability"] is None and "family history" in finding["malignancy_note"]


def check_result_objects(objects: list[dict[str, Any]], nodules: int) -> None:
    kinds = sorted(item["kind"] for item in objects)
    assert kinds == sorted(["sr"] + (["seg"] if nodules else []) + ["key_image"] * nodules)


def check_in_orthanc(content: bytes, item: dict[str, Any]) -> None:
    """What Orthanc stored is our object, and highdicom reads it back."""
    dataset = pydicom.dcmread(io.BytesIO(content))
    assert dataset.SOPInstanceUID == item["sop_instance_uid"]
    if item["kind"] == "sr":
        report = hd.sr.srread(io.BytesIO(content))
        assert report.SOPInstanceUID == item["sop_instance_uid"]
        assert report.ContentSequence  # the TID 1500 measurement report
    elif item["kind"] == "seg":
        assert hd.seg.segread(io.BytesIO(content)).number_of_segments >= 1
    else:
        assert dataset.Modality and dataset.SamplesPerPixel == 3
