"""Models per tenant, through a real API server and Celery worker: one tenant's retraining never
changes another tenant's scores, a candidate worse than the live model is never promoted, and a
retrain without enough labels is refused before any job is queued."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from services.fraud.serving import backtest_namespace
from services.fraud.simulate import SimulationConfig, simulate_transactions
from tests.fraud.conftest import FraudServer, FraudTenant, transaction
from tests.fraud.test_retraining import (
    DEFAULT_VERSION,
    HANDBOOK_CSV_COLUMNS,
    fraud_worker,
    labelled_history,
    store_rows,
    wait_for_job,
)
from tests.fraud.test_webhook_api import assert_problem, post
from tests.support import ManagedProcess, wait_until

__all__ = ["fraud_worker"]  # the worker fixture, shared with test_retraining

_probes = itertools.count()


def probe(tenant: FraudTenant) -> dict:
    """Score the same transaction for a card and a terminal never seen before: identical features."""
    n = next(_probes)
    response = post(tenant, transaction(customer_id=f"probe-card-{n}", terminal_id=f"probe-terminal-{n}",
                                        amount=180.0, channel="ecommerce"))
    assert response.status_code == 200, response.text
    return response.json()


def store_history(server: FraudServer, tenant: FraudTenant, live_scores: str = "random") -> None:
    with Session(server.engine) as session:
        store_rows(session, labelled_history(tenant.tenant_id, live_scores=live_scores))
        session.commit()


def backtest_versions(server: FraudServer, tenant: FraudTenant, seed: int) -> set[str]:
    """Back-test a small file through the worker; the model versions its rows were scored with."""
    frame = simulate_transactions(SimulationConfig(n_customers=10, n_terminals=300, n_days=3, seed=seed))
    with tenant.client() as client:
        submitted = client.post("/backtests", files={"file": ("small.csv",
                                                              frame[HANDBOOK_CSV_COLUMNS].to_csv(index=False))})
        assert submitted.status_code == 202, submitted.text
        wait_for_job(client, submitted.json()["job_id"])
    namespace = backtest_namespace(tenant.tenant_id, submitted.json()["job_id"])
    with server.engine.connect() as connection:
        return {row[0] for row in connection.execute(text(
            "SELECT DISTINCT model_version FROM fraud_transactions WHERE tenant_id = :n"), {"n": namespace})}


def listed(client: httpx.Client) -> list[tuple[str, str, bool]]:
    return [(m["version"], m["status"], m["default"]) for m in client.get("/models").json()]


def test_one_tenants_promoted_model_scores_that_tenant_alone(
        fraud_server: FraudServer, fraud_worker: ManagedProcess) -> None:
    bank_a, bank_b = fraud_server.new_tenant(), fraud_server.new_tenant()
    before = probe(bank_b)
    assert before["model_version"] == DEFAULT_VERSION
    assert backtest_versions(fraud_server, bank_a, seed=11) == {DEFAULT_VERSION}  # the worker loads the default
    store_history(fraud_server, bank_a)  # its live scores are chance: a candidate beats them
    with bank_a.client() as client:
        assert_problem(client.post("/models/retrain", json={"min_improvement": -1}), 422, "min_improvement")
        assert_problem(client.post("/models/retrain", json={"min_improvement": True}), 422, "min_improvement")
        outcome = wait_for_job(client, client.post("/models/retrain", json={}).json()["job_id"])
    assert outcome["promoted"] is True, outcome
    assert outcome["live_version"] == DEFAULT_VERSION
    assert outcome["candidate_metrics"]["average_precision"] >= outcome["live_metrics"]["average_precision"]

    wait_until(lambda: probe(bank_a)["model_version"] == outcome["version"], 60,
               "the API to serve bank A its promoted version", interval_s=0.5)
    after = probe(bank_b)
    assert (after["score"], after["model_version"]) == (before["score"], before["model_version"])
    assert backtest_versions(fraud_server, bank_a, seed=12) == {outcome["version"]}, "the worker's model is current"
    assert backtest_versions(fraud_server, bank_b, seed=12) == {DEFAULT_VERSION}

    with bank_a.client() as client:
        assert listed(client) == [(outcome["version"], "live", False), (DEFAULT_VERSION, "standby", True)]
    with bank_b.client() as client:
        assert listed(client) == [(DEFAULT_VERSION, "live", True)]
        default = client.get("/models").json()[0]
    assert default["metrics"]["test_average_precision"] > 0.5, "the default's model card metrics"


def test_a_candidate_worse_than_the_live_model_is_not_promoted(
        fraud_server: FraudServer, fraud_worker: ManagedProcess) -> None:
    bank = fraud_server.new_tenant()
    store_history(fraud_server, bank, live_scores="perfect")  # live AP 1.0: no candidate reaches it
    with bank.client() as client:
        outcome = wait_for_job(client, client.post("/models/retrain", json={"min_improvement": 0}).json()["job_id"])
        assert outcome["promoted"] is False, outcome
        assert outcome["candidate_metrics"]["average_precision"] < outcome["live_metrics"]["average_precision"]
        assert listed(client) == [(outcome["version"], "rejected", False), (DEFAULT_VERSION, "live", True)]
    assert probe(bank)["model_version"] == DEFAULT_VERSION


@pytest.fixture
def bank_with_few_labels(fraud_server: FraudServer) -> Iterator[FraudTenant]:
    """A tenant with 12 days of labelled traffic: none of it is old enough to train on."""
    bank = fraud_server.new_tenant()
    history = labelled_history(bank.tenant_id)
    first = min(row["tx_time_s"] for row in history)
    with Session(fraud_server.engine) as session:
        store_rows(session, [row for row in history if row["tx_time_s"] < first + 12 * 86_400])
        session.commit()
    yield bank


def test_a_retrain_without_enough_labels_is_refused_up_front(
        fraud_server: FraudServer, bank_with_few_labels: FraudTenant) -> None:
    with bank_with_few_labels.client() as client:
        problem = assert_problem(client.post("/models/retrain", json={}), 422, "training frauds: 0 of 20 needed")
    assert problem["needed"] == {"training_frauds": 20, "training_legitimate": 1,
                                 "calibration_frauds": 1, "calibration_legitimate": 1}
    assert problem["have"]["training_frauds"] == 0 and problem["have"]["calibration_frauds"] > 0
    with fraud_server.new_tenant().client() as client:  # no traffic at all
        assert_problem(client.post("/models/retrain", json={"holdout_days": 3}), 422, "0 of 20 needed")
    with fraud_server.engine.connect() as connection:
        queued = connection.execute(text("SELECT count(*) FROM platform_jobs WHERE tenant_id = :t"),
                                    {"t": bank_with_few_labels.tenant_id}).scalar()
    assert queued == 0

