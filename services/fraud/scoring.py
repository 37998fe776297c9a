"""Scoring one transaction: window state -> features -> batched model -> rules -> decision -> stored.

The request path does two short database visits in a worker thread (read the window state, then
write the decision) and awaits the model through the shared runtime, where concurrent requests are
batched. The decision is committed before it is answered, so an answered transaction is never lost;
a resend of the same transaction id returns the stored answer and changes no feature.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from model_runtime.runtime import get_runtime
from services.fraud.db import Case, Transaction
from services.fraud.features import FEATURE_NAMES, feature_vector, sequence_matrix
from services.fraud.rules import ActiveRules, RuleHit, evaluate_rules, load_active_rules
from services.fraud.schemas import (
    DECISION_SEVERITY,
    Decision,
    DecisionOut,
    Reason,
    TenantSettingsIn,
    TransactionIn,
)
from services.fraud.serving import FRAUD_MODEL_NAME
from services.fraud.state import read_aggregates
from shared.db import session_factory
from shared.security import Tenant

logger = logging.getLogger("tessera.fraud.scoring")

TENANT_CACHE_TTL_S = 10.0
TRANSACTION_FIELDS = ("amount", "currency", "channel", "merchant_category", "customer_id", "terminal_id")
RULE_FIELDS: frozenset[str] = frozenset((*TRANSACTION_FIELDS, *FEATURE_NAMES, "score"))
"""What a rule condition may name."""


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """The runtime's output for one transaction."""

    score: float
    contributions: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """A tenant's webhook secrets, thresholds and active rules, cached briefly per process."""

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


class TenantPolicyCache:
    """Per-process cache of tenant policies; a change is seen within ``TENANT_CACHE_TTL_S``."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, TenantPolicy]] = {}

    async def get(self, tenant_id: str) -> TenantPolicy:
        """The cached policy, re-read in a worker thread when stale."""
        now = time.monotonic()
        cached = self._entries.get(tenant_id)
        if cached and cached[0] > now:
            return cached[1]
        policy = await asyncio.to_thread(load_tenant_policy, tenant_id)
        self._entries[tenant_id] = (now + TENANT_CACHE_TTL_S, policy)
        return policy

    def invalidate(self, tenant_id: str) -> None:
        """Forget a tenant (after its rules or settings change in this process)."""
        self._entries.pop(tenant_id, None)


tenant_policies = TenantPolicyCache()


def tenant_settings(session: Session, tenant_id: str) -> TenantSettingsIn:
    """The tenant's fraud settings (defaults when never set)."""
    tenant = session.get(Tenant, tenant_id)
    raw = (tenant.settings or {}).get("fraud", {}) if tenant else {}
    return TenantSettingsIn.model_validate(raw)


@dataclass(frozen=True)
class _Prepared:
    """What the read visit produced: either a stored answer or the model inputs."""

    stored: DecisionOut | None
    features: np.ndarray | None = None
    sequence: np.ndarray | None = None


def stored_decision(row: Transaction) -> DecisionOut:
    """The answer recorded for a transaction (what a resend gets back)."""
    return DecisionOut(transaction_id=row.transaction_id, decision=Decision(row.decision), score=row.score,
                       reasons=[Reason.model_validate(r) for r in row.reasons],
                       model_version=row.model_version, rules_version=row.rules_version, replayed=True)


def _read_state(tenant_id: str, tx: TransactionIn) -> _Prepared:
    """The stored answer for a resend, else the model inputs from the window state."""
    with session_factory()() as session:
        existing = session.get(Transaction, (tenant_id, tx.id))
        if existing is not None:
            return _Prepared(stored=stored_decision(existing))
        t = tx.timestamp.timestamp()
        aggregates = read_aggregates(session, tenant_id=tenant_id, customer_id=tx.customer_id,
                                     terminal_id=tx.terminal_id, tx_time_s=t, amount=tx.amount)
    features = feature_vector(tx.amount, tx.timestamp.replace(tzinfo=None), aggregates)
    sequence = sequence_matrix(tx.amount, t, tx.terminal_id, aggregates.card_history)
    return _Prepared(stored=None, features=features, sequence=sequence)


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


def explain(hits: list[RuleHit], answer: ModelAnswer) -> list[Reason]:
    """Rule hits first, then the model's top contributions that pushed the score up."""
    reasons = [Reason(source="rule", code=hit.rule_id, description=hit.description) for hit in hits]
    reasons += [
        Reason(source="model", code=name, description=f"{name} raised the score",
               contribution=round(value, 4))
        for name, value in answer.contributions if value > 0
    ]
    return reasons


def rule_facts(tx: TransactionIn, features: np.ndarray, score: float) -> dict[str, Any]:
    """Everything a rule may test, by name."""
    facts: dict[str, Any] = {name: getattr(tx, name) for name in TRANSACTION_FIELDS}
    facts["channel"] = tx.channel.value
    facts.update(zip(FEATURE_NAMES, features.tolist(), strict=True))
    facts["score"] = score
    return facts


def _store(tenant_id: str, tx: TransactionIn, features: np.ndarray, out: DecisionOut,
           on_flagged: Any | None) -> DecisionOut:
    """Commit the decision; a concurrent duplicate that committed first wins and is returned."""
    with session_factory()() as session:
        try:
            session.add(Transaction(
                tenant_id=tenant_id, transaction_id=tx.id, customer_id=tx.customer_id,
                terminal_id=tx.terminal_id, tx_time_s=tx.timestamp.timestamp(), amount=tx.amount,
                currency=tx.currency, channel=tx.channel.value, score=out.score, decision=out.decision.value,
                reasons=[r.model_dump(exclude_none=True) for r in out.reasons],
                features=[round(float(v), 6) for v in features], model_version=out.model_version,
                rules_version=out.rules_version,
            ))
            session.flush()  # a duplicate fails here, before any case or callback is written
            if out.decision != Decision.approve:
                session.add(Case(tenant_id=tenant_id, transaction_id=tx.id))
                if on_flagged is not None:
                    on_flagged(session, tenant_id, out)
            session.commit()
        except IntegrityError:
            session.rollback()
            winner = session.get(Transaction, (tenant_id, tx.id))
            if winner is None:
                raise
            return stored_decision(winner)
    return out


def _decision(tx: TransactionIn, policy: TenantPolicy, features: np.ndarray, score: float,
              contributions: tuple[tuple[str, float], ...], model_version: str) -> DecisionOut:
    answer = ModelAnswer(score=score, contributions=contributions)
    hits = evaluate_rules(policy.rules.rules, rule_facts(tx, features, answer.score))
    return DecisionOut(
        transaction_id=tx.id, decision=decide(answer.score, hits, policy.settings),
        score=round(answer.score, 6), reasons=explain(hits, answer), model_version=model_version,
        rules_version=policy.rules.version,
    )


async def score_transaction(tenant_id: str, tx: TransactionIn, policy: TenantPolicy, *,
                            on_flagged: Any | None = None) -> DecisionOut:
    """Score, decide, store and answer one transaction (idempotent by ``tx.id``).

    ``on_flagged(session, tenant_id, decision)`` runs inside the storing transaction for review and
    decline decisions (the API uses it to enqueue the bank callback after commit).
    """
    prepared = await asyncio.to_thread(_read_state, tenant_id, tx)
    if prepared.stored is not None:
        return prepared.stored
    assert prepared.features is not None
    runtime = get_runtime()
    item = (prepared.features, prepared.sequence, policy.settings.review_threshold)
    score, contributions = await runtime.predict(FRAUD_MODEL_NAME, item)
    out = _decision(tx, policy, prepared.features, score, contributions,
                    runtime.loaded()[FRAUD_MODEL_NAME]["version"])
    return await asyncio.to_thread(_store, tenant_id, tx, prepared.features, out, on_flagged)


def score_transaction_sync(tenant_id: str, tx: TransactionIn, policy: TenantPolicy) -> DecisionOut:
    """The same as :func:`score_transaction` for worker processes (no event loop, no callbacks)."""
    prepared = _read_state(tenant_id, tx)
    if prepared.stored is not None:
        return prepared.stored
    assert prepared.features is not None
    runtime = get_runtime()
    item = (prepared.features, prepared.sequence, policy.settings.review_threshold)
    [(score, contributions)] = runtime.predict_many_sync(FRAUD_MODEL_NAME, [item])
    out = _decision(tx, policy, prepared.features, score, contributions,
                    runtime.loaded()[FRAUD_MODEL_NAME]["version"])
    return _store(tenant_id, tx, prepared.features, out, None)
