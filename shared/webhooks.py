"""Signed outbound webhooks: a tenant's JSON event, delivered by a durable job, every attempt logged.

A vertical calls :func:`enqueue_webhook` inside the transaction that produced the event (a flagged
fraud decision, an IIoT alert, a nodule result); the event is a durable job (:mod:`shared.jobs`)
keyed by the tenant, the source and the vertical's own key, so a repeat enqueues nothing. The job
runs on the source vertical's queue and:

- vets the URL again at delivery and connects only to the address it vetted
  (:mod:`shared.outbound`): a URL refused now fails the job at once, never retried;
- POSTs ``{"event": <event type>, **data}`` signed with the tenant's current webhook secret in the
  header Tessera uses for inbound webhooks (``Tessera-Signature: t=<unix s>,v1=<hex hmac>``,
  :func:`shared.security.sign_payload`), with ``Idempotency-Key: <tenant>:<key>`` so the receiver
  can drop a repeat;
- retries with exponential backoff on a timeout, a connection error, 429 or 5xx; fails at once on
  another 4xx or a redirect (not followed);
- writes each attempt (status, latency, error) to ``platform_webhook_deliveries`` in a transaction
  of its own, so failed attempts stay logged although the job's own transaction rolls back.

:func:`list_deliveries` is the per-tenant view of that log. A delivery that succeeded is never sent
again: a duplicate message finds its job finished.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
import orjson
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.db import Base, session_scope, utcnow
from shared.jobs import Job, PublicJobError, TransientJobError, job_task, submit_job
from shared.outbound import OutboundRefused, UnresolvableHost, post_to_vetted_address
from shared.queue import DEFAULT_QUEUE
from shared.security import SIGNATURE_HEADER, Tenant, sign_payload

DELIVER_TASK = "shared.webhooks.deliver"
DELIVERY_TIMEOUT_S = 5.0
"""Connect and read timeout of one attempt; a timeout is retried."""
MAX_ATTEMPTS = 6
"""Attempts before a webhook that keeps failing is given up (backoff 2, 4, 8, 16, 32 s between them)."""
IDEMPOTENCY_HEADER = "Idempotency-Key"

WEBHOOK_ATTEMPTS = Counter("tessera_webhook_attempts_total", "Outbound webhook attempts by outcome "
                           "(delivered, retried, refused: URL refused now, rejected: 3xx/4xx answer)",
                           ["source", "outcome"])
WEBHOOK_LATENCY = Histogram("tessera_webhook_attempt_seconds", "Outbound webhook attempt time, send to status",
                            ["source"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


class WebhookDelivery(Base):
    """One attempt to deliver a webhook: where, which try, what came back and how long it took."""

    __tablename__ = "platform_webhook_deliveries"
    __table_args__ = (Index("ix_platform_webhook_deliveries_tenant", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("platform_jobs.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32), doc="the vertical that sent it")
    event_type: Mapped[str] = mapped_column(String(64), doc="e.g. fraud.decision")
    subject_id: Mapped[str | None] = mapped_column(String(200), default=None,
                                                   doc="what the event is about (a transaction id, a study UID)")
    url: Mapped[str] = mapped_column(String(500))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None, doc="send to status; None if not sent")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDeliveryOut(BaseModel):
    """One logged attempt, as a tenant may read it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: str
    source: str
    event_type: str
    subject_id: str | None
    url: str
    attempt: int
    status_code: int | None
    latency_ms: float | None
    error: str | None
    attempted_at: datetime


def enqueue_webhook(session: Session, *, tenant_id: str, url: str, source: str, event_type: str,
                    data: dict[str, Any], key: str, subject_id: str | None = None, queue: str | None = None,
                    max_attempts: int = MAX_ATTEMPTS, timeout_s: float = DELIVERY_TIMEOUT_S) -> Job:
    """Queue the event ``{"event": event_type, **data}`` for ``url`` in ``session``'s transaction.

    ``key`` identifies the event within the tenant and source (a transaction id): the same key
    again returns the job already queued. The job runs on ``queue``, by default the source
    vertical's own. ``data`` must be JSON and must not have an ``event`` member.
    """
    if "event" in data:
        raise ValueError("webhook data must not have an 'event' member: the event type goes there")
    payload = {"url": url, "source": source, "event_type": event_type, "subject_id": subject_id, "key": key,
               "data": data, "timeout_s": timeout_s}
    return submit_job(session, deliver_webhook, key=f"webhook:{source}:{tenant_id}:{key}", payload=payload,
                      tenant_id=tenant_id, max_attempts=max_attempts, queue=queue or source)


def list_deliveries(session: Session, tenant_id: str, *, source: str | None = None, subject_id: str | None = None,
                    before_id: int | None = None, limit: int = 100) -> list[WebhookDelivery]:
    """The tenant's delivery attempts, newest first (``before_id``: the page after that attempt)."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id)
    if source is not None:
        query = query.where(WebhookDelivery.source == source)
    if subject_id is not None:
        query = query.where(WebhookDelivery.subject_id == subject_id)
    if before_id is not None:
        query = query.where(WebhookDelivery.id < before_id)
    return list(session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit)))


@job_task(name=DELIVER_TASK, queue=DEFAULT_QUEUE)
def deliver_webhook(session: Session, job: Job) -> dict[str, Any]:
    """POST one signed event (see the module's docstring); raises to retry or to fail the job."""
    payload, tenant_id = job.payload, job.tenant_id
    tenant = session.get(Tenant, tenant_id) if tenant_id else None
    if tenant is None:
        raise PublicJobError("the tenant of this webhook no longer exists")
    tenant_id = tenant.id
    body = orjson.dumps({"event": payload["event_type"], **payload["data"]})
    headers = {SIGNATURE_HEADER: sign_payload(tenant.webhook_secret, body), "Content-Type": "application/json",
               IDEMPOTENCY_HEADER: f"{tenant_id}:{payload['key']}"}
    source = payload["source"]
    started = time.perf_counter()
    try:
        status_code, error = _post(payload["url"], body, headers, float(payload["timeout_s"]))
    except OutboundRefused as exc:  # checked again at delivery: DNS or the policy may have changed
        _log_attempt(job, tenant_id, None, None, f"refused: {exc}")
        WEBHOOK_ATTEMPTS.labels(source, "refused").inc()
        raise PublicJobError(f"webhook URL refused, not retried: {exc}") from None
    latency_s = time.perf_counter() - started
    _log_attempt(job, tenant_id, status_code, latency_s * 1000.0, error)
    WEBHOOK_LATENCY.labels(source).observe(latency_s)
    if status_code is None or status_code >= 500 or status_code == 429:
        WEBHOOK_ATTEMPTS.labels(source, "retried").inc()
        raise TransientJobError(error or f"webhook answered {status_code}")
    if status_code >= 300:
        WEBHOOK_ATTEMPTS.labels(source, "rejected").inc()
        if status_code < 400:
            raise PublicJobError(f"webhook answered {status_code}; redirects are not followed")
        raise PublicJobError(f"webhook refused with {status_code}; not retried")
    WEBHOOK_ATTEMPTS.labels(source, "delivered").inc()
    return {"status_code": status_code}


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int | None, str | None]:
    """(status, None), or (None, the error) for a failure worth a retry; ``OutboundRefused`` is not."""
    try:
        return post_to_vetted_address(url, content=body, headers=headers, timeout_s=timeout_s), None
    except (httpx.HTTPError, UnresolvableHost) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _log_attempt(job: Job, tenant_id: str, status_code: int | None, latency_ms: float | None,
                 error: str | None) -> None:
    """Written in its own transaction: the log keeps failed attempts that the job rolls back."""
    payload = job.payload
    with session_scope() as log_session:
        log_session.add(WebhookDelivery(
            job_id=job.id, tenant_id=tenant_id, source=payload["source"], event_type=payload["event_type"],
            subject_id=payload["subject_id"], url=payload["url"], attempt=job.attempts, status_code=status_code,
            latency_ms=latency_ms, error=error))
