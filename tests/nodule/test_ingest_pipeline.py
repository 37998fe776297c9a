"""The ingest pipeline as `tessera up` runs it, in real processes: `tessera listen nodule dicom` receives
a series pushed by dcmtk's storescu, the worker's beat sweep finds it quiet and submits one analysis
job, the worker runs it to an end, and the listener stops cleanly on SIGTERM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from services.nodule.db import Series
from shared.db import session_scope
from shared.jobs import Job
from tests.conftest import apply_stack_in_process, sqlite_stack_at
from tests.nodule.conftest import small_series
from tests.nodule.dicom_factory import write_instances
from tests.scaffold import migrate
from tests.support import ManagedProcess, free_port, port_open, python_argv, wait_until


def test_a_pushed_series_is_analysed_once_after_its_quiet_period(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (scripts/ensure_services.sh installs it)")
    (tmp_path / "stack").mkdir()
    stack = sqlite_stack_at(tmp_path / "stack")
    port = free_port()
    stack.extra_env.update({"TESSERA_NODULE_DICOM_PORT": str(port), "TESSERA_NODULE_QUIET_PERIOD_S": "1",
                            "TESSERA_LOG_LEVEL": "INFO"})
    migrate(stack.database_url)
    apply_stack_in_process(stack, monkeypatch)
    listener = ManagedProcess(python_argv("-m", "services.cli", "listen", "nodule", "dicom"), stack.env, "dicom")
    worker = ManagedProcess(python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker",
                                        "-Q", "default,nodule", "--concurrency", "1", "-B",
                                        "--schedule", str(tmp_path / "beat"),
                                        "--without-gossip", "--without-mingle", "--loglevel", "INFO"),
                            stack.env, "worker")
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 60, "the DICOM listener to accept connections")
        datasets = small_series(slices=8)
        write_instances(datasets, tmp_path / "series")
        pushed = subprocess.run([storescu, "-aet", "CT-SCANNER", "-aec", "TESSERA", "+sd", "127.0.0.1", str(port),
                                 str(tmp_path / "series")], capture_output=True, text=True, timeout=60, check=False)
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        series_uid = str(datasets[0].SeriesInstanceUID)

        def analysed() -> bool:
            with session_scope() as session:
                series = session.get(Series, ("default", series_uid))
                return series is not None and series.state in ("done", "failed")

        worker.wait_for_output(r"ready\.", timeout_s=60)
        wait_until(analysed, 90, f"the series to be analysed\n{worker.output[-3000:]}")
        with session_scope() as session:
            series = session.get(Series, ("default", series_uid))
            jobs = session.scalars(select(Job).where(Job.task_name == "nodule.analyse_series")).all()
        assert series is not None and series.instance_count == 8
        assert [job.id for job in jobs] == [series.job_id]
        assert jobs[0].status in ("succeeded", "failed") and jobs[0].attempts == 1
        if series.state == "failed":
            assert series.error_code in ("detector_not_installed", "detection_refused")
    finally:
        worker.stop()
        assert listener.stop() == 0, listener.output[-3000:]
    assert "listener stopped" in listener.output
