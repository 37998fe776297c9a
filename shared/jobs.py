"""Durable jobs: accepted work survives a worker crash and is applied once in effect.

A job is a row (``platform_jobs``) written in the caller's transaction, keyed by an idempotency key
and owned by a tenant (``tenant_id``; None for platform work), who alone may read it. Its Celery
message is sent only after the caller's OUTER transaction commits (a savepoint's release is not a
commit; a rollback sends nothing). A worker *claims* the job with a lease and an attempt number (a
fencing token), runs the handler in one transaction, and marks it succeeded in that same
transaction only if it still holds the claim. So:

- a resubmitted key returns the existing job (no second job);
- a pool process killed mid-task is requeued by Celery (``task_reject_on_worker_lost``);
- a whole worker killed mid-task leaves a running job whose lease lapses; the sweeper re-enqueues it;
- a message lost between commit and publish leaves a pending job; the sweeper re-enqueues it;
- a late duplicate finds the job succeeded (or its claim stolen) and changes nothing;
- a job that fails is a failed Celery task (:class:`JobFailed`, acked, not redelivered); its stored
  ``error`` names the exception type and carries its message only for a :class:`PublicJobError`,
  otherwise "internal error ... see the worker log for job <id>": exception text may hold customer
  or card data, so it stays in the worker log (with the traceback), which is operators' data.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

from celery import Task
from celery.signals import worker_ready
from sqlalchemy import Integer, String, Text, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Mapped, Session, mapped_column

from shared.config import get_settings
from shared.db import Base, after_commit, session_scope, utcnow
from shared.errors import NotFound
from shared.queue import DEFAULT_QUEUE, SWEEP_TASK, celery_app

logger = logging.getLogger("tessera.jobs")

PENDING, RUNNING, SUCCEEDED, FAILED = "pending", "running", "succeeded", "failed"
STALE_PENDING_AFTER_S = 30.0
"""A pending job older than this whose message may have been lost is re-enqueued."""


class PublicJobError(Exception):
    """A job failure whose message is written for the tenant: it is stored in the job's ``error``.

    Domain code raises it (or a subclass) on purpose, with no customer or card data in the text.
    Any other exception is stored as a generic "internal error ... see the worker log for job <id>";
    its text and traceback go to the worker log only (operators' data).
    """


class TransientJobError(PublicJobError):
    """Raise from a job handler for a failure worth retrying (network, lock, busy peer)."""


class JobFailed(Exception):
    """Raised by a job task once its job is closed as failed, so Celery records a failed task.

    Late acks still ack a task that raised (it is not delivered again); the job row holds the error.
    """


class Job(Base):
    """One unit of accepted work, tracked from submission to result."""

    __tablename__ = "platform_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    task_name: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True,
                                                  doc="the submitting tenant: only it may see the job")
    queue: Mapped[str] = mapped_column(String(50), default=DEFAULT_QUEUE)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    progress: Mapped[float] = mapped_column(default=0.0)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


JobHandler = Callable[[Session, Job], dict[str, Any] | None]


def submit_job(session: Session, task: Task, *, key: str, payload: dict[str, Any], tenant_id: str | None,
               max_attempts: int = 5, queue: str | None = None) -> Job:
    """Record a job of ``tenant_id`` in ``session`` (idempotent by ``key``); enqueue it after commit.

    ``tenant_id`` is None only for platform work that no tenant may see. ``queue`` overrides the
    task's own (a platform task run by the workers of the vertical it serves). The message is published
    once the session's outer transaction commits (see :func:`shared.db.after_commit`), never for a
    row that is not committed. Returns the existing job when ``key`` was submitted before; nothing
    new is enqueued then.
    """
    existing = session.scalar(select(Job).where(Job.idempotency_key == key))
    if existing is not None:
        return existing
    # No savepoint: pysqlite's legacy transactions make RELEASE of a savepoint opened before the
    # session's first write a COMMIT, which would keep the job of a transaction that rolls back.
    insert = _dialect_insert(session).values(
        idempotency_key=key, task_name=task.name, queue=queue or task_queue(task), payload=payload,
        tenant_id=tenant_id, max_attempts=max_attempts,
    ).on_conflict_do_nothing(index_elements=[Job.idempotency_key]).returning(Job.id)
    inserted_id = session.scalar(insert)  # None: a concurrent submit of the same key committed first
    job = session.scalars(select(Job).where(Job.idempotency_key == key)).one()
    if inserted_id is not None:
        task_name, queue = job.task_name, job.queue
        after_commit(session, lambda: enqueue(task_name, queue, inserted_id))
    return job


def _dialect_insert(session: Session) -> Any:
    """``INSERT INTO platform_jobs`` with ``ON CONFLICT`` support (PostgreSQL and SQLite)."""
    dialect = {"postgresql": postgresql, "sqlite": sqlite_dialect}[session.get_bind().dialect.name]
    return dialect.insert(Job)


def task_queue(task: Task) -> str:
    """The queue a job task runs on."""
    return getattr(task, "tessera_queue", DEFAULT_QUEUE)


def enqueue(task_name: str, queue: str, job_id: str, countdown: float | None = None) -> None:
    """Publish the message that runs ``job_id`` (safe to repeat: execution is claimed)."""
    celery_app.send_task(task_name, args=[job_id], queue=queue, countdown=countdown)


def get_job(session: Session, job_id: str, *, tenant_id: str | None) -> Job:
    """The job ``job_id`` of ``tenant_id``, or :class:`NotFound` (also for another tenant's job)."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} does not exist")
    return job


def public_error(job_id: str, exc: BaseException) -> str:
    """What a failed job's ``error`` says: the message of a :class:`PublicJobError` only."""
    if isinstance(exc, PublicJobError):
        return f"{type(exc).__name__}: {exc}"
    return f"internal error ({type(exc).__name__}); see the worker log for job {job_id}"


def report_progress(job_id: str, fraction: float) -> None:
    """Record progress (0..1) and renew the lease: a long job calls this as a heartbeat."""
    lease = timedelta(seconds=get_settings().task_lease_s)
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == RUNNING)
            .values(progress=max(0.0, min(1.0, fraction)), lease_until=utcnow() + lease)
        )


def _claim(job_id: str) -> tuple[str, int | None, float]:
    """Try to take ``job_id``. Returns (outcome, attempt, seconds_until_lease_lapses)."""
    lease = timedelta(seconds=get_settings().task_lease_s)
    with session_scope() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            return "missing", None, 0.0
        now = utcnow()
        if job.status in (SUCCEEDED, FAILED):
            return "finished", None, 0.0
        lease_until = job.lease_until
        if job.status == RUNNING and lease_until is not None and lease_until > now:
            return "leased", None, (lease_until - now).total_seconds()
        attempt = job.attempts + 1
        claimed = _execute_update(session,
            update(Job).where(Job.id == job_id, Job.attempts == attempt - 1,
                              Job.status.in_((PENDING, RUNNING)))
            .values(status=RUNNING, attempts=attempt, lease_until=now + lease)
        )
        if claimed.rowcount != 1:
            return "leased", None, 1.0
        return "claimed", attempt, 0.0


def _execute_update(session: Session, statement: Any) -> CursorResult[Any]:
    """Run an UPDATE and return its cursor result (for ``rowcount``: compare-and-set)."""
    return cast(CursorResult[Any], session.execute(statement))


def _finish(session: Session, job_id: str, attempt: int, **values: Any) -> bool:
    """Close the job if this attempt still holds it; False means the claim was lost."""
    done = _execute_update(session,
        update(Job).where(Job.id == job_id, Job.attempts == attempt, Job.status == RUNNING)
        .values(finished_at=utcnow(), lease_until=None, **values)
    )
    return done.rowcount == 1


def execute_job(task: Task, job_id: str, handler: JobHandler) -> dict[str, Any] | None:
    """Claim, run and close one job; the body of every job task."""
    outcome, attempt, wait_s = _claim(job_id)
    if outcome == "leased":
        raise task.retry(countdown=wait_s + 1.0, max_retries=None)
    if outcome != "claimed" or attempt is None:
        logger.info("job %s skipped: %s", job_id, outcome)
        return None
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            result = handler(session, job) or {}
            if not _finish(session, job_id, attempt, status=SUCCEEDED, progress=1.0, result=result):
                raise _ClaimLost(job_id)
        return result
    except _ClaimLost:
        logger.warning("job %s attempt %s lost its claim; its effects were rolled back", job_id, attempt)
        return None
    except TransientJobError as exc:
        _retry_or_fail(task, job_id, attempt, exc)
        return None
    except Exception as exc:
        # The traceback (with whatever data the exception carries) goes to the worker log only.
        logger.exception("job %s failed permanently", job_id)
        _close_failed(job_id, attempt, exc)
        raise JobFailed(f"job {job_id} failed: {type(exc).__name__}") from None


class _ClaimLost(Exception):
    pass


def _retry_or_fail(task: Task, job_id: str, attempt: int, exc: TransientJobError) -> None:
    """Retry with backoff, or close the job as failed (raising :class:`JobFailed`) after its last attempt."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        retrying = attempt < job.max_attempts
        if retrying:
            session.execute(update(Job).where(Job.id == job_id, Job.attempts == attempt)
                            .values(status=PENDING, lease_until=None, error=public_error(job_id, exc)))
    if retrying:
        raise task.retry(countdown=min(300.0, 2.0 ** attempt), max_retries=None, exc=exc)
    logger.error("job %s failed after %s attempts: %s", job_id, attempt, exc)
    _close_failed(job_id, attempt, exc)
    raise JobFailed(f"job {job_id} failed after {attempt} attempts: {type(exc).__name__}")


def _close_failed(job_id: str, attempt: int, exc: Exception) -> None:
    with session_scope() as session:
        _finish(session, job_id, attempt, status=FAILED, error=public_error(job_id, exc))


def job_task(*, name: str, queue: str) -> Callable[[JobHandler], Task]:
    """Turn ``handler(session, job) -> result`` into a Celery task run through :func:`execute_job`.

    The handler's writes and the job's success commit together, so its effect happens once.
    Raise :class:`TransientJobError` to retry with exponential backoff, :class:`PublicJobError` to
    fail with a message the tenant may read. A failed job is a failed task (:class:`JobFailed`,
    logged by Celery as "raised expected" next to the job's own error line with the traceback).
    """

    def decorate(handler: JobHandler) -> Task:
        @celery_app.task(name=name, bind=True, acks_late=True, ignore_result=True, throws=(JobFailed,))
        def run(self: Task, job_id: str) -> dict[str, Any] | None:
            return execute_job(self, job_id, handler)

        run.tessera_queue = queue  # type: ignore[attr-defined]
        return run  # type: ignore[no-any-return]

    return decorate


def find_stalled_jobs(session: Session, now: datetime | None = None) -> list[Job]:
    """Jobs whose worker died (lease lapsed) or whose message may never have been sent."""
    now = now or utcnow()
    stale_pending = now - timedelta(seconds=STALE_PENDING_AFTER_S)
    return list(session.scalars(
        select(Job).where(
            ((Job.status == RUNNING) & (Job.lease_until < now))
            | ((Job.status == PENDING) & (Job.updated_at < stale_pending))
        ).limit(500)
    ))


@celery_app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_stalled_jobs() -> int:
    """Re-enqueue stalled jobs (scheduled by beat; also run when a worker starts)."""
    with session_scope() as session:
        stalled = [(job.task_name, job.queue, job.id) for job in find_stalled_jobs(session)]
        if not stalled:
            logger.debug("job sweep: nothing stalled")
        for _task_name, _queue, job_id in stalled:
            # Touch pending ones so they are not re-sent on every sweep while the queue is busy.
            session.execute(update(Job).where(Job.id == job_id, Job.status == PENDING)
                            .values(updated_at=utcnow()))
    for task_name, queue, job_id in stalled:
        logger.warning("re-enqueueing stalled job %s (%s)", job_id, task_name)
        enqueue(task_name, queue, job_id)
    return len(stalled)


@worker_ready.connect
def _sweep_when_worker_starts(**_kwargs: Any) -> None:
    """A restarted worker recovers what its predecessor left behind without waiting for beat."""
    sweep_stalled_jobs.apply_async(queue=DEFAULT_QUEUE)
