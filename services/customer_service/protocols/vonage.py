"""Vonage Voice API WebSockets, server side: a plain L16 socket (and the proof that a third
protocol is a small addition: this module is the whole of it).

Setup. An NCCO ``connect`` action with a ``websocket`` endpoint points Vonage at us
(``"content-type": "audio/l16;rate=16000"`` or ``rate=8000``); the endpoint's ``headers`` object comes
back in the first message. Put ``tenant`` (and ``call_id``: Vonage sends no call id of its own here)
there, or let the endpoint name the tenant from the API key it was given.

Vonage → server. First one JSON text message of metadata, then binary frames of 16-bit signed
little-endian mono PCM at the announced rate, normally 20 ms each (640 bytes at 16 kHz, 320 at
8 kHz); later text messages are events, of which ``websocket:dtmf`` is read here::

    {"event":"websocket:connected","content-type":"audio/l16;rate=16000","tenant":"acme","call_id":"…"}
    <binary 640 bytes> <binary 640 bytes> …
    {"event":"websocket:dtmf","digit":"5","duration":260}

The call ends when Vonage closes the socket (there is no stop message), so a normal close (1000,
1001) ends it as completed. Enforced: the metadata first (binary before it: 1008), its ``event`` is
``websocket:connected`` and its content type L16 at 8000 or 16000 Hz (else 1003), frames are whole
samples (an odd length: 1007), the call id (``?call_id=``, the metadata's ``call_id`` or ``uuid``) a string of
1-128 characters without control characters (1007). Server → Vonage (not used here): binary L16 frames at the same rate
to play, ``{"action":"clear"}`` to flush them; Vonage buffers at most 3,072 messages.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

import numpy as np

from services.customer_service.protocols.base import (
    AudioChunk,
    CallEnded,
    CallStarted,
    Dtmf,
    MalformedMessage,
    Participant,
    ProtocolError,
    StreamEvent,
    StreamSession,
    StreamStep,
    TenantRefused,
    TrackFormat,
    UnexpectedMessage,
    UnsupportedFormat,
    checked_id,
    json_object,
)

CONNECTED_EVENT = "websocket:connected"
DTMF_EVENT = "websocket:dtmf"
SAMPLE_RATES = (8000, 16000)
NORMAL_CLOSE_CODES = (1000, 1001)
DTMF_DIGITS = frozenset("0123456789*#ABCD")


def l16_rate(content_type: Any) -> int:
    """The sample rate of an ``audio/l16;rate=N`` content type this service reads (else 1003)."""
    if not isinstance(content_type, str):
        raise MalformedMessage(f"content-type: expected a string like audio/l16;rate=16000, got {content_type!r}")
    media_type, *parameters = (part.strip().lower() for part in content_type.split(";"))
    rates = [value for name, _, value in (part.partition("=") for part in parameters) if name.strip() == "rate"]
    rate = int(rates[0]) if len(rates) == 1 and rates[0].strip().isdigit() else None
    if media_type != "audio/l16" or rate not in SAMPLE_RATES:
        raise UnsupportedFormat(f"content-type {content_type[:80]!r} is not read here: send audio/l16 at "
                                f"rate={' or '.join(map(str, SAMPLE_RATES))}")
    return rate


class VonageSession(StreamSession):
    """One Vonage WebSocket call. ``tenant_id``: the tenant proved by the endpoint (the metadata may
    repeat it, not contradict it); ``call_id``: when known outside the metadata."""

    protocol: ClassVar[str] = "vonage"

    def __init__(self, *, tenant_id: str | None = None, call_id: str | None = None) -> None:
        super().__init__()
        self.tenant_id = tenant_id
        self.call_id = call_id
        self.sample_rate = 0
        self.samples = 0

    @property
    def position_s(self) -> float | None:
        """Audio received so far, in seconds."""
        return self.samples / self.sample_rate if self.sample_rate else None

    def receive(self, message: str | bytes) -> StreamStep:
        """Handle one frame from Vonage (module docstring)."""
        if self.failed is not None:
            raise UnexpectedMessage(f"the stream has already failed: {self.failed.detail}")
        try:
            if self.call is None:
                return self._on_metadata(message)
            return self._on_audio(message) if isinstance(message, bytes) else self._on_event(message)
        except ProtocolError as error:
            raise self._fail(error) from None

    def finish(self, close_code: int | None = None) -> list[StreamEvent]:
        """As :meth:`StreamSession.finish`; a normal close from Vonage is how its calls end."""
        if self.call is not None and not self.ended and self.failed is None and close_code in NORMAL_CLOSE_CODES:
            self.ended = True
            return [CallEnded("completed", f"socket closed (code {close_code})", self.position_s)]
        return super().finish(close_code)

    def _on_metadata(self, message: str | bytes) -> StreamStep:
        if isinstance(message, bytes):
            raise UnexpectedMessage(f"binary audio ({len(message)} bytes) before the metadata message")
        metadata = json_object(message, "the metadata message")
        if metadata.get("event") != CONNECTED_EVENT:
            raise MalformedMessage(f"event: the first message must be {CONNECTED_EVENT}, got {metadata.get('event')!r}")
        self.sample_rate = l16_rate(metadata.get("content-type"))
        named = metadata.get("tenant")
        if named is not None and self.tenant_id is not None and named != self.tenant_id:
            raise TenantRefused(f"the metadata names tenant {str(named)[:64]!r}, not the endpoint's {self.tenant_id!r}")
        tenant = self.tenant_id or (named if isinstance(named, str) else None)
        call_id = self._call_id(metadata)
        parameters = {key: value for key, value in metadata.items() if key not in ("event", "content-type")}
        self.call = CallStarted(self.protocol, call_id, tenant, call_id,
                                (TrackFormat("customer", "audio", "l16", self.sample_rate),),
                                (Participant("customer"),), None, parameters)
        return StreamStep(events=[self.call])

    def _call_id(self, metadata: dict[str, Any]) -> str:
        """The call id: ``?call_id=``, else the metadata's ``call_id`` or ``uuid``, else a new UUID;
        whichever is given (an empty one counts as absent) must be a valid id
        (:func:`~.base.checked_id`: a string of 1-128 characters, no control characters; else 1007)."""
        if self.call_id:
            return checked_id(self.call_id, "?call_id=")
        for key in ("call_id", "uuid"):
            if metadata.get(key) not in (None, ""):
                return checked_id(metadata[key], key)
        return str(uuid.uuid4())

    def _on_audio(self, frame: bytes) -> StreamStep:
        if len(frame) % 2:
            raise MalformedMessage(f"binary frame of {len(frame)} bytes is not whole 16-bit samples")
        samples = np.frombuffer(frame, dtype="<i2").astype(np.int16)
        start, self.samples = self.samples, self.samples + len(samples)
        return StreamStep(events=[AudioChunk("customer", 0, self.sample_rate, samples, start)] if len(samples) else [])

    def _on_event(self, text: str) -> StreamStep:
        event = json_object(text, "Vonage event")
        if event.get("event") != DTMF_EVENT:
            return StreamStep()  # websocket:cleared, websocket:notify: answers to messages we do not send
        digit = event.get("digit")
        if not isinstance(digit, str) or digit not in DTMF_DIGITS:
            raise MalformedMessage(f"{DTMF_EVENT}.digit: expected one of 0-9, *, #, A-D, got {digit!r}")
        return StreamStep(events=[Dtmf(digit, "customer", self.position_s)])
