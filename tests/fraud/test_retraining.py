"""Back-test upload, then retrain-and-promote end to end through a real Celery worker and a hot swap."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from services.fraud.simulate import SimulationConfig, simulate_transactions
from tests.fraud.conftest import FraudServer, FraudTenant, transaction
from tests.fraud.test_webhook_api import assert_problem, post
from tests.support import ManagedProcess, python_argv, wait_until

HANDBOOK_CSV_COLUMNS = ["TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"]


@pytest.fixture(scope="module")
def fraud_worker(fraud_server: FraudServer) -> Iterator[ManagedProcess]:
    worker = ManagedProcess(python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "fraud",
                                        "--concurrency", "1", "--without-gossip", "--without-mingle",
                                        "--loglevel", "INFO", "--hostname", f"retrain-{uuid.uuid4().hex[:6]}@%h"),
                            fraud_server.stack.env, "fraud-worker")
    worker.wait_for_output(r"ready\.", timeout_s=60)
    yield worker
    worker.stop()


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 240) -> dict:
    def finished() -> bool:
        return client.get(f"/jobs/{job_id}").json()["status"] in ("succeeded", "failed")

    wait_until(finished, timeout_s, f"job {job_id}", interval_s=0.5)
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    return job["result"]


def simulated_csv() -> bytes:
    frame = simulate_transactions(SimulationConfig(n_customers=50, n_terminals=120, n_days=30, seed=3))
    return frame[HANDBOOK_CSV_COLUMNS].to_csv(index=False).encode()


def test_backtest_then_retrain_promotes_and_serves_the_new_version(
        fraud_server: FraudServer, fraud_worker: ManagedProcess) -> None:
    tenant: FraudTenant = fraud_server.new_tenant()
    csv = simulated_csv()
    with tenant.client() as client:
        assert_problem(client.post("/backtests", files={"file": ("bad.csv", b"a,b\n1,2\n")}), 422, "customer_id")
        first = client.post("/backtests", files={"file": ("history.csv", csv)})
        assert first.status_code == 202, first.text
        again = client.post("/backtests", files={"file": ("history.csv", csv)})
        assert again.json()["job_id"] == first.json()["job_id"], "the same file is back-tested once"
        backtest = wait_for_job(client, first.json()["job_id"])
        assert backtest["scored"] == backtest["rows"] == csv.count(b"\n") - 1
        assert 0.5 < backtest["metrics"]["auc_roc"] <= 1.0

        promoted = wait_for_job(client, client.post("/models/retrain",
                                                    json={"min_improvement": -1.0}).json()["job_id"])
        assert promoted["promoted"] is True
        assert set(promoted["candidate_metrics"]) >= {"auc_roc", "average_precision", "card_precision_at_100"}
        assert set(promoted["live_metrics"]) >= {"auc_roc", "average_precision"}

        rejected = wait_for_job(client, client.post("/models/retrain",
                                                    json={"min_improvement": 1.0}).json()["job_id"])
        assert rejected["promoted"] is False
        versions = {m["version"]: m for m in client.get("/models").json()}
        assert versions[promoted["version"]]["status"] == "live"
        assert versions[rejected["version"]]["status"] == "rejected"
        assert versions[rejected["version"]]["metrics"]["candidate"]["average_precision"] >= 0

    def serving_new_version() -> bool:
        return post(tenant, transaction()).json()["model_version"] == promoted["version"]

    wait_until(serving_new_version, 60, "the API to hot-swap to the promoted model", interval_s=1)
