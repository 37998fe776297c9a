"""Tables of the customer-service vertical (names prefixed ``cs_``), every row owned by a tenant.

- :class:`Call`: one call from the start of its stream, keyed by the platform's id (Twilio
  ``callSid``, AudioHook ``conversationId``; unique per tenant); ``live`` until it ends, then
  ``ended`` or ``partial`` (the stream died: disconnected or a protocol error) with its reason. It
  carries what the supervisor's list of live calls shows (current emotion, sentiment trend,
  escalation count), updated with each utterance and escalation.
- :class:`Participant`: a party of a call by role (``customer``/``agent``) and the protocol's
  track name (Twilio ``inbound``/``outbound``, AudioHook ``external``/``internal``). No phone
  number or name is stored.
- :class:`Utterance`: one utterance of a call: speaker, offsets from the start of the stream, the
  transcript with PII already redacted (and where: kinds and spans, never values), emotion label
  and probabilities, valence and the speaker's sentiment trend, the suggested article.
- :class:`Escalation`: a time the escalation policy fired, with its rule and evidence.
- :class:`Article`: the knowledge base suggested replies come from; a deletion keeps the row
  (``deleted_at``) so every replica's index can see it went.
- :class:`TenantSettings`: a tenant's overrides of the escalation policy and of retrieval.
- :class:`Integration`: a tenant's stream credentials: the Twilio account (SID and the auth token
  that signs its streams) and the AudioHook client secret (base64, as Genesys shows it). Kept
  retrievable, as the platform's webhook secrets are: checking a signature needs the secret itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, utcnow

CALL_ID_LENGTH = 128
LIVE, ENDED, PARTIAL = "live", "ended", "partial"
CALL_STATUSES = (LIVE, ENDED, PARTIAL)
"""A call is live while its stream runs, then ended (closed as the protocol says) or partial (the stream died)."""
PROTOCOLS = ("twilio", "audiohook", "vonage", "upload")
SPEAKERS = ("customer", "agent")


class Call(Base):
    """One call, from the start of its stream (kept partial when the stream dies)."""

    __tablename__ = "cs_calls"
    __table_args__ = (
        Index("ix_cs_calls_tenant_call", "tenant_id", "call_id", unique=True),
        Index("ix_cs_calls_tenant_status", "tenant_id", "status", "started_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    call_id: Mapped[str] = mapped_column(String(CALL_ID_LENGTH), doc="Twilio callSid / AudioHook conversationId")
    protocol: Mapped[str] = mapped_column(String(16), doc="twilio, audiohook, vonage or upload")
    stream_id: Mapped[str | None] = mapped_column(String(CALL_ID_LENGTH), default=None,
                                                  doc="Twilio streamSid / AudioHook session id")
    language: Mapped[str | None] = mapped_column(String(16), default=None)
    status: Mapped[str] = mapped_column(String(16), default=LIVE)
    end_reason: Mapped[str | None] = mapped_column(String(32), default=None,
                                                   doc="completed, disconnected, protocol-error, ...")
    end_detail: Mapped[str | None] = mapped_column(String(200), default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
    utterance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_utterance_at: Mapped[datetime | None] = mapped_column(default=None)
    current_emotion: Mapped[str | None] = mapped_column(String(32), default=None,
                                                        doc="of the customer's latest utterance")
    sentiment_trend: Mapped[float | None] = mapped_column(Float, default=None, doc="the customer's, in [-1, 1]")
    escalation_count: Mapped[int] = mapped_column(Integer, default=0)
    last_escalation_at: Mapped[datetime | None] = mapped_column(default=None)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict,
                                                    doc="the protocol's non-personal details (tracks, formats)")


class Participant(Base):
    """A party of a call: its role and the protocol's name of its track."""

    __tablename__ = "cs_participants"
    __table_args__ = (Index("ix_cs_participants_call_track", "call_pk", "track", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    call_pk: Mapped[int] = mapped_column(ForeignKey("cs_calls.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16), doc="customer or agent")
    track: Mapped[str] = mapped_column(String(32), doc="inbound/outbound (Twilio), external/internal (AudioHook)")
    external_id: Mapped[str | None] = mapped_column(String(128), default=None, doc="the platform's participant id")
    joined_at: Mapped[datetime] = mapped_column(default=utcnow)


class Utterance(Base):
    """One utterance of a call, its transcript already redacted."""

    __tablename__ = "cs_utterances"
    __table_args__ = (
        Index("ix_cs_utterances_call_seq", "call_pk", "seq", unique=True),
        Index("ix_cs_utterances_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    call_pk: Mapped[int] = mapped_column(ForeignKey("cs_calls.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer, doc="0, 1, ... in the call")
    speaker: Mapped[str] = mapped_column(String(16), doc="customer or agent")
    track: Mapped[str | None] = mapped_column(String(32), default=None, doc="the protocol's track name")
    start_ms: Mapped[int] = mapped_column(Integer, doc="from the start of the stream")
    end_ms: Mapped[int] = mapped_column(Integer)
    transcript: Mapped[str | None] = mapped_column(Text, default=None, doc="PII redacted")
    redactions: Mapped[list[dict[str, Any]]] = mapped_column(default=list, doc="kind and spans, never values")
    emotion: Mapped[str | None] = mapped_column(String(32), default=None)
    emotion_probabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    valence: Mapped[float | None] = mapped_column(Float, default=None)
    sentiment_trend: Mapped[float | None] = mapped_column(Float, default=None, doc="the speaker's, after this one")
    suggested_article_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Escalation(Base):
    """A time the escalation policy fired on a call."""

    __tablename__ = "cs_escalations"
    __table_args__ = (
        Index("ix_cs_escalations_call", "call_pk", "at_ms"),
        Index("ix_cs_escalations_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    call_pk: Mapped[int] = mapped_column(ForeignKey("cs_calls.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(String(32), doc="emotion, keyword or negative_streak")
    utterance_seq: Mapped[int | None] = mapped_column(Integer, default=None, doc="the utterance that fired it")
    at_ms: Mapped[int] = mapped_column(Integer, doc="from the start of the stream")
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Article(Base):
    """A knowledge-base article of a tenant (``deleted_at`` set: deleted, kept for the replicas' indexes)."""

    __tablename__ = "cs_articles"
    __table_args__ = (Index("ix_cs_articles_tenant_updated", "tenant_id", "updated_at"),)

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    article_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    reply: Mapped[str | None] = mapped_column(Text, default=None, doc="the reply to suggest (else the body's start)")
    tags: Mapped[list[str]] = mapped_column(default=list)
    version: Mapped[int] = mapped_column(Integer, default=1, doc="1 when created, +1 at each change")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class TenantSettings(Base):
    """A tenant's overrides of the escalation policy and of retrieval (fields of
    :class:`~services.customer_service.escalation.EscalationPolicy` and
    :class:`~services.customer_service.knowledge.RetrievalSettings`)."""

    __tablename__ = "cs_tenant_settings"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    escalation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    retrieval: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Integration(Base):
    """A tenant's stream credentials (each part absent until configured); the API shows which are set, never
    the secrets."""

    __tablename__ = "cs_integrations"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    twilio_account_sid: Mapped[str | None] = mapped_column(String(64), default=None)
    twilio_auth_token: Mapped[str | None] = mapped_column(String(128), default=None)
    audiohook_client_secret: Mapped[str | None] = mapped_column(String(256), default=None, doc="base64")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
