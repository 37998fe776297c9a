"""Rules managed over the API, the review queue, labels, and signed callbacks through a real worker."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import text

from shared.security import SIGNATURE_HEADER, verify_signature
from tests.fraud.conftest import CALLBACKS_TO_LOOPBACK, FraudServer, FraudTenant, transaction
from tests.fraud.test_webhook_api import assert_problem, post
from tests.support import ManagedProcess, python_argv, wait_until

BIG_AMOUNT_RULE = {
    "id": "big-amount", "description": "amount above 1000", "action": "decline",
    "when": [{"field": "amount", "op": "gt", "value": 1000}],
}


@pytest.fixture
def fresh_tenant(fraud_server: FraudServer) -> FraudTenant:
    return fraud_server.new_tenant()


def test_rules_crud_versions_and_effect_on_decisions(fresh_tenant: FraudTenant) -> None:
    with fresh_tenant.client() as client:
        assert client.get("/rules").json()["version"] == 0
        created = client.post("/rules", json=BIG_AMOUNT_RULE)
        assert created.status_code == 201 and created.json()["version"] == 1
        assert_problem(client.post("/rules", json=BIG_AMOUNT_RULE), 409, "exists")
        typo = {**BIG_AMOUNT_RULE, "id": "typo", "when": [{"field": "amout", "op": "gt", "value": 1}]}
        assert_problem(client.post("/rules", json=typo), 422, "amout")
        for condition, complaint in (({"field": "amount", "op": "in", "value": 5}, "take a list"),
                                     ({"field": "amount", "op": "gt", "value": "abc"}, "finite number"),
                                     ({"field": "currency", "op": "gt", "value": 5}, "text field"),
                                     ({"field": "merchant_category", "op": "eq", "value": 5411}, "be text"),
                                     ({"field": "channel", "op": "in", "value": []}, "empty"),
                                     ({"field": "amount", "op": "in", "value": list(range(1001))}, "at most 1000"),
                                     ({"field": "customer_id", "op": "eq", "value": "c" * 129}, "128 characters")):
            never_fires = {**BIG_AMOUNT_RULE, "id": "never", "when": [condition]}
            assert_problem(client.post("/rules", json=never_fires), 422, complaint)
        assert client.get("/rules").json()["version"] == 1

    declined = post(fresh_tenant, transaction(amount=5000)).json()
    assert declined["decision"] == "decline" and declined["rules_version"] == 1
    assert {"source": "rule", "code": "big-amount", "description": "amount above 1000",
            "contribution": None}.items() <= declined["reasons"][0].items()
    assert post(fresh_tenant, transaction(amount=20)).json()["rules_version"] == 1

    with fresh_tenant.client() as client:
        replaced = client.put("/rules/big-amount", json={**BIG_AMOUNT_RULE, "action": "review"})
        assert replaced.json()["version"] == 2 and replaced.json()["rules"][0]["action"] == "review"
        assert_problem(client.put("/rules/nope", json={**BIG_AMOUNT_RULE, "id": "nope"}), 404, "does not exist")
        assert client.delete("/rules/big-amount").json() == {**client.get("/rules").json()}
        versions = client.get("/rules/versions").json()
    assert [v["version"] for v in versions] == [3, 2, 1]
    assert [v["change"] for v in versions] == ["delete big-amount", "replace big-amount", "add big-amount"]
    assert post(fresh_tenant, transaction(amount=5000)).json()["rules_version"] == 3


def test_review_queue_and_labels(fraud_server: FraudServer, fresh_tenant: FraudTenant) -> None:
    with fresh_tenant.client() as client:
        assert client.put("/settings", json={"review_threshold": 0.0, "decline_threshold": 1.0}).status_code == 200
        assert_problem(client.put("/settings", json={"review_threshold": 0.9, "decline_threshold": 0.1}),
                       422, "must not exceed")
    payload = transaction()
    assert post(fresh_tenant, payload).json()["decision"] == "review"
    fraud_server.wait_recorded(fresh_tenant.tenant_id, [payload["id"]])  # cases are written with the row
    with fresh_tenant.client() as client:
        cases = client.get("/cases").json()
        assert [c["transaction_id"] for c in cases] == [payload["id"]]
        labelled = client.post(f"/transactions/{payload['id']}/label",
                               json={"is_fraud": True, "source": "chargeback", "analyst": "ana"})
        assert labelled.status_code == 200
        assert client.get("/cases").json() == []
        assert [c["transaction_id"] for c in client.get("/cases", params={"status": "confirmed_fraud"}).json()] \
            == [payload["id"]]
        assert_problem(client.post("/transactions/unknown/label", json={"is_fraud": False}), 404, "never scored")
    with fraud_server.engine.connect() as connection:
        row = connection.execute(text("SELECT is_fraud, label_source FROM fraud_transactions "
                                      "WHERE tenant_id = :t AND transaction_id = :i"),
                                 {"t": fresh_tenant.tenant_id, "i": payload["id"]}).one()
    assert bool(row[0]) is True and row[1] == "chargeback"


class _Receiver(BaseHTTPRequestHandler):
    """A bank's callback endpoint: fails the first call (503), accepts the next."""

    received: list[tuple[dict[str, str], bytes]] = []
    fail_first = True

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(({k: v for k, v in self.headers.items()}, body))
        status = 503 if type(self).fail_first and len(type(self).received) == 1 else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def callback_receiver() -> Iterator[str]:
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fraud-callbacks"
    server.shutdown()


def test_flagged_decisions_are_pushed_signed_and_retried(fraud_server: FraudServer, fresh_tenant: FraudTenant,
                                                         callback_receiver: str) -> None:
    stack = fraud_server.stack
    worker = ManagedProcess(python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "fraud",
                                        "--concurrency", "1", "--without-gossip", "--without-mingle",
                                        "--loglevel", "INFO",
                                        "--hostname", f"fraud-{uuid.uuid4().hex[:6]}@%h"),
                            {**stack.env, **CALLBACKS_TO_LOOPBACK}, "fraud-worker")
    try:
        worker.wait_for_output(r"ready\.", timeout_s=60)
        with fresh_tenant.client() as client:
            client.put("/settings", json={"review_threshold": 0.0, "decline_threshold": 1.0,
                                          "callback_url": callback_receiver})
        payload = transaction()
        decision = post(fresh_tenant, payload).json()
        wait_until(lambda: len(_Receiver.received) >= 2, 60, "the callback to be retried and delivered")
        headers, body = _Receiver.received[-1]
        verify_signature(headers[SIGNATURE_HEADER], body, [fresh_tenant.webhook_secret], tolerance_s=300)
        delivered = httpx.Response(200, content=body).json()
        assert delivered["transaction_id"] == payload["id"] and delivered["score"] == decision["score"]
        assert headers["Idempotency-Key"] == f"{fresh_tenant.tenant_id}:{payload['id']}"

        def delivery_log() -> list[tuple[int, int | None]]:
            with fraud_server.engine.connect() as connection:
                return [tuple(r) for r in connection.execute(text(
                    "SELECT attempt, status_code FROM platform_webhook_deliveries WHERE subject_id = :i "
                    "ORDER BY attempt"), {"i": payload["id"]})]

        wait_until(lambda: len(delivery_log()) == 2, 30, "both attempts to be logged")
        assert delivery_log() == [(1, 503), (2, 200)]
    finally:
        worker.stop()
