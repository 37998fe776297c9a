"""Tables of the fraud vertical (all prefixed ``fraud_``); its model versions are in
:mod:`model_runtime.versions` (model ``fraud``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, utcnow


class Transaction(Base):
    """One scored transaction: the request, the decision, and later its label.

    It is also the feature state: window aggregates are read from these rows (indexed by customer
    and by terminal over time), so every API replica sees the same state.
    """

    __tablename__ = "fraud_transactions"
    __table_args__ = (
        # covering the window reads (services.fraud.state): they never visit the table's wide rows
        Index("ix_fraud_tx_customer_window", "tenant_id", "customer_id", "tx_time_s", "amount", "terminal_id"),
        Index("ix_fraud_tx_terminal_window", "tenant_id", "terminal_id", "tx_time_s", "is_fraud"),
        Index("ix_fraud_tx_time", "tenant_id", "tx_time_s"),
    )

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    transaction_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(128))
    terminal_id: Mapped[str] = mapped_column(String(128))
    tx_time_s: Mapped[float] = mapped_column(Float, doc="event time, seconds since the Unix epoch")
    amount: Mapped[float] = mapped_column(Float)
    currency: Mapped[str] = mapped_column(String(3))
    channel: Mapped[str] = mapped_column(String(20))
    score: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(10))
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(default=list)
    features: Mapped[list[float]] = mapped_column(default=list)
    model_version: Mapped[str] = mapped_column(String(64))
    rules_version: Mapped[int] = mapped_column(Integer)
    request_digest: Mapped[str | None] = mapped_column(String(64), default=None,
                                                       doc="sha256 of the scored request (a resend must match)")
    is_fraud: Mapped[bool | None] = mapped_column(Boolean, default=None)
    label_source: Mapped[str | None] = mapped_column(String(20), default=None)
    labelled_at: Mapped[datetime | None] = mapped_column(default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class RuleSet(Base):
    """An immutable version of a tenant's rules; exactly one per tenant is active."""

    __tablename__ = "fraud_rule_sets"
    __table_args__ = (Index("ix_fraud_rule_sets_tenant_version", "tenant_id", "version", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    change: Mapped[str] = mapped_column(String(200), default="")


class Case(Base):
    """A transaction in the analysts' review queue."""

    __tablename__ = "fraud_cases"
    __table_args__ = (Index("ix_fraud_cases_tenant_status", "tenant_id", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    transaction_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(20), default="open")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    analyst: Mapped[str | None] = mapped_column(String(100), default=None)
    note: Mapped[str | None] = mapped_column(Text, default=None)
