"""The public contract of the fraud API: transactions in, decisions out, rules, cases, labels."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    WithJsonSchema,
    field_validator,
)

from services.fraud.features import FEATURE_NAMES
from shared.times import as_utc, is_iso_datetime_text

MAX_FUTURE_SKEW = timedelta(days=1)
"""Event times further ahead than this are refused (a wrong clock would age every window out)."""
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)
"""Event times before this are refused: no card network replays them, and training reads event
times as pandas timestamps (a year-1500 row made every retrain of its tenant fail)."""
TIMESTAMP_WINDOW = f"from {EARLIEST_TIMESTAMP:%Y-%m-%dT%H:%M:%SZ} to {MAX_FUTURE_SKEW.days} day after the server clock"
"""The event times a transaction may have (older ones inside it are scored against the windows of
their own time: back-tests, catch-up after an outage)."""

AMOUNT_TEXT = re.compile(r"^[0-9]{1,10}(\.[0-9]{1,20})?$")
"""An amount sent as text: a plain decimal."""
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
    timestamp: datetime = Field(description="event time, ISO 8601 with offset (UTC assumed if none), accepted "
                                f"{TIMESTAMP_WINDOW}; an older event is scored against the windows of its "
                                "own time (back-tests, catch-up after an outage)")
    customer_id: Identifier = Field(description="card or customer id")
    terminal_id: Identifier = Field(description="terminal or merchant id")
    amount: Annotated[float, WithJsonSchema({"anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1e9},
        {"type": "string", "pattern": AMOUNT_TEXT.pattern}]})] = Field(
        gt=0, lt=1e9, description="amount in currency units: a JSON number, or a decimal string such as \"12.50\"")
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code")
    channel: Channel = Channel.card_present
    merchant_category: str | None = Field(default=None, pattern=r"^\d{4}$", description="ISO 18245 MCC")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("metadata")
    @classmethod
    def _sorted_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        # key order is not meaning: a resend with reordered metadata has the same request digest
        return dict(sorted(value.items())) if len(value) > 1 else value

    @field_validator("amount", mode="before")
    @classmethod
    def _number_or_decimal_text(cls, value: Any) -> Any:
        # pydantic's lax mode reads true as 1.0 and "1e3" as 1000.0; the contract is a JSON number
        # or plain decimal text ("12.50"), as published in the schema.
        if isinstance(value, bool):
            raise ValueError("amount must be a number, not a boolean")
        if isinstance(value, str) and not AMOUNT_TEXT.match(value):
            raise ValueError('amount text must be a plain decimal such as "12.50"')
        return value

    @field_validator("timestamp", mode="before")
    @classmethod
    def _date_time_text(cls, value: Any) -> Any:
        # pydantic's lax mode reads a number as Unix seconds and "2026-11-30" as midnight: the
        # contract is an ISO 8601 date and time.
        if isinstance(value, datetime):  # built in Python, not parsed from a request
            return value
        if not is_iso_datetime_text(value):
            raise ValueError("timestamp must be an ISO 8601 date and time, e.g. 2026-11-23T10:15:00Z")
        return value

    @field_validator("timestamp")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        utc = as_utc(value)
        if utc is None:  # e.g. 0001-01-01T00:00:00+01:00: its UTC time is before year 1
            raise ValueError(f"timestamp is outside the datetime range (accepted {TIMESTAMP_WINDOW})")
        value = utc
        if value < EARLIEST_TIMESTAMP:
            raise ValueError(f"timestamp is too old (accepted {TIMESTAMP_WINDOW})")
        if value > datetime.now(UTC) + MAX_FUTURE_SKEW:
            raise ValueError(f"timestamp is more than {MAX_FUTURE_SKEW} in the future (accepted {TIMESTAMP_WINDOW})")
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


MAX_BATCH_ITEMS = 1000


class BatchIn(BaseModel):
    """Several transactions scored in order (back-testing, catch-up after an outage).

    Each item is validated on its own: an invalid item gets its own error in the answer and the
    others are scored. Only a body that is not an object with a ``transactions`` list of objects
    (1 to ``MAX_BATCH_ITEMS``) fails as a whole.
    """

    model_config = ConfigDict(extra="forbid")
    transactions: list[dict[str, Any]] = Field(
        min_length=1, max_length=MAX_BATCH_ITEMS,
        description="transactions, each with the fields of TransactionIn (the body of POST /v1/transactions), "
                    "validated one by one")


class BatchItemOut(BaseModel):
    """One item's outcome: its decision, or the problem document of its failure."""

    index: int = Field(description="position of the item in the request's transactions list")
    transaction_id: str | None = Field(description="the item's id; null when the item has no valid id")
    result: DecisionOut | None = None
    error: dict[str, Any] | None = Field(
        default=None, description="an RFC 9457 problem (422 invalid item with its `errors`, 409 id reused "
                                  "with a different body, 503 ...) with the item's `index` and `transaction_id`")


class BatchOut(BaseModel):
    """Every item's outcome, in request order."""

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
    value: StrictFloat | str | list[StrictFloat | str] = Field(
        description="a number (never a boolean) or text, or a list of them for in/not_in")


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
    enabled: StrictBool = True


class RuleSetOut(BaseModel):
    version: int
    rules: list[RuleIn]
    created_at: datetime
    change: str


# --- feedback ------------------------------------------------------------------------------------

class LabelIn(BaseModel):
    """An analyst's verdict or a chargeback for a scored transaction."""

    model_config = ConfigDict(extra="forbid")
    is_fraud: StrictBool
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
    review_threshold: StrictFloat = Field(default=0.2, ge=0, le=1)
    decline_threshold: StrictFloat = Field(default=0.8, ge=0, le=1)
    callback_url: str | None = Field(
        default=None, max_length=500, pattern=r"^https?://",
        description="where review and decline decisions are POSTed, signed; every address its host resolves "
                    "to must be public (not loopback, private, link-local...) unless the operator allow-lists "
                    "it; https in production")


class RetrainIn(BaseModel):
    """Options of a retraining run."""

    model_config = ConfigDict(extra="forbid")
    holdout_days: StrictInt = Field(default=7, ge=1, le=60)
    min_improvement: StrictFloat = Field(default=0.0, ge=0, le=1,
                                   description="promote only when candidate AP - live AP >= this, on the "
                                               "tenant's held-out days (0: the candidate must not be worse)")
