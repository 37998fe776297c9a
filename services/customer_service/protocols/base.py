"""The common shape of the call-audio stream protocols: neutral events in, protocol replies out.

Every protocol (:mod:`.twilio`, :mod:`.audiohook`, :mod:`.vonage`) is a :class:`StreamSession`, one
object per WebSocket connection holding that protocol's state machine. It touches no socket, clock
or database: the endpoint hands it each received message and does what the answer says::

    step = session.receive(message)      # str (text frame) or bytes (binary frame)
    send every step.replies              # protocol answers, in order (AudioHook: opened, pong, closed)
    handle every step.events             # neutral events for the pipeline, in order
    if step.close: close the socket with step.close = (code, reason)

A message the protocol forbids raises :class:`ProtocolError`: a precise ``detail``, the WebSocket
``close_code`` (from the platform's table, :func:`shared.websockets.close_code_for`) and the
``replies`` to send before closing (AudioHook signals errors in-band with ``disconnect``). When the
socket is gone, whatever the cause, :meth:`StreamSession.finish` returns the :class:`CallEnded` of a
call that started and has not ended yet, so the partial call is kept.

Neutral events
    :class:`CallStarted`  call id, tenant, participants, the tracks and their formats
    :class:`AudioChunk`   one track's PCM ``int16`` samples with their sample rate and position
    :class:`Dtmf`         a key press
    :class:`Paused` / :class:`Resumed`   audio stopped / restarted (hold, secure pause)
    :class:`AudioGap`     audio the sender dropped (AudioHook ``discarded``; tolerated sequence gaps)
    :class:`LanguageChanged`, :class:`PeerError`, :class:`MarkPlayed`   protocol notices
    :class:`CallEnded`    completed, disconnected or failed, with why

Tracks are named for the party: ``customer`` (Twilio ``inbound``, AudioHook ``external``, Vonage's
one track) and ``agent`` (Twilio ``outbound``, AudioHook ``internal``).

Close codes (RFC 6455 7.4, the platform's table): ``1007`` malformed or invalid message (400),
``1003`` an encoding or sample rate this service does not read, or the wrong kind of frame (415),
``1008`` a message the protocol forbids here (409: before ``start``/``open``, out of order, a
duplicate), a signature or tenant refused (401/403), ``1009`` a message over the size limit (413).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.errors import ProblemError
from shared.text import CONTROL_CHARACTER
from shared.websockets import close_code_for, close_reason

Track = Literal["customer", "agent"]
EndReason = Literal["completed", "disconnected", "protocol-error"]
ModelT = TypeVar("ModelT", bound=BaseModel)
Frame = str | bytes

MAX_ID_LENGTH = 128
"""The longest call or stream id kept (``services.customer_service.db.CALL_ID_LENGTH``)."""


# --- neutral events ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TrackFormat:
    """One track of a call as it arrives: ``name`` is the protocol's own (``inbound``, ``external``),
    ``encoding`` ``mulaw`` or ``l16``, ``channel`` the track's index in an interleaved frame."""

    track: Track
    name: str
    encoding: str
    sample_rate: int
    channel: int = 0


@dataclass(frozen=True, slots=True)
class Participant:
    """A party of the call, as far as the protocol tells (AudioHook: ani, aniName, dnis)."""

    role: Track
    id: str | None = None
    phone: str | None = None
    name: str | None = None
    dialled: str | None = None


@dataclass(frozen=True, slots=True)
class CallStarted:
    """The stream of a call began: from here on audio chunks of ``tracks`` follow.

    ``authenticated`` is false only for an unsigned stream accepted on embedded defaults.
    """

    protocol: str
    call_id: str
    tenant_id: str | None
    stream_id: str
    tracks: tuple[TrackFormat, ...]
    participants: tuple[Participant, ...] = ()
    language: str | None = None
    custom_parameters: Mapping[str, Any] = field(default_factory=dict)
    authenticated: bool = True


@dataclass(frozen=True, slots=True, eq=False)
class AudioChunk:
    """Samples of one track: PCM ``int16`` mono at ``sample_rate``; ``start_sample`` is the position of
    the first one in the track's stream (samples since the stream began, at ``sample_rate``)."""

    track: Track
    channel: int
    sample_rate: int
    samples: npt.NDArray[np.int16]
    start_sample: int

    @property
    def position_s(self) -> float:
        """Stream time of the first sample, in seconds."""
        return self.start_sample / self.sample_rate

    @property
    def duration_s(self) -> float:
        """Length of the chunk, in seconds."""
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key press (``0``-``9``, ``*``, ``#``, ``A``-``D``)."""

    digit: str
    track: Track = "customer"
    position_s: float | None = None


@dataclass(frozen=True, slots=True)
class Paused:
    """The sender stopped sending audio (hold, secure pause) at ``position_s``."""

    position_s: float


@dataclass(frozen=True, slots=True)
class Resumed:
    """Audio follows again; ``discarded_s`` of audio during the pause was never sent."""

    position_s: float
    discarded_s: float = 0.0


@dataclass(frozen=True, slots=True)
class AudioGap:
    """Audio that will never arrive: ``duration_s`` from ``position_s`` (``None`` when unknown),
    ``reason`` ``discarded`` (the sender dropped it) or ``sequence-gap`` (messages missing)."""

    position_s: float | None
    duration_s: float | None
    reason: str
    missing_messages: int = 0


@dataclass(frozen=True, slots=True)
class LanguageChanged:
    """The call's language changed (AudioHook ``update``)."""

    language: str


@dataclass(frozen=True, slots=True)
class PeerError:
    """The sender reported an error of its own (AudioHook ``error``): for the log."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """Audio sent back up to the mark ``name`` has played (Twilio bidirectional streams)."""

    name: str


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The call's stream ended: ``completed`` (stop / close), ``disconnected`` (the socket went away
    first) or ``protocol-error``; ``detail`` says more (the close reason, the error)."""

    reason: EndReason
    detail: str = ""
    position_s: float | None = None


StreamEvent = (CallStarted | AudioChunk | Dtmf | Paused | Resumed | AudioGap | LanguageChanged | PeerError
               | MarkPlayed | CallEnded)


@dataclass(slots=True)
class StreamStep:
    """What one received message asks of the endpoint: send ``replies``, handle ``events``, then close
    with ``close`` (code, reason) when set."""

    events: list[StreamEvent] = field(default_factory=list)
    replies: list[Frame] = field(default_factory=list)
    close: tuple[int, str] | None = None


# --- protocol errors ---------------------------------------------------------------------------------

class ProtocolError(ProblemError):
    """A message the protocol forbids. ``close_code`` is the platform's code for its status;
    ``replies`` are protocol messages to send before closing (AudioHook ``disconnect``)."""

    def __init__(self, detail: str, *, replies: Sequence[Frame] = ()) -> None:
        super().__init__(detail)
        self.replies: list[Frame] = list(replies)

    @property
    def close_code(self) -> int:
        """The WebSocket close code of this error (:func:`shared.websockets.close_code_for`)."""
        return close_code_for(self)

    @property
    def close_reason(self) -> str:
        """The detail, cut to fit a close frame."""
        return close_reason(self.detail)


class MalformedMessage(ProtocolError):
    """Not valid for the protocol: bad JSON, a missing or mistyped field, bad base64 (1007)."""

    status, title, type_slug = 400, "Bad Request", "malformed-stream-message"


class UnexpectedMessage(ProtocolError):
    """Valid alone but not here: before ``start``/``open``, a duplicate, out of order, a gap (1008)."""

    status, title, type_slug = 409, "Conflict", "unexpected-stream-message"


class UnsupportedFormat(ProtocolError):
    """An encoding, sample rate or frame kind this service does not read (1003)."""

    status, title, type_slug = 415, "Unsupported Media Type", "unsupported-stream-format"


class SignatureRejected(ProtocolError):
    """A missing, malformed or wrong signature (1008)."""

    status, title, type_slug = 401, "Unauthorized", "invalid-signature"


class TenantRefused(ProtocolError):
    """A tenant that is missing, named twice differently, or not the one the credentials prove (1008)."""

    status, title, type_slug = 403, "Forbidden", "tenant-refused"


class MessageTooLarge(ProtocolError):
    """A message over the protocol's size limit (1009)."""

    status, title, type_slug = 413, "Content Too Large", "stream-message-too-large"


# --- the session interface ---------------------------------------------------------------------------

class StreamSession(ABC):
    """One connection's protocol state machine (module docstring for how an endpoint drives it)."""

    protocol: ClassVar[str]

    def __init__(self) -> None:
        self.call: CallStarted | None = None
        self.ended = False
        self.failed: ProtocolError | None = None

    @abstractmethod
    def receive(self, message: Frame) -> StreamStep:
        """Handle one received frame; raises :class:`ProtocolError` for one the protocol forbids."""

    def finish(self, close_code: int | None = None) -> list[StreamEvent]:
        """The socket is gone (``close_code`` as the client sent it, ``None`` when we closed it):
        the :class:`CallEnded` of a started call that has not ended yet, else nothing."""
        if self.call is None or self.ended:
            return []
        self.ended = True
        if self.failed is not None:
            return [CallEnded("protocol-error", self.failed.detail, self.position_s)]
        detail = "the socket closed before the end of the stream"
        return [CallEnded("disconnected", detail if close_code is None else f"{detail} (code {close_code})",
                          self.position_s)]

    @property
    def position_s(self) -> float | None:
        """How much audio the stream has carried, in seconds (``None`` when the protocol cannot say)."""
        return None

    def transcript_message(self, track: Track, text: str, *, offset_s: float, duration_s: float,
                           confidence: float, is_final: bool = True, language: str | None = None,
                           transcript_id: str | None = None) -> str | None:
        """The protocol's message carrying a transcript back to the sender, or ``None`` when the
        protocol has no such message (Twilio, Vonage) or the session is not in a state to send one."""
        return None

    def _fail(self, error: ProtocolError) -> ProtocolError:
        """Remember ``error`` as the reason the stream ends; returns it for ``raise``."""
        self.failed = self.failed or error
        return error


# --- helpers shared by the protocols ------------------------------------------------------------------

class WireMessage(BaseModel):
    """Base of a protocol's message schemas: types as sent (no coercion: ``"1"`` is not ``1``), fields
    the schema does not name ignored (senders add fields over time), immutable."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def json_object(text: str, what: str) -> dict[str, Any]:
    """Decode a text frame that must hold a JSON object; :class:`MalformedMessage` saying why not."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise MalformedMessage(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def validated(model: type[ModelT], data: Any, what: str) -> ModelT:
    """``data`` validated as ``model``; the first error named by its path (e.g. ``media.payload: Field
    required``) as a :class:`MalformedMessage`."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MalformedMessage(f"{what}: {where + ': ' if where else ''}{first['msg']}") from None


def checked_id(value: Any, what: str) -> str:
    """``value`` as a call or stream id the store keeps: a string of 1-:data:`MAX_ID_LENGTH` characters
    without control characters (NUL included); else :class:`MalformedMessage` (1007). The reason
    gives the length or the character's code point, never the value (it may be megabytes)."""
    if not isinstance(value, str):
        raise MalformedMessage(f"{what}: expected a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise MalformedMessage(f"{what}: {len(value)} characters; an id is 1-{MAX_ID_LENGTH} characters")
    control = CONTROL_CHARACTER.search(value)
    if control is not None:
        raise MalformedMessage(f"{what}: control character U+{ord(control.group()):04X} at position "
                               f"{control.start()}; an id is printable text")
    return value


def request_target(scope: Mapping[str, Any]) -> str:
    """The path and query of an ASGI connection exactly as the client sent them (``raw_path``, before
    any decoding or mount prefix stripping), as signatures cover them."""
    raw_path = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
    query = scope.get("query_string", b"")
    return raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def text_frame(message: Frame, what: str) -> str:
    """``message`` as text; a binary frame where text is expected is :class:`UnsupportedFormat` (1003)."""
    if isinstance(message, bytes):
        raise UnsupportedFormat(f"{what}: expected a text frame, got a binary one ({len(message)} bytes)")
    return message
