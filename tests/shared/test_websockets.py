"""WebSocket routes under the HTTP contract (shared/websockets.py): a real uvicorn serving
tests/shared/websocket_app.py on loopback and the ``websockets`` client, on both stacks."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from shared.db import session_factory
from shared.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ProblemError,
    ServiceOverloaded,
    Unauthorized,
    UnprocessableContent,
    UnsupportedMediaType,
)
from shared.security import create_api_key, revoke_api_key
from shared.websockets import close_code_for, close_reason
from tests.conftest import Stack
from tests.shared.websocket_app import MAX_ECHO_MESSAGE_BYTES
from tests.support import ManagedProcess, free_port, python_argv, wait_until


@dataclass
class WebSocketServer:
    stack: Stack
    port: int
    process: ManagedProcess

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def new_key(self, *scopes: str) -> str:
        with session_factory(self.stack.database_url)() as session:
            key = create_api_key(session, tenant_id=f"t-{uuid.uuid4().hex[:8]}", name="ws", scopes=scopes)
            session.commit()
        return key

    def revoke(self, key: str) -> None:
        with session_factory(self.stack.database_url)() as session:
            revoke_api_key(session, key.split("_")[1])
            session.commit()

    def connect(self, path: str, key: str | None, *, headers: dict[str, str] | None = None,
                subprotocols: list[str] | None = None) -> ClientConnection:
        key_header = {"X-API-Key": key} if key else {}
        return connect(self.url(path), additional_headers={**key_header, **(headers or {})},
                       subprotocols=[Subprotocol(name) for name in subprotocols or ()] or None,
                       proxy=None, open_timeout=10, close_timeout=5)

    def log_entries(self, message: str) -> list[dict[str, object]]:
        entries = [json.loads(line) for line in list(self.process.lines) if line.startswith("{")]
        return [entry for entry in entries if entry.get("msg") == message]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def ws_server(request: pytest.FixtureRequest) -> Iterator[WebSocketServer]:
    stack: Stack = request.getfixturevalue(f"{request.param}_stack")
    env = {**stack.env, "TESSERA_LOG_JSON": "true", "TESSERA_LOG_LEVEL": "INFO"}
    migrate = ManagedProcess(python_argv("-m", "services.cli", "db", "upgrade"), env, "migrate")
    assert migrate.process.wait(timeout=180) == 0, migrate.output[-3000:]
    port = free_port()
    server = ManagedProcess(python_argv("-m", "uvicorn", "tests.shared.websocket_app:app", "--host", "127.0.0.1",
                                        "--port", str(port)), env, f"websocket-app-{stack.name}")
    try:
        server.wait_for_output(r"Uvicorn running on", timeout_s=120)
        yield WebSocketServer(stack, port, server)
    finally:
        server.stop()


def refusal(server: WebSocketServer, path: str, key: str | None,
            headers: dict[str, str] | None = None) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as refused, server.connect(path, key, headers=headers):
        pass
    return refused.value


def problem_of(refused: InvalidStatus) -> dict[str, object]:
    response = refused.response
    assert response.headers["Content-Type"] == "application/problem+json"
    problem: dict[str, object] = json.loads(bytes(response.body or b""))
    assert problem["status"] == response.status_code
    assert problem["request_id"] == response.headers["X-Request-ID"]
    return problem


def closed_with(connection: ClientConnection) -> tuple[int, str]:
    """The close code and reason the server sent, once the connection ends."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            connection.recv(timeout=10)
    assert connection.protocol.close_rcvd is not None, "the server closed without a close frame"
    return connection.protocol.close_rcvd.code, connection.protocol.close_rcvd.reason


def test_a_scoped_key_connects_and_the_request_id_is_echoed(ws_server: WebSocketServer) -> None:
    key = ws_server.new_key("cs")
    with ws_server.connect("/v1/echo", key, headers={"X-Request-ID": "call-42-abc"}) as connection:
        assert connection.response is not None and connection.response.headers["X-Request-ID"] == "call-42-abc"
        hello = json.loads(connection.recv(timeout=10))
        assert hello["request_id"] == "call-42-abc" and hello["tenant"].startswith("t-")
        connection.send("ping")
        assert connection.recv(timeout=10) == "ping"
    wait_until(lambda: any(e.get("request_id") == "call-42-abc" and e.get("code") == 1000
                           for e in ws_server.log_entries("websocket closed")), 10, "the close logged with its id")
    opened = [e for e in ws_server.log_entries("websocket open") if e.get("request_id") == "call-42-abc"]
    assert opened and opened[0]["tenant"] == hello["tenant"]


def test_an_admin_key_and_a_bearer_key_connect_and_a_request_id_is_made(ws_server: WebSocketServer) -> None:
    admin = ws_server.new_key("admin")
    with ws_server.connect("/v1/echo", None, headers={"Authorization": f"Bearer {admin}"}) as connection:
        assert connection.response is not None
        request_id = connection.response.headers["X-Request-ID"]
        assert len(request_id) == 32 and json.loads(connection.recv(timeout=10))["request_id"] == request_id


def test_a_browser_offers_its_key_as_a_subprotocol_and_is_answered_tessera(ws_server: WebSocketServer) -> None:
    key = ws_server.new_key("cs")
    with ws_server.connect("/v1/echo", None, subprotocols=["tessera", f"tessera.api-key.{key}"]) as connection:
        assert connection.subprotocol == "tessera"
        assert connection.response is not None and key not in str(connection.response.headers)
        json.loads(connection.recv(timeout=10))


@pytest.mark.parametrize(("presented", "status", "detail"), [
    (None, 401, "missing API key"),
    ("tsk_000000000000_not-a-real-secret", 401, "invalid or revoked API key"),
    ("fraud-only", 403, "not allowed to use 'cs'"),
    ("revoked", 401, "invalid or revoked API key"),
])
def test_a_refused_handshake_is_the_http_problem(ws_server: WebSocketServer, presented: str | None, status: int,
                                                 detail: str) -> None:
    if presented == "fraud-only":
        presented = ws_server.new_key("fraud")
    elif presented == "revoked":
        presented = ws_server.new_key("cs")
        ws_server.revoke(presented)
    refused = refusal(ws_server, "/v1/echo", presented, headers={"X-Request-ID": "refused-1"})
    assert refused.response.status_code == status
    problem = problem_of(refused)
    assert detail in str(problem["detail"]) and problem["request_id"] == "refused-1"
    assert problem["instance"] == "/v1/echo"
    if status == 401:
        assert refused.response.headers["WWW-Authenticate"] == "Bearer"


def test_a_close_before_accept_reaches_clients_as_a_bare_403(ws_server: WebSocketServer) -> None:
    """Why refusals are HTTP answers: uvicorn turns a close before accept into an empty 403."""
    refused = refusal(ws_server, "/v1/closed-before-accept", None)
    assert refused.response.status_code == 403
    assert not refused.response.body


def test_a_key_revoked_while_connected_is_closed_with_1008(ws_server: WebSocketServer) -> None:
    key = ws_server.new_key("cs")
    with ws_server.connect("/v1/echo", key) as connection:
        connection.recv(timeout=10)
        ws_server.revoke(key)
        deadline = time.monotonic() + 15
        with contextlib.suppress(ConnectionClosed):
            while time.monotonic() < deadline:  # each message re-checks a key older than 1 s
                connection.send("still me?")
                connection.recv(timeout=10)
        close = connection.protocol.close_rcvd
        assert close is not None, "still open 15 s after the revocation"
        assert (close.code, close.reason) == (1008, "invalid or revoked API key")


def test_a_message_over_the_limit_is_closed_with_1009(ws_server: WebSocketServer) -> None:
    with ws_server.connect("/v1/echo", ws_server.new_key("cs")) as connection:
        connection.recv(timeout=10)
        connection.send("x" * MAX_ECHO_MESSAGE_BYTES)
        assert connection.recv(timeout=10) == "x" * MAX_ECHO_MESSAGE_BYTES, "the limit itself is accepted"
        connection.send("é" * (MAX_ECHO_MESSAGE_BYTES // 2 + 1))  # 2 bytes of UTF-8 each
        code, reason = closed_with(connection)
    assert code == 1009 and f"at most {MAX_ECHO_MESSAGE_BYTES}" in reason


@pytest.mark.parametrize(("path", "message", "code", "reason"), [
    ("/v1/echo", b"\x00binary", 1003, "expected a text message"),
    ("/v1/greetings", '{"name": ""}', 1007, "name: String should have at least 1 character"),
    ("/v1/greetings", "not json", 1007, "Invalid JSON"),
    ("/v1/overloaded", "hello", 1013, "the model's queue is full"),
])
def test_platform_errors_close_with_their_code_and_reason(ws_server: WebSocketServer, path: str,
                                                          message: str | bytes, code: int, reason: str) -> None:
    with ws_server.connect(path, ws_server.new_key("cs")) as connection:
        if path == "/v1/echo":
            connection.recv(timeout=10)
        connection.send(message)
        received = closed_with(connection)
    assert received[0] == code and reason in received[1], received


def test_a_handler_error_closes_with_1011_and_leaks_nothing(ws_server: WebSocketServer) -> None:
    with ws_server.connect("/v1/failing", ws_server.new_key("cs"), headers={"X-Request-ID": "boom-7"}) as connection:
        connection.send("hello")
        code, reason = closed_with(connection)
    assert (code, reason) == (1011, "internal error; request id boom-7")
    wait_until(lambda: any(e.get("request_id") == "boom-7" and "hunter2" in str(e.get("exc"))
                           for e in ws_server.log_entries("websocket handler failed")), 10, "the traceback logged")


def test_a_client_that_vanishes_is_logged_as_its_own_close(ws_server: WebSocketServer) -> None:
    with ws_server.connect("/v1/echo", ws_server.new_key("cs"), headers={"X-Request-ID": "gone-3"}) as connection:
        connection.recv(timeout=10)
        connection.socket.shutdown(socket.SHUT_RDWR)  # no close frame
    wait_until(lambda: any(e.get("request_id") == "gone-3" and e.get("closed_by") == "client"
                           and e.get("code") in (1005, 1006)  # no status / abnormal, as uvicorn reports it
                           for e in ws_server.log_entries("websocket closed")), 10, "the vanished client logged")
    assert "Exception in ASGI application" not in ws_server.process.output


def test_connections_and_messages_are_counted(ws_server: WebSocketServer) -> None:
    with ws_server.connect("/v1/echo", ws_server.new_key("cs")) as connection:
        connection.recv(timeout=10)
        connection.send("counted")
        connection.recv(timeout=10)
    refusal(ws_server, "/v1/echo", None)
    metrics = httpx.get(f"http://127.0.0.1:{ws_server.port}/metrics").text
    for sample in ('tessera_websocket_handshakes_total{app="websocket-test",status="101"}',
                   'tessera_websocket_handshakes_total{app="websocket-test",status="401"}',
                   'tessera_websocket_messages_total{app="websocket-test",direction="received"}',
                   'tessera_websocket_messages_total{app="websocket-test",direction="sent"}',
                   'tessera_websocket_connections_open{app="websocket-test"}'):
        assert sample in metrics, sample
    wait_until(lambda: 'tessera_websocket_closes_total{app="websocket-test",by="client",code="1000"}'
               in httpx.get(f"http://127.0.0.1:{ws_server.port}/metrics").text, 10, "the client's close counted")


@pytest.mark.parametrize(("error", "code"), [
    (UnsupportedMediaType(), 1003), (UnprocessableContent(), 1007), (BadRequest(), 1007), (Unauthorized(), 1008),
    (Forbidden(), 1008), (NotFound(), 1008), (Conflict(), 1008), (PayloadTooLarge(), 1009),
    (ServiceOverloaded(), 1013), (NotReady(), 1013), (DeadlineExceeded(), 1013), (ProblemError(), 1011),
])
def test_each_platform_error_has_its_close_code(error: ProblemError, code: int) -> None:
    assert close_code_for(error) == code


def test_a_long_reason_is_cut_to_fit_a_close_frame() -> None:
    reason = close_reason("é" * 100)
    assert len(reason.encode("utf-8")) <= 123 and reason.endswith("...") and "\ufffd" not in reason
    assert close_reason("short") == "short"
