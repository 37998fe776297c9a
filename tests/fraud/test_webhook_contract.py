"""The webhook's contract over real HTTP: no 500s, strict types, 415, 409 on a changed resend,
per-item batch errors, one clean log line for an unexpected error, and the access log.

Each webhook test runs on both state stores (the database; Redis with rows written behind) and
both ways the webhook is served (the hot route and its FastAPI twin, ``TESSERA_HOT_ROUTES``).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from fastapi import APIRouter, FastAPI
from sqlalchemy import create_engine, text

from tests.conftest import Stack
from tests.fraud.conftest import FraudServer, FraudTenant, run_cli, serve_fraud, transaction
from tests.fraud.test_webhook_api import assert_problem
from tests.support import ManagedProcess, free_port, python_argv, wait_until

VARIANTS = [("sqlite", "hot"), ("sqlite", "fastapi"), ("postgres", "hot"), ("postgres", "fastapi")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{stack}-{route}" for stack, route in VARIANTS])
def server(request: pytest.FixtureRequest) -> Iterator[FraudServer]:
    stack_name, route = request.param
    stack: Stack = request.getfixturevalue(f"{stack_name}_stack")
    run_cli(stack, "db", "upgrade")
    with serve_fraud(stack, {"TESSERA_HOT_ROUTES": str(route == "hot").lower()}, name=f"contract-{route}") as s:
        yield s


@pytest.fixture(scope="module")
def tenant(server: FraudServer) -> FraudTenant:
    return server.new_tenant()


def post_signed(tenant: FraudTenant, payload: object, path: str = "/transactions",
                headers: dict[str, str] | None = None) -> httpx.Response:
    body, signed_headers = tenant.signed(payload)
    with tenant.client() as client:
        return client.post(path, content=body, headers={**signed_headers, **(headers or {})})


# --- 1, 2: the timestamp window ----------------------------------------------------------------

TOO_FAR_AHEAD = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00",
                                       "1500-01-01T00:00:00Z", "1999-12-31T23:59:59Z",
                                       pytest.param(TOO_FAR_AHEAD, id="two-days-ahead")])
def test_a_timestamp_outside_the_window_is_422_naming_the_field(tenant: FraudTenant, timestamp: str) -> None:
    problem = assert_problem(post_signed(tenant, transaction(timestamp=timestamp)), 422, "timestamp")
    assert problem["errors"][0]["loc"] == ["timestamp"]
    assert "2000-01-01T00:00:00Z" in problem["detail"]


@pytest.mark.parametrize("timestamp", ["2000-01-01T00:00:00Z", "2018-04-01T00:00:31+02:00"])
def test_old_events_inside_the_window_are_scored(tenant: FraudTenant, timestamp: str) -> None:
    assert post_signed(tenant, transaction(timestamp=timestamp)).status_code == 200


# --- 3: strict types ---------------------------------------------------------------------------

def a_rule(**changes: object) -> dict[str, object]:
    condition = {"field": "amount", "op": "gt", "value": changes.pop("value", 1000)}
    return {"id": "big", "description": "big amount", "when": [condition], "action": "review", **changes}


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("PUT", "/settings", {"review_threshold": False}, "review_threshold"),
    ("PUT", "/settings", {"decline_threshold": "0.9"}, "decline_threshold"),
    ("POST", "/transactions/tx-any/label", {"is_fraud": 0}, "is_fraud"),
    ("POST", "/transactions/tx-any/label", {"is_fraud": "true"}, "is_fraud"),
    ("POST", "/rules", a_rule(enabled=1), "enabled"),
    ("POST", "/rules", a_rule(value=True), "value"),
    ("POST", "/models/retrain", {"holdout_days": True}, "holdout_days"),
], ids=["threshold-false", "threshold-string", "is_fraud-0", "is_fraud-string", "enabled-1", "rule-value-true",
        "holdout-true"])
def test_numbers_and_booleans_are_not_interchangeable(tenant: FraudTenant, method: str, path: str, body: object,
                                                      field: str) -> None:
    with tenant.client() as client:
        problem = assert_problem(client.request(method, path, json=body), 422, field)
    assert field in problem["errors"][0]["loc"]


def test_integers_for_numbers_and_numeric_amount_strings_stay_accepted(tenant: FraudTenant) -> None:
    with tenant.client() as client:
        saved = client.put("/settings", json={"review_threshold": 1, "decline_threshold": 1})
        assert saved.status_code == 200, saved.text
        assert saved.json()["review_threshold"] == 1.0
        client.put("/settings", json={"review_threshold": 0.2, "decline_threshold": 0.8})
    assert post_signed(tenant, transaction(amount=12)).status_code == 200
    assert post_signed(tenant, transaction(amount="12.50")).status_code == 200  # documented: numeric string


@pytest.mark.parametrize(("field", "value"), [
    ("timestamp", 1764500000), ("timestamp", "2026-11-30"), ("amount", "1e3"), ("amount", "12,50")])
def test_values_the_schema_refuses_are_refused(tenant: FraudTenant, field: str, value: object) -> None:
    """Unix seconds, a date without a time and exponent or comma amounts: pydantic's lax mode read them."""
    problem = assert_problem(post_signed(tenant, transaction(**{field: value})), 422, field)
    assert field in problem["errors"][0]["loc"]


# --- 4: media types ----------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_415(tenant: FraudTenant, content_type: str) -> None:
    for path, payload in (("/transactions", transaction()), ("/transactions:batch", {"transactions": [transaction()]})):
        problem = assert_problem(post_signed(tenant, payload, path, {"Content-Type": content_type}), 415,
                                 content_type)
        assert problem["supported"] == ["application/json"]
    with tenant.client() as client:
        settings = client.put("/settings", content=b'{"review_threshold": 0.2}', headers={"Content-Type": content_type})
    assert_problem(settings, 415, content_type)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON;charset=UTF-8",
                                          "application/vnd.bank+json", None])
def test_json_and_untyped_bodies_are_read(tenant: FraudTenant, content_type: str | None) -> None:
    body, headers = tenant.signed(transaction())
    headers = {name: value for name, value in headers.items() if name != "Content-Type"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    with tenant.client() as client:
        response = client.post("/transactions", content=body, headers=headers)
    assert response.status_code == 200, response.text


def test_multipart_uploads_keep_their_type(tenant: FraudTenant) -> None:
    csv = b"id,timestamp,customer_id,terminal_id,amount\ntx-csv-1,2026-11-23T10:00:00Z,c-1,t-1,10.5\n"
    with tenant.client() as client:
        response = client.post("/backtests", files={"file": ("past.csv", csv, "text/csv")})
    assert response.status_code == 202, response.text


# --- 6: a resend must repeat its body ----------------------------------------------------------

def expected_digest(payload: dict[str, object]) -> str:
    from services.fraud.schemas import TransactionIn
    from services.fraud.scoring import request_digest

    return request_digest(TransactionIn.model_validate(payload))


def the_same_written_differently(payload: dict[str, object]) -> bytes:
    """The same transaction as another body: keys reversed, spacing, amount as text, another offset."""
    changed = dict(reversed(list(payload.items())))
    changed["amount"] = f"{payload['amount']:.2f}"
    changed["timestamp"] = "2026-11-23T11:15:00+01:00"  # == 10:15Z, the factory's time
    changed["metadata"] = dict(reversed(list(payload["metadata"].items())))  # type: ignore[attr-defined]
    return json.dumps(changed, indent=2).encode()


def stored_digest(server: FraudServer, tenant: FraudTenant, transaction_id: str) -> str | None:
    server.wait_recorded(tenant.tenant_id, [transaction_id])
    with server.engine.connect() as connection:
        return connection.execute(text("SELECT request_digest FROM fraud_transactions WHERE tenant_id = :t AND "
                                       "transaction_id = :i"), {"t": tenant.tenant_id, "i": transaction_id}).scalar()


def forget_answer_in_redis(server: FraudServer, tenant: FraudTenant, transaction_id: str) -> None:
    """As after ``ANSWER_TTL_S``: a resend is then recognised by its window entry, answered from the row."""
    import redis

    from services.fraud.redis_state import answer_key

    assert server.stack.redis_url
    redis.Redis.from_url(server.stack.redis_url).delete(answer_key(tenant.tenant_id, transaction_id))


def test_a_resend_with_another_body_is_409_and_the_same_transaction_replays(server: FraudServer,
                                                                            tenant: FraudTenant) -> None:
    payload = transaction(metadata={"a": "1", "b": "2"})
    tx_id = str(payload["id"])
    first = post_signed(tenant, payload)
    assert first.status_code == 200, first.text
    problem = assert_problem(post_signed(tenant, {**payload, "amount": 43.0}), 409, tx_id)
    assert problem["transaction_id"] == tx_id
    again = post_signed(tenant, the_same_written_differently(payload))
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "replayed": True}
    assert stored_digest(server, tenant, tx_id) == expected_digest(payload)
    if server.stack.redis_url:  # the resend answered from the database row, not from Redis
        forget_answer_in_redis(server, tenant, tx_id)
        assert_problem(post_signed(tenant, {**payload, "amount": 43.0}), 409, tx_id)
        assert post_signed(tenant, payload).json() == {**first.json(), "replayed": True}


def test_concurrent_duplicates_with_different_bodies_store_one_and_refuse_the_other(
        server: FraudServer, tenant: FraudTenant) -> None:
    first = transaction()
    second = {**first, "amount": 99.0}
    requests = [tenant.signed(payload) for payload in (first, second) * 8]

    async def storm() -> list[httpx.Response]:
        async with tenant.async_client() as client:
            return await asyncio.gather(*(client.post("/transactions", content=body, headers=headers)
                                          for body, headers in requests))

    responses = asyncio.run(storm())
    by_body = [{r.status_code for r in responses[start::2]} for start in (0, 1)]
    assert sorted(by_body, key=lambda statuses: min(statuses)) == [{200}, {409}], [r.text for r in responses]
    winner = first if by_body[0] == {200} else second
    assert stored_digest(server, tenant, str(first["id"])) == expected_digest(winner)


def test_a_decision_stored_without_a_digest_keeps_replaying(server: FraudServer, tenant: FraudTenant) -> None:
    payload = transaction()
    first = post_signed(tenant, payload).json()
    server.wait_recorded(tenant.tenant_id, [str(payload["id"])])
    with server.engine.begin() as connection:  # as a row written before digests were kept
        connection.execute(text("UPDATE fraud_transactions SET request_digest = NULL WHERE tenant_id = :t AND "
                                "transaction_id = :i"), {"t": tenant.tenant_id, "i": payload["id"]})
    if server.stack.redis_url:
        import redis

        from services.fraud.redis_state import answer_key, split_answer

        client = redis.Redis.from_url(server.stack.redis_url)
        key = answer_key(tenant.tenant_id, str(payload["id"]))
        client.set(key, split_answer(client.get(key))[1])  # type: ignore[arg-type]
    replay = post_signed(tenant, {**payload, "amount": 1.0})
    assert replay.status_code == 200 and replay.json() == {**first, "replayed": True}


# --- 7: batch items fail alone -----------------------------------------------------------------

def test_each_batch_item_gets_its_own_result_or_error(tenant: FraudTenant) -> None:
    used = transaction()
    assert post_signed(tenant, used).status_code == 200
    items = [transaction(), transaction(amount=-1), transaction(id="not an id!"),
             transaction(timestamp="9999-12-31T23:59:59-05:00"), {**used, "amount": 1.0}, transaction(amount=True),
             transaction()]
    response = post_signed(tenant, {"transactions": items}, "/transactions:batch")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    for index in (0, 6):
        assert results[index]["result"]["decision"] and results[index]["transaction_id"] == items[index]["id"]
    for index, field in ((1, "amount"), (2, "id"), (3, "timestamp"), (5, "amount")):
        error = results[index]["error"]
        assert error["status"] == 422 and error["errors"][0]["loc"] == [field] and error["index"] == index, error
        assert results[index]["result"] is None
        assert results[index]["transaction_id"] == error["transaction_id"] == (None if field == "id"
                                                                                else items[index]["id"])
    assert results[4]["error"]["status"] == 409 and results[4]["transaction_id"] == used["id"]


@pytest.mark.parametrize("payload", [{"transactions": []}, {"transactions": [1, 2]}, {"items": [transaction()]},
                                     [transaction()], {"transactions": [transaction()] * 1001}],
                         ids=["empty", "not-objects", "no-transactions", "a-list", "too-many"])
def test_a_batch_body_of_the_wrong_shape_fails_as_a_whole(tenant: FraudTenant, payload: object) -> None:
    assert_problem(post_signed(tenant, payload, "/transactions:batch"), 422, "")


# --- 5: an unexpected error: one log line, a clean 500, the connection kept ----------------------

def raising_app() -> FastAPI:
    """A service app with routes that fail unexpectedly (``uvicorn --factory``)."""
    from shared.app import create_service_app
    from shared.observability import configure_logging

    configure_logging(level="INFO", json_logs=True)
    router = APIRouter()

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom in a coroutine")

    @router.get("/boom-sync")
    def boom_sync() -> None:
        raise RuntimeError("boom in a thread")

    @router.get("/fine")
    async def fine() -> dict[str, str]:
        return {"status": "fine"}

    return create_service_app("contract-test", title="raising", routers=[router], check_broker=False)


def read_response(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP/1.1 response (status line, headers, Content-Length body) from a keep-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return status.encode(), headers, body


def test_an_unexpected_error_is_one_log_line_and_a_500_on_a_kept_connection(tmp_path: object) -> None:
    port = free_port()
    process = ManagedProcess(
        python_argv("-m", "uvicorn", "--factory", "tests.fraud.test_webhook_contract:raising_app", "--host",
                    "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log"),
        {"TESSERA_ENVIRONMENT": "test", "TESSERA_DATA_DIR": str(tmp_path), "TESSERA_ACCESS_LOG": "false"},
        "raising-app")
    try:
        process.wait_for_output(r"Uvicorn running on", timeout_s=60)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for index, path in enumerate(["/boom", "/boom-sync", "/fine"]):
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nX-Request-ID: req-{index}\r\n\r\n".encode())
                status, headers, body = read_response(sock)
                assert headers.get("connection") != "close"
                if path == "/fine":
                    assert status.startswith(b"HTTP/1.1 200") and orjson.loads(body) == {"status": "fine"}
                    continue
                assert status.startswith(b"HTTP/1.1 500"), status
                assert headers["content-type"] == "application/problem+json"
                problem = orjson.loads(body)
                assert problem["request_id"] == f"req-{index}" and "boom in" not in body.decode()
        wait_until(lambda: sum('"unhandled error"' in line for line in process.lines) >= 2, 10, "the error logs")
    finally:
        process.stop()  # a second log line of an error would come before the exit: all lines are read by now
    errors = [json.loads(line) for line in process.lines if line.startswith("{") and "unhandled error" in line]
    assert [entry["request_id"] for entry in errors] == ["req-0", "req-1"], process.output
    assert "boom in a coroutine" in errors[0]["exc"] and "boom in a thread" in errors[1]["exc"]
    assert "Exception in ASGI application" not in process.output
    assert sum('"level": "ERROR"' in line for line in process.lines) == 2, process.output


# --- 8: the access log -------------------------------------------------------------------------

def test_tessera_up_writes_one_access_line_per_request(sqlite_stack: Stack) -> None:
    from services.cli import gateway_command

    run_cli(sqlite_stack, "db", "upgrade")
    port = free_port()
    process = ManagedProcess(gateway_command("127.0.0.1", port, 1),
                             {**sqlite_stack.env, "TESSERA_LOG_JSON": "true", "TESSERA_LOG_LEVEL": "INFO"}, "gateway")
    engine = create_engine(sqlite_stack.database_url)
    try:
        process.wait_for_output(r"Uvicorn running on", timeout_s=120)
        base = f"http://127.0.0.1:{port}"
        tenant = FraudServer(sqlite_stack, f"{base}/fraud/v1", engine).new_tenant()
        payload = transaction()
        body, headers = tenant.signed(payload)
        with tenant.client() as client:
            assert client.post("/transactions", content=body, headers={**headers, "X-Request-ID": "acc-1"}
                               ).status_code == 200
            assert client.get(f"/transactions/{payload['id']}?token=query-secret",
                              headers={"X-Request-ID": "acc-2"}).status_code == 200
        assert httpx.get(f"{base}/healthz", headers={"X-Request-ID": "acc-3"}).status_code == 200
        assert httpx.post(f"{base}/fraud/v1/transactions", content=body,
                          headers={**headers, "X-Request-ID": "acc-4"}).status_code == 401

        def access_lines() -> list[dict]:
            return [entry for entry in (json.loads(line) for line in list(process.lines) if line.startswith("{"))
                    if entry.get("logger") == "tessera.access"]

        wait_until(lambda: len(access_lines()) >= 4, 10, "four access lines")
    finally:
        engine.dispose()
        process.stop()  # any line more would come before the exit: all lines are read by now
    lines = {entry["request_id"]: entry for entry in access_lines() if entry["request_id"].startswith("acc-")}
    assert len(access_lines()) == len(lines) == 4, access_lines()
    assert {k: lines["acc-1"][k] for k in ("method", "path", "status", "tenant")} == {
        "method": "POST", "path": "/fraud/v1/transactions", "status": 200, "tenant": tenant.tenant_id}
    assert lines["acc-2"]["path"] == f"/fraud/v1/transactions/{payload['id']}"
    assert lines["acc-2"]["tenant"] == tenant.tenant_id and lines["acc-2"]["status"] == 200
    assert lines["acc-3"]["path"] == "/healthz" and "tenant" not in lines["acc-3"]
    assert lines["acc-4"]["status"] == 401 and "tenant" not in lines["acc-4"]
    assert all(isinstance(entry["duration_ms"], float) for entry in lines.values())
    logged = json.dumps(access_lines())
    assert "query-secret" not in logged and tenant.api_key not in logged and str(payload["customer_id"]) not in logged
    assert not any("HTTP/1.1\" 200" in line for line in process.lines)  # uvicorn's own access log stays off


def test_the_access_log_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings
    from shared.observability import RequestContextMiddleware

    monkeypatch.setenv("TESSERA_ACCESS_LOG", "false")
    get_settings.cache_clear()
    assert RequestContextMiddleware(FastAPI(), "bench").access_log is False
