"""Genesys Cloud AudioHook v2, server side: upgrade check, message schema, one session's state
machine, media negotiation, audio de-interleaving and the messages we send back.

Roles. Genesys is the client: it connects, opens and closes every session; we are the server.
Checked against Genesys' reference server (purecloudlabs/audiohook-reference-implementation,
``app/audiohook/src/protocol`` and ``server/serversessionimpl.ts``) and the Azure sample.

Upgrade (:func:`verify_upgrade`): headers ``Audiohook-Organization-Id``, ``Audiohook-Correlation-Id``,
``Audiohook-Session-Id`` (a UUID), ``X-API-KEY``, and an RFC 9421 ``Signature``/``Signature-Input``
pair (:mod:`.http_signature`): ``hmac-sha256`` keyed by the base64-decoded client secret, covering
``@request-target @authority audiohook-organization-id audiohook-session-id audiohook-correlation-id
x-api-key``, with ``keyid`` (= the ``X-API-KEY`` value), ``nonce`` (at least 22 characters),
``created`` (at most 10 s old) and ``expires``. As in the reference, an unsigned upgrade passes only
for a key whose client secret is empty, or here when ``require_signature`` is off (embedded defaults).

Text messages, both ways: ``{"version":"2","id":<session UUID>,"type":…,"seq":n,"parameters":{…}}``;
the client adds ``serverseq`` (the last server ``seq`` it saw) and ``position`` (audio sent so far, an
ISO-8601 duration ``PT3.2S``), the server adds ``clientseq``. Each side counts its ``seq`` 1, 2, 3…
Client: ``open close ping update paused resumed discarded error``; server: ``opened closed pong
event pause resume disconnect reconnect updated``. ::

    {"version":"2","type":"open","seq":1,"serverseq":0,"id":"e160e428-…","position":"PT0S",
     "parameters":{"organizationId":"d7934305-…","conversationId":"090eaa2f-…",
      "participant":{"id":"883efee8-…","ani":"+1-555-555-1234","aniName":"John Doe","dnis":"+1-800-555-6789"},
      "media":[{"type":"audio","format":"PCMU","channels":["external","internal"],"rate":8000},
               {"type":"audio","format":"PCMU","channels":["external"],"rate":8000}],"language":"en-US"}}

Checks, in the reference server's order, each answered as it does: ``disconnect`` with
``{"reason":"error","info":"Client Error: <why>"}`` (raised as a :class:`~.base.ProtocolError` whose
``replies`` hold it): a text over 65,535 characters; not JSON; not a well-formed client message
(``version`` "2", ``id`` a UUID, ``seq``/``serverseq`` non-negative integers, ``position`` a duration,
``parameters`` an object); ``seq`` not ``clientseq + 1``; ``serverseq`` above our own ``seq``; ``id``
not the session's; an unknown type or invalid parameters; audio outside the active state, before any
media was negotiated, or not whole samples. After that the session only answers ``close`` (with
``closed``) and ignores the rest, as the reference does. ``open`` in another state, ``paused`` when
not active, ``resumed`` when not paused and ``update`` before ``open`` are ignored, as there.

Open. ``open`` → ``opened {"media":[<exactly one offered entry>],"startPaused":false}``: entries
with both channels first, PCMU before L16, then the client's order (``supportedLanguages`` added when
asked). Organisation id must equal the upgrade's header (else ``disconnect`` ``unauthorized``). A
connection probe (``conversationId`` or ``participant.id`` all zeros) gets ``opened`` with
``"media":[]`` and then ``closed`` for its ``close``; it starts no call, so nothing is stored.

Audio: binary frames after ``opened``, channels interleaved sample by sample in the negotiated order
(PCMU one byte a sample; L16 two bytes, little-endian as the reference reads them), 8000 Hz;
``position`` advances by samples / 8000. ``discarded {start, discarded}`` and ``resumed {start,
discarded}`` move the position past audio never sent. Tracks: ``external`` is the customer,
``internal`` the agent.

Keep-alive: ``ping {rtt?}`` → ``pong {}`` (protocol messages, not WebSocket pings; the client pings
1 s after opening and every 5 s, and fails with 408 without a pong by the next ping). End: ``close
{reason: end|error|disconnect|reconnect}`` → ``closed {}``, then the client closes the socket; no
audio follows ``close``. We end a session with :meth:`AudioHookSession.disconnect_message`
(``completed``, ``unauthorized``, ``error``) and await the client's ``close``.

Results back: ``event {"entities":[{"type":"transcript","data":{"id","channelId","isFinal","offset",
"duration","alternatives":[{"confidence","languages"?,"interpretations":[{"type":"display",
"transcript"}]}]}}]}`` (:meth:`AudioHookSession.transcript_message`). The field is ``channelId``
(0 or 1, the channel's index in the negotiated media) as in the reference server's
``entities-transcript.ts`` and the Azure sample; ``../shared/reference/callcentre_protocols.md``
writes ``channel``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import orjson
from pydantic import Field, StringConstraints

from services.customer_service.audio import mulaw_decode
from services.customer_service.protocols.base import (
    AudioChunk,
    AudioGap,
    CallEnded,
    CallStarted,
    LanguageChanged,
    MalformedMessage,
    MessageTooLarge,
    Participant,
    Paused,
    PeerError,
    ProtocolError,
    Resumed,
    SignatureRejected,
    StreamEvent,
    StreamSession,
    StreamStep,
    TenantRefused,
    Track,
    TrackFormat,
    UnexpectedMessage,
    WireMessage,
    validated,
)
from services.customer_service.protocols.http_signature import SignedRequest, VerifiedSignature, verify_signature

VERSION = "2"
NULL_UUID = "00000000-0000-0000-0000-000000000000"
MAX_TEXT_CHARACTERS = 65535
SAMPLE_RATE = 8000
CHANNEL_TRACKS: dict[str, Track] = {"external": "customer", "internal": "agent"}
BYTES_PER_SAMPLE = {"PCMU": 1, "L16": 2}
SIGNED_COMPONENTS = ("@request-target", "@authority", "audiohook-organization-id", "audiohook-session-id",
                     "audiohook-correlation-id", "x-api-key")
MAX_SIGNATURE_AGE_S = 10
MIN_NONCE_LENGTH = 22
UUID_PATTERN = (r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[1-5][0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}"
                r"|00000000-0000-0000-0000-000000000000)$")
DURATION_PATTERN = r"^PT(?:\d*\.)?\d+S$"

Uuid = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]
Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN)]
LanguageCode = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}-[A-Za-z]{2,3}$")]
SequenceNumber = Annotated[int, Field(ge=0)]
State = Literal["preparing", "active", "paused", "closing", "closed", "error", "unauthorized"]



class ClientMessage(WireMessage):
    """What every client message carries (the reference's ``isClientMessageBase``)."""

    version: Literal["2"]
    id: Uuid
    type: str
    seq: SequenceNumber
    serverseq: SequenceNumber
    position: Duration
    parameters: dict[str, Any]


class MediaParameter(WireMessage):
    type: Literal["audio"]
    format: Literal["PCMU", "L16"]
    channels: list[Literal["external", "internal"]] = Field(min_length=1, max_length=2)
    rate: Literal[8000]


class ParticipantParameter(WireMessage):
    id: Uuid
    ani: str
    aniName: str
    dnis: str


class ContinuedSession(WireMessage):
    id: Uuid
    serverseq: SequenceNumber
    clientseq: SequenceNumber


class OpenParameters(WireMessage):
    organizationId: Uuid
    conversationId: Uuid
    participant: ParticipantParameter
    media: list[MediaParameter]
    language: LanguageCode | None = None
    supportedLanguages: bool | None = None
    continuedSessions: list[ContinuedSession] | None = None
    customConfig: dict[str, Any] | None = None


class CloseParameters(WireMessage):
    reason: Literal["end", "error", "disconnect", "reconnect"]


class PingParameters(WireMessage):
    rtt: Duration | None = None


class UpdateParameters(WireMessage):
    language: LanguageCode


class EmptyParameters(WireMessage):
    pass


class PositionParameters(WireMessage):
    start: Duration
    discarded: Duration


class ErrorParameters(WireMessage):
    code: Annotated[int, Field(ge=400, lt=10000)]
    message: str
    retryAfter: Duration | None = None


PARAMETERS: dict[str, type[WireMessage]] = {
    "open": OpenParameters, "close": CloseParameters, "ping": PingParameters, "update": UpdateParameters,
    "paused": EmptyParameters, "resumed": PositionParameters, "discarded": PositionParameters,
    "error": ErrorParameters,
}


def parse_duration(value: str) -> float:
    """Seconds of an ISO-8601 duration as AudioHook writes it (``PT3.2S``)."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration like PT3.2S")
    return float(value[2:-1])


def format_duration(seconds: float) -> str:
    """``seconds`` as ``PT<seconds>S`` (millisecond precision, no trailing zeros)."""
    text = f"{max(seconds, 0.0):.3f}".rstrip("0").rstrip(".")
    return f"PT{text}S"


def choose_media(offered: Sequence[MediaParameter], *, allow_l16: bool = True) -> MediaParameter | None:
    """The one offered entry to accept: both channels before one, PCMU before L16, else the client's
    order; ``None`` when nothing is acceptable."""
    acceptable = [(index, entry) for index, entry in enumerate(offered)
                  if len(set(entry.channels)) == len(entry.channels) and (allow_l16 or entry.format == "PCMU")]
    if not acceptable:
        return None
    return min(acceptable, key=lambda pair: (-len(pair[1].channels), pair[1].format != "PCMU", pair[0]))[1]


def deinterleave(frame: bytes, media: MediaParameter) -> list[np.ndarray[Any, np.dtype[np.int16]]]:
    """One ``int16`` array per negotiated channel, in its order (PCMU decoded from μ-law)."""
    width = BYTES_PER_SAMPLE[media.format] * len(media.channels)
    if len(frame) % width:
        raise MalformedMessage(f"binary frame of {len(frame)} bytes is not whole samples of {len(media.channels)} "
                               f"{media.format} channel(s) ({width} bytes each)")
    if media.format == "PCMU":
        interleaved = np.frombuffer(frame, dtype=np.uint8).reshape(-1, len(media.channels))
        return [mulaw_decode(interleaved[:, channel].tobytes()) for channel in range(len(media.channels))]
    samples = np.frombuffer(frame, dtype="<i2").reshape(-1, len(media.channels))
    return [samples[:, channel].astype(np.int16) for channel in range(len(media.channels))]


# --- the upgrade --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UpgradeIdentity:
    """Who opened the socket, from its upgrade headers; ``signature`` is ``None`` when unsigned."""

    api_key: str
    organization_id: str | None
    session_id: str | None
    correlation_id: str | None
    signature: VerifiedSignature | None


def verify_upgrade(headers: Mapping[str, str | list[str]], *, request_target: str,
                   client_secret_for: Callable[[str], bytes | None], require_signature: bool = True,
                   now: float | None = None) -> UpgradeIdentity:
    """Check an AudioHook upgrade (module docstring): ``headers`` with lower-case names (Starlette's
    ``websocket.headers`` as it is), ``request_target`` the path and query as sent
    (:func:`~.base.request_target` of the ASGI scope), ``client_secret_for(api_key)`` the decoded
    client secret (``None`` for an unknown key). Raises :class:`~.base.SignatureRejected` saying why."""
    request = SignedRequest(headers, request_target)
    api_key = request.header("x-api-key")
    if not api_key:
        raise SignatureRejected("no X-API-KEY header")
    identity = {name: request.header(f"audiohook-{name}-id") for name in ("organization", "session", "correlation")}
    if request.header("signature") is None and request.header("signature-input") is None:
        secret = client_secret_for(api_key)
        if require_signature and secret != b"":
            raise SignatureRejected("unsigned upgrade: sign it (Signature, Signature-Input) with the client secret")
        return UpgradeIdentity(api_key, identity["organization"], identity["session"], identity["correlation"], None)

    def key_for(keyid: str) -> bytes | None:
        if keyid != api_key:
            raise SignatureRejected("the signature's keyid is not the X-API-KEY")
        return client_secret_for(keyid)

    verified = verify_signature(request, key_for, required=SIGNED_COMPONENTS, max_age_s=MAX_SIGNATURE_AGE_S,
                                now=now)
    if verified.nonce is None or len(verified.nonce) < MIN_NONCE_LENGTH:
        raise SignatureRejected(f"the signature's nonce is missing or shorter than {MIN_NONCE_LENGTH} characters")
    return UpgradeIdentity(api_key, identity["organization"], identity["session"], identity["correlation"], verified)


# --- the session --------------------------------------------------------------------------------------

class AudioHookSession(StreamSession):
    """One AudioHook session (module docstring for the rules it enforces).

    ``session_id``: the ``Audiohook-Session-Id`` header (``None``: taken from the first message, as the
    reference does); ``organization_id``: the ``Audiohook-Organization-Id`` header, which ``open``
    must repeat; ``tenant_id``: the tenant the API key belongs to; ``authenticated``: whether the
    upgrade was signed; ``supported_languages``: answered to an ``open`` that asks.
    """

    protocol: ClassVar[str] = "audiohook"

    def __init__(self, *, session_id: str | None, organization_id: str | None = None,
                 tenant_id: str | None = None, authenticated: bool = True,
                 supported_languages: Sequence[str] = ("en-US",), allow_l16: bool = True) -> None:
        super().__init__()
        self.session_id = session_id or NULL_UUID
        self.organization_id = organization_id
        self.tenant_id = tenant_id
        self.authenticated = authenticated
        self.supported_languages = list(supported_languages)
        self.allow_l16 = allow_l16
        self.state: State = "preparing"
        self.seq = 0
        self.clientseq = 0
        self.media: MediaParameter | None = None
        self.probe = False
        self.samples = 0
        self.client_position_s = 0.0

    @property
    def position_s(self) -> float:
        """Audio received so far, in seconds (samples per channel / 8000, plus discarded audio)."""
        return self.samples / SAMPLE_RATE

    def receive(self, message: str | bytes) -> StreamStep:
        """Handle one frame from the client (module docstring)."""
        if self.state == "closed":
            return StreamStep()  # the client closes the socket next; stragglers are ignored
        if self.state in ("error", "unauthorized"):
            return self._after_failure(message)
        try:
            return self._on_audio(message) if isinstance(message, bytes) else self._on_text(message)
        except ProtocolError as error:
            if not error.replies:
                self.state = "error"
                error.replies.append(self._message("disconnect", {"reason": "error",
                                                                  "info": f"Client Error: {error.detail}"}))
            raise self._fail(error) from None

    # --- messages we send ---

    def event_message(self, entities: list[dict[str, Any]]) -> str | None:
        """An ``event`` carrying ``entities`` (only while active, paused or closing, as the reference)."""
        if self.state not in ("active", "paused", "closing") or self.probe:
            return None
        return self._message("event", {"entities": entities})

    def transcript_message(self, track: Track, text: str, *, offset_s: float, duration_s: float,
                           confidence: float, is_final: bool = True, language: str | None = None,
                           transcript_id: str | None = None) -> str | None:
        """A transcript ``event`` for ``track``'s channel (``None`` when the track was not negotiated
        or the state allows no event)."""
        channels = [CHANNEL_TRACKS[name] for name in self.media.channels] if self.media else []
        if track not in channels:
            return None
        alternative: dict[str, Any] = {"confidence": round(float(confidence), 4),
                                       "interpretations": [{"type": "display", "transcript": text}]}
        if language:
            alternative["languages"] = [language]
        data = {"id": transcript_id or str(uuid.uuid4()), "channelId": channels.index(track), "isFinal": is_final,
                "offset": format_duration(offset_s), "duration": format_duration(duration_s),
                "alternatives": [alternative]}
        return self.event_message([{"type": "transcript", "data": data}])

    def disconnect_message(self, reason: Literal["completed", "unauthorized", "error"],
                           info: str | None = None) -> str | None:
        """Ask the client to end the session (it answers with ``close``); ``None`` once closing."""
        if self.state not in ("preparing", "active", "paused"):
            return None
        self.state = "unauthorized" if reason == "unauthorized" else ("error" if reason == "error" else self.state)
        return self._message("disconnect", {"reason": reason, **({"info": info} if info else {})})

    def pause_message(self) -> str | None:
        """Ask the client to pause sending audio (answered with ``paused``)."""
        return self._message("pause", {}) if self.state in ("active", "paused") else None

    def resume_message(self) -> str | None:
        """Ask the client to resume sending audio (answered with ``resumed``)."""
        return self._message("resume", {}) if self.state in ("active", "paused") else None

    def _message(self, kind: str, parameters: dict[str, Any]) -> str:
        self.seq += 1
        return orjson.dumps({"version": VERSION, "type": kind, "seq": self.seq, "clientseq": self.clientseq,
                             "id": self.session_id, "parameters": parameters}).decode()

    # --- messages we receive ---

    def _on_text(self, text: str) -> StreamStep:
        if len(text) > MAX_TEXT_CHARACTERS:
            raise MessageTooLarge(f"text message too large (>64K): {len(text)} characters")
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            raise MalformedMessage(f"text message not valid JSON: {error}") from None
        message = validated(ClientMessage, data, "not a well-formed client message")
        if message.seq != self.clientseq + 1:
            raise UnexpectedMessage(f"invalid seq {message.seq} ({message.type}): expected {self.clientseq + 1}, "
                                    f"one more than the last ({self.clientseq})")
        self.clientseq = message.seq
        if message.serverseq > self.seq:
            raise UnexpectedMessage(f"invalid serverseq {message.serverseq}: the server has sent {self.seq} "
                                    "message(s)")
        if message.id != self.session_id:
            if self.session_id != NULL_UUID:
                raise UnexpectedMessage(f"session id mismatch: {message.id} is not {self.session_id}")
            self.session_id = message.id
        model = PARAMETERS.get(message.type)
        if model is None:
            raise MalformedMessage(f"'{message.type}' is not a supported client message")
        parameters = validated(model, message.parameters, f"invalid {message.type} parameters")
        self.client_position_s = parse_duration(message.position)
        return getattr(self, f"_on_{message.type}")(parameters)

    def _on_open(self, parameters: OpenParameters) -> StreamStep:
        if self.state != "preparing":
            return StreamStep()
        if self.organization_id is not None and parameters.organizationId != self.organization_id:
            self.state = "unauthorized"
            info = ("Mismatch between \"organizationId\" open parameter and \"audiohook-organization-id\" "
                    "header field")
            raise TenantRefused(info, replies=[self._message("disconnect", {"reason": "unauthorized",
                                                                            "info": info})])
        self.probe = NULL_UUID in (parameters.conversationId, parameters.participant.id)
        self.media = None if self.probe else choose_media(parameters.media, allow_l16=self.allow_l16)
        opened: dict[str, Any] = {"media": [self.media.model_dump()] if self.media else [], "startPaused": False}
        if parameters.supportedLanguages:
            opened["supportedLanguages"] = self.supported_languages
        step = StreamStep(replies=[self._message("opened", opened)])
        self.state = "active"
        if not self.probe:
            self.call = self._call_started(parameters)
            step.events.append(self.call)
        return step

    def _call_started(self, parameters: OpenParameters) -> CallStarted:
        channels = self.media.channels if self.media else []
        encoding = "mulaw" if self.media and self.media.format == "PCMU" else "l16"
        tracks = tuple(TrackFormat(CHANNEL_TRACKS[name], name, encoding, SAMPLE_RATE, index)
                       for index, name in enumerate(channels))
        person = parameters.participant
        customer = Participant("customer", person.id, person.ani or None, person.aniName or None, person.dnis or None)
        return CallStarted(self.protocol, parameters.conversationId, self.tenant_id, self.session_id, tracks,
                           (customer,), parameters.language, dict(parameters.customConfig or {}), self.authenticated)

    def _on_close(self, parameters: CloseParameters) -> StreamStep:
        if self.state in ("closing", "closed"):
            return StreamStep()
        self.state = "closed"
        step = StreamStep(replies=[self._message("closed", {})], close=(1000, f"closed ({parameters.reason})"))
        if self.call is not None and not self.ended:
            self.ended = True
            step.events.append(CallEnded("completed", f"close ({parameters.reason})", self.position_s))
        return step

    def _on_ping(self, parameters: PingParameters) -> StreamStep:
        return StreamStep(replies=[self._message("pong", {})])

    def _on_update(self, parameters: UpdateParameters) -> StreamStep:
        if self.state not in ("active", "paused"):
            return StreamStep()
        return StreamStep(events=[LanguageChanged(parameters.language)])

    def _on_paused(self, parameters: EmptyParameters) -> StreamStep:
        if self.state != "active":
            return StreamStep()
        self.state = "paused"
        return StreamStep(events=[Paused(self.client_position_s)])

    def _on_resumed(self, parameters: PositionParameters) -> StreamStep:
        if self.state != "paused":
            return StreamStep()
        self.state = "active"
        start, discarded = parse_duration(parameters.start), parse_duration(parameters.discarded)
        self._skip_to(start + discarded)
        return StreamStep(events=[Resumed(start + discarded, discarded)])

    def _on_discarded(self, parameters: PositionParameters) -> StreamStep:
        start, discarded = parse_duration(parameters.start), parse_duration(parameters.discarded)
        self._skip_to(start + discarded)
        return StreamStep(events=[AudioGap(start, discarded, "discarded")])

    def _on_error(self, parameters: ErrorParameters) -> StreamStep:
        return StreamStep(events=[PeerError(parameters.code, parameters.message)])

    def _skip_to(self, position_s: float) -> None:
        self.samples = max(self.samples, round(position_s * SAMPLE_RATE))

    def _on_audio(self, frame: bytes) -> StreamStep:
        if self.state != "active":
            when = {"preparing": "before open", "paused": "while paused", "closing": "after close",
                    "closed": "after close"}.get(self.state, f"in state {self.state}")
            raise UnexpectedMessage(f"received audio {when}")
        if self.media is None:
            raise UnexpectedMessage("unexpected binary message: no media was negotiated"
                                    + (" (a connection probe)" if self.probe else ""))
        channels = deinterleave(frame, self.media)
        start = self.samples
        self.samples += len(channels[0])
        events: list[StreamEvent] = [AudioChunk(CHANNEL_TRACKS[name], index, SAMPLE_RATE, samples, start)
                                     for index, (name, samples) in enumerate(zip(self.media.channels, channels,
                                                                                 strict=True)) if len(samples)]
        return StreamStep(events=events)

    def _after_failure(self, message: str | bytes) -> StreamStep:
        """After a signalled error only ``close`` is answered (with ``closed``), as the reference does."""
        if isinstance(message, bytes) or len(message) > MAX_TEXT_CHARACTERS:
            return StreamStep()
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError:
            return StreamStep()
        if not isinstance(data, dict) or data.get("type") != "close":
            return StreamStep()
        if isinstance(data.get("seq"), int):
            self.clientseq = data["seq"]
        failure = self.failed
        self.state = "closed"
        close = (failure.close_code, failure.close_reason) if failure else (1000, "closed")
        return StreamStep(replies=[self._message("closed", {})], close=close)
