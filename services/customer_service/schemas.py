"""The public contract of the customer-service API: one utterance's analysis, a call's summary.

Provisional: issue 18 builds the endpoints and may still change these shapes; until then every
endpoint answers 501 and nothing returns them. The stream protocols' messages are Twilio's and
Genesys AudioHook's own (``../shared/reference/callcentre_protocols.md``), not models here.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

EmotionProbabilities = dict[str, float]
"""Probability of each emotion label (they sum to 1)."""


class UtteranceAnalysis(BaseModel):
    """What one utterance said and how it sounded (provisional)."""

    transcript: str | None = Field(default=None, description="speech-to-text (or the transcript sent), PII redacted")
    emotion: str = Field(description="the most probable emotion label")
    emotion_probabilities: EmotionProbabilities


class EmotionAtTime(BaseModel):
    """One utterance on a call's emotion timeline (provisional)."""

    start_ms: int = Field(ge=0, description="from the start of the call")
    end_ms: int = Field(ge=0)
    speaker: str = Field(description="the participant, e.g. customer or agent")
    emotion: str
    emotion_probabilities: EmotionProbabilities


class Escalation(BaseModel):
    """A time the escalation policy fired on a call (provisional)."""

    at_ms: int = Field(ge=0, description="from the start of the call")
    reason: str = Field(description="which rule fired: emotion over threshold, keyword, negative streak")


class TranscriptLine(BaseModel):
    """One utterance of a call's transcript, PII redacted (provisional)."""

    start_ms: int = Field(ge=0)
    speaker: str
    text: str


class CallSummary(BaseModel):
    """A call's summary: emotion timeline, escalations, redacted transcript (provisional)."""

    call_id: str = Field(description="Twilio's callSid or AudioHook's conversationId")
    emotion_timeline: list[EmotionAtTime] = Field(default_factory=list)
    escalations: list[Escalation] = Field(default_factory=list)
    transcript: list[TranscriptLine] = Field(default_factory=list)
