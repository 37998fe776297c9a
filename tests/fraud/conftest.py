"""Fixtures for the fraud vertical: a real uvicorn server per backend stack and a signing client."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from tests.conftest import Stack, Variant, variant_stack
from tests.support import ManagedProcess, free_port, python_argv, wait_until

CALLBACKS_TO_LOOPBACK = {"TESSERA_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"}
"""Lets callbacks reach the tests' receivers on 127.0.0.1 (refused by default: not a public address)."""
FRAUD_ENV = {"TESSERA_LOG_LEVEL": "WARNING", **CALLBACKS_TO_LOOPBACK}


def run_cli(stack: Stack, *args: str) -> str:
    """Run ``tessera <args>`` against ``stack`` in a child process; returns its stdout."""
    done = subprocess.run(python_argv("-m", "services.cli", *args), env={**stack_env(stack)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def stack_env(stack: Stack) -> dict[str, str]:
    import os

    return {**os.environ, **stack.env, **FRAUD_ENV}


@dataclass
class FraudTenant:
    """A tenant with its API key and webhook secret, and a client that signs what it sends."""

    tenant_id: str
    api_key: str
    webhook_secret: str
    base_url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"X-API-Key": self.api_key}, timeout=30)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers={"X-API-Key": self.api_key}, timeout=30)

    def signed(self, payload: object, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
        from shared.security import SIGNATURE_HEADER, sign_payload

        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        return body, {SIGNATURE_HEADER: sign_payload(self.webhook_secret, body, timestamp),
                      "Content-Type": "application/json"}


@dataclass
class FraudServer:
    stack: Stack
    base_url: str
    engine: Engine
    pid: int = 0
    """The server process (0 when not known)."""

    def wait_recorded(self, tenant_id: str, transaction_ids: list[str], timeout_s: float = 30.0) -> None:
        """Wait until the rows exist: with Redis state, decisions are written behind the answer."""
        from sqlalchemy import text

        def recorded() -> bool:
            with self.engine.connect() as connection:
                stored = {row[0] for row in connection.execute(text(
                    "SELECT transaction_id FROM fraud_transactions WHERE tenant_id = :t"), {"t": tenant_id})}
            return set(transaction_ids) <= stored

        wait_until(recorded, timeout_s, f"{len(transaction_ids)} decisions to be recorded", interval_s=0.05)

    def new_tenant(self, scopes: tuple[str, ...] = ("fraud",)) -> FraudTenant:
        tenant_id = f"bank-{uuid.uuid4().hex[:8]}"
        scope_args = [arg for scope in scopes for arg in ("--scope", scope)]
        out = run_cli(self.stack, "keys", "create", "--tenant", tenant_id, *scope_args)
        values = exported_values(out)
        return FraudTenant(tenant_id, values["API_KEY"], values["WEBHOOK_SECRET"], self.base_url)


def exported_values(cli_output: str) -> dict[str, str]:
    """``NAME: value`` of each ``export NAME=value`` line ``tessera keys create/rotate`` printed."""
    import shlex

    return dict(shlex.split(line)[1].split("=", 1) for line in cli_output.splitlines() if line.startswith("export "))


@pytest.fixture(scope="module")
def fraud_server(request: pytest.FixtureRequest, stack_variant: Variant) -> Iterator[FraudServer]:
    """The fraud app alone under uvicorn, on a migrated database of each variant (see tests/conftest.py)."""
    stack = variant_stack(request, stack_variant)
    run_cli(stack, "db", "upgrade")
    with serve_fraud(stack) as server:
        yield server


@contextlib.contextmanager
def serve_fraud(stack: Stack, env: dict[str, str] | None = None, name: str = "fraud") -> Iterator[FraudServer]:
    """The fraud app alone under uvicorn on a migrated ``stack``, with ``env`` over :data:`FRAUD_ENV`."""
    port = free_port()
    server = ManagedProcess(python_argv("-m", "uvicorn", "services.fraud.api:app", "--host", "127.0.0.1",
                                        "--port", str(port), "--loop", "uvloop", "--http", "httptools"),
                            {**stack.env, **FRAUD_ENV, **(env or {})}, f"{name}-{stack.name}")
    engine = create_engine(stack.database_url)
    try:
        server.wait_for_output(r"Uvicorn running on", timeout_s=120)
        yield FraudServer(stack, f"http://127.0.0.1:{port}/v1", engine, server.process.pid)
    finally:
        engine.dispose()
        server.stop()
        if "Traceback" in server.output:  # surfaced in the test report: a 500 must be explainable
            print(f"--- {name} server ({stack.name}) log with errors ---\n{server.output[-6000:]}")


@pytest.fixture(scope="module")
def tenant(fraud_server: FraudServer) -> FraudTenant:
    return fraud_server.new_tenant()


def transaction(**overrides: object) -> dict[str, Any]:
    """A valid transaction payload (factory)."""
    payload: dict[str, Any] = {
        "id": f"tx-{uuid.uuid4().hex}", "timestamp": "2026-11-23T10:15:00Z", "customer_id": "cust-1",
        "terminal_id": "term-1", "amount": 42.5, "currency": "EUR", "channel": "card_present",
    }
    payload.update(overrides)
    return payload
