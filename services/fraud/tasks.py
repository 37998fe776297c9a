"""Celery tasks of the fraud vertical (queue ``fraud``): retraining, back-tests; bank callbacks queued.

Tasks are thin: each is a durable job (``shared.jobs``) whose handler calls the domain.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from model_runtime.versions import reload_in_workers
from services.fraud.backtest import run_backtest
from services.fraud.retraining import retrain
from services.fraud.schemas import DecisionOut
from services.fraud.scoring import tenant_settings
from services.fraud.serving import FRAUD_MODELS, backtest_namespace
from shared.jobs import Job, job_task, report_progress
from shared.webhooks import enqueue_webhook

logger = logging.getLogger("tessera.fraud.tasks")

CALLBACK_EVENT = "fraud.decision"

reload_in_workers(FRAUD_MODELS)  # a worker swaps in promoted versions when a task starts, not only at start-up


def enqueue_callback(session: Session, tenant_id: str, decision: DecisionOut) -> None:
    """Queue the signed callback of a flagged decision, if the tenant configured a URL (once per transaction).

    A platform webhook (:mod:`shared.webhooks`) on the ``fraud`` queue: vetted again at delivery,
    signed, retried with backoff, every attempt in the delivery log.
    """
    url = tenant_settings(session, tenant_id).callback_url
    if url:
        enqueue_webhook(session, tenant_id=tenant_id, url=url, source="fraud", event_type=CALLBACK_EVENT,
                        data=decision.model_dump(mode="json", exclude={"replayed"}), key=decision.transaction_id,
                        subject_id=decision.transaction_id)


@job_task(name="fraud.retrain", queue="fraud")
def retrain_model(session: Session, job: Job) -> dict[str, Any]:
    """Train a candidate on labelled traffic; promote it only if it beats the live model."""
    outcome = retrain(session, job.payload["tenant_id"], holdout_days=int(job.payload.get("holdout_days", 7)),
                      min_improvement=float(job.payload.get("min_improvement", 0.0)))
    return outcome.as_dict()


@job_task(name="fraud.backtest", queue="fraud")
def backtest_csv(session: Session, job: Job) -> dict[str, Any]:
    """Replay an uploaded CSV through the scoring path in its own namespace; report metrics."""
    namespace = backtest_namespace(job.payload["tenant_id"], job.id)
    return run_backtest(Path(job.payload["path"]), job.payload["tenant_id"], namespace,
                        lambda done: report_progress(job.id, done))
