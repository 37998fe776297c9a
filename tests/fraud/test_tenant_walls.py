"""Tenants are walls: two banks on one server, and neither can read, label, list, page through,
retrain on, back-test into or otherwise influence the other's data, jobs or models.

Every refusal must look exactly like "nothing there" (the same 404 problem as for an id that was
never used), so a key cannot even learn whether another tenant's id exists.
"""

from __future__ import annotations

import uuid

import pytest

from tests.fraud.conftest import FraudServer, FraudTenant, transaction
from tests.fraud.test_webhook_api import assert_problem, post


def flag_everything(tenant: FraudTenant) -> None:
    """Thresholds at zero: every decision is at least a review, so each opens a case."""
    with tenant.client() as client:
        saved = client.put("/settings", json={"review_threshold": 0.0, "decline_threshold": 1.0})
        assert saved.status_code == 200, saved.text


@pytest.fixture(scope="module")
def banks(fraud_server: FraudServer) -> tuple[FraudTenant, FraudTenant, list[str]]:
    """Bank A with five flagged transactions, bank B with none of its own yet."""
    bank_a, bank_b = fraud_server.new_tenant(), fraud_server.new_tenant()
    flag_everything(bank_a)
    ids = []
    for index in range(5):
        response = post(bank_a, transaction(amount=10.0 + index, customer_id=f"c-{index}"))
        assert response.status_code == 200, response.text
        assert response.json()["decision"] == "review"
        ids.append(response.json()["transaction_id"])
    fraud_server.wait_recorded(bank_a.tenant_id, ids)
    return bank_a, bank_b, ids


def test_another_tenants_transaction_cannot_be_read_or_labelled(
        banks: tuple[FraudTenant, FraudTenant, list[str]]) -> None:
    bank_a, bank_b, ids = banks
    never_used = f"tx-{uuid.uuid4().hex}"
    with bank_b.client() as client:
        foreign = assert_problem(client.get(f"/transactions/{ids[0]}"), 404, "never scored")
        missing = assert_problem(client.get(f"/transactions/{never_used}"), 404, "never scored")
        assert foreign.keys() == missing.keys()
        assert_problem(client.post(f"/transactions/{ids[0]}/label", json={"is_fraud": True}), 404, "never scored")
    with bank_a.client() as client:
        mine = client.get(f"/transactions/{ids[0]}")
        assert mine.status_code == 200 and mine.json()["transaction_id"] == ids[0]
        assert client.get("/cases").json()[0]["status"] == "open", "B's label attempt changed nothing"


def test_the_same_transaction_id_is_a_different_transaction_per_tenant(
        banks: tuple[FraudTenant, FraudTenant, list[str]]) -> None:
    bank_a, bank_b, ids = banks
    reused = post(bank_b, transaction(id=ids[0], amount=99.0))
    assert reused.status_code == 200, reused.text
    assert reused.json()["replayed"] is False, "B's id space is its own: not A's stored answer"
    with bank_a.client() as client:
        stored = client.get(f"/transactions/{ids[0]}").json()
    assert stored["decision"] == "review" and stored["replayed"] is True, "A's stored answer is untouched"


def test_cases_are_listed_and_paged_within_the_tenant_only(
        banks: tuple[FraudTenant, FraudTenant, list[str]]) -> None:
    bank_a, bank_b, ids = banks
    with bank_b.client() as client:
        assert client.get("/cases").json() == []
        assert client.get("/cases", params={"status": "confirmed_fraud"}).json() == []
    seen: list[str] = []
    with bank_a.client() as client:
        page = client.get("/cases", params={"limit": 2})
        while True:
            assert page.status_code == 200, page.text
            seen += [case["transaction_id"] for case in page.json()]
            link = page.headers.get("link")
            if link is None:
                break
            next_url = link.split(";")[0].strip("<>")
            with bank_b.client() as other:  # B following A's cursor sees only B's (empty) queue
                assert other.get(next_url).json() == []
            page = client.get(next_url)
        scores = [case["score"] for case in client.get("/cases", params={"limit": 500}).json()]
        assert_problem(client.get("/cases", params={"cursor": "not-a-cursor"}), 422, "cursor")
    assert sorted(seen) == sorted(ids), "every case once, across pages"
    assert scores == sorted(scores, reverse=True)


def test_settings_and_rules_of_one_tenant_do_not_touch_the_other(
        banks: tuple[FraudTenant, FraudTenant, list[str]]) -> None:
    bank_a, bank_b, _ = banks
    with bank_b.client() as client:
        assert client.get("/settings").json()["review_threshold"] == 0.2, "A's thresholds are A's"
        assert client.get("/rules").json()["version"] == 0
        rule = {"id": "big", "description": "decline big amounts", "action": "decline",
                "when": [{"field": "amount", "op": "gt", "value": 1}]}
        assert client.post("/rules", json=rule).status_code == 201
    with bank_a.client() as client:
        assert client.get("/rules").json()["version"] == 0
    assert post(bank_a, transaction(amount=50.0)).json()["decision"] == "review", "B's rule did not fire for A"


def test_models_and_jobs_of_another_tenant_are_invisible(
        fraud_server: FraudServer, banks: tuple[FraudTenant, FraudTenant, list[str]]) -> None:
    bank_a, bank_b, _ = banks
    csv = (f"id,timestamp,customer_id,terminal_id,amount\n"
           f"tx-{uuid.uuid4().hex},2026-11-23T10:15:00Z,c-42,t-1,10.0\n").encode()
    with bank_a.client() as client:
        submitted = client.post("/backtests", files={"file": ("a.csv", csv)})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        models_a = client.get("/models").json()
    with bank_b.client() as client:
        foreign = assert_problem(client.get(f"/jobs/{job_id}"), 404, job_id)
        missing = assert_problem(client.get(f"/jobs/{uuid.uuid4().hex}"), 404, "does not exist")
        assert foreign.keys() == missing.keys(), "another tenant's job looks exactly like no job"
        models_b = client.get("/models").json()
        # B has no labels of its own: A's traffic does not count towards B's retraining.
        refused = client.post("/models/retrain", json={})
        assert refused.status_code == 422, refused.text
        assert "labelled" in refused.json()["detail"]
    assert {m["version"] for m in models_a} == {m["version"] for m in models_b}, "only the shared default"
    assert all(m.get("tenant_id") in (None, "") for m in models_b)
