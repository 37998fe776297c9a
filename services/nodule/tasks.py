"""Celery tasks of the nodule vertical (queue ``nodule``), thin over :mod:`services.nodule.analysis`.

- ``nodule.analyse_series``: a durable job (:mod:`shared.jobs`) per complete series: exactly once in
  effect even if a worker dies (lease, fencing, idempotency key), progress in the job row.
- ``nodule.send_results``: a durable job per analysed series when a PACS is configured: C-STOREs
  its SR, SEG and key images (:func:`services.nodule.pacs.send_results`); transient failures retry
  with backoff (12 attempts), refusals fail it with the PACS' reason.
- ``nodule.sweep_quiet_series``: run by beat every :func:`sweep_interval_s` on the ``default`` queue
  (as the platform's job sweeper: never behind a long analysis on the ``nodule`` queue); marks quiet
  series complete and submits their jobs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from services.nodule.analysis import analyse_series, queue_complete_series
from services.nodule.dicom_io import storage_root
from services.nodule.pacs import load_destination, send_results
from shared.config import get_settings
from shared.db import session_scope
from shared.jobs import Job, job_task, report_progress
from shared.queue import DEFAULT_QUEUE, celery_app, schedule_periodic

QUEUE = "nodule"
SWEEP_TASK = "nodule.sweep_quiet_series"


def sweep_interval_s() -> float:
    """How often beat sweeps: a fifth of the quiet period, between 0.5 and 2 s (cheap: one indexed query)."""
    return max(0.5, min(2.0, get_settings().nodule_quiet_period_s / 5))


@job_task(name="nodule.analyse_series", queue=QUEUE)
def analyse_series_job(session: Session, job: Job) -> dict[str, Any]:
    """Assemble and analyse one complete series; its progress is the job's."""
    assert job.tenant_id is not None
    return analyse_series(session, job.id, job.tenant_id, job.payload,
                          on_progress=lambda fraction: report_progress(job.id, fraction))


@job_task(name="nodule.send_results", queue=QUEUE)
def send_results_job(session: Session, job: Job) -> dict[str, Any]:
    """C-STORE one analysed series' results to the configured PACS (a no-op answer without one)."""
    destination = load_destination()
    if destination is None:
        return {"sent": False, "reason": "no PACS configured (TESSERA_NODULE_PACS_HOST)"}
    root = storage_root()
    return send_results([str(root / path) for path in job.payload["paths"]], destination).summary()


@celery_app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_quiet_series() -> int:
    """Submit the analysis of every series quiet for the quiet period; the number submitted."""
    with session_scope() as session:
        return len(queue_complete_series(session, analyse_series_job))


schedule_periodic("nodule-sweep-quiet-series", SWEEP_TASK, sweep_interval_s(), queue=DEFAULT_QUEUE)
