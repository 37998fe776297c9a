"""Celery tasks of the IIoT vertical (queue ``iiot``), thin over the domain modules.

- ``iiot.ingest_file``: a durable job ingesting one uploaded file (:func:`services.iiot.ingest.run_file_ingest`),
  each chunk committed with its checkpoint.
- ``iiot.score_tenant``: a durable job scoring every asset of one tenant and applying its alert
  policy (:func:`services.iiot.scoring.score_tenant`); alert notifications are platform webhooks
  queued in its transaction.
- ``iiot.score_all_tenants``: run by beat every ``TESSERA_IIOT_SCORING_INTERVAL_S``; submits one
  scoring job per tenant keyed by the time slot, so a slot is scored once however often it is sent.
- ``iiot.retrain``: a durable job training a tenant's candidate on its labelled readings and promoting
  it for that tenant alone if not worse (:func:`services.iiot.retraining.retrain`).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from model_runtime.versions import reload_in_workers
from services.iiot.db import Asset
from services.iiot.ingest import run_file_ingest
from services.iiot.retraining import RetrainIn, retrain
from services.iiot.scoring import IIOT_MODELS, score_tenant
from shared.config import get_settings
from shared.db import session_scope
from shared.jobs import Job, job_task, submit_job
from shared.queue import celery_app, schedule_periodic

QUEUE = "iiot"


# --------------------------------------------------------------------------- ingestion (H1)

@job_task(name="iiot.ingest_file", queue=QUEUE)
def ingest_file_job(session: Session, job: Job) -> dict[str, Any]:
    """Ingest an uploaded file of readings chunk by chunk, resuming after the last committed chunk."""
    return run_file_ingest(session, job)


# --------------------------------------------------------------------------- scoring, alerts, retraining (H5)

SCORE_ALL_TASK = "iiot.score_all_tenants"
SCORE_ALL_ENTRY = "iiot-score-all"

reload_in_workers(IIOT_MODELS)  # a worker swaps in promoted versions when a task starts, not only at start-up


@job_task(name="iiot.score_tenant", queue=QUEUE)
def score_tenant_job(session: Session, job: Job) -> dict[str, Any]:
    """Score every asset of the job's tenant whose readings moved; apply its alert policy (notifications queued)."""
    assert job.tenant_id is not None
    return score_tenant(session, job.tenant_id).as_dict()


def submit_scoring(session: Session, tenant_id: str, key: str) -> Job:
    """Queue a scoring run of ``tenant_id`` (idempotent by ``key``; sent after the commit)."""
    return submit_job(session, score_tenant_job, key=f"iiot-score:{tenant_id}:{key}", payload={}, tenant_id=tenant_id,
                      max_attempts=3)


@celery_app.task(name=SCORE_ALL_TASK, ignore_result=True)
def score_all_tenants() -> int:
    """Beat's fan-out: one scoring job per tenant with assets, keyed by the time slot (a slot runs once)."""
    interval_s = get_settings().iiot_scoring_interval_s
    slot = int(time.time() // interval_s)
    with session_scope() as session:
        tenants = list(session.scalars(select(Asset.tenant_id).distinct()))
        for tenant_id in tenants:
            submit_scoring(session, tenant_id, f"slot-{slot}")
    return len(tenants)


def schedule_scoring() -> None:
    """Have beat run :func:`score_all_tenants` every ``TESSERA_IIOT_SCORING_INTERVAL_S`` on the ``iiot`` queue."""
    schedule_periodic(SCORE_ALL_ENTRY, SCORE_ALL_TASK, every_s=get_settings().iiot_scoring_interval_s, queue=QUEUE)


schedule_scoring()


@job_task(name="iiot.retrain", queue=QUEUE)
def retrain_job(session: Session, job: Job) -> dict[str, Any]:
    """Train a candidate on the tenant's labelled readings; promote it for that tenant only if not worse."""
    assert job.tenant_id is not None
    return retrain(session, job.tenant_id, RetrainIn.model_validate(job.payload))
