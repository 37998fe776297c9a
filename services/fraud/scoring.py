"""Scoring one transaction: window state -> batched features + model -> rules -> decision -> recorded.

Two state stores, one semantics (a resend of the same transaction id gets the stored answer and
changes no feature; an answered transaction is never lost):

- the database (embedded default): two short visits, reading the window state on the DBAPI cursor
  (:mod:`services.fraud.state`) and then committing the decision before it is answered (on
  SQLite both on the event loop for an approval; in a worker thread otherwise);
- Redis (``TESSERA_REDIS_URL`` set): one Lua script before the model and one after, on the event
  loop; the database row is written behind, in batches (:mod:`services.fraud.recorder`).

Features are built with the model, in the runtime's batch (:func:`services.fraud.serving.score_batch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from redis.exceptions import RedisError
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from model_runtime.runtime import get_runtime
from services.fraud.db import Case, Transaction
from services.fraud.features import FEATURE_NAMES, WindowAggregates
from services.fraud.redis_state import RedisWindowState, split_answer, wait_while_busy
from services.fraud.rules import ActiveRules, RuleHit, evaluate_rules, load_active_rules
from services.fraud.schemas import (
    DECISION_SEVERITY,
    TRANSACTION_FIELDS,
    Decision,
    DecisionOut,
    Reason,
    TenantSettingsIn,
    TransactionIn,
)
from services.fraud.serving import ScoredItem, ScoringItem, model_name_for
from services.fraud.state import read_window_state
from shared.cache import FreshnessBoundedCache
from shared.db import get_engine, session_factory
from shared.errors import Conflict, NotReady
from shared.kv import redis_configured, redis_multiplexer, redis_unavailable_as_503
from shared.security import Tenant

logger = logging.getLogger("tessera.fraud.scoring")

TENANT_CACHE_MAX_AGE_S = 1.0
"""Tenant settings, rules and webhook secrets changed on any replica are used everywhere within 1 s."""
TENANT_CACHE_REFRESH_AFTER_S = 0.5
TENANT_CACHE_STALE_IF_ERROR_S = 30.0


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """A tenant's webhook secrets, thresholds and active rules, cached per process for at most 1 s."""

    webhook_secrets: tuple[str, ...]
    settings: TenantSettingsIn
    rules: ActiveRules


def load_tenant_policy(tenant_id: str) -> TenantPolicy:
    """Read a tenant's policy from the database (unknown tenants get no secrets: every signature fails)."""
    with session_factory()() as session:
        tenant = session.get(Tenant, tenant_id)
        secrets = tuple(s for s in (tenant.webhook_secret, tenant.previous_webhook_secret) if s) if tenant else ()
        return TenantPolicy(webhook_secrets=secrets, settings=tenant_settings(session, tenant_id),
                            rules=load_active_rules(session, tenant_id))


class TenantPolicyCache(FreshnessBoundedCache[str, TenantPolicy]):
    """Per-process cache of tenant policies: a change committed at time T (on any replica) is used by
    no request that starts after T + ``TENANT_CACHE_MAX_AGE_S`` (:class:`~shared.cache.FreshnessBoundedCache`).

    A policy in use is read again in the background after ``TENANT_CACHE_REFRESH_AFTER_S``, so a
    busy process reads each tenant about twice a second and no request waits for it; the first
    request after an idle second waits for one read. A database that cannot be read is a 503 once
    the last policy read is ``TENANT_CACHE_STALE_IF_ERROR_S`` past its age limit.
    """

    def __init__(self) -> None:
        super().__init__(lambda tenant_id: load_tenant_policy(tenant_id), name="a tenant policy",
                         max_age_s=TENANT_CACHE_MAX_AGE_S, refresh_after_s=TENANT_CACHE_REFRESH_AFTER_S,
                         stale_if_error_s=TENANT_CACHE_STALE_IF_ERROR_S)

    async def get(self, key: str) -> TenantPolicy:
        """The tenant's policy, fresh within the bound; 503 when the database cannot be read."""
        try:
            return await super().get(key)
        except SQLAlchemyError as exc:
            raise NotReady("tenant settings cannot be read right now; retry shortly",
                           headers={"Retry-After": "1"}) from exc


tenant_policies = TenantPolicyCache()


def tenant_settings(session: Session, tenant_id: str) -> TenantSettingsIn:
    """The tenant's fraud settings (defaults when never set)."""
    tenant = session.get(Tenant, tenant_id)
    raw = (tenant.settings or {}).get("fraud", {}) if tenant else {}
    return TenantSettingsIn.model_validate(raw)


def stored_decision(row: Transaction) -> DecisionOut:
    """The answer recorded for a transaction (what a resend gets back)."""
    return DecisionOut(transaction_id=row.transaction_id, decision=Decision(row.decision), score=row.score,
                       reasons=[Reason.model_validate(r) for r in row.reasons],
                       model_version=row.model_version, rules_version=row.rules_version, replayed=True)


def request_digest(tx: TransactionIn) -> str:
    """sha256 of the validated transaction's canonical JSON: what a resend of its id must match.

    Bodies that differ only in form (key order, spacing, ``+01:00`` for the same instant in ``Z``,
    ``42.50`` for ``42.5``) have the same digest.
    """
    return hashlib.sha256(tx.model_dump_json().encode()).hexdigest()


class TransactionIdReused(Conflict):
    """A transaction id already scored for a different transaction (Stripe's idempotency-key rule)."""

    type_slug = "transaction-id-reused"


def check_same_request(transaction_id: str, stored_digest: str | None, digest: str) -> None:
    """409 unless the request stored under ``transaction_id`` had ``digest`` (a stored decision
    without a digest, from before digests were kept, replays as before)."""
    if stored_digest is not None and stored_digest != digest:
        raise TransactionIdReused(
            f"transaction id '{transaction_id}' was already used for a different transaction: a resend must "
            "repeat the original body; a new transaction needs a new id", transaction_id=transaction_id)


def _stored_in_database(tenant_id: str, transaction_id: str, digest: str) -> DecisionOut | None:
    with session_factory()() as session:
        existing = session.get(Transaction, (tenant_id, transaction_id))
        if existing is None:
            return None
        check_same_request(transaction_id, existing.request_digest, digest)
        return stored_decision(existing)


def _scoring_item(tx: TransactionIn, aggregates: WindowAggregates, policy: TenantPolicy) -> ScoringItem:
    return ScoringItem(amount=tx.amount, tx_datetime=tx.timestamp.replace(tzinfo=None),
                       tx_time_s=tx.timestamp.timestamp(), terminal_id=tx.terminal_id, aggregates=aggregates,
                       explain_from=policy.settings.review_threshold)


def _read_state(tenant_id: str, tx: TransactionIn, digest: str) -> DecisionOut | WindowAggregates:
    """The stored answer for a resend (409 if its body differs), else the window state from the database."""
    aggregates = read_window_state(get_engine(), tenant_id=tenant_id, transaction_id=tx.id,
                                   customer_id=tx.customer_id, terminal_id=tx.terminal_id,
                                   tx_time_s=tx.timestamp.timestamp(), amount=tx.amount)
    if aggregates is not None:
        return aggregates
    stored = _stored_in_database(tenant_id, tx.id, digest)
    assert stored is not None, "decision rows are never deleted"
    return stored


def decide(score: float, hits: list[RuleHit], settings: TenantSettingsIn) -> Decision:
    """The most severe of the threshold decision and every rule hit's action."""
    decision = Decision.approve
    if score >= settings.decline_threshold:
        decision = Decision.decline
    elif score >= settings.review_threshold:
        decision = Decision.review
    for hit in hits:
        if DECISION_SEVERITY[hit.action] > DECISION_SEVERITY[decision]:
            decision = hit.action
    return decision


def explain(hits: list[RuleHit], contributions: tuple[tuple[str, float], ...]) -> list[Reason]:
    """Rule hits first, then the model's top contributions that pushed the score up."""
    reasons = [Reason(source="rule", code=hit.rule_id, description=hit.description) for hit in hits]
    reasons += [
        Reason(source="model", code=name, description=f"{name} raised the score",
               contribution=round(value, 4))
        for name, value in contributions if value > 0
    ]
    return reasons


def rule_facts(tx: TransactionIn, features: np.ndarray, score: float) -> dict[str, Any]:
    """Everything a rule may test, by name."""
    facts: dict[str, Any] = {name: getattr(tx, name) for name in TRANSACTION_FIELDS}
    facts["channel"] = tx.channel.value
    facts.update(zip(FEATURE_NAMES, features.tolist(), strict=True))
    facts["score"] = score
    return facts


def decision_record(tenant_id: str, tx: TransactionIn, features: np.ndarray, out: DecisionOut,
                    digest: str | None = None) -> dict[str, Any]:
    """The ``fraud_transactions`` row of a decision, as plain values (``digest``: of ``tx`` if not given)."""
    return {
        "tenant_id": tenant_id, "transaction_id": tx.id, "customer_id": tx.customer_id,
        "terminal_id": tx.terminal_id, "tx_time_s": tx.timestamp.timestamp(), "amount": tx.amount,
        "currency": tx.currency, "channel": tx.channel.value, "score": out.score, "decision": out.decision.value,
        "reasons": [r.model_dump(exclude_none=True) for r in out.reasons],
        "features": [round(float(v), 6) for v in features.tolist()], "model_version": out.model_version,
        "rules_version": out.rules_version, "received_at_s": time.time(),
        "request_digest": digest or request_digest(tx),
    }


_INSERT_DECISION = insert(Transaction)


def _store(tenant_id: str, tx: TransactionIn, features: np.ndarray, out: DecisionOut,
           on_flagged: Any | None, digest: str) -> DecisionOut:
    """Commit the decision; a concurrent duplicate that committed first wins and is returned (409 if
    its body differs)."""
    record = decision_record(tenant_id, tx, features, out, digest)
    record["received_at"] = datetime.fromtimestamp(record.pop("received_at_s"), UTC)
    try:
        if out.decision == Decision.approve:
            _insert_approval(record)
        else:
            _insert_flagged(record, tenant_id, out, on_flagged)
    except IntegrityError:  # a concurrent duplicate committed first: its answer (409 if it differs)
        stored = _stored_in_database(tenant_id, tx.id, digest)
        if stored is None:
            raise
        return stored
    return out


def _insert_approval(record: dict[str, Any]) -> None:
    """No case, no callback: one INSERT, without the ORM's work."""
    with get_engine().connect() as connection:
        connection.execute(_INSERT_DECISION, record)
        connection.commit()


def _insert_flagged(record: dict[str, Any], tenant_id: str, out: DecisionOut, on_flagged: Any | None) -> None:
    """The row, its case and (``on_flagged``) its callback job, in one transaction."""
    with session_factory()() as session:
        session.add(Transaction(**record))
        session.flush()  # a duplicate fails here, before any case or callback is written
        session.add(Case(tenant_id=tenant_id, transaction_id=out.transaction_id))
        if on_flagged is not None:
            on_flagged(session, tenant_id, out)
        session.commit()


def _decision(tx: TransactionIn, policy: TenantPolicy, scored: ScoredItem, model_version: str) -> DecisionOut:
    hits = evaluate_rules(policy.rules.rules, rule_facts(tx, scored.features, scored.score))
    return DecisionOut(
        transaction_id=tx.id, decision=decide(scored.score, hits, policy.settings),
        score=round(scored.score, 6), reasons=explain(hits, scored.contributions), model_version=model_version,
        rules_version=policy.rules.version,
    )


def _model_version(model: str) -> str:
    return get_runtime().version(model)


async def score_transaction(tenant_id: str, tx: TransactionIn, policy: TenantPolicy, *,
                            on_flagged: Any | None = None) -> DecisionOut:
    """Score, decide, record and answer one transaction (idempotent by ``tx.id``).

    With Redis configured the window state and the answer live there and the row is written
    behind (:mod:`services.fraud.redis_state`, :mod:`services.fraud.recorder`, which also opens the
    case and queues the callback); otherwise the database is the state and the decision is
    committed before it is answered, ``on_flagged(session, tenant_id, decision)`` running inside
    that transaction for review and decline decisions.
    """
    digest = request_digest(tx)
    if redis_configured():
        return await _score_with_redis(tenant_id, tx, policy, digest)
    # On SQLite the read (~0.1 ms that never waits) and an approval's INSERT (~0.1 ms behind the
    # in-process write gate) run on the loop: thread hops cost more in GIL hand-offs than they
    # overlapped (wrk, 400/s: p99 20-105 -> 11-14 ms). Flagged decisions also queue a callback on
    # the broker: those stay in a thread, as does every visit to a server database.
    on_loop = get_engine().dialect.name == "sqlite"
    if on_loop:
        state = _read_state(tenant_id, tx, digest)
    else:
        state = await asyncio.to_thread(_read_state, tenant_id, tx, digest)
    if isinstance(state, DecisionOut):
        return state
    model = model_name_for(tenant_id)
    scored: ScoredItem = await get_runtime().predict(model, _scoring_item(tx, state, policy))
    out = _decision(tx, policy, scored, _model_version(model))
    if on_loop and out.decision == Decision.approve:
        return _store(tenant_id, tx, scored.features, out, on_flagged, digest)
    return await asyncio.to_thread(_store, tenant_id, tx, scored.features, out, on_flagged, digest)


MAX_RESERVE_ATTEMPTS = 4


async def _reserve(state: RedisWindowState, tenant_id: str, tx: TransactionIn,
                   digest: str) -> DecisionOut | WindowAggregates:
    """Window state for a new transaction, or the answer a resend (or a concurrent duplicate) gets
    (409 when its body differs from the one answered)."""
    takeover = False
    for _ in range(MAX_RESERVE_ATTEMPTS):
        reservation = await state.reserve(tenant_id, tx.id, tx.customer_id, tx.terminal_id,
                                          tx.timestamp.timestamp(), tx.amount, takeover=takeover)
        if reservation.aggregates is not None:
            return reservation.aggregates
        if reservation.answer is not None:
            return checked_replay(tx.id, reservation.answer, digest)
        if reservation.status == "busy":
            answer = await wait_while_busy(state, tenant_id, tx.id)
            if answer is not None:
                return checked_replay(tx.id, answer, digest)
            continue  # the duplicate's lease lapsed: its process died; reserve again
        stored = await asyncio.to_thread(_stored_in_database, tenant_id, tx.id, digest)
        if stored is not None:
            return stored
        takeover = True  # in the windows but never answered: a crashed attempt, score it now
    raise Conflict("a duplicate of this transaction is still being scored; retry shortly",
                   headers={"Retry-After": "1"})


def replayed_answer(value: bytes) -> DecisionOut:
    """A stored answer (an answer key's value, :func:`~services.fraud.redis_state.split_answer`) as a resend gets it."""
    _digest, answer = split_answer(value)
    return DecisionOut.model_validate_json(answer).model_copy(update={"replayed": True})


def checked_replay(transaction_id: str, value: bytes, digest: str) -> DecisionOut:
    """The stored answer for a resend whose request has ``digest`` (409 if the stored one differs)."""
    check_same_request(transaction_id, split_answer(value)[0], digest)
    return replayed_answer(value)


async def _score_with_redis(tenant_id: str, tx: TransactionIn, policy: TenantPolicy, digest: str) -> DecisionOut:
    with redis_unavailable_as_503("fraud window state"):  # nothing was answered: a retry is safe
        return await _score_with_redis_state(tenant_id, tx, policy, digest)


async def _score_with_redis_state(tenant_id: str, tx: TransactionIn, policy: TenantPolicy,
                                  digest: str) -> DecisionOut:
    state = redis_window_state()
    prepared = await _reserve(state, tenant_id, tx, digest)
    if isinstance(prepared, DecisionOut):
        return prepared
    try:
        model = model_name_for(tenant_id)
        scored: ScoredItem = await get_runtime().predict(model, _scoring_item(tx, prepared, policy))
        out = _decision(tx, policy, scored, _model_version(model))
    except BaseException:  # 503 overload, 504 deadline, a cancelled caller: nothing was answered
        with contextlib.suppress(RedisError):  # else the lease lapses by itself
            await asyncio.shield(state.release(tenant_id, tx.id))
        raise
    winner = await state.commit(tenant_id, tx.id, out.model_dump_json().encode(),
                                decision_record(tenant_id, tx, scored.features, out, digest), digest)
    return out if winner is None else checked_replay(tx.id, winner, digest)


def redis_window_state() -> RedisWindowState:
    """The Redis window state over the running event loop's :class:`~shared.kv.RedisMultiplexer`."""
    multiplexer = redis_multiplexer()
    state = _redis_states.get(multiplexer)
    if state is None:
        state = _redis_states[multiplexer] = RedisWindowState(multiplexer)
    return state


_redis_states: weakref.WeakKeyDictionary[Any, RedisWindowState] = weakref.WeakKeyDictionary()
"""Keyed by the multiplexer itself, not its id(): a closed one's id may be reused by the next one."""


def score_transaction_sync(tenant_id: str, tx: TransactionIn, policy: TenantPolicy) -> DecisionOut:
    """The database-state path of :func:`score_transaction` for worker processes (back-tests)."""
    digest = request_digest(tx)
    state = _read_state(tenant_id, tx, digest)
    if isinstance(state, DecisionOut):
        return state
    model = model_name_for(tenant_id)
    [scored] = get_runtime().predict_many_sync(model, [_scoring_item(tx, state, policy)])
    out = _decision(tx, policy, scored, _model_version(model))
    return _store(tenant_id, tx, scored.features, out, None, digest)
