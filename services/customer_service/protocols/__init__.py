"""Call-audio stream protocols as pure state machines: Twilio Media Streams (:mod:`.twilio`), Genesys
AudioHook v2 (:mod:`.audiohook`) and Vonage's L16 socket (:mod:`.vonage`), each turning WebSocket
frames into the neutral events of :mod:`.base` plus the protocol's own replies."""

from services.customer_service.protocols.base import (
    AudioChunk,
    AudioGap,
    CallEnded,
    CallStarted,
    Dtmf,
    LanguageChanged,
    MarkPlayed,
    Participant,
    Paused,
    PeerError,
    ProtocolError,
    Resumed,
    StreamEvent,
    StreamSession,
    StreamStep,
    TrackFormat,
)

__all__ = ["AudioChunk", "AudioGap", "CallEnded", "CallStarted", "Dtmf", "LanguageChanged", "MarkPlayed",
           "Participant", "Paused", "PeerError", "ProtocolError", "Resumed", "StreamEvent", "StreamSession",
           "StreamStep", "TrackFormat"]
