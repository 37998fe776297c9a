"""WebSocket clients that behave like the call platforms, for the stream tests and the benchmark.

- :class:`TwilioClient`: a Twilio Media Stream (``connected`` → ``start`` → ``media`` × N → ``stop``
  → close), inbound-only or ``both_tracks``, ``sequenceNumber``/``chunk``/``timestamp`` as strings,
  ``X-Twilio-Signature`` computed over the stream URL with the tenant's auth token by the server's
  own :func:`~services.customer_service.protocols.twilio.compute_signature`.
- :class:`AudioHookClient`: a Genesys AudioHook v2 client (``X-API-KEY`` and the other upgrade
  headers, an optional RFC 9421 ``hmac-sha256`` signature, ``open`` with a media offer, binary
  PCMU frames with interleaved channels, ``ping`` every 5 s, ``close`` answered by ``closed``);
  it keeps what the server sends (``opened``, ``pong``, ``event``, ``disconnect``, ``closed``).
- :class:`AssistFeed`: a subscriber of ``/v1/calls/{call_id}/events`` keeping every event with the
  ``time.monotonic()`` of its arrival (the same clock as the server's on this machine).

:func:`play_twilio_call` and :func:`play_audiohook_call` stream a simulated call
(:mod:`services.customer_service.simulate`) with optional pacing: ``pacing=1.0`` sends each 20 ms
frame when its time comes (real time), ``2.0`` twice as fast, ``None`` as fast as the socket takes.

URLs are those of the cs app served alone (``/v1/...``); behind the gateway prefix them with ``/cs``.
:func:`serve_customer_service` runs that app under uvicorn on loopback for a tenant whose stream
credentials are set (:data:`TENANT`, :data:`AUTH_TOKEN`, :data:`CLIENT_SECRET`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.customer_service.protocols.audiohook import SIGNED_COMPONENTS, format_duration
from services.customer_service.protocols.http_signature import InnerList, Item, serialize_inner_list
from services.customer_service.protocols.twilio import compute_signature
from services.customer_service.simulate import (
    AUDIOHOOK_CHANNELS,
    FRAME_BYTES,
    FRAME_MS,
    MULAW_SILENCE,
    TWILIO_TRACKS,
    MediaFrame,
    SimulatedCall,
    iter_frames,
)
from shared.config import get_settings
from shared.db import session_factory
from shared.security import create_api_key
from tests.conftest import Stack
from tests.scaffold import migrate
from tests.support import ManagedProcess, free_port, python_argv, wait_until

TWILIO_PATH = "/v1/streams/twilio"
AUDIOHOOK_PATH = "/v1/streams/audiohook"
SAMPLE_RATE = 8000
NULL_UUID = "00000000-0000-0000-0000-000000000000"
ROLE_OF_TWILIO_TRACK = {track: role for role, track in TWILIO_TRACKS.items()}
ROLE_OF_AUDIOHOOK_CHANNEL = {channel: role for role, channel in AUDIOHOOK_CHANNELS.items()}


def call_events_path(call_id: str) -> str:
    """The agent-assist feed of one call."""
    return f"/v1/calls/{call_id}/events"


def ws_url(base_url: str, path: str) -> str:
    """``path`` on the server at ``base_url`` (``http://host:port``) as a ``ws://`` URL."""
    return base_url.replace("https://", "wss://").replace("http://", "ws://").rstrip("/") + path


@dataclass(frozen=True, slots=True)
class Received:
    """A message from the server and when it arrived (``time.monotonic()``)."""

    at: float
    data: Any


@dataclass(frozen=True, slots=True)
class Closed:
    """How the server closed the connection (``code`` 1006 when it vanished without a close frame)."""

    code: int | None
    reason: str


class Pacer:
    """Holds each frame back until its time: ``factor`` 1.0 is real time, 2.0 twice as fast,
    ``None`` (or 0) sends at once."""

    def __init__(self, factor: float | None) -> None:
        self.factor = factor or None
        self.started = time.monotonic()

    async def wait(self, media_s: float) -> None:
        """Sleep until the frame at ``media_s`` into the stream is due."""
        if self.factor is None:
            await asyncio.sleep(0)  # let the receive loops run
            return
        delay = self.started + media_s / self.factor - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def silence_frames(after: MediaFrame | None, roles: Sequence[str], seconds: float) -> list[MediaFrame]:
    """``seconds`` of μ-law silence frames following ``after`` (so the VAD can end the last turn)."""
    first = 0 if after is None else after.index + 1
    start_ms = 0 if after is None else after.timestamp_ms + FRAME_MS
    count = round(seconds * 1000 / FRAME_MS)
    silence = bytes([MULAW_SILENCE]) * FRAME_BYTES
    return [MediaFrame(first + i, start_ms + i * FRAME_MS, {role: silence for role in roles})
            for i in range(count)]


def call_frames(call: SimulatedCall, roles: Sequence[str], *, tail_silence_s: float = 0.0,
                until_s: float | None = None) -> list[MediaFrame]:
    """The call's 20 ms frames of ``roles``, cut at ``until_s`` when given, with ``tail_silence_s`` of
    silence appended."""
    frames = [frame for frame in iter_frames(call, roles) if until_s is None or frame.timestamp_ms < until_s * 1000]
    return frames + silence_frames(frames[-1] if frames else None, roles, tail_silence_s)


async def _close_of(connection: ClientConnection, timeout_s: float) -> Closed:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(connection.wait_closed(), timeout_s)
    return Closed(connection.close_code, connection.close_reason or "")


# --- Twilio Media Streams --------------------------------------------------------------------------

class TwilioClient:
    """One Twilio Media Stream as Twilio sends it (see the module docstring).

    ``url``: the ``ws://`` URL to connect to; ``signed_url``: the URL as written in the TwiML, which
    Twilio signs (default: ``url`` with ``wss``, what the server rebuilds from its Host header);
    ``auth_token``: sign with it (``None``: no ``X-Twilio-Signature``); ``tenant``: sent as the
    ``tenant`` custom parameter; ``tracks``: ``("inbound",)`` or ``("inbound", "outbound")``.
    """

    def __init__(self, url: str, *, call_sid: str, tenant: str | None = None, auth_token: str | None = None,
                 signed_url: str | None = None, signature: str | None = None, tracks: Sequence[str] = ("inbound",),
                 account_sid: str = "AC" + "0" * 32, stream_sid: str | None = None,
                 custom_parameters: dict[str, str] | None = None,
                 media_format: dict[str, Any] | None = None) -> None:
        self.url = url
        self.signed_url = signed_url or url.replace("ws://", "wss://", 1)
        self.signature = signature if signature is not None else (
            compute_signature(auth_token, self.signed_url) if auth_token else None)
        self.call_sid = call_sid
        self.account_sid = account_sid
        self.stream_sid = stream_sid or "MZ" + uuid.uuid4().hex
        self.tracks = tuple(tracks)
        self.custom_parameters = {**({"tenant": tenant} if tenant else {}), **(custom_parameters or {})}
        self.media_format = media_format or {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1}
        self.sequence = 0
        self.chunks: dict[str, int] = {}
        self.connection: ClientConnection | None = None
        self.connected_at: float | None = None
        self.media_started_at: float | None = None
        self.frames_sent = 0

    async def connect(self) -> TwilioClient:
        """Open the WebSocket with Twilio's upgrade header."""
        headers = {"X-Twilio-Signature": self.signature} if self.signature else {}
        self.connection = await connect(self.url, additional_headers=headers, proxy=None, open_timeout=10,
                                        max_queue=None)
        self.connected_at = time.monotonic()
        return self

    async def __aenter__(self) -> TwilioClient:
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def socket(self) -> ClientConnection:
        """The open connection."""
        if self.connection is None:
            raise RuntimeError("not connected: call connect() first")
        return self.connection

    async def send_json(self, message: dict[str, Any]) -> None:
        """Send one JSON text frame as it is."""
        await self.socket.send(orjson.dumps(message).decode())

    def _next_sequence(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    async def send_connected(self) -> None:
        """The first message of every stream (no ``sequenceNumber``)."""
        await self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    async def send_start(self) -> None:
        """``start``: the call, its tracks, custom parameters and media format."""
        await self.send_json({"event": "start", "sequenceNumber": self._next_sequence(), "streamSid": self.stream_sid,
                              "start": {"accountSid": self.account_sid, "streamSid": self.stream_sid,
                                        "callSid": self.call_sid, "tracks": list(self.tracks),
                                        "customParameters": self.custom_parameters,
                                        "mediaFormat": self.media_format}})

    def media_message(self, track: str, payload: bytes, timestamp_ms: int) -> dict[str, Any]:
        """The next ``media`` message of ``track`` (sequence and chunk numbers advance)."""
        chunk = self.chunks.get(track, 0) + 1
        self.chunks[track] = chunk
        return {"event": "media", "sequenceNumber": self._next_sequence(), "streamSid": self.stream_sid,
                "media": {"track": track, "chunk": str(chunk), "timestamp": str(timestamp_ms),
                          "payload": base64.b64encode(payload).decode("ascii")}}

    async def send_media(self, track: str, payload: bytes, timestamp_ms: int) -> None:
        """One ``media`` message (Twilio sends one per track per 20 ms)."""
        await self.send_json(self.media_message(track, payload, timestamp_ms))

    async def send_frames(self, frames: Iterable[MediaFrame], pacing: float | None = None) -> None:
        """Each frame as one ``media`` message per track, paced (see :class:`Pacer`); the first
        frame's send time is :attr:`media_started_at` (stream time 0 when frames start at 0)."""
        pacer = Pacer(pacing)
        self.media_started_at = self.media_started_at or pacer.started
        for frame in frames:
            await pacer.wait(frame.timestamp_ms / 1000)
            for track in self.tracks:
                await self.send_media(track, frame.payloads[ROLE_OF_TWILIO_TRACK[track]], frame.timestamp_ms)
            self.frames_sent += 1

    async def send_stop(self) -> None:
        """``stop``: the stream ends."""
        await self.send_json({"event": "stop", "sequenceNumber": self._next_sequence(), "streamSid": self.stream_sid,
                              "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})

    async def server_close(self, timeout_s: float = 30.0) -> Closed:
        """Wait for the server to close the connection; its code and reason."""
        return await _close_of(self.socket, timeout_s)

    async def close(self) -> None:
        """Close the socket (normal closure) if still open."""
        if self.connection is not None:
            await self.connection.close()

    def vanish(self) -> None:
        """Drop the TCP connection without a close frame, as a network failure does."""
        self.socket.transport.abort()


async def play_twilio_call(url: str, call: SimulatedCall, *, tenant: str | None, auth_token: str | None,
                           both_tracks: bool = False, pacing: float | None = None, tail_silence_s: float = 1.0,
                           until_s: float | None = None, signed_url: str | None = None) -> Closed:
    """Stream ``call`` over Twilio Media Streams from ``connected`` to ``stop`` and wait for the server
    to close. With ``until_s`` the client vanishes after that much audio instead (no ``stop``)."""
    tracks = ("inbound", "outbound") if both_tracks else ("inbound",)
    roles = [ROLE_OF_TWILIO_TRACK[track] for track in tracks]
    client = TwilioClient(url, call_sid=call.call_id, tenant=tenant, auth_token=auth_token, tracks=tracks,
                          signed_url=signed_url)
    await client.connect()
    try:
        await client.send_connected()
        await client.send_start()
        await client.send_frames(call_frames(call, roles, tail_silence_s=0 if until_s else tail_silence_s,
                                             until_s=until_s), pacing)
        if until_s is not None:
            client.vanish()
            return Closed(None, "vanished")
        await client.send_stop()
        return await client.server_close(timeout_s=60)
    finally:
        await client.close()


# --- Genesys AudioHook v2 ------------------------------------------------------------------------------

def audiohook_signature_headers(url: str, headers: dict[str, str], *, api_key: str, client_secret: bytes,
                                created: int | None = None, lifetime_s: int = 30, nonce: str | None = None,
                                label: str = "sig1") -> dict[str, str]:
    """``Signature-Input`` and ``Signature`` (RFC 9421, ``hmac-sha256``) over the components AudioHook
    signs, for an upgrade to ``url`` carrying ``headers`` (lower-case names), as Genesys signs it."""
    created = int(time.time()) if created is None else created
    nonce = nonce or base64.urlsafe_b64encode(secrets.token_bytes(24)).decode().rstrip("=")
    parts = urlsplit(url)
    values = {"@request-target": parts.path + (f"?{parts.query}" if parts.query else ""),
              "@authority": parts.netloc.lower(), **headers}
    inner = InnerList([Item(name, []) for name in SIGNED_COMPONENTS],
                      [("keyid", api_key), ("nonce", nonce), ("alg", "hmac-sha256"), ("created", created),
                       ("expires", created + lifetime_s)])
    base = "\n".join([*(f'"{name}": {values[name]}' for name in SIGNED_COMPONENTS),
                      f'"@signature-params": {serialize_inner_list(inner)}'])
    digest = hmac.new(client_secret, base.encode("utf-8"), hashlib.sha256).digest()
    return {"signature-input": f"{label}={serialize_inner_list(inner)}",
            "signature": f"{label}=:{base64.b64encode(digest).decode('ascii')}:"}


def media_offer(channels: Sequence[str]) -> list[dict[str, Any]]:
    """The media entries an ``open`` offers: ``channels`` first, then the external channel alone."""
    offer = [{"type": "audio", "format": "PCMU", "channels": list(channels), "rate": SAMPLE_RATE}]
    if list(channels) != ["external"]:
        offer.append({"type": "audio", "format": "PCMU", "channels": ["external"], "rate": SAMPLE_RATE})
    return offer


class AudioHookError(AssertionError):
    """The server did not answer as AudioHook requires (no ``opened``, no ``pong``, no ``closed``)."""


class AudioHookClient:
    """One AudioHook session as Genesys runs it (see the module docstring).

    ``client_secret``: sign the upgrade with it (``None``: unsigned); ``channels``: the channels
    offered first (``("external",)`` or ``("external", "internal")``); ``ping_interval_s``: a
    ``ping`` this often once opened (``None``: never), failing as the reference client does when the
    previous one has no ``pong`` yet.
    """

    def __init__(self, url: str, *, api_key: str, conversation_id: str, client_secret: bytes | None = None,
                 organization_id: str | None = None, session_id: str | None = None,
                 channels: Sequence[str] = ("external",), ping_interval_s: float | None = 5.0,
                 offer: list[dict[str, Any]] | None = None, language: str = "en-US") -> None:
        self.url = url
        self.api_key = api_key
        self.client_secret = client_secret
        self.conversation_id = conversation_id
        self.organization_id = organization_id or str(uuid.uuid4())
        self.session_id = session_id or str(uuid.uuid4())
        self.correlation_id = str(uuid.uuid4())
        self.offer = offer or media_offer(channels)
        self.language = language
        self.ping_interval_s = ping_interval_s
        self.seq = 0
        self.serverseq = 0
        self.samples_sent = 0
        self.media_started_at: float | None = None
        self.received: list[Received] = []
        self.media: dict[str, Any] | None = None
        self.connection: ClientConnection | None = None
        self.pings_sent = 0
        self.missed_pongs = 0
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None

    # -- connection ---------------------------------------------------------------------------------

    def upgrade_headers(self) -> dict[str, str]:
        """The upgrade headers Genesys sends (signed when a client secret is set)."""
        headers = {"audiohook-organization-id": self.organization_id, "audiohook-session-id": self.session_id,
                   "audiohook-correlation-id": self.correlation_id, "x-api-key": self.api_key}
        if self.client_secret is not None:
            headers.update(audiohook_signature_headers(self.url, headers, api_key=self.api_key,
                                                       client_secret=self.client_secret))
        return headers

    async def connect(self) -> AudioHookClient:
        """Open the WebSocket and start keeping what the server sends."""
        self.connection = await connect(self.url, additional_headers=self.upgrade_headers(), proxy=None,
                                        open_timeout=10, max_queue=None)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aenter__(self) -> AudioHookClient:
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.shutdown()

    @property
    def socket(self) -> ClientConnection:
        """The open connection."""
        if self.connection is None:
            raise RuntimeError("not connected: call connect() first")
        return self.connection

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.socket:
                data = orjson.loads(message) if isinstance(message, str) else message
                if isinstance(data, dict) and isinstance(data.get("seq"), int):
                    self.serverseq = data["seq"]
                self.received.append(Received(time.monotonic(), data))
                self._arrived.set()

    async def expect(self, kind: str, timeout_s: float = 5.0, after: int = 0) -> dict[str, Any]:
        """The first server message of type ``kind`` among those from index ``after`` on, waiting for
        it up to ``timeout_s``; :class:`AudioHookError` when it does not come."""
        deadline = time.monotonic() + timeout_s
        while True:
            for item in self.received[after:]:
                if isinstance(item.data, dict) and item.data.get("type") == kind:
                    return dict(item.data)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._reader is not None and self._reader.done()):
                seen = [item.data.get("type") for item in self.received if isinstance(item.data, dict)]
                raise AudioHookError(f"no {kind!r} from the server within {timeout_s:g} s (got {seen})")
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.5))

    def messages(self, kind: str) -> list[Received]:
        """The server messages of type ``kind`` received so far."""
        return [item for item in self.received if isinstance(item.data, dict) and item.data.get("type") == kind]

    # -- messages -----------------------------------------------------------------------------------

    @property
    def position_s(self) -> float:
        """Audio sent so far, in seconds."""
        return self.samples_sent / SAMPLE_RATE

    def message(self, kind: str, parameters: dict[str, Any], **overrides: Any) -> dict[str, Any]:
        """The next client message of ``kind`` (``seq`` advances; ``overrides`` replace fields)."""
        self.seq += 1
        return {"version": "2", "id": self.session_id, "type": kind, "seq": self.seq, "serverseq": self.serverseq,
                "position": format_duration(self.position_s), "parameters": parameters, **overrides}

    async def send(self, kind: str, parameters: dict[str, Any], **overrides: Any) -> None:
        """Send one client message."""
        await self.socket.send(orjson.dumps(self.message(kind, parameters, **overrides)).decode())

    def open_parameters(self) -> dict[str, Any]:
        """``open``'s parameters: organisation, conversation, participant, the media offer."""
        return {"organizationId": self.organization_id, "conversationId": self.conversation_id,
                "participant": {"id": str(uuid.uuid4()), "ani": "+1-555-555-1234", "aniName": "Simulated Caller",
                                "dnis": "+1-800-555-6789"},
                "media": self.offer, "language": self.language}

    async def open(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """``open`` → ``opened`` (the reference client's 5 s open timeout); starts the pings."""
        mark = len(self.received)
        await self.send("open", self.open_parameters())
        opened = await self.expect("opened", timeout_s, after=mark)
        media = opened["parameters"].get("media") or []
        self.media = media[0] if media else None
        if self.ping_interval_s:
            self._pinger = asyncio.create_task(self._ping_every(self.ping_interval_s))
        return opened

    @property
    def channels(self) -> list[str]:
        """The negotiated channels, in their interleaving order."""
        return list(self.media["channels"]) if self.media else []

    async def send_audio(self, frame: bytes) -> None:
        """One binary frame of interleaved PCMU (one byte a sample and channel)."""
        await self.socket.send(frame)
        self.samples_sent += len(frame) // max(len(self.channels), 1)

    async def send_frames(self, frames: Iterable[MediaFrame], pacing: float | None = None) -> None:
        """Each frame, its negotiated channels interleaved, paced (see :class:`Pacer`); the first
        frame's send time is :attr:`media_started_at`."""
        roles = [ROLE_OF_AUDIOHOOK_CHANNEL[channel] for channel in self.channels]
        pacer = Pacer(pacing)
        self.media_started_at = self.media_started_at or pacer.started
        for frame in frames:
            await pacer.wait(frame.timestamp_ms / 1000)
            await self.send_audio(frame.interleaved(roles))

    async def ping(self) -> None:
        """A protocol ``ping`` (not a WebSocket ping)."""
        self.pings_sent += 1
        await self.send("ping", {})

    async def _ping_every(self, interval_s: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval_s)
                if len(self.messages("pong")) < self.pings_sent:
                    self.missed_pongs += 1  # the reference client fails the session with 408 here
                await self.ping()

    async def close(self, reason: str = "end", timeout_s: float = 10.0) -> dict[str, Any]:
        """``close`` → ``closed`` (the reference's 10 s close timeout), then close the socket."""
        self._stop_pinging()
        mark = len(self.received)
        await self.send("close", {"reason": reason})
        closed = await self.expect("closed", timeout_s, after=mark)
        await self.socket.close()
        return closed

    async def server_close(self, timeout_s: float = 30.0) -> Closed:
        """Wait for the server to close the connection; its code and reason."""
        return await _close_of(self.socket, timeout_s)

    def _stop_pinging(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()

    async def shutdown(self) -> None:
        """Stop pinging and reading, close the socket if open."""
        self._stop_pinging()
        if self.connection is not None:
            await self.connection.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)

    def transcripts(self) -> list[tuple[float, dict[str, Any]]]:
        """Each transcript entity of the ``event`` messages received, with its arrival time."""
        found = []
        for item in self.messages("event"):
            for entity in item.data["parameters"].get("entities", []):
                if entity.get("type") == "transcript":
                    found.append((item.at, entity["data"]))
        return found


async def play_audiohook_call(url: str, call: SimulatedCall, *, api_key: str, client_secret: bytes | None,
                              both_channels: bool = False, pacing: float | None = None,
                              tail_silence_s: float = 1.0, linger_s: float = 0.0) -> AudioHookClient:
    """Stream ``call`` over AudioHook: open, audio, ``close`` answered by ``closed``; ``linger_s``
    waits that long before ``close`` (transcript ``event`` messages come back only until then)."""
    channels = ("external", "internal") if both_channels else ("external",)
    client = AudioHookClient(url, api_key=api_key, client_secret=client_secret,
                             conversation_id=conversation_uuid(call.call_id), channels=channels)
    await client.connect()
    try:
        await client.open()
        roles = [ROLE_OF_AUDIOHOOK_CHANNEL[channel] for channel in client.channels]
        await client.send_frames(call_frames(call, roles, tail_silence_s=tail_silence_s), pacing)
        if linger_s:
            await asyncio.sleep(linger_s)
        await client.close(timeout_s=60)
    finally:
        await client.shutdown()
    return client


def conversation_uuid(call_id: str) -> str:
    """A stable UUID (version 4 shape, as AudioHook's validator wants) for a simulated call's id."""
    digest = bytearray(hashlib.sha256(call_id.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(digest)))


# --- the agent-assist feed ----------------------------------------------------------------------------

@dataclass
class AssistFeed:
    """A subscriber of one call's assist events (``X-API-Key``), keeping each with its arrival time.

    :meth:`run` connects (retrying while the call does not exist yet: the feed closes ``1008`` for
    an unknown call) and reads until the server closes the feed after ``call.ended``.
    """

    base_url: str
    call_id: str
    api_key: str
    events: list[Received] = field(default_factory=list)
    closed: Closed | None = None
    subscribed_at: float | None = None

    async def run(self, connect_within_s: float = 30.0) -> AssistFeed:
        """Subscribe and collect until the feed ends."""
        url = ws_url(self.base_url, call_events_path(self.call_id))
        deadline = time.monotonic() + connect_within_s
        while True:
            connection = await connect(url, additional_headers={"X-API-Key": self.api_key}, proxy=None,
                                       open_timeout=10, max_queue=None)
            self.subscribed_at = time.monotonic()
            with contextlib.suppress(ConnectionClosed):
                async for message in connection:
                    self.events.append(Received(time.monotonic(), orjson.loads(message)))
            self.closed = Closed(connection.close_code, connection.close_reason or "")
            unknown = self.closed.code == 1008 and not self.events
            if not unknown or time.monotonic() > deadline:
                return self
            await asyncio.sleep(0.05)

    def of_type(self, kind: str, **matching: Any) -> list[dict[str, Any]]:
        """The events of ``kind`` whose fields equal ``matching``."""
        return [item.data for item in self.events
                if item.data.get("type") == kind and all(item.data.get(k) == v for k, v in matching.items())]

    def timed(self, kind: str, **matching: Any) -> list[Received]:
        """Like :meth:`of_type`, with arrival times."""
        return [item for item in self.events
                if item.data.get("type") == kind and all(item.data.get(k) == v for k, v in matching.items())]


# --- the server the clients talk to --------------------------------------------------------------------

CS_APP = "services.customer_service.api:app"
TENANT = "acme-cs"
TWILIO_ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "twilio-auth-token-of-acme"
CLIENT_SECRET = b"audiohook client secret of acme"


@dataclass
class CsServer:
    """The cs app under uvicorn on loopback, its database and :data:`TENANT`'s API key."""

    base_url: str
    database_url: str
    api_key: str
    process: ManagedProcess

    def ws(self, path: str) -> str:
        """``path`` on this server as a ``ws://`` URL."""
        return ws_url(self.base_url, path)

    @property
    def twilio_url(self) -> str:
        """The Twilio stream URL naming :data:`TENANT`."""
        return self.ws(f"{TWILIO_PATH}?tenant={TENANT}")

    def call_record(self, call_id: str) -> dict[str, Any]:
        """The call's ``status``, ``end_reason`` and transcript ``lines`` (speaker, text):
        ``GET /v1/calls/{id}`` where it answers, else read from the database (``status`` ``None``:
        no such call)."""
        response = httpx.get(f"{self.base_url}/v1/calls/{call_id}", headers={"X-API-Key": self.api_key}, timeout=10)
        if response.status_code == 200:
            summary = response.json()
            return {"status": summary["status"], "end_reason": summary["end_reason"],
                    "lines": [(line["speaker"], line["text"] or "") for line in summary["transcript"]]}
        if response.status_code not in (404, 501):
            raise AssertionError(f"GET /v1/calls/{call_id}: {response.status_code} {response.text[:500]}")
        from services.customer_service import store

        with session_factory(self.database_url)() as session:
            call = store.find_call(session, TENANT, call_id)
            if call is None:
                return {"status": None, "end_reason": None, "lines": []}
            lines = [(row.speaker, row.transcript or "") for row in store.call_utterances(session, call)]
            return {"status": call.status, "end_reason": call.end_reason, "lines": lines}


def configure_tenant(env: dict[str, str], database_url: str) -> str:
    """An API key of :data:`TENANT` (``cs`` scope) and its stream credentials (Twilio auth token,
    AudioHook client secret). Keys are hashed with the server's secret key, so the settings are
    read from ``env`` meanwhile."""
    from services.customer_service import store
    from services.customer_service.assist_schemas import IntegrationsIn

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        with session_factory(database_url)() as session:
            key = create_api_key(session, tenant_id=TENANT, name="streams", scopes=["cs"])
            store.set_integrations(session, TENANT, IntegrationsIn.model_validate({
                "twilio": {"account_sid": TWILIO_ACCOUNT_SID, "auth_token": AUTH_TOKEN},
                "audiohook": {"client_secret": base64.b64encode(CLIENT_SECRET).decode()}}))
            session.commit()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
    return key


def emotion_models_env(workdir: Path) -> tuple[dict[str, str], str]:
    """The environment that gives the server an emotion model, and where it came from: none needed
    when a model is shipped (``<models_dir>/cs/emotion``), else an untrained one sealed under
    ``workdir`` (its emotions mean nothing; streams, latency and the protocols work the same)."""
    from model_runtime import save_artifact
    from services.customer_service.model import (
        ARTIFACT_NAME,
        MODELS_SUBDIR,
        EmotionModel,
        default_emotion_dir,
        save_emotion_model,
    )

    with contextlib.suppress(FileNotFoundError):
        return {}, f"shipped ({default_emotion_dir()})"
    directory = workdir / MODELS_SUBDIR / ARTIFACT_NAME / "untrained"
    save_emotion_model(EmotionModel.create(), directory)
    save_artifact(directory, name=ARTIFACT_NAME, version="untrained", framework="torch",
                  model_card="Untrained: random weights, for tests and timing only.")
    return {"TESSERA_MODELS_DIR": str(workdir)}, "untrained (no shipped model: its emotions mean nothing)"


def wait_ready(base_url: str, process: ManagedProcess, timeout_s: float) -> None:
    """Block until ``/readyz`` answers 200: the models load after uvicorn starts, and streams are
    refused with 1013 until then."""

    def ready() -> bool:
        if process.process.poll() is not None:
            raise AssertionError(f"{process.name} exited ({process.process.returncode}):\n{process.output[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200
        return False

    wait_until(ready, timeout_s, f"{base_url}/readyz (the cs models loading)\n{process.output[-3000:]}", 0.25)


@contextlib.contextmanager
def serve_customer_service(stack: Stack, *, environment: str = "production", app: str = CS_APP,
                           env: dict[str, str] | None = None, startup_timeout_s: float = 180.0) -> Iterator[CsServer]:
    """Migrate ``stack``, configure :data:`TENANT` and serve ``app`` under uvicorn on a free loopback
    port (``environment`` ``production`` refuses unsigned streams) until the block ends."""
    stack.extra_env.update({"TESSERA_ENVIRONMENT": environment, "TESSERA_SECRET_KEY": uuid.uuid4().hex,
                            "TESSERA_LOG_LEVEL": "WARNING", "TESSERA_CS_STREAM_MODELS": "true", **(env or {})})
    migrate(stack.database_url)
    api_key = configure_tenant(stack.env, stack.database_url)
    port = free_port()
    process = ManagedProcess(python_argv("-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)),
                             stack.env, "cs-api")
    base_url = f"http://127.0.0.1:{port}"
    try:
        process.wait_for_output(r"Uvicorn running on", timeout_s=startup_timeout_s)
        wait_ready(base_url, process, startup_timeout_s)
        yield CsServer(base_url, stack.database_url, api_key, process)
    finally:
        process.stop()
        if "Traceback" in process.output:
            print(f"--- cs server log with errors ---\n{process.output[-6000:]}")
