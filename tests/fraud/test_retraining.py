"""Back-test upload then retraining through a real Celery worker; retraining on stored rows in-process."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session

from model_runtime.versions import ModelVersion
from services.fraud import training
from services.fraud.db import Transaction
from services.fraud.features import compute_offline_features
from services.fraud.retraining import labelled_frame, retrain
from services.fraud.serving import default_artifact_dir
from services.fraud.simulate import SimulationConfig, simulate_transactions
from services.fraud.tasks import retrain_model
from shared import jobs
from shared.db import session_scope
from shared.jobs import Job, submit_job
from tests.conftest import Stack
from tests.fraud.conftest import FraudServer, FraudTenant, transaction
from tests.fraud.test_webhook_api import assert_problem, post
from tests.support import ManagedProcess, python_argv, wait_until

HANDBOOK_CSV_COLUMNS = ["TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"]
DEFAULT_VERSION = default_artifact_dir().name  # type: ignore[union-attr]


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


def test_backtest_then_retrain_records_the_tenants_version(
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

        # The back-test's labelled rows train the candidate; the default's scores on them are the bar.
        rejected = wait_for_job(client, client.post("/models/retrain",
                                                    json={"min_improvement": 1.0}).json()["job_id"])
        assert rejected["promoted"] is False
        assert set(rejected["candidate_metrics"]) >= {"auc_roc", "average_precision", "card_precision_at_100"}
        assert set(rejected["live_metrics"]) >= {"auc_roc", "average_precision"}
        assert rejected["live_version"] == DEFAULT_VERSION
        versions = {m["version"]: m for m in client.get("/models").json()}
        assert versions[rejected["version"]]["status"] == "rejected"
        assert versions[rejected["version"]]["metrics"]["candidate"]["average_precision"] >= 0
        assert versions[DEFAULT_VERSION]["status"] == "live"
    assert post(tenant, transaction()).json()["model_version"] == DEFAULT_VERSION


# --------------------------------------------------------------------------- in-process, on stored rows

def labelled_history(tenant_id: str, *, customer_prefix: str = "c-", live_scores: str = "random",
                     seed: int = 3) -> list[dict[str, Any]]:
    """A tenant's stored, labelled transactions as ``fraud_transactions`` rows.

    Simulated traffic (35 days, ~2,100 rows, a third fraud) with its offline features (what scoring
    stores), text customer ids, chargeback labels, and the scores a live model gave: ``random``
    (a live model no better than chance) or ``perfect`` (the label itself).
    """
    frame = simulate_transactions(SimulationConfig(n_customers=50, n_terminals=120, n_days=35, seed=seed))
    features, _ = compute_offline_features(frame)
    frauds = frame.TX_FRAUD.to_numpy() == 1
    scores = frauds.astype(float) if live_scores == "perfect" else np.random.default_rng(seed).random(len(frame))
    times = (frame.TX_DATETIME - pd.Timestamp("1970-01-01")).dt.total_seconds().to_numpy()
    return [{"tenant_id": tenant_id, "transaction_id": f"history-{index}",
             "customer_id": f"{customer_prefix}{customer}", "terminal_id": f"t-{terminal}",
             "tx_time_s": float(when), "amount": float(amount), "currency": "EUR", "channel": "card_present",
             "score": float(score), "decision": "approve", "reasons": [],
             "features": [float(value) for value in row], "model_version": "history", "rules_version": 0,
             "is_fraud": bool(fraud), "label_source": "chargeback" if fraud else None}
            for index, (customer, terminal, when, amount, score, fraud, row) in enumerate(zip(
                frame.CUSTOMER_ID, frame.TERMINAL_ID, times, frame.TX_AMOUNT, scores, frauds,
                features.to_numpy(), strict=True))]


def store_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert rows into ``fraud_transactions`` directly (as a database restore or an old bug would)."""
    session.execute(insert(Transaction), rows)


def test_a_row_dated_1500_is_left_out_of_training(migrated_stack: Stack) -> None:
    tenant_id = f"bank-{uuid.uuid4().hex[:8]}"
    history = labelled_history(tenant_id, customer_prefix="")
    ancient = {**history[0], "transaction_id": "ancient", "tx_time_s": datetime(1500, 1, 1, tzinfo=UTC).timestamp()}
    with session_scope() as session:
        store_rows(session, [*history, ancient])
    with session_scope() as session:
        outcome = retrain(session, tenant_id)
    assert outcome.candidate["n_train"] + outcome.candidate["n_holdout"] < len(history)
    with session_scope() as session:
        stored = session.get(ModelVersion, ("fraud", outcome.version))
        assert stored is not None and stored.tenant_id == tenant_id


def test_a_failed_retrain_tells_no_customer_data(migrated_stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A library error quoting a card id and an amount reaches neither the job's error nor the log."""
    tenant_id = f"bank-{uuid.uuid4().hex[:8]}"
    history = labelled_history(tenant_id, customer_prefix="c-secret-")
    with session_scope() as session:
        store_rows(session, history)
    leaked_amount = repr(history[0]["amount"])

    def quoting_failure(frame: pd.DataFrame, *args: object, **kwargs: object) -> None:
        raise ValueError(f"cannot use card {frame.CUSTOMER_ID.iloc[0]} with amount {leaked_amount}")

    monkeypatch.setattr(training, "train_candidate", quoting_failure)
    monkeypatch.setattr(jobs, "enqueue", lambda *args, **kwargs: None)  # run here, not in a worker
    with session_scope() as session:
        job_id = submit_job(session, retrain_model, key=f"retrain-{tenant_id}", tenant_id=tenant_id,
                            payload={"tenant_id": tenant_id, "holdout_days": 7, "min_improvement": 0.0}).id
    with caplog.at_level(logging.INFO), contextlib.suppress(Exception):  # a failed job is a failed task
        retrain_model(job_id)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "failed"
        error = job.error or ""
    assert "ValueError" in error and "train" in error, error
    for text in (error, caplog.text):
        assert "c-secret-" not in text and leaked_amount not in text, text


def test_a_tenant_trains_on_its_own_backtests_only(migrated_stack: Stack) -> None:
    """``_`` is a LIKE wildcard: tenant ``x_y`` must not train on tenant ``x-y``'s back-test rows."""
    suffix = uuid.uuid4().hex[:8]
    with session_scope() as session:
        store_rows(session, labelled_history(f"bank-{suffix}-x~backtest-0123456789ab")[::20])
    with session_scope() as session:
        assert labelled_frame(session, f"bank-{suffix}_x").empty
        assert len(labelled_frame(session, f"bank-{suffix}-x")) > 0
