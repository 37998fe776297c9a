"""Redis (the fast window state) unreachable: the API starts, says it is not ready, and answers 503s.

Nothing is scored without the window state, and nothing is a 500: the processor's retry of a 503 is
safe because scoring is idempotent by transaction id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Stack
from tests.fraud.conftest import FRAUD_ENV, FraudServer, run_cli, transaction
from tests.support import ManagedProcess, free_port, python_argv

DEAD_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture(scope="module")
def server_without_redis(postgres_stack: Stack) -> Iterator[FraudServer]:
    from sqlalchemy import create_engine

    stack = dataclasses.replace(postgres_stack, redis_url=DEAD_REDIS)
    run_cli(stack, "db", "upgrade")
    port = free_port()
    server = ManagedProcess(python_argv("-m", "uvicorn", "services.fraud.api:app", "--host", "127.0.0.1",
                                        "--port", str(port)), {**stack.env, **FRAUD_ENV}, "fraud-no-redis")
    server.wait_for_output(r"Uvicorn running on", timeout_s=120)
    engine = create_engine(stack.database_url)
    yield FraudServer(stack, f"http://127.0.0.1:{port}/v1", engine)
    engine.dispose()
    server.stop()


def test_webhook_answers_503_with_retry_after(server_without_redis: FraudServer) -> None:
    tenant = server_without_redis.new_tenant()
    body, headers = tenant.signed(transaction())
    with tenant.client() as client:
        response = client.post("/transactions", content=body, headers=headers)
        lookup = client.get("/transactions/tx-never-seen")
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert "Redis" in response.json()["detail"]
    assert lookup.status_code == 503, lookup.text


def test_readiness_names_the_fast_state(server_without_redis: FraudServer) -> None:
    ready = httpx.get(server_without_redis.base_url.removesuffix("/v1") + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["fast_state"] != "ok"
