"""Signed outbound webhooks through a real Celery worker to a real HTTP receiver on loopback, on
SQLite + embedded broker and PostgreSQL + Redis.

The receiver answers by path, from a script per path (a status, or a pause past the client's
timeout), and keeps every request it got. The worker's environment allow-lists 127.0.0.1 only
(``TESSERA_CALLBACK_ALLOWED_HOSTS``), as an operator would for an internal receiver; a receiver on
127.0.0.2 stands for an address inside the deployment that no tenant may reach. One worker per
database serves every test here (starting one is the slow part).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from shared.db import session_scope
from shared.jobs import FAILED, SUCCEEDED, Job, enqueue
from shared.security import SIGNATURE_HEADER, ensure_tenant, verify_signature
from shared.webhooks import DELIVER_TASK, IDEMPOTENCY_HEADER, enqueue_webhook, list_deliveries
from tests.conftest import Stack
from tests.support import ManagedProcess, python_argv, wait_until

ALLOW_LOOPBACK = {"TESSERA_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"}
SLOW_ANSWER = -1
"""In a script: answer 200 only after the client's timeout has passed."""


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """What each path answers, in order (then 200), and every request received."""

    url: str
    scripts: dict[str, list[int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def on(self, path: str) -> list[Received]:
        return [request for request in self.received if request.path == path]


def serve(host: str) -> tuple[Receiver, ThreadingHTTPServer]:
    """A receiver listening on ``host`` (any free port)."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append(Received(self.path, dict(self.headers.items()), body))
            script = state.scripts.get(self.path, [])
            status = script.pop(0) if script else 200
            if status == SLOW_ANSWER:
                time.sleep(1.5)
                status = 200
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://{host}:{server.server_address[1]}"
    return state, server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver the worker may reach (allow-listed)."""
    state, server = serve("127.0.0.1")
    yield state
    server.shutdown()


@pytest.fixture
def internal_receiver() -> Iterator[Receiver]:
    """A receiver on a loopback address that is not allow-listed."""
    state, server = serve("127.0.0.2")
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, ManagedProcess]]:
    """The module's webhook workers, one per stack, stopped when the module is done."""
    started: dict[str, ManagedProcess] = {}
    yield started
    for worker in started.values():
        worker.stop()


@pytest.fixture
def worker(migrated_stack: Stack, workers: dict[str, ManagedProcess]) -> ManagedProcess:
    """A worker delivering webhooks on this stack, with 127.0.0.1 allow-listed."""
    if migrated_stack.name not in workers:
        name = f"webhooks-{uuid.uuid4().hex[:6]}"
        argv = python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "default",
                           "--include", "shared.webhooks", "--concurrency", "1", "--hostname", f"{name}@%h",
                           "--without-gossip", "--without-mingle", "--loglevel", "INFO")
        workers[migrated_stack.name] = ManagedProcess(argv, {**migrated_stack.env, **ALLOW_LOOPBACK}, name)
    workers[migrated_stack.name].wait_for_output(r"ready\.", timeout_s=90)
    return workers[migrated_stack.name]


def new_tenant() -> tuple[str, str]:
    """A tenant of this test's own: (id, webhook secret)."""
    with session_scope() as session:
        tenant = ensure_tenant(session, f"hooks-{uuid.uuid4().hex[:8]}")
        return tenant.id, tenant.webhook_secret


def send(tenant_id: str, url: str, key: str, **options: Any) -> str:
    """Queue a ``tests.thing_happened`` event (committed); returns its job id."""
    with session_scope() as session:
        return enqueue_webhook(session, tenant_id=tenant_id, url=url, source="tests", event_type="tests.thing_happened",
                               data={"thing": key, "amount": 12.5}, key=key, subject_id=f"subject-{key}",
                               queue="default", **options).id


def job_state(job_id: str) -> tuple[str, int, str | None]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status, job.attempts, job.error


def wait_finished(job_id: str, timeout_s: float = 60) -> tuple[str, int, str | None]:
    wait_until(lambda: job_state(job_id)[0] in (SUCCEEDED, FAILED), timeout_s, f"webhook job {job_id} to finish")
    return job_state(job_id)


def attempts_logged(tenant_id: str, subject_id: str) -> list[tuple[int, int | None, str | None]]:
    """(attempt, status, error) of one event's attempts, oldest first."""
    with session_scope() as session:
        rows = list_deliveries(session, tenant_id, subject_id=subject_id)
        return [(row.attempt, row.status_code, row.error) for row in reversed(rows)]


def test_a_webhook_is_signed_retried_on_503_and_delivered_once(worker: ManagedProcess, receiver: Receiver) -> None:
    """First answer 503, then 200: two attempts, both signed with the tenant's secret in the inbound
    format, both logged with their latency; a repeat of the event, and a duplicate of its message
    after delivery, send nothing more."""
    tenant_id, secret = new_tenant()
    receiver.scripts["/flaky"] = [503]
    job_id = send(tenant_id, f"{receiver.url}/flaky", "evt-1")
    assert send(tenant_id, f"{receiver.url}/flaky", "evt-1") == job_id  # the same key: the same job

    assert wait_finished(job_id) == (SUCCEEDED, 2, "TransientJobError: webhook answered 503")
    attempts = receiver.on("/flaky")
    assert len(attempts) == 2
    for attempt in attempts:
        verify_signature(attempt.headers[SIGNATURE_HEADER], attempt.body, [secret], tolerance_s=300)
        assert attempt.headers[IDEMPOTENCY_HEADER] == f"{tenant_id}:evt-1"
        assert attempt.headers["Content-Type"] == "application/json"
    assert orjson.loads(attempts[-1].body) == {"event": "tests.thing_happened", "thing": "evt-1", "amount": 12.5}
    assert attempts_logged(tenant_id, "subject-evt-1") == [(1, 503, None), (2, 200, None)]
    with session_scope() as session:
        logged = list_deliveries(session, tenant_id)
        assert all(row.latency_ms is not None and row.latency_ms > 0 for row in logged)
        assert {(row.source, row.event_type, row.job_id) for row in logged} == {
            ("tests", "tests.thing_happened", job_id)}
        other_tenant, _ = new_tenant()
        assert list_deliveries(session, other_tenant) == []

    enqueue(DELIVER_TASK, "default", job_id)  # a duplicate message of the delivered job ...
    marker = send(tenant_id, f"{receiver.url}/marker", "evt-after")  # ... handled before this one
    assert wait_finished(marker)[0] == SUCCEEDED
    assert len(receiver.on("/flaky")) == 2, "a delivered webhook was sent again"


def test_timeouts_are_retried_and_client_errors_are_not(worker: ManagedProcess, receiver: Receiver) -> None:
    """An answer later than the timeout is a retried attempt with the error logged; a 410 fails the
    job after one attempt, with the reason in the job's public error."""
    tenant_id, _secret = new_tenant()
    receiver.scripts["/slow"] = [SLOW_ANSWER]
    receiver.scripts["/gone"] = [410]
    slow = send(tenant_id, f"{receiver.url}/slow", "evt-slow", timeout_s=0.5)
    gone = send(tenant_id, f"{receiver.url}/gone", "evt-gone")

    assert wait_finished(slow)[:2] == (SUCCEEDED, 2)
    [(first, status, error), second] = attempts_logged(tenant_id, "subject-evt-slow")
    assert (first, status) == (1, None) and error is not None and "ReadTimeout" in error
    assert second == (2, 200, None)
    assert wait_finished(gone) == (FAILED, 1, "PublicJobError: webhook refused with 410; not retried")
    assert attempts_logged(tenant_id, "subject-evt-gone") == [(1, 410, None)]
    assert len(receiver.on("/gone")) == 1


def test_a_url_refused_at_delivery_fails_at_once_and_reaches_nothing(worker: ManagedProcess,
                                                                     internal_receiver: Receiver) -> None:
    """A loopback address that is not allow-listed is refused when the worker delivers, although
    nothing checked the URL when it was queued: the job fails on its first attempt, the log says
    why, and the receiver gets nothing."""
    tenant_id, _secret = new_tenant()
    job_id = send(tenant_id, f"{internal_receiver.url}/internal", "evt-ssrf")
    status, attempts, error = wait_finished(job_id)
    assert (status, attempts) == (FAILED, 1)
    assert error is not None and error.startswith("PublicJobError: webhook URL refused, not retried: 127.0.0.2 is a "
                                                  "loopback address")
    [(attempt, status_code, logged_error)] = attempts_logged(tenant_id, "subject-evt-ssrf")
    assert (attempt, status_code) == (1, None) and logged_error is not None
    assert logged_error.startswith("refused: 127.0.0.2 is a loopback address")
    with session_scope() as session:
        assert [row.latency_ms for row in list_deliveries(session, tenant_id)] == [None]  # nothing was sent
    assert internal_receiver.received == []


def test_event_data_may_not_name_the_event(migrated_stack: Stack) -> None:
    tenant_id, _secret = new_tenant()
    with session_scope() as session, pytest.raises(ValueError, match="'event' member"):
        enqueue_webhook(session, tenant_id=tenant_id, url="https://hooks.example/x", source="tests",
                        event_type="tests.thing_happened", data={"event": "other"}, key="k")
