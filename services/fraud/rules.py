"""Declarative rules: versioned per tenant, evaluated beside the model on every transaction.

A rule is data (see :class:`~services.fraud.schemas.RuleIn`): conditions on transaction fields,
features or the model ``score``, all of which must hold, and the least severe decision it forces.
Rule sets are immutable versions: every change writes a new version and activates it, so each
decision records exactly which rules produced it (``rules_version``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.fraud.db import RuleSet
from services.fraud.schemas import MEMBERSHIP_OPERATORS, ORDERING_OPERATORS, Condition, Decision, RuleIn
from shared.errors import Conflict, NotFound, UnprocessableContent

_COMPARATORS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le,
    "eq": operator.eq, "ne": operator.ne,
    "in": lambda left, right: left in right, "not_in": lambda left, right: left not in right,
}


@dataclass(frozen=True, slots=True)
class RuleHit:
    """A rule whose conditions all held."""

    rule_id: str
    description: str
    action: Decision


@dataclass(frozen=True)
class ActiveRules:
    """A tenant's active rule set, parsed once and cached by version."""

    version: int
    rules: tuple[RuleIn, ...]


def condition_holds(condition: Condition, facts: Mapping[str, Any]) -> bool:
    """Evaluate one condition; a missing fact or a type mismatch makes it false, never an error."""
    if condition.field not in facts:
        return False
    left = facts[condition.field]
    try:
        return bool(_COMPARATORS[condition.op](left, condition.value))
    except TypeError:
        return False


def evaluate_rules(rules: tuple[RuleIn, ...], facts: Mapping[str, Any]) -> list[RuleHit]:
    """Every enabled rule whose conditions all hold, in rule order."""
    return [
        RuleHit(rule.id, rule.description, rule.action)
        for rule in rules
        if rule.enabled and all(condition_holds(c, facts) for c in rule.when)
    ]


ORDERING_OPS = frozenset(ORDERING_OPERATORS)
MEMBERSHIP_OPS = frozenset(MEMBERSHIP_OPERATORS)


MAX_LIST_VALUES = 1_000
"""Most values an in/not_in list may hold: every condition is evaluated on each scored transaction."""
MAX_TEXT_VALUE_CHARS = 128
"""Longest text value: the longest text field (a customer or terminal id) holds 128 characters."""


def validate_rule(rule: RuleIn, known_fields: set[str], text_fields: set[str]) -> None:
    """Refuse a rule that could never fire: an unknown field (a typo) or a condition whose value
    cannot be compared with its field (evaluation would quietly call it false).

    Checked when a rule is written, not when a stored rule set is loaded, so a rule set stored
    before a check existed keeps scoring.
    """
    unknown = sorted({c.field for c in rule.when} - known_fields)
    if unknown:
        raise UnprocessableContent(f"rule '{rule.id}' uses unknown fields: {', '.join(unknown)}",
                                   known_fields=sorted(known_fields))
    for position, condition in enumerate(rule.when):
        problem = _condition_problem(condition, is_text=condition.field in text_fields)
        if problem:
            raise UnprocessableContent(f"rule '{rule.id}', condition {position} ({condition.field} "
                                       f"{condition.op}): {problem}")


def _condition_problem(condition: Condition, *, is_text: bool) -> str | None:
    """Why ``condition`` cannot be evaluated as meant, or None."""
    values = condition.value if isinstance(condition.value, list) else [condition.value]
    if (condition.op in MEMBERSHIP_OPS) != isinstance(condition.value, list):
        return "in and not_in take a list, the other operators a single value"
    if not values:
        return "the list is empty"
    if len(values) > MAX_LIST_VALUES:
        return f"the list holds {len(values)} values, at most {MAX_LIST_VALUES} are accepted"
    if any(isinstance(v, str) and len(v) > MAX_TEXT_VALUE_CHARS for v in values):
        return f"a text value is longer than {MAX_TEXT_VALUE_CHARS} characters (no field holds one)"
    if is_text and condition.op in ORDERING_OPS:
        return "a text field is compared with eq, ne, in or not_in"
    if not all(_is_valid_value(v, is_text=is_text) for v in values):
        return f"the value must be {'text' if is_text else 'a finite number'}"
    return None


def _is_valid_value(value: object, *, is_text: bool) -> bool:
    """Whether ``value`` is a text (for a text field) or a finite number (for a number field)."""
    if is_text:
        return isinstance(value, str)
    return isinstance(value, float) and math.isfinite(value)


def active_rule_set(session: Session, tenant_id: str) -> RuleSet | None:
    """The tenant's active rule-set row, if any."""
    return session.scalar(select(RuleSet).where(RuleSet.tenant_id == tenant_id, RuleSet.active.is_(True)))


def load_active_rules(session: Session, tenant_id: str) -> ActiveRules:
    """The active rules (version 0 and no rules for a tenant that never defined any)."""
    row = active_rule_set(session, tenant_id)
    if row is None:
        return ActiveRules(version=0, rules=())
    return ActiveRules(version=row.version, rules=tuple(RuleIn.model_validate(r) for r in row.rules))


def _write_version(session: Session, tenant_id: str, rules: list[RuleIn], change: str) -> RuleSet:
    current = active_rule_set(session, tenant_id)
    next_version = (current.version if current else 0) + 1
    session.execute(update(RuleSet).where(RuleSet.tenant_id == tenant_id).values(active=False))
    row = RuleSet(tenant_id=tenant_id, version=next_version, active=True, change=change,
                  rules=[rule.model_dump(mode="json") for rule in rules])
    session.add(row)
    session.flush()
    return row


def add_rule(session: Session, tenant_id: str, rule: RuleIn) -> RuleSet:
    """Add a rule as a new version; its id must be new."""
    rules = list(load_active_rules(session, tenant_id).rules)
    if any(existing.id == rule.id for existing in rules):
        raise Conflict(f"rule '{rule.id}' exists; PUT /v1/rules/{rule.id} replaces it")
    return _write_version(session, tenant_id, [*rules, rule], f"add {rule.id}")


def replace_rule(session: Session, tenant_id: str, rule_id: str, rule: RuleIn) -> RuleSet:
    """Replace a rule (same id) as a new version."""
    rules = list(load_active_rules(session, tenant_id).rules)
    if rule.id != rule_id:
        raise UnprocessableContent(f"body id '{rule.id}' does not match path id '{rule_id}'")
    if not any(existing.id == rule_id for existing in rules):
        raise NotFound(f"rule '{rule_id}' does not exist")
    updated = [rule if existing.id == rule_id else existing for existing in rules]
    return _write_version(session, tenant_id, updated, f"replace {rule_id}")


def delete_rule(session: Session, tenant_id: str, rule_id: str) -> RuleSet:
    """Remove a rule as a new version."""
    rules = list(load_active_rules(session, tenant_id).rules)
    if not any(existing.id == rule_id for existing in rules):
        raise NotFound(f"rule '{rule_id}' does not exist")
    return _write_version(session, tenant_id, [r for r in rules if r.id != rule_id], f"delete {rule_id}")


def rule_set_history(session: Session, tenant_id: str) -> list[RuleSet]:
    """Every version of the tenant's rules, newest first."""
    return list(session.scalars(select(RuleSet).where(RuleSet.tenant_id == tenant_id)
                                .order_by(RuleSet.version.desc())))
