"""WebSocket endpoints under the contract of the HTTP routes: API key and scope, request id, metrics,
problem+json refusals and one table of close codes.

A vertical declares a route on its router; the handler gets an :class:`AuthorizedWebSocket`, already
accepted for a caller whose key holds the route's scope::

    @router.websocket("/v1/calls/{call_id}/audio")
    @authorized_websocket("cs", max_message_bytes=64 * 1024)
    async def call_audio(connection: AuthorizedWebSocket) -> None:
        call_id = connection.websocket.path_params["call_id"]
        async for frame in connection.iter_bytes():
            await connection.send_json(assist_event_for(frame))

The handler raises the platform's errors (:mod:`shared.errors`) as an HTTP route does; this module
turns them into close codes, logs the connection with its request id and tenant, and counts it.

Presenting the API key
    ``X-API-Key: tsk_...`` or ``Authorization: Bearer tsk_...``, as on HTTP. Browsers cannot set
    headers on a WebSocket, so the key may instead be offered as a subprotocol:
    ``new WebSocket(url, ["tessera", "tessera.api-key.tsk_..."])``; the server answers
    ``Sec-WebSocket-Protocol: tessera`` (never the key). Risk: the key travels in a request header
    that a proxy may log, and it sits in the browser's memory; give a browser a key scoped to one
    vertical, over ``wss://`` only. A ``?api_key=`` query parameter is *not* accepted: uvicorn's
    and most proxies' access logs write query strings.

Refusing the handshake (before accept)
    A WebSocket close frame can only be sent on an accepted connection: an ASGI app that closes
    before accepting makes uvicorn answer a bare ``HTTP 403`` with no body, and the close code and
    reason are lost (tested in tests/shared/test_websockets.py). So a refused handshake is an HTTP
    answer, the same one an HTTP route gives: ``401`` (no, wrong or revoked key, with
    ``WWW-Authenticate``), ``403`` (key without the scope) or ``503`` (keys cannot be checked, with
    ``Retry-After``), a problem+json body with the ``request_id``, sent through the ASGI WebSocket
    Denial Response extension (uvicorn and hypercorn have it). On a server without it, the
    connection is closed before accept (a bare 403). Non-browser clients see the status and body
    (the ``websockets`` package raises ``InvalidStatus``); browsers show every refused handshake as
    close code 1006, by design of the browser API.

Closing an accepted connection: IANA-registered codes (RFC 6455 section 7.4), each with a reason
(the problem's detail, at most 123 bytes of UTF-8)

    ====  ==============================================================================
    1000  the handler returned (reason ``done``), or closed the connection itself
    1003  a message of the wrong kind: binary where text is expected or the reverse (415)
    1007  a message that is not valid for the endpoint: malformed JSON, a failed schema (400, 422)
    1008  policy: the key was revoked or lost its scope while connected (401, 403), or any
          other 4xx the handler raises (404, 409, ...)
    1009  a message larger than the endpoint's ``max_message_bytes`` (413); uvicorn closes with
          1009 itself above ``--ws-max-size`` (16 MiB by default), before the app sees a message
    1011  an unexpected error in the handler: ``internal error; request id <id>``, details only
          in the log; also a ``ProblemError`` with a 5xx other than 503/504
    1013  try again later: overloaded or not ready (503), a deadline exceeded (504)
    ====  ==============================================================================

The key is checked again when a message arrives more than :data:`shared.security.API_KEY_MAX_AGE_S`
after the last check, so a revoked key's connection is closed (1008) at its next message.

Request id: ``X-Request-ID`` from the handshake (or a new one), answered in the handshake's
response headers, in every log line of the connection and in refusals; uvicorn's own WebSocket
log line carries none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from prometheus_client import Counter, Gauge
from pydantic import BaseModel
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from shared.errors import (
    EdgeMappedError,
    PayloadTooLarge,
    ProblemError,
    UnsupportedMediaType,
    as_problem,
    failure_document,
    parse_json,
    problem_response,
)
from shared.observability import REQUEST_ID_HEADER, _incoming_request_id, request_id_var
from shared.security import API_KEY_MAX_AGE_S, Principal, authorize, presented_api_key

logger = logging.getLogger("tessera.websocket")
ModelT = TypeVar("ModelT", bound=BaseModel)

API_KEY_SUBPROTOCOL_PREFIX = "tessera.api-key."
"""A browser offers its key as the subprotocol ``tessera.api-key.<key>`` (beside ``tessera``)."""
TESSERA_SUBPROTOCOL = "tessera"
"""The subprotocol the server selects when a key came as a subprotocol (browsers require one)."""
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MAX_CLOSE_REASON_BYTES = 123
"""A close frame's payload is at most 125 bytes, two of them the code (RFC 6455 section 5.5)."""

NORMAL_CLOSURE = 1000
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
CLOSE_CODE_BY_STATUS = {400: INVALID_PAYLOAD, 413: MESSAGE_TOO_BIG, 415: UNSUPPORTED_DATA, 422: INVALID_PAYLOAD,
                        503: TRY_AGAIN_LATER, 504: TRY_AGAIN_LATER}
"""Statuses with a close code of their own; other 4xx are 1008 (policy), other 5xx 1011."""

WEBSOCKET_HANDSHAKES = Counter("tessera_websocket_handshakes_total",
                               "WebSocket handshakes by answer: 101 accepted, else the refusal's HTTP status",
                               ["app", "status"])
WEBSOCKET_OPEN = Gauge("tessera_websocket_connections_open", "Accepted WebSocket connections now open", ["app"])
WEBSOCKET_MESSAGES = Counter("tessera_websocket_messages_total", "WebSocket messages", ["app", "direction"])
WEBSOCKET_CLOSES = Counter("tessera_websocket_closes_total", "Closed WebSocket connections by code and closing side",
                           ["app", "code", "by"])


def close_code_for(exc: ProblemError) -> int:
    """The close code of a platform error raised on an accepted connection (the module's table)."""
    status = exc.status
    return CLOSE_CODE_BY_STATUS.get(status, POLICY_VIOLATION if status < 500 else INTERNAL_ERROR)


def close_reason(text: str) -> str:
    """``text`` cut to what fits a close frame (123 bytes of UTF-8, never half a character)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return text
    return encoded[:MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def presented_websocket_key(websocket: WebSocket) -> str | None:
    """The API key from the headers (as HTTP), else from a ``tessera.api-key.<key>`` subprotocol."""
    from_headers = presented_api_key(websocket.headers)
    if from_headers:
        return from_headers
    for offered in websocket.scope.get("subprotocols", ()):
        if offered.startswith(API_KEY_SUBPROTOCOL_PREFIX):
            return offered[len(API_KEY_SUBPROTOCOL_PREFIX):]
    return None


def chosen_subprotocol(offered: Sequence[str], supported: Sequence[str]) -> str | None:
    """The first of the endpoint's ``supported`` subprotocols the client offered, else ``tessera``
    when offered (a browser that sent its key as a subprotocol needs one answered), else none."""
    for name in supported:
        if name in offered:
            return name
    return TESSERA_SUBPROTOCOL if TESSERA_SUBPROTOCOL in offered else None


class AuthorizedWebSocket:
    """An accepted WebSocket of a caller whose key holds the route's scope.

    Receiving enforces the endpoint's message size and the kind of message expected; the
    errors it raises (and those the handler raises) become close codes (module docstring).
    ``websocket`` is Starlette's object, for ``path_params``, ``query_params`` and ``headers``.
    """

    def __init__(self, websocket: WebSocket, *, principal: Principal, api_key: str, scope: str,
                 request_id: str, app_name: str, max_message_bytes: int) -> None:
        self.websocket = websocket
        self.principal = principal
        self.request_id = request_id
        self.max_message_bytes = max_message_bytes
        self.messages_received = 0
        self.messages_sent = 0
        self.client_close_code: int | None = None
        self.server_close: tuple[int, str] | None = None
        self._api_key = api_key
        self._scope = scope
        self._authorized_at = time.monotonic()
        self._received = WEBSOCKET_MESSAGES.labels(app_name, "received")
        self._sent = WEBSOCKET_MESSAGES.labels(app_name, "sent")

    async def receive(self) -> str | bytes:
        """The next message, text or binary; ``WebSocketDisconnect`` when the client has closed."""
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            self.client_close_code = int(message.get("code") or NORMAL_CLOSURE)
            raise WebSocketDisconnect(self.client_close_code, message.get("reason"))
        payload: str | bytes = message["text"] if message.get("text") is not None else message.get("bytes") or b""
        self._check_size(payload)
        self.messages_received += 1
        self._received.inc()
        await self._check_still_authorized()
        return payload

    async def receive_text(self) -> str:
        """The next message, which must be text (binary: closed with 1003)."""
        payload = await self.receive()
        if not isinstance(payload, str):
            raise UnsupportedMediaType("expected a text message, got a binary one")
        return payload

    async def receive_bytes(self) -> bytes:
        """The next message, which must be binary (text: closed with 1003)."""
        payload = await self.receive()
        if not isinstance(payload, bytes):
            raise UnsupportedMediaType("expected a binary message, got a text one")
        return payload

    async def receive_model(self, model: type[ModelT]) -> ModelT:
        """The next message, a JSON text valid for ``model`` (else closed with 1007, the first error as reason)."""
        return parse_json(model, (await self.receive_text()).encode("utf-8"))

    async def iter_text(self) -> AsyncIterator[str]:
        """Text messages until the client closes."""
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                yield await self.receive_text()

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Binary messages until the client closes."""
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                yield await self.receive_bytes()

    async def send_text(self, text: str) -> None:
        """Send a text message."""
        await self.websocket.send_text(text)
        self._count_sent()

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary message."""
        await self.websocket.send_bytes(data)
        self._count_sent()

    async def send_json(self, value: BaseModel | Any) -> None:
        """Send a pydantic model or a JSON-serialisable value as a text message."""
        text = value.model_dump_json() if isinstance(value, BaseModel) else orjson.dumps(value).decode()
        await self.send_text(text)

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "done") -> None:
        """Close the connection now with ``code`` and a ``reason`` (every close says why)."""
        self.server_close = (code, reason)
        await close_quietly(self.websocket, code, reason)

    def _count_sent(self) -> None:
        self.messages_sent += 1
        self._sent.inc()

    def _check_size(self, payload: str | bytes) -> None:
        # A character is at most 4 bytes of UTF-8: encode only a text that might be too large.
        size = len(payload) if isinstance(payload, bytes) or len(payload) * 4 <= self.max_message_bytes \
            else len(payload.encode("utf-8"))
        if size > self.max_message_bytes:
            raise PayloadTooLarge(f"message of {size} bytes; this endpoint accepts at most "
                                  f"{self.max_message_bytes}")

    async def _check_still_authorized(self) -> None:
        if time.monotonic() - self._authorized_at < API_KEY_MAX_AGE_S:
            return
        self.principal = await authorize(self._api_key, self._scope)
        self._authorized_at = time.monotonic()


WebSocketHandler = Callable[[AuthorizedWebSocket], Awaitable[None]]
WebSocketEndpoint = Callable[[WebSocket], Awaitable[None]]


def authorized_websocket(scope: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                         subprotocols: Sequence[str] = ()) -> Callable[[WebSocketHandler], WebSocketEndpoint]:
    """Decorator: turn a handler of :class:`AuthorizedWebSocket` into a FastAPI WebSocket endpoint.

    ``scope``: the vertical a caller's key must hold (or ``admin``). ``max_message_bytes``: larger
    messages close the connection with 1009. ``subprotocols``: the endpoint's own, chosen in
    this order among those the client offers.
    """

    def decorate(handler: WebSocketHandler) -> WebSocketEndpoint:
        async def endpoint(websocket: WebSocket) -> None:
            await serve_websocket(websocket, handler, scope=scope, max_message_bytes=max_message_bytes,
                                  subprotocols=subprotocols)

        endpoint.__name__ = handler.__name__
        endpoint.__qualname__ = handler.__qualname__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    return decorate


async def serve_websocket(websocket: WebSocket, handler: WebSocketHandler, *, scope: str,
                          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, subprotocols: Sequence[str] = ()) -> None:
    """Authorize, accept, run ``handler`` and close with the code its outcome maps to (module docstring)."""
    request_id = websocket_request_id(websocket)
    token = request_id_var.set(request_id)
    app_name = getattr(getattr(websocket.scope.get("app"), "state", None), "service_name", "app")
    try:
        api_key = presented_websocket_key(websocket)
        try:
            principal = await authorize(api_key, scope)
        except ProblemError as exc:
            await refuse_handshake(websocket, exc, request_id, app_name)
            return
        assert api_key is not None  # authorize refuses a missing key
        websocket.state.principal = principal
        await websocket.accept(subprotocol=chosen_subprotocol(websocket.scope.get("subprotocols", ()), subprotocols),
                               headers=[(REQUEST_ID_HEADER.encode(), request_id.encode())])
        WEBSOCKET_HANDSHAKES.labels(app_name, "101").inc()
        connection = AuthorizedWebSocket(websocket, principal=principal, api_key=api_key, scope=scope,
                                         request_id=request_id, app_name=app_name,
                                         max_message_bytes=max_message_bytes)
        await _run_accepted(connection, handler, app_name)
    finally:
        request_id_var.reset(token)


def websocket_request_id(websocket: WebSocket) -> str:
    """The connection's request id: set by an outer app, else the client's ``X-Request-ID``, else new."""
    state = websocket.scope.setdefault("state", {})
    request_id = state.get("request_id") or _incoming_request_id(websocket.scope) or os.urandom(16).hex()
    state["request_id"] = request_id
    return str(request_id)


async def refuse_handshake(websocket: WebSocket, exc: ProblemError, request_id: str, app_name: str) -> None:
    """Answer the handshake with the HTTP problem an HTTP route would give (module docstring)."""
    WEBSOCKET_HANDSHAKES.labels(app_name, str(exc.status)).inc()
    logger.info("websocket refused", extra={"path": websocket.url.path, "status": exc.status, "reason": exc.detail})
    body = failure_document(exc, websocket.url.path, request_id)
    headers = {**exc.headers, REQUEST_ID_HEADER: request_id}
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(problem_response(body, headers))
    else:
        await websocket.close(POLICY_VIOLATION, close_reason(exc.detail))


async def _run_accepted(connection: AuthorizedWebSocket, handler: WebSocketHandler, app_name: str) -> None:
    websocket = connection.websocket
    started = time.perf_counter()
    WEBSOCKET_OPEN.labels(app_name).inc()
    logger.info("websocket open", extra={"path": websocket.url.path, "tenant": connection.principal.tenant_id})
    code, reason = NORMAL_CLOSURE, "done"
    try:
        await handler(connection)
    except WebSocketDisconnect as exc:
        connection.client_close_code = connection.client_close_code or exc.code
    except (ProblemError, EdgeMappedError) as exc:  # EdgeMappedError: e.g. the model runtime's overload
        problem = as_problem(exc)
        if problem is None:
            logger.error("websocket handler failed", exc_info=exc, extra={"path": websocket.url.path})
            code, reason = INTERNAL_ERROR, f"internal error; request id {connection.request_id}"
        else:
            code, reason = close_code_for(problem), problem.detail
    except Exception:
        logger.exception("websocket handler failed", extra={"path": websocket.url.path})
        code, reason = INTERNAL_ERROR, f"internal error; request id {connection.request_id}"
    finally:
        WEBSOCKET_OPEN.labels(app_name).dec()
    side = "server"
    if connection.client_close_code is not None:
        code, reason, side = connection.client_close_code, "closed by the client", "client"
    elif connection.server_close is not None:  # the handler closed it itself
        code, reason = connection.server_close
    else:
        await close_quietly(websocket, code, reason)
    WEBSOCKET_CLOSES.labels(app_name, str(code), side).inc()
    logger.info("websocket closed", extra={
        "path": websocket.url.path, "tenant": connection.principal.tenant_id, "code": code, "closed_by": side,
        "reason": close_reason(reason), "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "messages_received": connection.messages_received, "messages_sent": connection.messages_sent})


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    """Close an accepted connection with ``code`` and ``reason``; nothing if either side has closed."""
    if websocket.application_state != WebSocketState.CONNECTED or websocket.client_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(WebSocketDisconnect):
        await websocket.close(code, close_reason(reason))
