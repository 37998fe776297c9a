"""The public contract of the customer-service HTTP API: one uploaded utterance's analysis, the
calls (the list and one call's summary with its emotion timeline).

The knowledge base, settings, integrations and the agent-assist feed's shapes are in
:mod:`services.customer_service.assist_schemas`. The stream protocols' messages are Twilio's and
Genesys AudioHook's own (``../shared/reference/callcentre_protocols.md``), not models here.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from services.customer_service.assist_schemas import EscalationOut, LiveCall, RedactionSpanOut, SuggestedReply

EmotionProbabilities = dict[str, float]
"""Probability of each emotion label (they sum to 1)."""


class UtteranceAnalysis(BaseModel):
    """What one uploaded utterance said (PII redacted), how it sounded, and what the agent might reply."""

    transcript: str | None = Field(default=None, description="speech-to-text (or the transcript sent), PII redacted")
    transcript_source: str = Field(description="asr (recognised from the audio) or client (the transcript sent)")
    redacted: list[str] = Field(default_factory=list, description="kinds of PII redacted: card_number, cvv, phone, "
                                                                  "email, ssn")
    redactions: list[RedactionSpanOut] = Field(default_factory=list, description="where, never the values")
    emotion: str = Field(description="the most probable emotion label")
    emotion_probabilities: EmotionProbabilities
    modalities: list[str] = Field(description="what the emotion was read from: audio, text")
    valence: float = Field(description="expected valence of the emotion under the tenant's policy, in [-1, 1]")
    suggestion: SuggestedReply | None = Field(default=None, description="from the tenant's knowledge base; absent "
                                                                        "when no article scores its minimum")
    duration_ms: int = Field(ge=0, description="of the audio")
    sample_rate: int = Field(description="of the audio as uploaded (Hz)")
    latency_ms: float = Field(description="from the upload being read to the answer: decoding, speech-to-text, "
                                          "emotion, retrieval")


class CallListItem(LiveCall):
    """One call of the tenant's list (a live one as the supervisor sees it, or one that ended)."""

    status: str = Field(description="live, ended (closed as its protocol says) or partial (the stream died)")
    ended_at: datetime | None
    end_reason: str | None = Field(description="completed, disconnected, protocol-error, ...")


class ParticipantOut(BaseModel):
    """A party of a call (no phone number or name is kept)."""

    role: str = Field(description="customer or agent")
    track: str = Field(description="the protocol's track: inbound/outbound (Twilio), external/internal (AudioHook)")
    joined_at: datetime


class EmotionAtTime(BaseModel):
    """One utterance on a call's emotion timeline."""

    seq: int = Field(ge=0, description="the utterance's number in the call")
    speaker: str = Field(description="customer or agent")
    start_ms: int = Field(ge=0, description="from the start of the call")
    end_ms: int = Field(ge=0)
    emotion: str | None
    emotion_probabilities: EmotionProbabilities
    valence: float | None = Field(description="expected valence of the emotion, in [-1, 1]")
    sentiment_trend: float | None = Field(description="the speaker's running (EWMA) valence after this utterance")
    trend_direction: str | None = Field(description="improving, worsening or steady, against the speaker's "
                                                    "previous utterance")


class TranscriptLine(BaseModel):
    """One utterance of a call's transcript, PII redacted."""

    seq: int = Field(ge=0)
    speaker: str
    start_ms: int = Field(ge=0)
    end_ms: int = Field(ge=0)
    text: str | None = Field(description="PII redacted; null when nothing was recognised")
    redacted: list[str] = Field(default_factory=list, description="kinds of PII redacted in it")


class CallCounts(BaseModel):
    """How much happened on a call."""

    utterances: int
    customer_utterances: int
    agent_utterances: int
    escalations: int
    redactions: int = Field(description="PII spans redacted across the transcript")


class CallSummary(BaseModel):
    """A call's summary: status and times, participants, the emotion timeline, escalations and the
    redacted transcript."""

    call_id: str = Field(description="Twilio's callSid or AudioHook's conversationId")
    status: str = Field(description="live, ended or partial")
    protocol: str = Field(description="twilio, audiohook, vonage or upload")
    started_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    duration_ms: int | None = Field(description="from start to end; null while live")
    current_emotion: str | None = Field(description="of the customer's latest utterance")
    sentiment_trend: float | None = Field(description="the customer's, in [-1, 1]")
    participants: list[ParticipantOut]
    emotion_timeline: list[EmotionAtTime]
    escalations: list[EscalationOut]
    transcript: list[TranscriptLine]
    counts: CallCounts
