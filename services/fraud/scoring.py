"""Scoring one transaction: window state -> batched features + model -> rules -> decision -> recorded.

The window state comes from the process's :func:`~services.fraud.window_store.window_store`; two
stores, one semantics (a resend of the same transaction id gets the stored answer and changes no
feature; an answered transaction is never lost):

- the database (embedded default): two short visits, reading the window state on the DBAPI cursor
  and then committing the decision before it is answered (on SQLite both on the event loop for an
  approval; in a worker thread otherwise), :class:`~services.fraud.state.DatabaseWindowStore`;
- Redis (``TESSERA_REDIS_URL`` set): one Lua script before the model and one after, on the event
  loop; the database row is written behind, in batches (:mod:`services.fraud.recorder`),
  :class:`~services.fraud.redis_state.RedisWindowStore`.

Features are built with the model, in the runtime's batch (:func:`services.fraud.serving.score_batch`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from model_runtime.runtime import get_runtime
from services.fraud.features import FEATURE_NAMES, WindowAggregates
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
from services.fraud.state import DatabaseWindowStore, FlaggedHook
from services.fraud.window_store import window_store
from shared.cache import FreshnessBoundedCache
from shared.db import session_factory
from shared.errors import NotReady
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


def request_digest(tx: TransactionIn) -> str:
    """sha256 of the validated transaction's canonical JSON: what a resend of its id must match.

    Bodies that differ only in form (key order, spacing, ``+01:00`` for the same instant in ``Z``,
    ``42.50`` for ``42.5``) have the same digest.
    """
    return hashlib.sha256(tx.model_dump_json().encode()).hexdigest()


def _scoring_item(tx: TransactionIn, aggregates: WindowAggregates, policy: TenantPolicy) -> ScoringItem:
    return ScoringItem(amount=tx.amount, tx_datetime=tx.timestamp.replace(tzinfo=None),
                       tx_time_s=tx.timestamp.timestamp(), terminal_id=tx.terminal_id, aggregates=aggregates,
                       explain_from=policy.settings.review_threshold)


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
                            on_flagged: FlaggedHook | None = None) -> DecisionOut:
    """Score, decide, record and answer one transaction (idempotent by ``tx.id``).

    The store admits the transaction (its windows, or the stored answer of a resend), the model
    scores it, and the store commits the decision, whose winner is answered. With Redis the row is
    written behind (:mod:`services.fraud.recorder` also opens the case and queues the callback);
    with the database the decision is committed before it is answered, ``on_flagged(session,
    tenant_id, decision)`` running inside that transaction for review and decline decisions.
    """
    digest = request_digest(tx)
    store = window_store()
    admitted = await store.admit(tenant_id, tx, digest)
    if isinstance(admitted, DecisionOut):
        return admitted
    try:
        model = model_name_for(tenant_id)
        scored: ScoredItem = await get_runtime().predict(model, _scoring_item(tx, admitted, policy))
        out = _decision(tx, policy, scored, _model_version(model))
    except BaseException:  # 503 overload, 504 deadline, a cancelled caller: nothing was answered
        await store.release(tenant_id, tx)
        raise
    return await store.commit(tenant_id, tx, out, decision_record(tenant_id, tx, scored.features, out, digest),
                              on_flagged=on_flagged)


def score_transaction_sync(tenant_id: str, tx: TransactionIn, policy: TenantPolicy) -> DecisionOut:
    """:func:`score_transaction` for worker processes (back-tests), always on the database store:
    back-tests keep their state there whichever store the API uses."""
    digest = request_digest(tx)
    store = DatabaseWindowStore()
    state = store.read(tenant_id, tx, digest)
    if isinstance(state, DecisionOut):
        return state
    model = model_name_for(tenant_id)
    [scored] = get_runtime().predict_many_sync(model, [_scoring_item(tx, state, policy)])
    out = _decision(tx, policy, scored, _model_version(model))
    return store.store(tenant_id, out, decision_record(tenant_id, tx, scored.features, out, digest))
