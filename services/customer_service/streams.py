"""The WebSocket endpoints of the customer-service vertical: call audio in (Twilio Media Streams,
Genesys AudioHook v2, Vonage), agent-assist and supervisor feeds out.

Each stream endpoint drives one protocol session (:mod:`.protocols`, pure state machines) and one
call pipeline (:mod:`.pipeline`) with :func:`run_stream`; whatever ends the stream (the protocol's
own end, a protocol error, the client vanishing), the pipeline closes the call, so the partial
call is kept, and other calls are untouched.

Who may stream for a tenant
    Twilio can set no header of its own: the tenant is named in the stream URL (``?tenant=ID``) or
    a ``<Parameter name="tenant">`` and proved by ``X-Twilio-Signature`` with that tenant's auth
    token (``PUT /cs/v1/integrations``). AudioHook presents the tenant's API key as ``X-API-KEY``
    (the ``cs`` scope) and signs the upgrade (RFC 9421) with the tenant's client secret; Vonage
    presents an API key. In production an unsigned Twilio or AudioHook stream is refused; on
    embedded defaults it is accepted with a warning in the log (a tenant with no credentials set).

Feeds (API key with the ``cs`` scope; a browser offers it as a subprotocol, :mod:`shared.websockets`)
    ``/v1/calls/{call_id}/events``  one call's assist events: first those kept (the call so far;
        ``?after=<feed_id>`` resumes after a reconnect; an ``after`` that is not a feed id closes 1007),
        then live ones; closed ``1000`` once the call has ended.
    ``/v1/supervisor/events``  the tenant's live calls (a ``live.calls`` snapshot first), then
        each call started, updated (current emotion), escalated and ended.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from services.customer_service import store
from services.customer_service.assist import assist_services
from services.customer_service.assist_schemas import LiveCall
from services.customer_service.pipeline import CallPipeline, call_topic, live_topic
from services.customer_service.protocols.audiohook import AudioHookSession, verify_upgrade
from services.customer_service.protocols.base import CallEnded, ProtocolError, StreamSession, Track, request_target
from services.customer_service.protocols.twilio import TwilioCredentials, TwilioSession, signed_stream_url
from services.customer_service.protocols.vonage import VonageSession
from shared.config import get_settings
from shared.db import session_scope
from shared.errors import BadRequest, NotFound, ProblemError
from shared.feeds import EventFeed, FeedLagged, InvalidFeedId
from shared.observability import request_id_var
from shared.websockets import (
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    NORMAL_CLOSURE,
    POLICY_VIOLATION,
    TRY_AGAIN_LATER,
    AuthorizedWebSocket,
    authorized_websocket,
    close_code_for,
    close_quietly,
    close_reason,
    websocket_request_id,
)

logger = logging.getLogger("tessera.cs.streams")

streams = APIRouter(prefix="/v1")

MAX_STREAM_MESSAGE_BYTES = 64 * 1024
"""A media message is about 300 bytes of JSON (Twilio) or 320 bytes of audio (AudioHook); AudioHook's
text messages are at most 64 KiB."""
CREDENTIALS_TTL_S = 30.0


class StreamChannel(Protocol):
    """What :func:`run_stream` needs of a WebSocket."""

    async def receive(self) -> str | bytes:
        """The next message; ``WebSocketDisconnect`` once the client has closed."""
        ...

    async def send_text(self, text: str) -> None:
        """Send a text message."""
        ...

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary message."""
        ...

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "done") -> None:
        """Close the connection."""
        ...


class PlainChannel:
    """A WebSocket whose caller shows no API key (Twilio), with the stream message size limit."""

    def __init__(self, websocket: WebSocket, max_message_bytes: int = MAX_STREAM_MESSAGE_BYTES) -> None:
        self.websocket = websocket
        self.max_message_bytes = max_message_bytes

    async def receive(self) -> str | bytes:
        """The next message; ``WebSocketDisconnect`` once the client has closed."""
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(int(message.get("code") or NORMAL_CLOSURE), message.get("reason"))
        payload: str | bytes = message["text"] if message.get("text") is not None else message.get("bytes") or b""
        if len(payload) > self.max_message_bytes:
            await self.close(MESSAGE_TOO_BIG, f"message of {len(payload)} bytes; at most {self.max_message_bytes}")
            raise WebSocketDisconnect(MESSAGE_TOO_BIG)
        return payload

    async def send_text(self, text: str) -> None:
        """Send a text message."""
        await self.websocket.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary message."""
        await self.websocket.send_bytes(data)

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "done") -> None:
        """Close the connection."""
        await close_quietly(self.websocket, code, reason)


async def run_stream(channel: StreamChannel, session: StreamSession) -> None:
    """Drive one protocol session and its call's pipeline until the stream ends, however it ends."""
    sending = asyncio.Lock()  # replies and transcript events leave in the order of their seq

    async def send(frame: str | bytes) -> None:
        async with sending:
            await (channel.send_bytes(frame) if isinstance(frame, bytes) else channel.send_text(frame))

    async def send_transcript(track: Track, text: str, offset_s: float, duration_s: float) -> None:
        message = session.transcript_message(track, text, offset_s=offset_s, duration_s=duration_s, confidence=0.0)
        if message is not None:
            await send(message)

    try:
        services = assist_services()
    except ProblemError as not_ready:
        await channel.close(close_code_for(not_ready), close_reason(not_ready.detail))
        return
    pipeline = CallPipeline(services, send_transcript=send_transcript)
    client_code: int | None = None
    idle_timeout_s = get_settings().cs_stream_idle_timeout_s
    try:
        while True:
            try:
                message = await asyncio.wait_for(channel.receive(), idle_timeout_s)
            except TimeoutError:
                await _close_stalled(channel, session, pipeline, idle_timeout_s)
                return
            step = session.receive(message)
            for reply in step.replies:
                await send(reply)
            for event in step.events:
                await pipeline.handle(event)
            if step.close:
                await channel.close(*step.close)
                return
    except WebSocketDisconnect as gone:
        client_code = gone.code
    except ProtocolError as error:
        logger.info("stream refused: %s (close %d)", error.detail, error.close_code)
        for reply in error.replies:
            with contextlib.suppress(Exception):
                await send(reply)
        await channel.close(error.close_code, error.close_reason)
    finally:
        for event in session.finish(client_code):
            await pipeline.handle(event)
        await pipeline.close()


async def _close_stalled(channel: StreamChannel, session: StreamSession, pipeline: CallPipeline,
                         idle_timeout_s: float) -> None:
    """A client that sent nothing for ``idle_timeout_s`` (no audio, no ping): the call is ended as
    disconnected (kept as partial, with what was heard) and the socket closed with 1008."""
    reason = f"nothing received for {idle_timeout_s:g} s"
    logger.info("stream stalled: %s", reason)
    for event in session.finish(None):
        await pipeline.handle(replace(event, detail=reason) if isinstance(event, CallEnded) else event)
    await channel.close(POLICY_VIOLATION, reason)


# --- credentials ------------------------------------------------------------------------------------

_credentials_cache: dict[str, tuple[float, Any]] = {}


def _integration(tenant_id: str) -> Any:
    """The tenant's stream credentials (cached briefly: a call start must not wait on the database)."""
    cached = _credentials_cache.get(tenant_id)
    if cached is not None and time.monotonic() - cached[0] < CREDENTIALS_TTL_S:
        return cached[1]
    with session_scope() as session:
        found = store.integration_credentials(session, tenant_id)
    _credentials_cache[tenant_id] = (time.monotonic(), found)
    return found


def twilio_credentials(tenant_id: str) -> TwilioCredentials | None:
    """The tenant's Twilio auth token and account SID, or None when it has set none."""
    found = _integration(tenant_id)
    if found is None or not found.twilio_auth_token:
        return None
    return TwilioCredentials(auth_token=found.twilio_auth_token, account_sid=found.twilio_account_sid)


def audiohook_client_secret(tenant_id: str) -> bytes | None:
    """The tenant's AudioHook client secret (stored base64), or None when it has set none."""
    found = _integration(tenant_id)
    if found is None or not found.audiohook_client_secret:
        return None
    try:
        return base64.b64decode(found.audiohook_client_secret, validate=True)
    except binascii.Error:
        logger.error("tenant %s: its AudioHook client secret is not base64", tenant_id)
        return None


def signatures_required() -> bool:
    """Production refuses unsigned streams; embedded defaults accept them with a warning."""
    return get_settings().environment == "production"


# --- stream endpoints --------------------------------------------------------------------------------

@streams.websocket("/streams/twilio")
async def twilio_media_stream(websocket: WebSocket) -> None:
    """Twilio Media Streams: call audio in; the tenant proved by ``X-Twilio-Signature``."""
    await websocket.accept()
    settings = get_settings()
    required = signatures_required()
    signature = websocket.headers.get("x-twilio-signature")
    if not signature and not required:
        logger.warning("Twilio stream without X-Twilio-Signature accepted (environment %s; refused in production)",
                       settings.environment)
    session = TwilioSession(url=signed_stream_url(websocket.scope, settings.cs_public_stream_base),
                            signature=signature, credentials_for=twilio_credentials, require_signature=required,
                            default_tenant=None if required else "default")
    await _run_plain_stream(websocket, session)


async def _run_plain_stream(websocket: WebSocket, session: StreamSession) -> None:
    """:func:`run_stream` for an endpoint outside :func:`shared.websockets.serve_websocket` (Twilio shows
    no API key, so it is not wrapped): an unexpected error is logged and closes the socket with 1011
    and the request id, as ``serve_websocket`` does, instead of escaping to the ASGI server."""
    request_id = websocket_request_id(websocket)
    token = request_id_var.set(request_id)
    try:
        await run_stream(PlainChannel(websocket), session)
    except Exception:
        logger.exception("stream handler failed", extra={"path": websocket.url.path})
        await close_quietly(websocket, INTERNAL_ERROR, f"internal error; request id {request_id}")
    finally:
        request_id_var.reset(token)


@streams.websocket("/streams/audiohook")
@authorized_websocket("cs", max_message_bytes=MAX_STREAM_MESSAGE_BYTES)
async def audiohook_stream(connection: AuthorizedWebSocket) -> None:
    """Genesys AudioHook v2: call audio in, transcript events back."""
    websocket = connection.websocket
    tenant_id = connection.principal.tenant_id
    secret = await asyncio.to_thread(audiohook_client_secret, tenant_id)
    required = signatures_required()
    session = AudioHookSession(session_id=websocket.headers.get("audiohook-session-id"),
                               organization_id=websocket.headers.get("audiohook-organization-id"),
                               tenant_id=tenant_id)
    try:
        verify_upgrade(websocket.headers, request_target=request_target(websocket.scope),
                       client_secret_for=lambda _key: secret if secret is not None else (None if required else b""),
                       require_signature=required)
    except ProtocolError as refused:
        message = session.disconnect_message("unauthorized", refused.detail)
        if message is not None:
            await connection.send_text(message)
        raise
    if secret is None and not required:
        logger.warning("AudioHook stream of tenant %s accepted without a signature (no client secret set; "
                       "refused in production)", tenant_id)
    await run_stream(connection, session)


@streams.websocket("/streams/vonage")
@authorized_websocket("cs", max_message_bytes=MAX_STREAM_MESSAGE_BYTES)
async def vonage_stream(connection: AuthorizedWebSocket) -> None:
    """Vonage Voice WebSocket: a JSON metadata message, then L16 audio frames (8 or 16 kHz)."""
    call_id = connection.websocket.query_params.get("call_id")
    await run_stream(connection, VonageSession(tenant_id=connection.principal.tenant_id, call_id=call_id))


# --- feeds ----------------------------------------------------------------------------------------------

@streams.websocket("/calls/{call_id}/events")
@authorized_websocket("cs")
async def call_assist_events(connection: AuthorizedWebSocket) -> None:
    """The agent-assist feed of one call: transcript, emotion, escalations, suggested replies."""
    tenant_id = connection.principal.tenant_id
    call_id = connection.websocket.path_params["call_id"]
    status = await asyncio.to_thread(_call_status, tenant_id, call_id)
    feed = assist_services().feed
    after = _checked_after(feed, connection.websocket.query_params.get("after") or None)
    events = feed.subscribe(call_topic(tenant_id, call_id), replay=10_000, after=after)
    await _serve_feed(connection, events, until=lambda event: event.get("type") == "call.ended",
                      ended_already=status != "live")


@streams.websocket("/supervisor/events")
@authorized_websocket("cs")
async def supervisor_events(connection: AuthorizedWebSocket) -> None:
    """The supervisor's view of the tenant's live calls: a snapshot, then every change."""
    tenant_id = connection.principal.tenant_id
    services = assist_services()
    events = services.feed.subscribe(live_topic(tenant_id))
    # Subscribe before taking the snapshot (the local feed at once, Redis within its first round
    # trip), so a change is seldom missed, and the call's next change repairs one that was.
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)
    await connection.send_json({"type": "live.calls", "calls": await asyncio.to_thread(_live_calls, tenant_id)})
    await _serve_feed(connection, _prepended(first, events), until=lambda _event: False)


async def _prepended(first: asyncio.Future[dict[str, Any]],
                     rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield await first
    async for event in rest:
        yield event


async def _serve_feed(connection: AuthorizedWebSocket, events: AsyncIterator[dict[str, Any]], *,
                      until: Callable[[dict[str, Any]], bool], ended_already: bool = False) -> None:
    """Send ``events`` until ``until`` says the last one went, the client leaves or falls behind."""

    async def forward() -> None:
        async for event in events:
            await connection.send_text(orjson.dumps(event).decode())
            if until(event):
                return

    async def client_left() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await connection.receive()  # feeds take no messages; this notices the close

    sending = asyncio.ensure_future(_until_idle(forward(), idle_s=1.0) if ended_already else forward())
    watching = asyncio.ensure_future(client_left())
    try:
        done, _ = await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
        if sending in done:
            error = sending.exception()
            if isinstance(error, FeedLagged):
                await connection.close(TRY_AGAIN_LATER, "fell behind the feed; reconnect with ?after=<feed_id>")
            elif error is not None:
                raise error
            else:
                await connection.close(NORMAL_CLOSURE, "call ended")
    finally:
        for task in (sending, watching):
            task.cancel()
        with contextlib.suppress(BaseException):
            await events.aclose()  # type: ignore[attr-defined]


async def _until_idle(forwarding: Awaitable[None], idle_s: float) -> None:
    """A call that ended before the subscriber came: its kept events, then the end (the feed of an
    old call may have lost its ``call.ended`` to the history cap)."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(forwarding, timeout=idle_s)


def _checked_after(feed: EventFeed, after: str | None) -> str | None:
    """``?after=`` when it is a ``feed_id`` of ``feed`` (or absent); else :class:`BadRequest` (close 1007)
    naming the expected format."""
    if after is not None:
        try:
            feed.check_feed_id(after)
        except InvalidFeedId as invalid:
            raise BadRequest(f"{invalid}; resume with the feed_id of the last event received") from None
    return after


def _call_status(tenant_id: str, call_id: str) -> str:
    with session_scope() as session:
        call = store.find_call(session, tenant_id, call_id)
        if call is None:
            raise NotFound(f"no call {call_id!r}")
        return str(call.status)


def _live_calls(tenant_id: str) -> list[dict[str, Any]]:
    with session_scope() as session:
        return [LiveCall.model_validate(call).model_dump(mode="json")
                for call in store.list_live_calls(session, tenant_id)]
