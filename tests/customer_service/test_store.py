"""The customer-service storage on SQLite and on PostgreSQL, migrated: a call's life (live, ended,
partial, reopened), its participants, utterances and escalations, concurrent writers, the
supervisor's live list, knowledge articles and the retrieval index kept in step with them, and a
tenant's assist settings; every read scoped to its tenant."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from services.customer_service import store
from services.customer_service.assist_schemas import ArticleIn, ArticleOut, AssistSettingsPatch, LiveCall
from services.customer_service.db import Call, Utterance
from services.customer_service.escalation import EscalationEvent, Rule
from services.customer_service.knowledge import KnowledgeIndex
from shared.db import session_scope, utcnow
from shared.errors import Conflict, NotFound, UnprocessableContent
from tests.conftest import POSTGRESQL, SQLITE, Stack

pytestmark = pytest.mark.stack_variants(SQLITE, POSTGRESQL)
T = TypeVar("T")


@pytest.fixture
def tenant(migrated_stack: Stack) -> str:
    """A tenant of its own for each test (the database is shared by the module's tests)."""
    return f"cs-{uuid.uuid4().hex[:8]}"


def in_session(work: Callable[[Session], T]) -> T:
    with session_scope() as session:
        return work(session)


def open_twilio_call(session: Session, tenant: str, call_id: str = "CA1") -> Call:
    return store.open_call(session, tenant, call_id, protocol="twilio", stream_id="MZ1",
                           details={"tracks": ["inbound", "outbound"]})


def test_a_call_is_live_from_its_start_then_ended(tenant: str) -> None:
    with session_scope() as session:
        call = open_twilio_call(session, tenant)
        store.add_participant(session, call, role="customer", track="inbound")
        store.add_participant(session, call, role="agent", track="outbound", external_id="agent-7")
        store.add_participant(session, call, role="customer", track="inbound")  # once per track
    with session_scope() as session:
        [live] = store.list_live_calls(session, tenant)
        assert (live.call_id, live.protocol, live.status, live.stream_id) == ("CA1", "twilio", "live", "MZ1")
        assert live.details == {"tracks": ["inbound", "outbound"]} and live.started_at.tzinfo is not None
        assert [(p.role, p.track, p.external_id) for p in store.call_participants(session, live)] == [
            ("customer", "inbound", None), ("agent", "outbound", "agent-7")]
        ended = store.close_call(session, tenant, "CA1", reason="completed", detail="stop")
        assert (ended.status, ended.end_reason, ended.end_detail) == ("ended", "completed", "stop")
        assert ended.ended_at is not None
    with session_scope() as session:
        assert store.list_live_calls(session, tenant) == []
        again = store.close_call(session, tenant, "CA1", reason="disconnected")  # reported twice: unchanged
        assert (again.status, again.end_reason) == ("ended", "completed")


def test_a_stream_that_dies_leaves_the_partial_call_with_its_utterances(tenant: str) -> None:
    with session_scope() as session:
        call = store.open_call(session, tenant, "conv-1", protocol="audiohook")
        store.add_utterance(session, call, speaker="customer", start_ms=0, end_ms=900, transcript="hello")
        store.close_call(session, tenant, "conv-1", reason="disconnected", detail="x" * 500)
    with session_scope() as session:
        call = store.get_call(session, tenant, "conv-1")
        assert (call.status, call.end_reason, len(call.end_detail or "")) == ("partial", "disconnected", 200)
        assert [u.transcript for u in store.call_utterances(session, call)] == ["hello"]
        reopened = store.open_call(session, tenant, "conv-1", protocol="audiohook", stream_id="session-2")
        assert (reopened.id, reopened.status, reopened.ended_at, reopened.stream_id) == (call.id, "live", None,
                                                                                        "session-2")


def test_call_ids_are_unique_per_tenant_and_never_cross_tenants(tenant: str) -> None:
    other = f"{tenant}-other"
    with session_scope() as session:
        mine = open_twilio_call(session, tenant, "CA-same")
        theirs = open_twilio_call(session, other, "CA-same")
        assert mine.id != theirs.id
        store.add_utterance(session, theirs, speaker="customer", start_ms=0, end_ms=1, emotion="angry")
    with session_scope() as session:
        assert store.get_call(session, tenant, "CA-same").current_emotion is None
        assert [c.call_id for c in store.list_live_calls(session, other)] == ["CA-same"]
        with pytest.raises(NotFound, match="CA-none"):
            store.get_call(session, tenant, "CA-none")
        assert store.find_call(session, tenant, "CA-none") is None


def test_utterances_are_numbered_and_the_customers_set_the_calls_current_emotion(tenant: str) -> None:
    with session_scope() as session:
        call = open_twilio_call(session, tenant)
        first = store.add_utterance(
            session, call, speaker="customer", track="inbound", start_ms=100, end_ms=1900,
            transcript="my card is [CARD]", redactions=[{"kind": "card_number", "start": 11, "end": 30,
                                                          "redacted_start": 11, "redacted_end": 17}],
            emotion="angry", emotion_probabilities={"angry": 0.8, "neutral": 0.2}, valence=-0.8,
            sentiment_trend=-0.8, suggested_article_id="refund")
        second = store.add_utterance(session, call, speaker="agent", start_ms=2000, end_ms=3000, emotion="neutral",
                                     emotion_probabilities={"neutral": 1.0}, valence=0.0, sentiment_trend=0.0)
        assert (first.seq, second.seq) == (0, 1)
    with session_scope() as session:
        call = store.get_call(session, tenant, "CA1")
        assert (call.utterance_count, call.current_emotion, call.sentiment_trend) == (2, "angry", -0.8)
        assert call.last_utterance_at is not None
        rows = store.call_utterances(session, call)
        assert [(u.seq, u.speaker, u.emotion) for u in rows] == [(0, "customer", "angry"), (1, "agent", "neutral")]
        assert rows[0].redactions[0]["kind"] == "card_number" and rows[0].emotion_probabilities == {
            "angry": 0.8, "neutral": 0.2}
        assert rows[0].suggested_article_id == "refund" and rows[0].track == "inbound"
        [live] = store.list_live_calls(session, tenant)
        summary = LiveCall.model_validate(live)
        assert (summary.current_emotion, summary.utterance_count, summary.escalation_count) == ("angry", 2, 0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"speaker": "bot", "start_ms": 0, "end_ms": 1}, "unknown speaker"),
    ({"speaker": "customer", "start_ms": 5, "end_ms": 1}, "start_ms <= end_ms"),
    ({"speaker": "customer", "start_ms": -1, "end_ms": 1}, "start_ms <= end_ms"),
    ({"speaker": "customer", "start_ms": 0, "end_ms": 1, "emotion_probabilities": {"angry": -1.0}}, "probability"),
])
def test_bad_utterances_are_refused_before_anything_is_written(tenant: str, kwargs: dict[str, object],
                                                              message: str) -> None:
    with session_scope() as session:
        call = open_twilio_call(session, tenant)
        with pytest.raises(ValueError, match=message):
            store.add_utterance(session, call, **kwargs)  # type: ignore[arg-type]
        assert store.get_call(session, tenant, "CA1").utterance_count == 0


def test_bad_calls_are_refused(tenant: str) -> None:
    with session_scope() as session:
        with pytest.raises(ValueError, match="unknown protocol"):
            store.open_call(session, tenant, "CA1", protocol="sip")
        with pytest.raises(ValueError, match="1-128"):
            store.open_call(session, tenant, "x" * 129, protocol="twilio")
        call = open_twilio_call(session, tenant)
        with pytest.raises(ValueError, match="unknown role"):
            store.add_participant(session, call, role="bot", track="inbound")


def run_in_threads(count: int, work: Callable[[int], object]) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_both_tracks_writing_at_once_get_distinct_numbers(tenant: str) -> None:
    in_session(lambda session: open_twilio_call(session, tenant))

    def write(worker: int) -> None:
        for i in range(5):
            with session_scope() as session:
                call = store.get_call(session, tenant, "CA1")
                store.add_utterance(session, call, speaker="customer" if worker % 2 else "agent",
                                    start_ms=i, end_ms=i + 1)

    run_in_threads(4, write)
    with session_scope() as session:
        call = store.get_call(session, tenant, "CA1")
        assert call.utterance_count == 20
        assert [u.seq for u in store.call_utterances(session, call)] == list(range(20))


def test_two_streams_opening_one_call_at_once_make_one_row(tenant: str) -> None:
    run_in_threads(4, lambda i: in_session(lambda session: store.open_call(session, tenant, "CA-race",
                                                                           protocol="twilio")))
    with session_scope() as session:
        assert len(session.scalars(select(Call).where(Call.tenant_id == tenant)).all()) == 1


def test_escalations_are_stored_with_their_evidence_and_counted(tenant: str) -> None:
    event = EscalationEvent(Rule.EMOTION, 3, 4200, {"threshold": 0.6, "utterances": [{"index": 3, "anger": 0.9}]})
    with session_scope() as session:
        call = open_twilio_call(session, tenant)
        store.add_escalation(session, call, event)
        store.add_escalation(session, call, EscalationEvent(Rule.KEYWORD, 5, 7000, {"keyword": "supervisor"}))
    with session_scope() as session:
        call = store.get_call(session, tenant, "CA1")
        assert call.escalation_count == 2 and call.last_escalation_at is not None
        rows = store.call_escalations(session, call)
        assert [(e.rule, e.utterance_seq, e.at_ms) for e in rows] == [("emotion", 3, 4200), ("keyword", 5, 7000)]
        assert rows[0].evidence == event.evidence


def test_a_deleted_call_takes_its_rows_with_it(tenant: str) -> None:
    with session_scope() as session:
        call = open_twilio_call(session, tenant)
        store.add_participant(session, call, role="customer", track="inbound")
        store.add_utterance(session, call, speaker="customer", start_ms=0, end_ms=1)
        store.add_escalation(session, call, EscalationEvent(Rule.KEYWORD, 0, 1, {}))
        call_pk = call.id
    with session_scope() as session:
        session.execute(delete(Call).where(Call.id == call_pk))
    with session_scope() as session:
        assert session.scalars(select(Utterance).where(Utterance.call_pk == call_pk)).all() == []


def test_calls_left_live_by_a_dead_process_are_swept_partial(tenant: str) -> None:
    long_ago = utcnow() - timedelta(hours=2)
    with session_scope() as session:
        store.open_call(session, tenant, "stale", protocol="twilio", started_at=long_ago)
        talking = store.open_call(session, tenant, "talking", protocol="twilio", started_at=long_ago)
        store.add_utterance(session, talking, speaker="customer", start_ms=0, end_ms=1)
        store.open_call(session, tenant, "fresh", protocol="twilio")
    with session_scope() as session:
        assert store.abandon_stale_calls(session, idle_since=utcnow() - timedelta(hours=1)) >= 1
    with session_scope() as session:
        assert sorted(c.call_id for c in store.list_live_calls(session, tenant)) == ["fresh", "talking"]
        stale = store.get_call(session, tenant, "stale")
        assert (stale.status, stale.end_reason) == ("partial", "abandoned")


REFUND = ArticleIn(id="refund", title="Refund policy", body="Refunds go back to the card within five days.",
                   tags=["Billing", "billing"])


def test_articles_are_created_replaced_listed_and_deleted(tenant: str) -> None:
    with session_scope() as session:
        row = store.create_article(session, tenant, REFUND)
        generated = store.create_article(session, tenant, ArticleIn(title="Hours", body="We open at nine.",
                                                                    reply="We open at nine."))
        assert (row.version, row.tags) == (1, ["billing"]) and len(generated.article_id) == 32
        with pytest.raises(Conflict, match="refund"):
            store.create_article(session, tenant, REFUND)
    with session_scope() as session:
        replaced = store.replace_article(session, tenant, "refund", REFUND.model_copy(update={"title": "Refunds"}))
        assert (replaced.version, replaced.title) == (2, "Refunds") and replaced.updated_at >= replaced.created_at
        with pytest.raises(UnprocessableContent, match="does not match"):
            store.replace_article(session, tenant, "other", REFUND)
        assert [a.article_id for a in store.list_articles(session, tenant, tag="billing")] == ["refund"]
        assert len(store.list_articles(session, tenant)) == 2
        out = ArticleOut.model_validate(store.get_article(session, tenant, "refund"))
        assert (out.id, out.version, out.tags) == ("refund", 2, ["billing"])
    with session_scope() as session:
        store.delete_article(session, tenant, "refund")
        with pytest.raises(NotFound):
            store.get_article(session, tenant, "refund")
        with pytest.raises(NotFound):
            store.delete_article(session, tenant, "refund")
        assert [a.article_id for a in store.list_articles(session, tenant)] == [generated.article_id]
        again = store.create_article(session, tenant, REFUND)  # a deleted id can be used again
        assert again.version == 4 and again.deleted_at is None


def test_articles_of_another_tenant_are_invisible(tenant: str) -> None:
    with session_scope() as session:
        store.create_article(session, tenant, REFUND)
        store.create_article(session, f"{tenant}-b", REFUND)  # the same id in another tenant is no conflict
        store.delete_article(session, f"{tenant}-b", "refund")
        assert store.get_article(session, tenant, "refund").deleted_at is None
        with pytest.raises(NotFound):
            store.replace_article(session, f"{tenant}-c", "refund", REFUND)


def test_the_retrieval_index_follows_the_articles(tenant: str) -> None:
    index = KnowledgeIndex()
    password = ArticleIn(id="password", title="Reset a password", body="Send the reset link to the email on file.")
    with session_scope() as session:
        store.create_article(session, tenant, REFUND)
        store.create_article(session, tenant, password)
        store.create_article(session, f"{tenant}-b", ArticleIn(id="x", title="Refund", body="Refund in cash."))
        watermark = store.sync_index(session, index, tenant)
    assert index.count(tenant) == 2 and not index.holds(f"{tenant}-b")
    suggestion = index.suggest(tenant, "where is my refund")
    assert suggestion is not None and suggestion.article_id == "refund"
    with session_scope() as session:
        store.delete_article(session, tenant, "refund")
        store.replace_article(session, tenant, "password", password.model_copy(update={"body": "Unlock it."}))
        watermark = store.sync_index(session, index, tenant, watermark)
    assert index.count(tenant) == 1 and index.search(tenant, "refund") == []
    with session_scope() as session:
        assert store.sync_index(session, index, tenant, watermark) == watermark  # nothing new: same watermark


def test_assist_settings_are_the_defaults_with_a_tenants_overrides(tenant: str) -> None:
    with session_scope() as session:
        defaults = store.assist_settings(session, tenant)
        assert defaults.escalation.anger_threshold == 0.6 and defaults.retrieval.min_score == 1.0
        changed = store.set_assist_settings(session, tenant, AssistSettingsPatch(
            escalation={"anger_threshold": 0.8, "keywords": ["Refund now"]}, retrieval={"min_score": 0.2}))
        assert changed.escalation.anger_threshold == 0.8 and changed.escalation.keywords == ("refund now",)
        assert changed.retrieval.min_score == 0.2
    with session_scope() as session:
        with pytest.raises(UnprocessableContent, match="anger_release_threshold"):
            store.set_assist_settings(session, tenant, AssistSettingsPatch(escalation={"anger_threshold": 0.1}))
        with pytest.raises(UnprocessableContent, match="min_score"):
            store.set_assist_settings(session, tenant, AssistSettingsPatch(retrieval={"min_score": -1}))
    with session_scope() as session:
        kept = store.assist_settings(session, tenant)
        assert kept.escalation.anger_threshold == 0.8 and kept.retrieval.min_score == 0.2
        partly = store.set_assist_settings(session, tenant, AssistSettingsPatch(escalation=None))
        assert partly.escalation.anger_threshold == 0.6 and partly.retrieval.min_score == 0.2
        assert store.assist_settings(session, f"{tenant}-b").retrieval.min_score == 1.0
