"""Proposed public shapes of agent assist: knowledge articles, escalations, the supervisor's live
calls, a suggested reply, a tenant's assist settings.

They are what :mod:`services.customer_service.store` reads and writes; the API (``api.py``) may
publish them as they are or fold them into :mod:`services.customer_service.schemas`.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from services.customer_service.escalation import EscalationPolicy
from services.customer_service.knowledge import RetrievalSettings

ARTICLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_TAGS = 20
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9:_-]{0,39}$")
TAG_INPUT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9:_-]{0,39}$"
"""A tag as sent (stripped; any case: stored lower-case), stated in the schema as the API enforces it."""


class ArticleIn(BaseModel):
    """A knowledge-base article as a client sends it (create or replace)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str | None = Field(default=None, pattern=ARTICLE_ID_PATTERN,
                           description="the client's id (letters, digits, . _ -); generated on create when absent")
    title: str = Field(min_length=1, max_length=300)
    body: str = Field(min_length=1, max_length=20_000)
    reply: str | None = Field(default=None, max_length=2_000,
                              description="the reply to suggest; absent: the body's first sentences")
    tags: list[Annotated[str, Field(pattern=TAG_INPUT_PATTERN)]] = Field(default_factory=list, max_length=MAX_TAGS,
                            description="lower-case labels; `apology`, `de-escalation`, `empathy` are boosted for "
                                        "angry, frustrated or sad callers")

    @field_validator("tags")
    @classmethod
    def _tags_lower_and_unique(cls, tags: list[str]) -> list[str]:
        normalised = list(dict.fromkeys(tag.strip().lower() for tag in tags))
        for tag in normalised:
            if not TAG_PATTERN.match(tag):
                raise ValueError(f"tag {tag!r}: 1-40 of a-z, 0-9, ':', '_', '-', starting with a letter or digit")
        return normalised


class ArticleOut(BaseModel):
    """A stored article."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(validation_alias="article_id")
    title: str
    body: str
    reply: str | None
    tags: list[str]
    version: int = Field(description="1 when created, +1 at each change")
    created_at: datetime
    updated_at: datetime


class SuggestedReply(BaseModel):
    """The knowledge base's answer to one utterance (absent when nothing scores the tenant's minimum)."""

    article_id: str
    title: str
    reply: str
    score: float = Field(description="BM25 score after the emotion boost")
    boost: float = Field(default=1.0, description="the emotion boost applied (1: none)")


class EscalationOut(BaseModel):
    """A time the escalation policy fired on a call."""

    model_config = ConfigDict(from_attributes=True)

    rule: str = Field(description="emotion, keyword or negative_streak")
    at_ms: int = Field(ge=0, description="from the start of the call")
    utterance_seq: int | None = Field(default=None, description="the utterance that fired it")
    evidence: dict[str, Any] = Field(description="what made it fire: the utterances and their anger or valence, "
                                                 "or the keyword")
    created_at: datetime | None = Field(default=None, description="when stored (absent on the live feed)")


class LiveCall(BaseModel):
    """One live call on the supervisor's list."""

    model_config = ConfigDict(from_attributes=True)

    call_id: str
    protocol: str
    started_at: datetime
    utterance_count: int
    current_emotion: str | None = Field(description="of the customer's latest utterance")
    sentiment_trend: float | None = Field(description="the customer's, in [-1, 1]")
    escalation_count: int
    last_escalation_at: datetime | None


class AssistSettings(BaseModel):
    """A tenant's agent-assist settings in force: the escalation policy and retrieval, defaults
    overridden by what the tenant set."""

    escalation: EscalationPolicy
    retrieval: RetrievalSettings


class AssistSettingsPatch(BaseModel):
    """Overrides to store for a tenant: any fields of the policy and of retrieval (null: back to the defaults)."""

    model_config = ConfigDict(extra="forbid")

    escalation: dict[str, Any] | None = None
    retrieval: dict[str, Any] | None = None


class RedactionSpanOut(BaseModel):
    """Where PII was redacted in a transcript: its kind and offsets, never its value."""

    kind: str = Field(description="card_number, cvv, phone, email or ssn")
    start: int = Field(ge=0, description="in the transcript as recognised (not sent)")
    end: int = Field(ge=0)
    redacted_start: int = Field(ge=0, description="where its tag stands in the redacted transcript")
    redacted_end: int = Field(ge=0)


class UtteranceAssist(BaseModel):
    """One event of the agent-assist feed, per utterance: what was said (redacted), how it sounded,
    where the speaker's sentiment is heading, what fired, and what the agent might reply."""

    type: str = Field(default="utterance", description="the event type on the feed")
    call_id: str
    seq: int = Field(ge=0, description="the utterance's number in the call")
    speaker: str = Field(description="customer or agent")
    start_ms: int = Field(ge=0)
    end_ms: int = Field(ge=0)
    transcript: str | None = Field(default=None, description="PII redacted")
    redactions: list[RedactionSpanOut] = Field(default_factory=list)
    emotion: str | None = None
    emotion_probabilities: dict[str, float] = Field(default_factory=dict)
    valence: float | None = Field(default=None, description="expected valence of the emotion, in [-1, 1]")
    sentiment_trend: float | None = Field(default=None, description="the speaker's EWMA of valence")
    trend_direction: str | None = Field(default=None, description="improving, worsening or steady")
    escalations: list[EscalationOut] = Field(default_factory=list, description="rules this utterance fired")
    suggestion: SuggestedReply | None = None


class TwilioIntegrationIn(BaseModel):
    """A tenant's Twilio account: its SID (``start.accountSid`` of a stream must be it) and the auth
    token that signs its streams (``X-Twilio-Signature``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$", description="AC followed by 32 hex digits")
    auth_token: SecretStr = Field(min_length=16, max_length=128, description="the account's (or a secondary) "
                                  "auth token; write-only")


class AudioHookIntegrationIn(BaseModel):
    """The client secret Genesys AudioHook signs its connections with (RFC 9421 hmac-sha256)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    client_secret: SecretStr = Field(min_length=4, max_length=256, description="base64, as the AudioHook "
                                     "integration shows it; write-only")

    @field_validator("client_secret")
    @classmethod
    def _base64(cls, secret: SecretStr) -> SecretStr:
        try:
            decoded = base64.b64decode(secret.get_secret_value(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("client_secret is not base64") from None
        if len(decoded) < 16:
            raise ValueError("client_secret decodes to fewer than 16 bytes")
        return secret


class IntegrationsIn(BaseModel):
    """Stream credentials to store: each section sent replaces that integration's, ``null`` removes
    it, a section left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    twilio: TwilioIntegrationIn | None = None
    audiohook: AudioHookIntegrationIn | None = None


class IntegrationsOut(BaseModel):
    """Which stream credentials a tenant has set; secrets are never shown."""

    twilio_account_sid: str | None = Field(default=None, description="the Twilio account (not a secret)")
    twilio_auth_token_set: bool = False
    audiohook_client_secret_set: bool = False
    updated_at: datetime | None = None
