"""The write-behind recorder in its own process (``tessera recorder fraud``), as compose runs it.

The API runs with ``TESSERA_RECORDER_IN_API=false``: its answers land in the decision stream and
only the separate recorder turns them into rows; SIGTERM stops it after draining.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import Stack
from tests.fraud.conftest import FRAUD_ENV, FraudServer, run_cli, transaction
from tests.support import ManagedProcess, free_port, python_argv, wait_until


@pytest.fixture(scope="module")
def api_without_recorder(postgres_stack: Stack) -> Iterator[FraudServer]:
    run_cli(postgres_stack, "db", "upgrade")
    port = free_port()
    env = {**postgres_stack.env, **FRAUD_ENV, "TESSERA_RECORDER_IN_API": "false"}
    server = ManagedProcess(python_argv("-m", "uvicorn", "services.fraud.api:app", "--host", "127.0.0.1",
                                        "--port", str(port), "--loop", "uvloop", "--http", "httptools"),
                            env, "fraud-api-without-recorder")
    server.wait_for_output(r"Uvicorn running on", timeout_s=120)
    engine = create_engine(postgres_stack.database_url)
    yield FraudServer(postgres_stack, f"http://127.0.0.1:{port}/v1", engine)
    engine.dispose()
    server.stop()


def stored_count(server: FraudServer, tenant_id: str) -> int:
    with server.engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM fraud_transactions WHERE tenant_id = :t"),
                                      {"t": tenant_id}).scalar() or 0)


def test_decisions_become_rows_through_the_separate_recorder(api_without_recorder: FraudServer) -> None:
    tenant = api_without_recorder.new_tenant()
    ids = []
    with tenant.client() as client:
        for amount in (12.5, 80.0, 410.0):
            payload = transaction(amount=amount)
            body, headers = tenant.signed(payload)
            response = client.post("/transactions", content=body, headers=headers)
            assert response.status_code == 200, response.text
            ids.append(str(payload["id"]))
    assert stored_count(api_without_recorder, tenant.tenant_id) == 0  # answered, queued, not yet written

    env = {**api_without_recorder.stack.env, "TESSERA_LOG_LEVEL": "INFO", "TESSERA_LOG_JSON": "false"}
    recorder = ManagedProcess(python_argv("-m", "services.cli", "recorder", "fraud"), env, "fraud-recorder")
    try:
        recorder.wait_for_output("recording fraud decisions", timeout_s=120)
        api_without_recorder.wait_recorded(tenant.tenant_id, ids, timeout_s=30)
        with tenant.client() as client:
            stored = client.get(f"/transactions/{ids[-1]}")
        assert stored.status_code == 200 and stored.json()["transaction_id"] == ids[-1]
    finally:
        assert recorder.stop() == 0, recorder.output[-3000:]
    wait_until(lambda: "recorder stopped" in recorder.output, 10, "the recorder's last log line")
    assert "recorder stopped after 3 rows" in recorder.output, "the API wrote rows itself"  # (they were new)


def test_the_recorder_refuses_to_start_without_redis(api_without_recorder: FraudServer) -> None:
    env = {**api_without_recorder.stack.env, "TESSERA_REDIS_URL": ""}
    recorder = ManagedProcess(python_argv("-m", "services.cli", "recorder", "fraud"), env, "fraud-recorder")
    assert recorder.process.wait(timeout=120) == 2
    wait_until(lambda: "TESSERA_REDIS_URL is not set" in recorder.output, 10, "the recorder's refusal")
