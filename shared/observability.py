"""JSON logs with request ids, Prometheus metrics, ``/healthz`` and ``/readyz``.

The request middleware is plain ASGI (no ``BaseHTTPMiddleware``): it costs a few microseconds on
the fraud hot path. Readiness is a registry of named checks (database, broker, models loaded) that
each app fills in; ``/readyz`` answers 503 problem+json naming what is not ready.
"""

from __future__ import annotations

import contextvars
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.config import get_settings
from shared.errors import problem_body, problem_response, problem_responses

REQUEST_ID_HEADER = "x-request-id"
access_logger = logging.getLogger("tessera.access")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

HTTP_REQUESTS = Counter("tessera_http_requests_total", "HTTP requests", ["app", "method", "status"])
HTTP_LATENCY = Histogram(
    "tessera_http_request_seconds", "HTTP request latency", ["app"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

GC_PAUSE = Histogram(
    "tessera_gc_pause_seconds", "Time one garbage collection held the interpreter", ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

ReadinessCheck = Callable[[], Awaitable[None] | None]


class _GcPauseTimer:
    """A ``gc.callbacks`` entry that times each collection into :data:`GC_PAUSE`."""

    def __init__(self) -> None:
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - self.started)


def observe_gc_pauses() -> None:
    """Time every garbage collection of this process into ``tessera_gc_pause_seconds`` (once per process).

    A collection stops every thread that holds the interpreter: a pause of tens of milliseconds
    lands whole on the latency of each request in flight, so it belongs beside the request latency.
    """
    if not any(isinstance(callback, _GcPauseTimer) for callback in gc.callbacks):
        gc.callbacks.append(_GcPauseTimer())


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current request id when there is one."""

    _RESERVED = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in self._RESERVED and k != "message"})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | None = None, json_logs: bool | None = None) -> None:
    """Route all logging to stderr, as JSON lines unless disabled in settings."""
    settings = get_settings()
    handler = logging.StreamHandler(sys.stderr)
    use_json = settings.log_json if json_logs is None else json_logs
    handler.setFormatter(JsonLogFormatter() if use_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or settings.log_level)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class RequestContextMiddleware:
    """Assign/propagate ``X-Request-ID``, record request count and latency per app, write the access log.

    The outermost instance (the gateway's, or a vertical app's when it runs alone) writes one
    access line per request, unless ``TESSERA_ACCESS_LOG=false``.
    """

    def __init__(self, app: ASGIApp, app_name: str, access_log: bool | None = None) -> None:
        self.app = app
        self.app_name = app_name
        self.access_log = get_settings().access_log if access_log is None else access_log
        self._latency = HTTP_LATENCY.labels(app_name)
        self._counters: dict[tuple[str, int], Any] = {}  # label lookups cost more than the increment

    def _count(self, method: str, status: int) -> None:
        counter = self._counters.get((method, status))
        if counter is None:
            counter = self._counters[(method, status)] = HTTP_REQUESTS.labels(self.app_name, method, str(status))
        counter.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        outer_request_id = state.get("request_id")  # set already when mounted under the gateway
        request_id = outer_request_id or _incoming_request_id(scope) or os.urandom(16).hex()
        token = request_id_var.set(request_id)
        state["request_id"] = request_id
        path = scope["path"]  # as the client sent it, before a mounted app's routing touches the scope
        started = time.perf_counter()
        status_holder = [500]
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                if outer_request_id is None:
                    message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not answered:
                raise
            # Starlette re-raises an error after its 500 handler answered (and logged) it; raising
            # it further would make uvicorn log it a second time and drop the keep-alive connection.
        finally:
            elapsed = time.perf_counter() - started
            self._latency.observe(elapsed)
            self._count(scope["method"], status_holder[0])
            if self.access_log and outer_request_id is None and access_logger.isEnabledFor(logging.INFO):
                log_access(scope["method"], path, status_holder[0], elapsed, state.get("principal"))
            request_id_var.reset(token)


def log_access(method: str, path: str, status: int, elapsed_s: float, principal: Any) -> None:
    """One access-log line: never the query string, headers or body (keys, secrets, card data)."""
    duration_ms = round(elapsed_s * 1000, 2)
    fields: dict[str, Any] = {"method": method, "path": path, "status": status, "duration_ms": duration_ms}
    if principal is not None:  # set once the API key was checked (shared.security, shared.hot_routes)
        fields["tenant"] = principal.tenant_id
    access_logger.info("%s %s %d %.2f ms", method, path, status, duration_ms, extra=fields)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")[:128]
            return text if text.replace("-", "").isalnum() else None
    return None


class Readiness:
    """Named readiness checks; each raises (or returns an awaitable that raises) when not ready."""

    def __init__(self) -> None:
        self._checks: dict[str, ReadinessCheck] = {}

    def add(self, name: str, check: ReadinessCheck) -> None:
        """Register (or replace) a check."""
        self._checks[name] = check

    async def run(self, skip: frozenset[str] = frozenset()) -> dict[str, str]:
        """Run every check not in ``skip``; returns ``{name: "ok" | "<error>"}``."""
        results: dict[str, str] = {}
        for name, check in self._checks.items():
            if name in skip:
                continue
            try:
                outcome = check()
                if outcome is not None:
                    await outcome
                results[name] = "ok"
            except Exception as exc:  # a failing check is reported, never raised
                results[name] = f"{type(exc).__name__}: {exc}"[:300]
        return results


def health_router(readiness: Readiness) -> APIRouter:
    """``/healthz`` (process alive), ``/readyz`` (dependencies ready) and ``/metrics``."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", response_model=None, responses={
        200: {"description": "Every check passes", "content": {"application/json": {"schema": {"type": "object"}}}},
        **problem_responses(503, notes={503: "A check fails; the problem's checks say which."})})
    async def readyz() -> Any:
        results = await readiness.run()
        failing = {name: result for name, result in results.items() if result != "ok"}
        if failing:
            detail = "not ready: " + ", ".join(failing)
            return problem_response(problem_body(503, None, detail, "not-ready", "/readyz",
                                                 {"checks": results}))
        return {"status": "ready", "checks": results}

    @router.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition", "content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
