"""The public contract of the fraud API: transactions in, decisions out, rules, cases, labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.fraud.features import FEATURE_NAMES

MAX_FUTURE_SKEW = timedelta(days=1)
"""Event times further ahead than this are refused (a wrong clock would age every window out)."""

Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]


class Channel(StrEnum):
    card_present = "card_present"
    ecommerce = "ecommerce"
    atm = "atm"
    moto = "moto"
    other = "other"


class Decision(StrEnum):
    approve = "approve"
    review = "review"
    decline = "decline"


DECISION_SEVERITY = {Decision.approve: 0, Decision.review: 1, Decision.decline: 2}


class TransactionIn(BaseModel):
    """A card transaction as the bank's processor sends it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: Identifier = Field(description="the processor's transaction id; the idempotency key")
    timestamp: datetime = Field(description="event time, ISO 8601 with offset (UTC assumed if none)")
    customer_id: Identifier = Field(description="card or customer id")
    terminal_id: Identifier = Field(description="terminal or merchant id")
    amount: float = Field(gt=0, lt=1e9, description="amount in currency units (a JSON number or numeric string)")
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code")
    channel: Channel = Channel.card_present
    merchant_category: str | None = Field(default=None, pattern=r"^\d{4}$", description="ISO 18245 MCC")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("amount", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # pydantic's lax mode reads true as 1.0; a numeric string ("12.50") stays accepted.
        if isinstance(value, bool):
            raise ValueError("amount must be a number, not a boolean")
        return value

    @field_validator("timestamp")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if value > datetime.now(UTC) + MAX_FUTURE_SKEW:
            raise ValueError(f"timestamp is more than {MAX_FUTURE_SKEW} in the future")
        return value


class Reason(BaseModel):
    """Why a decision came out as it did: a rule hit or a top model contribution."""

    source: Literal["rule", "model"]
    code: str
    description: str
    contribution: float | None = None


class DecisionOut(BaseModel):
    """The synchronous answer to a transaction webhook."""

    transaction_id: str
    decision: Decision
    score: float = Field(ge=0, le=1, description="calibrated probability of fraud")
    reasons: list[Reason]
    model_version: str
    rules_version: int
    replayed: bool = Field(default=False, description="true when this is a resend's stored answer")


class BatchIn(BaseModel):
    """Several transactions scored in order (back-testing, catch-up after an outage)."""

    model_config = ConfigDict(extra="forbid")
    transactions: list[TransactionIn] = Field(min_length=1, max_length=1000)


class BatchItemOut(BaseModel):
    transaction_id: str
    result: DecisionOut | None = None
    error: dict[str, Any] | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]


# --- rules ---------------------------------------------------------------------------------------

Operator = Literal["gt", "gte", "lt", "lte", "eq", "ne", "in", "not_in"]
OPERATOR_MEANINGS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=", "ne": "!=",
                     "in": "is one of the listed values", "not_in": "is none of the listed values"}
MEMBERSHIP_OPERATORS = ("in", "not_in")
EQUALITY_OPERATORS = ("eq", "ne")
ORDERING_OPERATORS = ("gt", "gte", "lt", "lte")

TRANSACTION_FIELDS = ("amount", "currency", "channel", "merchant_category", "customer_id", "terminal_id")
RULE_FIELDS: frozenset[str] = frozenset((*TRANSACTION_FIELDS, *FEATURE_NAMES, "score"))
"""What a rule condition may name."""
TEXT_RULE_FIELDS: frozenset[str] = frozenset(TRANSACTION_FIELDS) - {"amount"}
"""The rule fields holding text; every other one is a number."""


def _condition_shape(fields: frozenset[str], operators: tuple[str, ...], value: dict[str, Any]) -> dict[str, Any]:
    return {"properties": {"field": {"enum": sorted(fields)}, "op": {"enum": list(operators)}, "value": value}}


def _document_condition(schema: dict[str, Any]) -> None:
    """The published schema of a condition: which fields and operators exist and which values go with them.

    Checked when a rule is written (``rules.validate_rule``, whose 422 names the unknown field and
    lists the known ones), not by this model: rules stored before a field was retired keep loading.
    """
    numbers = RULE_FIELDS - TEXT_RULE_FIELDS
    one_or_more = {"type": "array", "minItems": 1}
    schema["properties"]["field"] = {
        "type": "string", "enum": sorted(RULE_FIELDS), "title": "Field",
        "description": f"a transaction field ({', '.join(TRANSACTION_FIELDS)}), a feature computed at request "
                       "time, or score (the model's calibrated probability); text fields: "
                       f"{', '.join(sorted(TEXT_RULE_FIELDS))}, all others are numbers"}
    schema["properties"]["op"]["description"] = "; ".join(f"{op}: {means}" for op, means in OPERATOR_MEANINGS.items())
    schema["anyOf"] = [
        _condition_shape(numbers, (*ORDERING_OPERATORS, *EQUALITY_OPERATORS), {"type": "number"}),
        _condition_shape(numbers, MEMBERSHIP_OPERATORS, {**one_or_more, "items": {"type": "number"}}),
        _condition_shape(TEXT_RULE_FIELDS, EQUALITY_OPERATORS, {"type": "string"}),
        _condition_shape(TEXT_RULE_FIELDS, MEMBERSHIP_OPERATORS, {**one_or_more, "items": {"type": "string"}}),
    ]


class Condition(BaseModel):
    """``field op value``: a number field compared with a number (or in a list of numbers), or a text
    field equal to a text (or in a list of texts)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_document_condition)
    field: str = Field(min_length=1, max_length=64)
    op: Operator
    value: float | str | list[float | str]


EXAMPLE_RULE: dict[str, Any] = {
    "id": "large-foreign-ecommerce", "description": "large e-commerce payment in another currency",
    "when": [{"field": "amount", "op": "gt", "value": 1000}, {"field": "channel", "op": "eq", "value": "ecommerce"},
             {"field": "currency", "op": "not_in", "value": ["EUR", "CHF"]}],
    "action": "review",
}


class RuleIn(BaseModel):
    """A declarative rule: when all conditions hold, the decision is at least ``action``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_RULE]})
    id: Identifier
    description: str = Field(min_length=1, max_length=300)
    when: list[Condition] = Field(min_length=1, max_length=10)
    action: Decision
    enabled: bool = True


class RuleSetOut(BaseModel):
    version: int
    rules: list[RuleIn]
    created_at: datetime
    change: str


# --- feedback ------------------------------------------------------------------------------------

class LabelIn(BaseModel):
    """An analyst's verdict or a chargeback for a scored transaction."""

    model_config = ConfigDict(extra="forbid")
    is_fraud: bool
    source: Literal["analyst", "chargeback"] = "analyst"
    analyst: str | None = Field(default=None, max_length=100)
    note: str | None = Field(default=None, max_length=2000)


class CaseOut(BaseModel):
    id: int
    transaction_id: str
    status: str
    decision: Decision
    score: float
    amount: float
    customer_id: str
    created_at: datetime
    reasons: list[Reason]


class TenantSettingsIn(BaseModel):
    """Per-tenant decision thresholds on the calibrated score, and the callback URL."""

    model_config = ConfigDict(extra="forbid")
    review_threshold: float = Field(default=0.2, ge=0, le=1)
    decline_threshold: float = Field(default=0.8, ge=0, le=1)
    callback_url: str | None = Field(default=None, max_length=500, pattern=r"^https?://")


class RetrainIn(BaseModel):
    """Options of a retraining run."""

    model_config = ConfigDict(extra="forbid")
    holdout_days: int = Field(default=7, ge=1, le=60)
    min_improvement: float = Field(default=0.0, ge=-1, le=1,
                                   description="AP margin the candidate must beat the live model by")
