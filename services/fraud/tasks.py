"""Celery tasks of the fraud vertical (queue ``fraud``): bank callbacks, retraining, back-tests.

Tasks are thin: each is a durable job (``shared.jobs``) whose handler calls the domain.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy.orm import Session

from services.fraud.backtest import run_backtest
from services.fraud.db import CallbackDelivery, Transaction
from services.fraud.retraining import retrain
from services.fraud.schemas import DecisionOut
from services.fraud.scoring import stored_decision, tenant_settings
from services.fraud.serving import backtest_namespace
from shared.db import session_scope
from shared.jobs import Job, PublicJobError, TransientJobError, job_task, report_progress, submit_job
from shared.outbound import OutboundRefused, UnresolvableHost, post_to_vetted_address
from shared.security import SIGNATURE_HEADER, Tenant, sign_payload

logger = logging.getLogger("tessera.fraud.tasks")

CALLBACK_TIMEOUT_S = 5.0
CALLBACK_MAX_ATTEMPTS = 6


@job_task(name="fraud.deliver_callback", queue="fraud")
def deliver_callback(session: Session, job: Job) -> dict[str, Any]:
    """POST a signed review/decline decision to the bank's callback URL; retried with backoff.

    The URL is vetted again now and the connection made to the address vetted (``shared.outbound``):
    a refused URL fails the job at once, with the reason in the delivery log and the job's error.
    """
    tenant_id, transaction_id, url = job.payload["tenant_id"], job.payload["transaction_id"], job.payload["url"]
    row = session.get(Transaction, (tenant_id, transaction_id))
    tenant = session.get(Tenant, tenant_id)
    if row is None or tenant is None:
        raise LookupError(f"transaction {transaction_id} of {tenant_id} is gone")
    body = orjson.dumps({"event": "fraud.decision", **stored_decision(row).model_dump(mode="json",
                                                                                   exclude={"replayed"})})
    headers = {SIGNATURE_HEADER: sign_payload(tenant.webhook_secret, body), "Content-Type": "application/json",
               "Idempotency-Key": f"{tenant_id}:{transaction_id}"}
    try:
        status_code, error = _post(url, body, headers)
    except OutboundRefused as exc:  # checked again at delivery: DNS or the policy may have changed
        _log_attempt(job, tenant_id, transaction_id, url, None, f"refused: {exc}")
        raise PublicJobError(f"callback URL refused, not retried: {exc}") from None
    _log_attempt(job, tenant_id, transaction_id, url, status_code, error)
    if status_code is None or status_code >= 500 or status_code == 429:
        raise TransientJobError(error or f"callback answered {status_code}")
    if 300 <= status_code < 400:
        raise PublicJobError(f"callback answered {status_code}; redirects are not followed")
    if status_code >= 400:
        raise PublicJobError(f"callback refused with {status_code}; not retried")
    return {"status_code": status_code}


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
    """(status, None), or (None, the error) for a failure worth a retry; ``OutboundRefused`` is not."""
    try:
        return post_to_vetted_address(url, content=body, headers=headers, timeout_s=CALLBACK_TIMEOUT_S), None
    except (httpx.HTTPError, UnresolvableHost) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _log_attempt(job: Job, tenant_id: str, transaction_id: str, url: str, status_code: int | None,
                 error: str | None) -> None:
    """Written in its own transaction: the log keeps failed attempts that the job rolls back."""
    with session_scope() as log_session:
        log_session.add(CallbackDelivery(job_id=job.id, tenant_id=tenant_id, transaction_id=transaction_id,
                                         url=url, attempt=job.attempts, status_code=status_code, error=error))


def enqueue_callback(session: Session, tenant_id: str, decision: DecisionOut) -> None:
    """Queue the callback for a flagged decision, if the tenant configured a URL (once per transaction)."""
    url = tenant_settings(session, tenant_id).callback_url
    if url:
        submit_job(session, deliver_callback, key=f"fraud-callback:{tenant_id}:{decision.transaction_id}",
                   payload={"tenant_id": tenant_id, "transaction_id": decision.transaction_id, "url": url},
                   tenant_id=tenant_id, max_attempts=CALLBACK_MAX_ATTEMPTS)


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
