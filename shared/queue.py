"""The one Celery app: a named queue per vertical, late acks, prefetch 1, retries with backoff.

Broker by URL: the embedded default is kombu's SQLAlchemy transport on a SQLite file (works across
processes on one machine, no server); Redis or RabbitMQ by setting ``TESSERA_BROKER_URL``.

Delivery guarantees: ``acks_late`` + ``task_reject_on_worker_lost`` requeue a task whose pool
process dies. The embedded transport never re-delivers a message whose *whole* worker died, and
Redis only after its visibility timeout, so durable work also goes through :mod:`shared.jobs`: a job
row with a lease, re-enqueued by the sweeper when the lease lapses, and applied once by key.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu import pools as kombu_pools
from kombu.transport import sqlalchemy as kombu_sqla

from shared.config import Settings, get_settings
from shared.verticals import vertical_queues, vertical_task_modules

DEFAULT_QUEUE = "default"
SWEEP_TASK = "shared.jobs.sweep_stalled_jobs"
QUEUES: tuple[str, ...] = (DEFAULT_QUEUE, *vertical_queues())
PLATFORM_TASK_MODULES: tuple[str, ...] = ("shared.jobs", "shared.webhooks")


def task_modules() -> list[str]:
    """Modules holding tasks: the platform's own and every registered vertical's (:mod:`shared.verticals`).

    Named as strings: the worker imports them, ``shared`` itself imports no vertical.
    """
    return [*PLATFORM_TASK_MODULES, *vertical_task_modules()]


def _celery_config(settings: Settings) -> dict[str, Any]:
    broker_options: dict[str, Any] = {}
    if settings.celery_broker_url.startswith(("redis://", "rediss://")):
        # Unacked messages of a dead worker come back after this; jobs dedupe by key anyway.
        broker_options["visibility_timeout"] = max(60, int(settings.task_lease_s * 2))
    return {
        "broker_url": settings.celery_broker_url,
        "result_backend": settings.celery_result_backend,
        "broker_transport_options": broker_options,
        "broker_connection_retry_on_startup": True,
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        "task_default_queue": DEFAULT_QUEUE,
        "task_default_exchange": DEFAULT_QUEUE,
        "task_default_routing_key": DEFAULT_QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 24 * 3600,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "sweep-stalled-jobs": {
                "task": SWEEP_TASK,
                "schedule": settings.job_sweep_interval_s,
                "options": {"queue": DEFAULT_QUEUE, "expires": settings.job_sweep_interval_s},
            }
        },
    }


def create_celery_app(settings: Settings | None = None) -> Celery:
    """Build the Celery app from settings (tests build their own with other URLs)."""
    settings = settings or get_settings()
    # The embedded transport polls; its class attribute is the knob that works (see module doc).
    kombu_sqla.Transport.polling_interval = settings.broker_polling_interval_s
    app = Celery("tessera", include=task_modules())
    app.conf.update(_celery_config(settings))
    return app


celery_app = create_celery_app()
"""The process-wide Celery app used by every ``tasks.py``."""


QUIET_PERIODIC_TASKS: set[str] = {SWEEP_TASK}
"""Tasks beat runs every few seconds whose routine Celery lines are logged at DEBUG (:func:`schedule_periodic`)."""


def schedule_periodic(entry: str, task: str, every_s: float, *, queue: str = DEFAULT_QUEUE, quiet: bool = True) -> None:
    """Have beat send ``task`` every ``every_s`` seconds to ``queue`` (a run not started within the
    interval expires: the next one replaces it).

    ``quiet``: Celery's per-run INFO lines about it (beat sending it, a worker receiving and finishing
    it) become DEBUG, as the platform's own job sweeper's do, so an idle system is quiet at INFO; the
    task itself says at WARNING when a run finds something to report.
    """
    celery_app.conf.beat_schedule[entry] = {"task": task, "schedule": every_s,
                                            "options": {"queue": queue, "expires": every_s}}
    if quiet:
        QUIET_PERIODIC_TASKS.add(task)


class _SweepsAtDebug(logging.Filter):
    """Celery's per-run INFO lines about a quiet periodic task (beat sending it, the worker receiving
    and finishing it, every few seconds) become DEBUG: an idle system is quiet at INFO. A sweep that
    recovers something says so itself, at WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        if not any(task in message for task in QUIET_PERIODIC_TASKS):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


for _celery_logger in ("celery.beat", "celery.worker.strategy", "celery.app.trace",
                       "celery.worker.request"):  # the last: sweeps expired in a busy queue
    logging.getLogger(_celery_logger).addFilter(_SweepsAtDebug())


def reconfigure_celery_app(settings: Settings) -> None:
    """Point the process-wide app at other URLs (tests switching between SQLite and PostgreSQL)."""
    kombu_sqla.Transport.polling_interval = settings.broker_polling_interval_s
    celery_app.conf.update(_celery_config(settings))
    # The next publish opens fresh connection and producer pools on the new broker.
    kombu_pools.reset()
    celery_app._after_fork()
    # The cached result backend too, so the next AsyncResult reads the new one (Celery keeps a
    # thread-safe backend on the app and others per thread).
    celery_app._backend_cache = None
    celery_app._local.__dict__.pop("backend", None)
