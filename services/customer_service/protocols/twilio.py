"""Twilio Media Streams, server side: the message schema, one stream's state machine and the
``X-Twilio-Signature`` check.

Setup. TwiML ``<Start><Stream url="wss://…/cs/v1/streams/twilio">`` forks a call one way
(``track="inbound_track|outbound_track|both_tracks"``); ``<Connect><Stream>`` is bidirectional.
``<Parameter name="tenant" value="acme"/>`` children arrive as ``start.customParameters``. Twilio's
error 31920 page says ``<Stream url>`` does not support query strings, so ``?tenant=ID`` in the URL
(which the issue names) may not reach us: the ``<Parameter>`` is the dependable way. Both are read;
named twice, they must agree.

Twilio → server, JSON text frames; ``sequenceNumber``, ``chunk`` and ``timestamp`` are strings of
digits (``connected`` has no ``sequenceNumber``)::

    {"event":"connected","protocol":"Call","version":"1.0.0"}
    {"event":"start","sequenceNumber":"1","streamSid":"MZ…","start":{"accountSid":"AC…","streamSid":"MZ…",
     "callSid":"CA…","tracks":["inbound","outbound"],"customParameters":{"tenant":"acme"},
     "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}
    {"event":"media","sequenceNumber":"3","streamSid":"MZ…","media":{"track":"inbound","chunk":"1",
     "timestamp":"5","payload":"<base64 μ-law, no header>"}}
    {"event":"dtmf","sequenceNumber":"4","streamSid":"MZ…","dtmf":{"track":"inbound_track","digit":"1"}}
    {"event":"mark","sequenceNumber":"5","streamSid":"MZ…","mark":{"name":"reply-1"}}
    {"event":"stop","sequenceNumber":"6","streamSid":"MZ…","stop":{"accountSid":"AC…","callSid":"CA…"}}

What this session enforces (each failure a :class:`~.base.ProtocolError` naming the field or the
numbers; close codes in :mod:`.base`):

- ``connected`` first (optional), at most once; ``start`` exactly once and before any ``media``,
  ``dtmf``, ``mark`` or ``stop``; nothing after ``stop`` (1008).
- ``sequenceNumber`` counts 1, 2, 3…: a repeat is a duplicate, a lower one out of order, a higher one
  a gap naming the missing numbers (1008). With ``allow_gaps`` a gap is an :class:`~.base.AudioGap`
  event instead and the stream goes on; duplicates and reordering are always refused.
- ``streamSid`` and ``callSid`` are 1-128 characters without control characters (1007; Twilio's CA/MZ + 32 hex
  format is not required).
- ``streamSid`` of every message is the one ``start`` announced; ``media.track`` one of
  ``start.tracks``; ``chunk`` increases per track (1008).
- ``start.mediaFormat`` is ``audio/x-mulaw`` at 8000 Hz, one channel (else 1003); ``payload`` is
  strict, non-empty base64 (else 1007). Frames are normally 20 ms, 160 bytes, but any length is read.

Tracks: ``inbound`` is the audio of the call leg that runs the TwiML (the customer, events' track
``customer``); ``outbound`` is what Twilio plays to it (the agent or bot, ``agent``). ``dtmf.track``
says ``inbound_track``. A chunk's position is its ``timestamp`` (ms since the stream began) × 8.

Server → Twilio, bidirectional streams only: :func:`media_message` (μ-law 8 kHz, base64),
:func:`mark_message` (echoed back as a ``mark`` once the audio before it has played) and
:func:`clear_message` (flush buffered audio, for barge-in). Twilio expects no answer to its messages.

Signature. Twilio sends ``X-Twilio-Signature`` on the WebSocket upgrade: base64 of HMAC-SHA1, keyed
by the account's auth token, over the full URL as configured in TwiML (scheme ``wss``, path and
query); a WebSocket upgrade has no POST parameters, so nothing is appended. :func:`is_valid_signature`
does what twilio-python's ``RequestValidator.validate`` (and twilio-node's ``validateRequest``) do:
the URL is tried without its port and with one, a default port added when the URL has none (443 for
``https``, else 80: the libraries know no other scheme, so a ``wss`` URL gets ``:80``), because
"signature generation on the back end is inconsistent"; either matching is enough; comparison is in
constant time. The endpoint must rebuild the public URL Twilio called (``wss://`` and the public host,
not what a proxy forwards). The signature covers the URL only, so a ``<Parameter>`` tenant is proved
by checking the signature with that tenant's token (and, when configured, ``start.accountSid``);
the check therefore runs at ``start``, where the tenant is known. Twilio's scheme has no timestamp or
nonce: a captured signature replays for the same URL, which only TLS prevents.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
from pydantic import Field, StringConstraints

from services.customer_service.audio import mulaw_decode
from services.customer_service.protocols.base import (
    AudioChunk,
    AudioGap,
    CallEnded,
    CallStarted,
    Dtmf,
    MalformedMessage,
    MarkPlayed,
    Participant,
    ProtocolError,
    SignatureRejected,
    StreamSession,
    StreamStep,
    TenantRefused,
    Track,
    TrackFormat,
    UnexpectedMessage,
    UnsupportedFormat,
    WireMessage,
    checked_id,
    json_object,
    request_target,
    text_frame,
    validated,
)
from shared.security import TENANT_ID_PATTERN

SIGNATURE_HEADER = "X-Twilio-Signature"
TENANT_PARAMETER = "tenant"
MULAW_ENCODING = "audio/x-mulaw"
SAMPLE_RATE = 8000
SAMPLES_PER_MS = SAMPLE_RATE // 1000
TRACKS: dict[str, Track] = {"inbound": "customer", "outbound": "agent"}
DTMF_TRACKS: dict[str, Track] = {"inbound_track": "customer", "outbound_track": "agent"}
EVENTS = ("connected", "start", "media", "dtmf", "mark", "stop")

Digits = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,15}$")]
"""Twilio's counters: strings of digits (an integer JSON number is refused, as Twilio never sends one)."""



class ConnectedMessage(WireMessage):
    event: Literal["connected"]
    protocol: str
    version: str


class MediaFormat(WireMessage):
    encoding: str
    sampleRate: int
    channels: int


class StartBody(WireMessage):
    accountSid: str = Field(min_length=1)
    streamSid: str = Field(min_length=1)
    callSid: str = Field(min_length=1)
    tracks: list[str] = Field(min_length=1, max_length=2)
    customParameters: dict[str, str] = Field(default_factory=dict)
    mediaFormat: MediaFormat


class StartMessage(WireMessage):
    event: Literal["start"]
    sequenceNumber: Digits
    streamSid: str = Field(min_length=1)
    start: StartBody


class MediaBody(WireMessage):
    track: str
    chunk: Digits
    timestamp: Digits
    payload: str


class MediaMessage(WireMessage):
    event: Literal["media"]
    sequenceNumber: Digits
    streamSid: str
    media: MediaBody


class DtmfBody(WireMessage):
    track: str
    digit: Annotated[str, StringConstraints(pattern=r"^[0-9*#A-D]$")]


class DtmfMessage(WireMessage):
    event: Literal["dtmf"]
    sequenceNumber: Digits
    streamSid: str
    dtmf: DtmfBody


class MarkBody(WireMessage):
    name: str


class MarkMessage(WireMessage):
    event: Literal["mark"]
    sequenceNumber: Digits
    streamSid: str
    mark: MarkBody


class StopBody(WireMessage):
    accountSid: str | None = None
    callSid: str | None = None


class StopMessage(WireMessage):
    event: Literal["stop"]
    sequenceNumber: Digits
    streamSid: str
    stop: StopBody = Field(default_factory=StopBody)


# --- signatures ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TwilioCredentials:
    """A tenant's Twilio account: the auth token that signs its streams and, when known, its SID
    (then ``start.accountSid`` must be it)."""

    auth_token: str
    account_sid: str | None = None


def compute_signature(auth_token: str, url: str, params: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """Twilio's signature of ``url``: base64 HMAC-SHA1 keyed by ``auth_token`` over the URL followed by
    each POST parameter's name and value, names sorted, a name's distinct values sorted (HTTP
    webhooks; a WebSocket upgrade has none)."""
    message = url
    for name in sorted(params or {}):
        values = params[name] if params else ()
        for value in sorted({values} if isinstance(values, str) else set(values)):
            message += name + value
    digest = hmac.new(auth_token.encode("utf-8"), message.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def url_without_port(url: str) -> str:
    """``url`` with any explicit port removed (twilio-python's ``remove_port``)."""
    parts = urlsplit(url)
    if not parts.port:
        return url
    host = parts.netloc.rpartition(":")[0]
    return urlunsplit(parts._replace(netloc=host))


def url_with_port(url: str) -> str:
    """``url`` with a port: its own, else 443 for ``https`` and 80 for any other scheme
    (twilio-python's ``add_port``; ``wss`` gets 80, as the library does)."""
    parts = urlsplit(url)
    if parts.port:
        return url
    port = 443 if parts.scheme == "https" else 80
    return urlunsplit(parts._replace(netloc=f"{parts.netloc}:{port}"))


def is_valid_signature(auth_token: str, url: str, signature: str,
                       params: Mapping[str, str | Sequence[str]] | None = None) -> bool:
    """Whether ``signature`` (``X-Twilio-Signature``) signs ``url`` under ``auth_token``, tried without
    and with the port as Twilio's libraries do; compared in constant time."""
    presented = signature.encode("utf-8")
    matches = [hmac.compare_digest(compute_signature(auth_token, candidate, params).encode("ascii"), presented)
               for candidate in (url_without_port(url), url_with_port(url))]
    return any(matches)


def signed_stream_url(scope: Mapping[str, Any], public_base: str | None = None) -> str:
    """The URL Twilio signed for this ASGI WebSocket connection: ``public_base`` (e.g.
    ``wss://cs.example.com``, the public origin as written in the TwiML) or else ``wss://`` and the
    ``Host`` header, followed by the path and query as sent (:func:`~.base.request_target`)."""
    if public_base is None:
        host = next((value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"host"), "")
        public_base = f"wss://{host}"
    return public_base.rstrip("/") + request_target(scope)


def stream_tenant(url: str) -> str | None:
    """The tenant named in the stream URL's query (``?tenant=ID``), if any."""
    values = parse_qs(urlsplit(url).query).get(TENANT_PARAMETER)
    return values[0] if values else None


# --- messages to Twilio (bidirectional streams) ---------------------------------------------------------

def media_message(stream_sid: str, mulaw: bytes) -> str:
    """Audio to play on the call: μ-law 8 kHz bytes, no header."""
    return orjson.dumps({"event": "media", "streamSid": stream_sid,
                         "media": {"payload": base64.b64encode(mulaw).decode("ascii")}}).decode()


def mark_message(stream_sid: str, name: str) -> str:
    """A mark after the audio sent so far; Twilio echoes it once that audio has played."""
    return orjson.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}).decode()


def clear_message(stream_sid: str) -> str:
    """Flush the audio Twilio has buffered for the call (barge-in)."""
    return orjson.dumps({"event": "clear", "streamSid": stream_sid}).decode()


# --- the session ---------------------------------------------------------------------------------------

CredentialsLookup = Callable[[str], TwilioCredentials | None]


class TwilioSession(StreamSession):
    """One Twilio Media Stream (module docstring for the rules it enforces).

    ``url``: the public URL Twilio connected to, as it signed it; ``signature``: the
    ``X-Twilio-Signature`` header (``None`` when absent); ``credentials_for``: a tenant's
    :class:`TwilioCredentials` (``None`` for an unknown tenant), looked up synchronously at ``start``
    (cache them); ``require_signature``: refuse unsigned streams (production), else accept them with
    ``authenticated=False``; ``default_tenant``: the tenant of a stream that names none (embedded
    defaults); ``allow_gaps``: report sequence gaps as :class:`~.base.AudioGap` instead of refusing.
    """

    protocol: ClassVar[str] = "twilio"

    def __init__(self, *, url: str, signature: str | None, credentials_for: CredentialsLookup,
                 require_signature: bool = True, default_tenant: str | None = None,
                 allow_gaps: bool = False) -> None:
        super().__init__()
        self.url = url
        self.signature = signature or None
        self.credentials_for = credentials_for
        self.require_signature = require_signature
        self.default_tenant = default_tenant
        self.allow_gaps = allow_gaps
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.tracks: tuple[str, ...] = ()
        self.last_sequence = 0
        self.messages = 0
        self.last_chunk: dict[str, int] = {}
        self.track_end_ms: dict[str, int] = {}

    @property
    def position_s(self) -> float | None:
        """Stream time reached by the furthest track, from Twilio's timestamps."""
        return max(self.track_end_ms.values(), default=0) / 1000

    def receive(self, message: str | bytes) -> StreamStep:
        """Handle one frame from Twilio (module docstring)."""
        if self.failed is not None:
            raise UnexpectedMessage(f"the stream has already failed: {self.failed.detail}")
        try:
            return self._receive(message)
        except ProtocolError as error:
            raise self._fail(error) from None

    def _receive(self, message: str | bytes) -> StreamStep:
        data = json_object(text_frame(message, "Twilio stream"), "Twilio message")
        event = data.get("event")
        if not isinstance(event, str) or event not in EVENTS:
            raise MalformedMessage(f"event: {event!r} is not a Twilio Media Streams event (one of "
                                   f"{', '.join(EVENTS)})")
        self._check_state(event)
        self.messages += 1
        if event == "connected":
            validated(ConnectedMessage, data, "connected")
            return StreamStep()
        step = StreamStep()
        self._check_sequence(data.get("sequenceNumber"), event, step)
        handle = {"start": self._on_start, "media": self._on_media, "dtmf": self._on_dtmf,
                  "mark": self._on_mark, "stop": self._on_stop}[event]
        handle(data, step)
        return step

    def _check_state(self, event: str) -> None:
        if self.ended:
            raise UnexpectedMessage(f"{event} after stop: the stream has ended")
        if event == "connected" and self.messages:
            raise UnexpectedMessage("connected must be the first message, and only once")
        if event == "start" and self.call is not None:
            raise UnexpectedMessage(f"a second start on stream {self.stream_sid}")
        if event not in ("connected", "start") and self.call is None:
            raise UnexpectedMessage(f"{event} before start: a stream must begin with connected, start")

    def _check_sequence(self, raw: Any, event: str, step: StreamStep) -> None:
        if not isinstance(raw, str) or not raw.isascii() or not raw.isdigit() or len(raw) > 15:
            raise MalformedMessage(f"{event}.sequenceNumber: expected a string of digits, got {raw!r}")
        number, last = int(raw), self.last_sequence
        if number == last:
            raise UnexpectedMessage(f"duplicate sequenceNumber {number} ({event})")
        if number < last:
            raise UnexpectedMessage(f"sequenceNumber {number} ({event}) after {last}: out of order, or a "
                                    "duplicate of an earlier message")
        missing = number - last - 1
        if missing:
            first, final = last + 1, number - 1
            numbers = str(first) if first == final else f"{first}-{final}"
            if not self.allow_gaps or self.call is None:
                raise UnexpectedMessage(f"sequenceNumber {number} ({event}) after {last}: {missing} message(s) "
                                        f"missing ({numbers})")
            step.events.append(AudioGap(self.position_s, None, "sequence-gap", missing_messages=missing))
        self.last_sequence = number

    def _on_start(self, data: dict[str, Any], step: StreamStep) -> None:
        message = validated(StartMessage, data, "start")
        body = message.start
        checked_id(message.streamSid, "start.streamSid")
        checked_id(body.callSid, "start.callSid")
        if body.streamSid != message.streamSid:
            raise MalformedMessage(f"start.streamSid {body.streamSid!r} differs from streamSid {message.streamSid!r}")
        fmt = body.mediaFormat
        if (fmt.encoding, fmt.sampleRate, fmt.channels) != (MULAW_ENCODING, SAMPLE_RATE, 1):
            raise UnsupportedFormat(f"start.mediaFormat: {fmt.encoding} at {fmt.sampleRate} Hz, {fmt.channels} "
                                    f"channel(s) is not read here; send {MULAW_ENCODING} at {SAMPLE_RATE} Hz, mono")
        unknown = [track for track in body.tracks if track not in TRACKS]
        if unknown or len(set(body.tracks)) != len(body.tracks):
            raise MalformedMessage(f"start.tracks: {body.tracks} must be distinct names of inbound, outbound")
        tenant = self._tenant(body.customParameters)
        authenticated = self._authenticate(tenant, body.accountSid)
        self.stream_sid, self.call_sid, self.tracks = message.streamSid, body.callSid, tuple(body.tracks)
        formats = tuple(TrackFormat(TRACKS[name], name, "mulaw", SAMPLE_RATE) for name in body.tracks)
        self.call = CallStarted(self.protocol, body.callSid, tenant, message.streamSid, formats,
                                (Participant("customer"),), None, dict(body.customParameters), authenticated)
        step.events.append(self.call)

    def _tenant(self, custom_parameters: Mapping[str, str]) -> str | None:
        named = {source: value for source, value in (("the URL's ?tenant=", stream_tenant(self.url)),
                                                     ("<Parameter name=\"tenant\">",
                                                      custom_parameters.get(TENANT_PARAMETER))) if value}
        if len(set(named.values())) > 1:
            raise TenantRefused("the stream names two tenants: "
                                + " and ".join(f"{value!r} in {source}" for source, value in named.items()))
        tenant = next(iter(named.values()), None) or self.default_tenant
        if tenant is None:
            raise TenantRefused('no tenant: name it as <Parameter name="tenant" value="ID"/> in the <Stream> '
                                "(or ?tenant=ID in its URL)")
        if not TENANT_ID_PATTERN.fullmatch(tenant):
            raise MalformedMessage(f"tenant {tenant[:64]!r} is not a tenant id (1-40 of a-z, 0-9, '.', '_', '-')")
        return tenant

    def _authenticate(self, tenant: str | None, account_sid: str) -> bool:
        if self.signature is None:
            if self.require_signature:
                raise SignatureRejected(f"no {SIGNATURE_HEADER} header: this server accepts signed streams only")
            return False
        credentials = self.credentials_for(tenant) if tenant else None
        if credentials is None:
            raise SignatureRejected(f"no Twilio auth token is configured for tenant {tenant!r}, so its "
                                    f"{SIGNATURE_HEADER} cannot be checked")
        if not is_valid_signature(credentials.auth_token, self.url, self.signature):
            raise SignatureRejected(f"{SIGNATURE_HEADER} does not sign this stream URL under tenant "
                                    f"{tenant!r}'s auth token")
        if credentials.account_sid is not None and not hmac.compare_digest(credentials.account_sid.encode(),
                                                                           account_sid.encode()):
            raise TenantRefused(f"start.accountSid {account_sid!r} is not tenant {tenant!r}'s Twilio account")
        return True

    def _on_media(self, data: dict[str, Any], step: StreamStep) -> None:
        media = validated(MediaMessage, data, "media")
        self._check_stream(media.streamSid, "media")
        body = media.media
        if body.track not in self.tracks:
            raise UnexpectedMessage(f"media.track {body.track!r} is not one of start.tracks {list(self.tracks)}")
        chunk, last_chunk = int(body.chunk), self.last_chunk.get(body.track, 0)
        if chunk <= last_chunk:
            raise UnexpectedMessage(f"media.chunk {chunk} on track {body.track} after chunk {last_chunk}: "
                                    "a duplicate or out of order")
        try:
            payload = base64.b64decode(body.payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise MalformedMessage(f"media.payload (chunk {chunk}) is not valid base64: {error}") from None
        if not payload:
            raise MalformedMessage(f"media.payload (chunk {chunk}) is empty")
        self.last_chunk[body.track] = chunk
        timestamp_ms = int(body.timestamp)
        self.track_end_ms[body.track] = timestamp_ms + len(payload) // SAMPLES_PER_MS
        step.events.append(AudioChunk(TRACKS[body.track], self.tracks.index(body.track), SAMPLE_RATE,
                                      mulaw_decode(payload), timestamp_ms * SAMPLES_PER_MS))

    def _on_dtmf(self, data: dict[str, Any], step: StreamStep) -> None:
        dtmf = validated(DtmfMessage, data, "dtmf")
        self._check_stream(dtmf.streamSid, "dtmf")
        track = DTMF_TRACKS.get(dtmf.dtmf.track)
        if track is None:
            raise MalformedMessage(f"dtmf.track {dtmf.dtmf.track!r} is not inbound_track or outbound_track")
        step.events.append(Dtmf(dtmf.dtmf.digit, track, self.position_s))

    def _on_mark(self, data: dict[str, Any], step: StreamStep) -> None:
        mark = validated(MarkMessage, data, "mark")
        self._check_stream(mark.streamSid, "mark")
        step.events.append(MarkPlayed(mark.mark.name))

    def _on_stop(self, data: dict[str, Any], step: StreamStep) -> None:
        stop = validated(StopMessage, data, "stop")
        self._check_stream(stop.streamSid, "stop")
        if stop.stop.callSid is not None and stop.stop.callSid != self.call_sid:
            raise UnexpectedMessage(f"stop.callSid {stop.stop.callSid!r} is not the stream's call {self.call_sid!r}")
        self.ended = True
        step.events.append(CallEnded("completed", "stop", self.position_s))
        step.close = (1000, "stream stopped")

    def _check_stream(self, stream_sid: str, event: str) -> None:
        if stream_sid != self.stream_sid:
            raise UnexpectedMessage(f"{event}.streamSid {stream_sid!r} is not this stream's {self.stream_sid!r}")
