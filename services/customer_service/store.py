"""The customer-service vertical's storage: calls and what happens on them, knowledge articles,
a tenant's assist settings. Every function takes the caller's :class:`~sqlalchemy.orm.Session`
(``session_scope()`` in the stream pipeline, ``SessionDep`` in a route) and leaves the commit to it;
every read and write is scoped to one tenant.

Concurrency: a call's utterance numbers and counters are advanced by one ``UPDATE ... RETURNING``
on the call row, so both tracks of a call may write from separate sessions; two streams opening
the same call at once end with one row (the loser of the insert reads the winner's).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.customer_service.assist_schemas import (
    ArticleIn,
    AssistSettings,
    AssistSettingsPatch,
    IntegrationsIn,
    IntegrationsOut,
)
from services.customer_service.db import (
    CALL_STATUSES,
    ENDED,
    LIVE,
    PARTIAL,
    PROTOCOLS,
    SPEAKERS,
    Article,
    Call,
    Escalation,
    Integration,
    Participant,
    TenantSettings,
    Utterance,
)
from services.customer_service.escalation import EscalationEvent, EscalationPolicy, normalised_probabilities
from services.customer_service.knowledge import Article as IndexedArticle
from services.customer_service.knowledge import KnowledgeIndex, RetrievalSettings
from shared.db import utcnow
from shared.errors import Conflict, NotFound, UnprocessableContent, parse_object

COMPLETED = "completed"
"""The end reason of a call closed as its protocol says (stop, close); any other leaves it partial."""
END_DETAIL_LENGTH = 200


# --- calls ---------------------------------------------------------------------------------------------

def open_call(session: Session, tenant_id: str, call_id: str, *, protocol: str, stream_id: str | None = None,
              language: str | None = None, details: Mapping[str, Any] | None = None,
              started_at: datetime | None = None) -> Call:
    """The call's row, created live at the start of its stream. A call id seen before (a reconnect,
    AudioHook's continued session) is the same call: it is live again with the new stream id."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if not call_id or len(call_id) > 128:
        raise ValueError("a call id is 1-128 characters")
    call = find_call(session, tenant_id, call_id)
    if call is None:
        call = Call(tenant_id=tenant_id, call_id=call_id, protocol=protocol, stream_id=stream_id, language=language,
                    details=dict(details or {}), started_at=started_at or utcnow())
        try:
            with session.begin_nested():
                session.add(call)
        except IntegrityError:  # another stream of the same call inserted it first
            call = get_call(session, tenant_id, call_id)
        else:
            return call
    call.status, call.ended_at, call.end_reason, call.end_detail = LIVE, None, None, None
    call.stream_id = stream_id or call.stream_id
    call.language = language or call.language
    session.flush()
    return call


def close_call(session: Session, tenant_id: str, call_id: str, *, reason: str, detail: str = "",
               ended_at: datetime | None = None) -> Call:
    """End a live call: ``ended`` when ``reason`` is ``completed``, else ``partial`` (its rows stay).
    A call already closed is left as it is (a stream's end may be reported twice)."""
    call = get_call(session, tenant_id, call_id)
    if call.status != LIVE:
        return call
    call.status = ENDED if reason == COMPLETED else PARTIAL
    call.end_reason = reason[:32]
    call.end_detail = detail[:END_DETAIL_LENGTH] or None
    call.ended_at = ended_at or utcnow()
    session.flush()
    return call


def abandon_stale_calls(session: Session, *, idle_since: datetime, reason: str = "abandoned") -> int:
    """Mark ``partial`` every call still live with no utterance (or start) since ``idle_since``: calls
    whose process died without closing them. Returns how many (all tenants: a startup sweep)."""
    quiet = (Call.last_utterance_at.is_(None) & (Call.started_at < idle_since)) | (Call.last_utterance_at < idle_since)
    result = session.execute(update(Call).where(Call.status == LIVE, quiet).values(
        status=PARTIAL, end_reason=reason, ended_at=utcnow()).execution_options(synchronize_session=False))
    return int(getattr(result, "rowcount", 0) or 0)


def find_call(session: Session, tenant_id: str, call_id: str) -> Call | None:
    """The tenant's call, or None."""
    return session.scalars(select(Call).where(Call.tenant_id == tenant_id, Call.call_id == call_id)).first()


def get_call(session: Session, tenant_id: str, call_id: str) -> Call:
    """The tenant's call; :class:`~shared.errors.NotFound` when it has none of that id."""
    call = find_call(session, tenant_id, call_id)
    if call is None:
        raise NotFound(f"call '{call_id}' does not exist for this tenant")
    return call


def list_live_calls(session: Session, tenant_id: str, *, limit: int = 500) -> list[Call]:
    """The tenant's live calls, oldest first (the supervisor's list)."""
    return list(session.scalars(select(Call).where(Call.tenant_id == tenant_id, Call.status == LIVE)
                                .order_by(Call.started_at, Call.id).limit(limit)))


@dataclass(frozen=True, slots=True)
class CallPosition:
    """Where a page of calls (newest first) ended: the last call's start and row id."""

    started_at: datetime
    row_id: int


def list_calls(session: Session, tenant_id: str, *, status: str | None = None, limit: int = 100,
               after: CallPosition | None = None) -> list[Call]:
    """The tenant's calls, newest first (by start, then row), those of ``status`` when given; the
    page after ``after`` (keyset paging: calls started meanwhile never shift a page)."""
    if status is not None and status not in CALL_STATUSES:
        raise ValueError(f"unknown call status {status!r}; known: {', '.join(CALL_STATUSES)}")
    query = select(Call).where(Call.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Call.status == status)
    if after is not None:
        query = query.where((Call.started_at < after.started_at)
                            | ((Call.started_at == after.started_at) & (Call.id < after.row_id)))
    return list(session.scalars(query.order_by(Call.started_at.desc(), Call.id.desc()).limit(limit)))


def add_participant(session: Session, call: Call, *, role: str, track: str,
                    external_id: str | None = None) -> Participant:
    """The call's party on ``track`` (the protocol's track name), added once."""
    if role not in SPEAKERS:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(SPEAKERS)}")
    existing = session.scalars(select(Participant).where(Participant.call_pk == call.id,
                                                         Participant.track == track)).first()
    if existing is not None:
        return existing
    participant = Participant(tenant_id=call.tenant_id, call_pk=call.id, role=role, track=track,
                              external_id=external_id)
    session.add(participant)
    session.flush()
    return participant


def call_participants(session: Session, call: Call) -> list[Participant]:
    """The call's parties in the order they joined."""
    return list(session.scalars(select(Participant).where(Participant.call_pk == call.id).order_by(Participant.id)))


def add_utterance(session: Session, call: Call, *, speaker: str, start_ms: int, end_ms: int,
                  transcript: str | None = None, redactions: Sequence[Mapping[str, Any]] = (),
                  emotion: str | None = None, emotion_probabilities: Mapping[str, float] | None = None,
                  valence: float | None = None, sentiment_trend: float | None = None, track: str | None = None,
                  suggested_article_id: str | None = None) -> Utterance:
    """Store the call's next utterance (``transcript`` already redacted; ``redactions`` its spans).

    It gets the next number of the call; a customer's utterance also becomes the call's current
    emotion and sentiment on the supervisor's list. ValueError for a bad speaker, offsets or
    probabilities.
    """
    probabilities = _checked_utterance(speaker, start_ms, end_ms, emotion_probabilities)
    now = utcnow()
    values: dict[str, Any] = {"utterance_count": Call.utterance_count + 1, "last_utterance_at": now}
    if speaker == "customer":
        values.update(current_emotion=emotion, sentiment_trend=sentiment_trend)
    seq = _advance(session, call, values, Call.utterance_count) - 1
    utterance = Utterance(tenant_id=call.tenant_id, call_pk=call.id, seq=seq, speaker=speaker, track=track,
                          start_ms=start_ms, end_ms=end_ms, transcript=transcript,
                          redactions=[dict(span) for span in redactions], emotion=emotion,
                          emotion_probabilities=probabilities, valence=valence, sentiment_trend=sentiment_trend,
                          suggested_article_id=suggested_article_id, created_at=now)
    session.add(utterance)
    session.flush()
    return utterance


def _checked_utterance(speaker: str, start_ms: int, end_ms: int,
                       probabilities: Mapping[str, float] | None) -> dict[str, float]:
    if speaker not in SPEAKERS:
        raise ValueError(f"unknown speaker {speaker!r}; known: {', '.join(SPEAKERS)}")
    if not 0 <= start_ms <= end_ms:
        raise ValueError(f"utterance offsets must satisfy 0 <= start_ms <= end_ms (got {start_ms}, {end_ms})")
    if not probabilities:
        return {}
    normalised_probabilities(probabilities)  # raises on negative, non-finite or all-zero values
    return {label: float(value) for label, value in probabilities.items()}


def _advance(session: Session, call: Call, values: Mapping[str, Any], counter: Any) -> int:
    """Apply ``values`` to the call row in one UPDATE and return ``counter``'s new value."""
    new_value = session.execute(update(Call).where(Call.id == call.id).values(**values).returning(counter)
                                .execution_options(synchronize_session=False)).scalar_one()
    session.expire(call)
    return int(new_value)


def call_utterances(session: Session, call: Call) -> list[Utterance]:
    """The call's utterances in order."""
    return list(session.scalars(select(Utterance).where(Utterance.call_pk == call.id).order_by(Utterance.seq)))


def add_escalation(session: Session, call: Call, event: EscalationEvent) -> Escalation:
    """Store an escalation the policy fired on the call (and count it on the supervisor's list)."""
    now = utcnow()
    _advance(session, call, {"escalation_count": Call.escalation_count + 1, "last_escalation_at": now},
             Call.escalation_count)
    escalation = Escalation(tenant_id=call.tenant_id, call_pk=call.id, rule=event.rule.value,
                            utterance_seq=event.utterance_index, at_ms=event.at_ms, evidence=dict(event.evidence),
                            created_at=now)
    session.add(escalation)
    session.flush()
    return escalation


def call_escalations(session: Session, call: Call) -> list[Escalation]:
    """The call's escalations in the order they fired."""
    return list(session.scalars(select(Escalation).where(Escalation.call_pk == call.id)
                                .order_by(Escalation.at_ms, Escalation.id)))


# --- knowledge articles --------------------------------------------------------------------------------

def create_article(session: Session, tenant_id: str, article: ArticleIn) -> Article:
    """Add an article (its id generated when the client gave none); Conflict when the id is taken.
    The id of a deleted article can be used again (the row comes back with a new version)."""
    article_id = article.id or uuid.uuid4().hex
    existing = session.get(Article, (tenant_id, article_id))
    if existing is not None and existing.deleted_at is None:
        raise Conflict(f"article '{article_id}' exists; PUT replaces it")
    if existing is not None:
        _write(existing, article)
        existing.deleted_at, existing.created_at = None, existing.updated_at
        session.flush()
        return existing
    now = utcnow()
    row = Article(tenant_id=tenant_id, article_id=article_id, title=article.title, body=article.body,
                  reply=article.reply, tags=list(article.tags), version=1, created_at=now, updated_at=now)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise Conflict(f"article '{article_id}' exists; PUT replaces it") from None
    return row


def replace_article(session: Session, tenant_id: str, article_id: str, article: ArticleIn) -> Article:
    """Replace an article's content (a new version); NotFound when absent, an id in the body must match."""
    if article.id is not None and article.id != article_id:
        raise UnprocessableContent(f"body id '{article.id}' does not match the article id '{article_id}'")
    row = get_article(session, tenant_id, article_id)
    _write(row, article)
    session.flush()
    return row


def _write(row: Article, article: ArticleIn) -> None:
    row.title, row.body, row.reply, row.tags = article.title, article.body, article.reply, list(article.tags)
    row.version += 1
    row.updated_at = utcnow()


def delete_article(session: Session, tenant_id: str, article_id: str) -> Article:
    """Delete an article (kept with ``deleted_at`` so every replica's index drops it); NotFound when absent."""
    row = get_article(session, tenant_id, article_id)
    row.deleted_at = row.updated_at = utcnow()
    row.version += 1
    session.flush()
    return row


def get_article(session: Session, tenant_id: str, article_id: str) -> Article:
    """The tenant's article; NotFound when absent or deleted."""
    row = session.get(Article, (tenant_id, article_id))
    if row is None or row.deleted_at is not None:
        raise NotFound(f"article '{article_id}' does not exist for this tenant")
    return row


def list_articles(session: Session, tenant_id: str, *, tag: str | None = None, limit: int = 100,
                  offset: int = 0) -> list[Article]:
    """The tenant's articles by id (those tagged ``tag`` when given: filtered here, as JSON columns
    differ between the databases; a knowledge base is small)."""
    rows = session.scalars(select(Article).where(Article.tenant_id == tenant_id, Article.deleted_at.is_(None))
                           .order_by(Article.article_id)).all()
    if tag is not None:
        rows = [row for row in rows if tag.lower() in row.tags]
    return list(rows[offset:offset + limit])


def articles_changed_since(session: Session, tenant_id: str, since: datetime | None) -> list[Article]:
    """The tenant's articles created, changed or deleted at or after ``since`` (all when None), oldest first."""
    query = select(Article).where(Article.tenant_id == tenant_id)
    if since is not None:
        query = query.where(Article.updated_at >= since)
    return list(session.scalars(query.order_by(Article.updated_at, Article.article_id)))


def indexed(row: Article) -> IndexedArticle:
    """The row as the retrieval index takes it."""
    return IndexedArticle(tenant_id=row.tenant_id, article_id=row.article_id, title=row.title, body=row.body,
                          tags=tuple(row.tags), reply=row.reply, updated_at=row.updated_at)


def sync_index(session: Session, index: KnowledgeIndex, tenant_id: str,
               since: datetime | None = None) -> datetime | None:
    """Bring ``index`` up to date with the tenant's articles changed since ``since`` (a whole load when
    None); returns the watermark for the next call (the latest change seen, or ``since``)."""
    rows = articles_changed_since(session, tenant_id, since)
    if since is None:
        index.replace_tenant(tenant_id, [indexed(row) for row in rows if row.deleted_at is None])
    else:
        for row in rows:
            if row.deleted_at is None:
                index.upsert(indexed(row))
            else:
                index.remove(tenant_id, row.article_id)
    return max((row.updated_at for row in rows), default=since)


# --- tenant settings -----------------------------------------------------------------------------------

def assist_settings(session: Session, tenant_id: str) -> AssistSettings:
    """The tenant's escalation policy and retrieval settings: the defaults with its overrides."""
    row = session.get(TenantSettings, tenant_id)
    escalation, retrieval = (row.escalation, row.retrieval) if row is not None else ({}, {})
    return AssistSettings(escalation=EscalationPolicy().with_overrides(escalation),
                          retrieval=RetrievalSettings.model_validate(retrieval))


def set_assist_settings(session: Session, tenant_id: str, patch: AssistSettingsPatch) -> AssistSettings:
    """Store the tenant's overrides: each section ``patch`` names replaces that section's overrides
    (null: back to the defaults), validated whole first (UnprocessableContent when invalid)."""
    row = session.get(TenantSettings, tenant_id) or TenantSettings(tenant_id=tenant_id, escalation={}, retrieval={})
    if "escalation" in patch.model_fields_set:
        overrides = patch.escalation or {}
        parse_object(EscalationPolicy, {**EscalationPolicy().model_dump(), **overrides}, loc=("body", "escalation"))
        row.escalation = dict(overrides)
    if "retrieval" in patch.model_fields_set:
        overrides = patch.retrieval or {}
        parse_object(RetrievalSettings, overrides, loc=("body", "retrieval"))
        row.retrieval = dict(overrides)
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return assist_settings(session, tenant_id)


# --- stream integrations -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class IntegrationCredentials:
    """A tenant's stream credentials as stored (each None until configured; detached from the session,
    so a caller may cache it)."""

    twilio_account_sid: str | None
    twilio_auth_token: str | None
    audiohook_client_secret: str | None
    """Base64, as the tenant configured it."""


def integration_credentials(session: Session, tenant_id: str) -> IntegrationCredentials | None:
    """The tenant's Twilio account and AudioHook client secret; None when it never configured any."""
    row = session.get(Integration, tenant_id)
    if row is None:
        return None
    return IntegrationCredentials(row.twilio_account_sid, row.twilio_auth_token, row.audiohook_client_secret)


def integrations(session: Session, tenant_id: str) -> IntegrationsOut:
    """Which of the tenant's stream credentials are set (the Twilio account SID, never a secret)."""
    row = session.get(Integration, tenant_id)
    if row is None:
        return IntegrationsOut()
    return IntegrationsOut(twilio_account_sid=row.twilio_account_sid,
                           twilio_auth_token_set=row.twilio_auth_token is not None,
                           audiohook_client_secret_set=row.audiohook_client_secret is not None,
                           updated_at=row.updated_at)


def set_integrations(session: Session, tenant_id: str, change: IntegrationsIn) -> IntegrationsOut:
    """Store the sections ``change`` names: ``twilio`` (SID and token together) and ``audiohook``;
    a section sent as null removes it, one left out stays as it is."""
    row = session.get(Integration, tenant_id) or Integration(tenant_id=tenant_id)
    if "twilio" in change.model_fields_set:
        twilio = change.twilio
        row.twilio_account_sid = twilio.account_sid if twilio else None
        row.twilio_auth_token = twilio.auth_token.get_secret_value() if twilio else None
    if "audiohook" in change.model_fields_set:
        audiohook = change.audiohook
        row.audiohook_client_secret = audiohook.client_secret.get_secret_value() if audiohook else None
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return integrations(session, tenant_id)
