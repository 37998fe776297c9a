"""The window-state store contract (:mod:`shared.window_state`), run against every fraud store.

Each test runs on the database store over SQLite and over PostgreSQL (no Redis), and on the Redis
store (PostgreSQL + Redis), as :func:`~services.fraud.window_store.window_store` chooses it from the
settings: what scoring, labels and lookups rely on holds whichever store a deployment has.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import uuid4

import numpy as np
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.orm import Session

from services.fraud import redis_state
from services.fraud.features import FEATURE_NAMES, SECONDS_PER_DAY, WindowAggregates
from services.fraud.schemas import Decision, DecisionOut, TransactionIn
from services.fraud.scoring import decision_record, request_digest
from services.fraud.state import TransactionIdReused, stored_in_database
from services.fraud.window_store import FraudWindowStore, window_store
from shared.db import session_scope
from shared.errors import NotReady
from shared.kv import close_async_redis
from shared.window_state import WindowBackend
from tests.conftest import STATE_STORES, Stack, apply_stack_in_process

T0 = 1_790_000_000.0
"""An event time (2026-09-21)."""
FEATURES = np.zeros(len(FEATURE_NAMES))
ResultT = TypeVar("ResultT")


@dataclasses.dataclass
class Subject:
    """A store under test, the tenant its data belongs to, and the stack behind it."""

    store: FraudWindowStore
    tenant_id: str
    stack: Stack

    def run(self, scenario: Callable[[FraudWindowStore], Awaitable[ResultT]]) -> ResultT:
        """Run ``scenario(store)`` on a fresh event loop inside the store's connections (as an app's lifespan)."""

        async def connected() -> ResultT:
            async with self.store.connected():
                return await scenario(self.store)

        return asyncio.run(connected())


pytestmark = pytest.mark.stack_variants(*STATE_STORES)


@pytest.fixture
def subject(migrated_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Subject]:
    """The store this process chooses for each stack variant, with a tenant of its own."""
    stack = migrated_stack
    tenant_id = f"ws-{uuid4().hex[:8]}"
    stream = f"fraud:decisions:test-{uuid4().hex[:8]}"  # decisions of this test stay out of any recorder's way
    monkeypatch.setattr(redis_state, "DECISION_STREAM", stream)
    store = window_store()
    expected = WindowBackend.REDIS if stack.redis_url else WindowBackend.DATABASE
    assert store.backend is expected and window_store() is store
    yield Subject(store, tenant_id, stack)
    if stack.redis_url:
        client = redis.Redis.from_url(stack.redis_url)
        client.delete(stream, *client.scan_iter(match=f"fraud:{{{tenant_id}}}*"))
        client.close()


def transaction(tx_id: str, at: float = T0, amount: float = 10.0, terminal_id: str = "term-1",
                customer_id: str = "cust-1") -> TransactionIn:
    return TransactionIn(id=tx_id, timestamp=datetime.fromtimestamp(at, UTC), customer_id=customer_id,
                         terminal_id=terminal_id, amount=amount)


def decided(tx: TransactionIn, score: float = 0.1, outcome: Decision = Decision.approve) -> DecisionOut:
    return DecisionOut(transaction_id=tx.id, decision=outcome, score=score, reasons=[], model_version="test",
                       rules_version=0)


async def admitted_windows(store: FraudWindowStore, tenant_id: str, tx: TransactionIn) -> WindowAggregates:
    admitted = await store.admit(tenant_id, tx, request_digest(tx))
    assert isinstance(admitted, WindowAggregates), admitted
    return admitted


async def score(store: FraudWindowStore, tenant_id: str, tx: TransactionIn, answer: DecisionOut, *,
                on_flagged: Any = None) -> DecisionOut:
    """What scoring does around the model: admit, (the model: one turn of the loop), commit."""
    digest = request_digest(tx)
    admitted = await store.admit(tenant_id, tx, digest)
    if isinstance(admitted, DecisionOut):
        return admitted
    await asyncio.sleep(0)
    return await store.commit(tenant_id, tx, answer, decision_record(tenant_id, tx, FEATURES, answer, digest),
                              on_flagged=on_flagged)


def test_a_transaction_counts_once_and_a_resend_replays_its_answer(subject: Subject) -> None:
    first, later = transaction("tx-1", amount=10.0), transaction("tx-2", at=T0 + 60, amount=20.0)

    async def scenario(store: FraudWindowStore) -> None:
        windows = await admitted_windows(store, subject.tenant_id, first)
        assert (windows.customer_count_1h, windows.customer_amount_sum_1h, windows.terminal_count_1h) == (1, 10.0, 1)
        assert windows.seconds_since_prev_customer_tx is None and windows.card_history == ()
        answer = decided(first)
        assert await store.commit(subject.tenant_id, first, answer,
                                  decision_record(subject.tenant_id, first, FEATURES, answer)) == answer
        for _ in range(2):
            resend = await store.admit(subject.tenant_id, first, request_digest(first))
            assert resend == answer.model_copy(update={"replayed": True})
        windows = await admitted_windows(store, subject.tenant_id, later)
        assert (windows.customer_count_1h, windows.customer_amount_sum_1h, windows.terminal_count_1h) == (2, 30.0, 2)
        assert windows.seconds_since_prev_customer_tx == 60.0
        assert windows.card_history == ((T0, 10.0, "term-1"),)

    subject.run(scenario)


def test_a_resend_with_another_body_is_refused(subject: Subject) -> None:
    tx = transaction("tx-reused")
    changed = tx.model_copy(update={"amount": 99.0})

    async def scenario(store: FraudWindowStore) -> None:
        await score(store, subject.tenant_id, tx, decided(tx))
        with pytest.raises(TransactionIdReused):
            await store.admit(subject.tenant_id, changed, request_digest(changed))

    subject.run(scenario)


def test_concurrent_duplicates_get_one_answer_and_count_once(subject: Subject) -> None:
    """Two requests for one transaction in flight together: the first committed answer is both
    callers' (the database store's insert race, the Redis store's lease), and it counts once."""
    tx, later = transaction("tx-dup"), transaction("tx-after", at=T0 + 60)

    async def scenario(store: FraudWindowStore) -> tuple[DecisionOut, DecisionOut, WindowAggregates]:
        one, other = await asyncio.gather(score(store, subject.tenant_id, tx, decided(tx, 0.1)),
                                          score(store, subject.tenant_id, tx, decided(tx, 0.2)))
        return one, other, await admitted_windows(store, subject.tenant_id, later)

    one, other, windows = subject.run(scenario)
    assert one.score == other.score and sorted([one.replayed, other.replayed]) == [False, True]
    assert windows.customer_count_1h == 2 and windows.terminal_count_1h == 2


@pytest.mark.parametrize("outcome", [Decision.approve, Decision.review])
def test_a_duplicate_admitted_before_the_first_commit_loses_the_race(subject: Subject, outcome: Decision) -> None:
    """Both admitted before either committed (the database store's integrity-error race; the Redis
    store tells the second one to wait, so it is admitted only after the first one's answer)."""
    tx = transaction(f"tx-race-{outcome}")
    flagged: list[str] = []

    def on_flagged(session: Session, tenant_id: str, out: DecisionOut) -> None:
        flagged.append(out.transaction_id)

    async def scenario(store: FraudWindowStore) -> tuple[DecisionOut, DecisionOut]:
        digest = request_digest(tx)
        first_answer, second_answer = decided(tx, 0.1, outcome), decided(tx, 0.2, outcome)
        assert isinstance(await store.admit(subject.tenant_id, tx, digest), WindowAggregates)
        if not store.written_behind:
            assert isinstance(await store.admit(subject.tenant_id, tx, digest), WindowAggregates)
        first = await store.commit(subject.tenant_id, tx, first_answer,
                                   decision_record(subject.tenant_id, tx, FEATURES, first_answer, digest),
                                   on_flagged=on_flagged)
        second = await store.commit(subject.tenant_id, tx, second_answer,
                                    decision_record(subject.tenant_id, tx, FEATURES, second_answer, digest),
                                    on_flagged=on_flagged)
        return first, second

    first, second = subject.run(scenario)
    assert first.score == second.score == 0.1 and not first.replayed and second.replayed
    if not subject.store.written_behind:
        assert flagged == ([] if outcome is Decision.approve else [tx.id])
        with session_scope() as session:
            cases = session.execute(text("SELECT count(*) FROM fraud_cases WHERE tenant_id = :t"),
                                    {"t": subject.tenant_id}).scalar_one()
        assert cases == (0 if outcome is Decision.approve else 1)


def test_a_released_admission_is_admitted_again_and_counted_once(subject: Subject) -> None:
    """Scoring failed after the admission (503 overload, 504 deadline): the retry is admitted at once."""
    tx, later = transaction("tx-shed"), transaction("tx-next", at=T0 + 60)

    async def scenario(store: FraudWindowStore) -> tuple[WindowAggregates, WindowAggregates]:
        await admitted_windows(store, subject.tenant_id, tx)
        await store.release(subject.tenant_id, tx)
        retried = await admitted_windows(store, subject.tenant_id, tx)
        answer = decided(tx)
        await store.commit(subject.tenant_id, tx, answer, decision_record(subject.tenant_id, tx, FEATURES, answer))
        return retried, await admitted_windows(store, subject.tenant_id, later)

    retried, windows = subject.run(scenario)
    assert retried.customer_count_1h == 1 and windows.customer_count_1h == 2


def test_an_answer_can_be_read_back_at_once(subject: Subject) -> None:
    """A flagged decision just answered: its row (``on_flagged`` ran in its transaction) or, while a
    written-behind row is on its way, the store's answer (the recorder opens case and callback)."""
    tx = transaction("tx-flagged")
    flagged: list[str] = []

    def on_flagged(session: Session, tenant_id: str, out: DecisionOut) -> None:
        flagged.append(out.transaction_id)

    answer = decided(tx, 0.9, Decision.review)
    subject.run(lambda store: score(store, subject.tenant_id, tx, answer, on_flagged=on_flagged))
    row = stored_in_database(subject.tenant_id, tx.id, request_digest(tx))
    unrecorded = subject.store.unrecorded_answer(subject.tenant_id, tx.id)
    replayed = answer.model_copy(update={"replayed": True})
    if subject.store.written_behind:
        assert row is None and unrecorded == replayed and flagged == []
    else:
        assert row == replayed and unrecorded is None and flagged == [tx.id]
    assert subject.store.unrecorded_answer(subject.tenant_id, "tx-never-seen") is None


def test_a_label_moves_terminal_risk_and_a_reversed_one_moves_it_back(subject: Subject) -> None:
    """Labelled fraud counts in the terminal's delayed windows ((t - 7 d - W, t - 7 d]) once the store
    has recorded the label and the caller committed the row's ``is_fraud``, as feedback does."""
    labelled, week_later = transaction("tx-fraud", terminal_id="term-t"), T0 + 7 * SECONDS_PER_DAY + 12 * 3600

    def label(is_fraud: bool) -> None:
        subject.store.record_label(subject.tenant_id, "term-t", labelled.id, T0, is_fraud)
        with session_scope() as session:
            session.execute(text("UPDATE fraud_transactions SET is_fraud = :f WHERE tenant_id = :t AND "
                                 "transaction_id = :i"), {"f": is_fraud, "t": subject.tenant_id, "i": labelled.id})

    async def terminal_risk(store: FraudWindowStore, tx_id: str) -> tuple[int, int]:
        windows = await admitted_windows(store, subject.tenant_id,
                                         transaction(tx_id, at=week_later, terminal_id="term-t", customer_id="c-2"))
        return windows.terminal_count_delayed_1d, windows.terminal_fraud_delayed_1d

    subject.run(lambda store: score(store, subject.tenant_id, labelled, decided(labelled)))
    label(True)
    assert subject.run(lambda store: terminal_risk(store, "tx-after-label")) == (1, 1)
    label(False)
    assert subject.run(lambda store: terminal_risk(store, "tx-after-reversal")) == (1, 0)


def test_an_unreachable_redis_store_is_503_and_not_ready(postgres_stack: Stack,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is admitted, looked up or labelled without Redis: each is a 503 the caller may retry;
    releasing never raises (the lease lapses by itself); readiness fails."""
    from redis.exceptions import RedisError

    apply_stack_in_process(dataclasses.replace(postgres_stack, redis_url="redis://127.0.0.1:1/0"), monkeypatch)
    store = window_store()
    tx = transaction("tx-unreachable")

    async def scenario() -> None:
        try:
            with pytest.raises(NotReady) as refused:
                await store.admit("bank", tx, request_digest(tx))
            assert refused.value.headers == {"Retry-After": "1"}
            await store.release("bank", tx)
            with pytest.raises(RedisError):
                await store.check_ready()
        finally:
            await close_async_redis()

    asyncio.run(scenario())
    with pytest.raises(NotReady):
        store.unrecorded_answer("bank", tx.id)
    with pytest.raises(NotReady):
        store.record_label("bank", "term-1", tx.id, T0, True)
