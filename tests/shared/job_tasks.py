"""A job task used by the worker tests: records its effect, optionally blocking mid-task.

Loaded by the real worker with ``--include tests.shared.job_tasks``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.jobs import Job, PublicJobError, TransientJobError, job_task

EFFECTS_DDL = "CREATE TABLE IF NOT EXISTS test_job_effects (job_key VARCHAR(200), worker_pid INTEGER)"


@job_task(name="tests.record_effect", queue="default")
def record_effect(session: Session, job: Job) -> dict[str, Any]:
    """Insert one effect row; wait on a gate file first when the payload names one."""
    gate = job.payload.get("block_until_exists")
    if gate:
        Path(job.payload["started_marker"]).write_text(str(os.getpid()))
        while not Path(gate).exists():
            time.sleep(0.05)
    if job.payload.get("fail_times", 0) >= job.attempts:
        raise TransientJobError(f"simulated transient failure on attempt {job.attempts}")
    session.execute(text("INSERT INTO test_job_effects (job_key, worker_pid) VALUES (:key, :pid)"),
                    {"key": job.idempotency_key, "pid": os.getpid()})
    return {"pid": os.getpid(), "attempt": job.attempts}


@job_task(name="tests.fail_with_private_text", queue="default")
def fail_with_private_text(session: Session, job: Job) -> dict[str, Any]:
    """Fail the way a domain bug does: an exception whose text carries customer data."""
    return {"customer": int(job.payload["customer_id"])}  # ValueError: invalid literal ... 'c-42'


@job_task(name="tests.fail_with_public_text", queue="default")
def fail_with_public_text(session: Session, job: Job) -> dict[str, Any]:
    """Fail on purpose with a message written for the tenant."""
    raise PublicJobError(f"needs at least {job.payload['needed']} labels")
