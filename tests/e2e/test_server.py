"""The suite served by real processes: uvicorn over HTTP, and `tessera up` started and stopped."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import pytest

from shared.verticals import verticals
from tests.conftest import Stack
from tests.support import ManagedProcess, free_port, python_argv, wait_until

VERTICAL_APPS = {vertical.name: f"{vertical.package}.{vertical.app}" for vertical in verticals()}
"""Every registered vertical's app as uvicorn names it (``services.fraud.api:app``)."""


def serve(app_path: str, env: dict[str, str], name: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    process = ManagedProcess(python_argv("-m", "uvicorn", app_path, "--host", "127.0.0.1", "--port",
                                         str(port), "--loop", "uvloop", "--http", "httptools"), env, name)
    process.wait_for_output(r"Uvicorn running on", timeout_s=60)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture
def gateway(migrated_stack: Stack) -> Iterator[str]:
    process, base_url = serve("services.gateway:app", migrated_stack.env, "gateway")
    yield base_url
    process.stop()


def test_gateway_reports_health_readiness_and_metrics(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"fraud": "ok", "cs": "ok", "nodule": "ok", "iiot": "ok",
                                          "database": "ok", "broker": "ok"}
        response = client.get("/cs/v1/status", headers={"X-Request-ID": "req-123"})
        assert response.headers["x-request-id"] == "req-123"
        metrics = client.get("/metrics").text
        assert 'tessera_http_requests_total{app="cs",method="GET",status="200"}' in metrics


def test_every_vertical_is_mounted_and_errors_are_problem_json(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=10) as client:
        for prefix in VERTICAL_APPS:
            assert client.get(f"/{prefix}/healthz").status_code == 200
        missing = client.get("/fraud/v1/does-not-exist")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        body = missing.json()
        assert body["status"] == 404 and body["instance"] == "/fraud/v1/does-not-exist"
        assert body["request_id"] == missing.headers["x-request-id"]


def test_the_fraud_webhook_hot_route_is_served_under_the_gateway_prefix(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=10) as client:
        anonymous = client.post("/fraud/v1/transactions", content=b"{}", headers={"X-Request-ID": "hot-1"})
        assert anonymous.status_code == 401
        assert anonymous.headers["content-type"] == "application/problem+json"
        assert anonymous.headers["x-request-id"] == "hot-1"
        assert anonymous.json()["request_id"] == "hot-1"
        assert anonymous.json()["instance"] == "/fraud/v1/transactions"
        other_method = client.get("/fraud/v1/transactions")  # not a hot route: FastAPI answers
        assert other_method.status_code == 405
        assert other_method.headers["content-type"] == "application/problem+json"
        metrics = client.get("/metrics").text
        assert 'tessera_http_requests_total{app="fraud",method="POST",status="401"}' in metrics


@pytest.mark.parametrize("vertical", sorted(VERTICAL_APPS))
def test_each_vertical_runs_alone(sqlite_stack: Stack, vertical: str) -> None:
    process, base_url = serve(VERTICAL_APPS[vertical], sqlite_stack.env, vertical)
    try:
        assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
    finally:
        process.stop()


def test_readiness_fails_clearly_when_the_broker_is_down(sqlite_stack: Stack) -> None:
    env = {**sqlite_stack.env, "TESSERA_BROKER_URL": "redis://127.0.0.1:1/0"}
    process, base_url = serve("services.gateway:app", env, "gateway-no-broker")
    try:
        response = httpx.get(f"{base_url}/readyz", timeout=30)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["checks"]["database"] == "ok"
        assert response.json()["checks"]["broker"] != "ok"
    finally:
        process.stop()


def test_tessera_up_starts_everything_and_ctrl_c_stops_it(tmp_path) -> None:
    port = free_port()
    env = {"TESSERA_DATA_DIR": str(tmp_path / "fresh"), "TESSERA_PORT": str(port),
           "TESSERA_LOG_JSON": "false", "PYTHONUNBUFFERED": "1"}
    up = ManagedProcess(python_argv("-m", "services.cli", "up"), env, "tessera-up")
    try:
        up.wait_for_output(r"ready\.", timeout_s=90)  # the Celery worker
        wait_until(lambda: _ready(port), 60, "the gateway to be ready")
        up.process.send_signal(signal.SIGINT)
        assert up.process.wait(timeout=60) == 0, up.output[-3000:]
        assert "tessera up: all stopped" in up.output
    finally:
        up.stop()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
