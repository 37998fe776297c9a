"""The transaction webhook over real HTTP: signatures, replay window, validation, idempotency, batch."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import orjson
import pytest
from sqlalchemy import text

from tests.conftest import STATE_STORES
from tests.fraud.conftest import FraudServer, FraudTenant, transaction

pytestmark = pytest.mark.stack_variants(*STATE_STORES)  # concurrent duplicates race differently on each


def post(tenant: FraudTenant, payload: object, timestamp: int | None = None) -> httpx.Response:
    body, headers = tenant.signed(payload, timestamp)
    with tenant.client() as client:
        return client.post("/transactions", content=body, headers=headers)


def assert_problem(response: httpx.Response, status: int, detail_contains: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and detail_contains in problem["detail"], problem
    return problem


def test_signed_transaction_gets_a_decision(tenant: FraudTenant) -> None:
    response = post(tenant, transaction())
    assert response.status_code == 200, response.text
    decision = response.json()
    assert decision["decision"] in {"approve", "review", "decline"}
    assert 0.0 <= decision["score"] <= 1.0
    assert decision["model_version"] and decision["rules_version"] == 0
    assert decision["replayed"] is False
    assert isinstance(decision["reasons"], list)


def test_unsigned_bad_and_expired_signatures_are_401(tenant: FraudTenant) -> None:
    body = orjson.dumps(transaction())
    with tenant.client() as client:
        unsigned = client.post("/transactions", content=body)
        assert_problem(unsigned, 401, "missing Tessera-Signature")
        _, headers = tenant.signed(body)
        tampered = client.post("/transactions", content=body.replace(b"42.5", b"4.25"), headers=headers)
        assert_problem(tampered, 401, "does not match")
    expired = post(tenant, transaction(), timestamp=int(time.time()) - 301)
    assert_problem(expired, 401, "replay window")


def test_api_key_is_required_and_scoped(fraud_server: FraudServer, tenant: FraudTenant) -> None:
    body, headers = tenant.signed(transaction())
    anonymous = httpx.post(f"{tenant.base_url}/transactions", content=body, headers=headers)
    assert_problem(anonymous, 401, "missing API key")
    iiot_only = fraud_server.new_tenant(scopes=("iiot",))
    with iiot_only.client() as client:
        assert_problem(client.post("/transactions", content=body, headers=headers), 403, "not allowed")


def test_another_tenants_secret_does_not_verify(fraud_server: FraudServer, tenant: FraudTenant) -> None:
    other = fraud_server.new_tenant()
    body, headers = other.signed(transaction())
    with tenant.client() as client:
        assert_problem(client.post("/transactions", content=body, headers=headers), 401, "does not match")


def test_oversized_body_is_413_and_problems_carry_the_request_id(tenant: FraudTenant) -> None:
    with tenant.client() as client:
        huge = client.post("/transactions", content=b"x" * ((1 << 20) + 1),
                           headers={"X-Request-ID": "big-1", "Content-Type": "application/json"})
    problem = assert_problem(huge, 413, "larger than")
    assert problem["request_id"] == "big-1" == huge.headers["x-request-id"]


def test_malformed_input_is_422_with_the_failing_field(tenant: FraudTenant) -> None:
    assert_problem(post(tenant, b"{not json"), 422, "")
    problem = assert_problem(post(tenant, transaction(amount=-5)), 422, "amount")
    assert problem["errors"][0]["loc"] == ["amount"]
    assert_problem(post(tenant, transaction(amount=True)), 422, "not a boolean")
    assert_problem(post(tenant, transaction(currency="euro")), 422, "currency")
    assert_problem(post(tenant, transaction(unexpected="x")), 422, "unexpected")
    missing = transaction()
    del missing["customer_id"]
    assert_problem(post(tenant, missing), 422, "customer_id")


def test_a_body_that_is_not_utf8_is_a_400_and_a_byte_order_mark_is_ignored(tenant: FraudTenant) -> None:
    """As FastAPI's own routes answer them: the signed raw body is decoded by the platform's ``parse_json``."""
    problem = assert_problem(post(tenant, b'{"transaction_id": "\xff"}'), 400, "not UTF-8 text (byte 20)")
    assert problem["type"].endswith("/undecodable-body")
    accepted = post(tenant, b"\xef\xbb\xbf" + orjson.dumps(transaction()))
    assert accepted.status_code == 200, accepted.text


def test_resend_returns_the_stored_decision(tenant: FraudTenant) -> None:
    payload = transaction()
    first = post(tenant, payload).json()
    again = post(tenant, payload).json()
    assert again["replayed"] is True
    assert {k: v for k, v in again.items() if k != "replayed"} == {k: v for k, v in first.items() if k != "replayed"}


@pytest.mark.parametrize("review_threshold", [1.0, 0.0], ids=["approved", "flagged"])
def test_concurrent_duplicates_are_stored_and_counted_once(fraud_server: FraudServer, review_threshold: float) -> None:
    tenant = fraud_server.new_tenant()
    with tenant.client() as client:
        client.put("/settings", json={"review_threshold": review_threshold, "decline_threshold": 1.0})
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    payload = transaction(customer_id=customer, timestamp="2026-11-23T09:00:00Z")
    body, headers = tenant.signed(payload)

    async def storm() -> list[httpx.Response]:
        async with tenant.async_client() as client:
            return await asyncio.gather(*(client.post("/transactions", content=body, headers=headers)
                                          for _ in range(16)))

    responses = asyncio.run(storm())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert len({(r.json()["decision"], r.json()["score"]) for r in responses}) == 1
    fraud_server.wait_recorded(tenant.tenant_id, [payload["id"]])
    with fraud_server.engine.connect() as connection:
        stored = connection.execute(text("SELECT count(*) FROM fraud_transactions WHERE tenant_id = :t "
                                         "AND customer_id = :c"), {"t": tenant.tenant_id, "c": customer}).scalar()
    assert stored == 1
    follow_up = transaction(customer_id=customer, timestamp="2026-11-23T09:30:00Z")
    assert post(tenant, follow_up).status_code == 200
    fraud_server.wait_recorded(tenant.tenant_id, [follow_up["id"]])
    with fraud_server.engine.connect() as connection:
        features = connection.execute(text("SELECT features FROM fraud_transactions WHERE tenant_id = :t "
                                           "AND transaction_id = :i"),
                                      {"t": tenant.tenant_id, "i": follow_up["id"]}).scalar()
    from services.fraud.features import FEATURE_NAMES

    assert features is not None
    features = orjson.loads(features) if isinstance(features, str) else features
    assert features[FEATURE_NAMES.index("CUSTOMER_ID_NB_TX_1DAY_WINDOW")] == 2.0


def test_batch_scores_each_item(tenant: FraudTenant) -> None:
    items = [transaction(), transaction(customer_id="cust-batch")]
    body, headers = tenant.signed({"transactions": items})
    with tenant.client() as client:
        response = client.post("/transactions:batch", content=body, headers=headers)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["transaction_id"] for r in results] == [i["id"] for i in items]
    assert all(r["result"]["decision"] for r in results)


def test_stored_decision_can_be_read_back(tenant: FraudTenant) -> None:
    payload = transaction()
    decision = post(tenant, payload).json()
    with tenant.client() as client:
        stored = client.get(f"/transactions/{payload['id']}")
        missing = client.get("/transactions/never-sent")
    assert stored.json()["score"] == decision["score"]
    assert_problem(missing, 404, "never scored")
