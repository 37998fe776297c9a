"""The embedded default's database path: what a decision stores and replays (what it costs in CPU:
``bench/fraud_database_state.py``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from services.fraud import scoring
from services.fraud.db import Transaction
from services.fraud.schemas import Decision, DecisionOut, Reason, TransactionIn
from services.fraud.state import DatabaseWindowStore, TransactionIdReused
from shared.config import get_settings
from shared.db import session_factory

START = datetime(2026, 1, 1, tzinfo=UTC)
FEATURES = np.linspace(0.0, 1.0, 40)


@pytest.fixture
def migrated_sqlite() -> Path:
    from services.cli import db_upgrade

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    db_upgrade()
    return get_settings().data_dir


def _transaction(i: int, rng: np.random.Generator) -> TransactionIn:
    return TransactionIn(id=f"tx-{i}", timestamp=START + timedelta(seconds=52 * i),
                         customer_id=f"c-{rng.integers(1000)}", terminal_id=f"t-{rng.integers(2000)}",
                         amount=float(rng.integers(1, 300)))


def _approval(tx: TransactionIn) -> DecisionOut:
    return DecisionOut(transaction_id=tx.id, decision=Decision.approve, score=0.01, reasons=[],
                       model_version="m", rules_version=0, replayed=False)


def _store(store: DatabaseWindowStore, tx: TransactionIn, out: DecisionOut, digest: str) -> DecisionOut:
    return store.store("bank", out, scoring.decision_record("bank", tx, FEATURES, out, digest))


def test_the_fast_paths_store_and_replay_what_the_orm_did(migrated_sqlite: Path) -> None:
    tx = _transaction(1, np.random.default_rng(1))
    digest = scoring.request_digest(tx)
    out = _approval(tx).model_copy(update={"reasons": [Reason(source="model", code="amount", description="d",
                                                               contribution=0.1)]})
    store = DatabaseWindowStore()
    assert _store(store, tx, out, digest) == out
    with session_factory()() as session:
        row = session.get(Transaction, ("bank", tx.id))
        assert row is not None
        assert row.features == [round(float(v), 6) for v in FEATURES]
        assert row.reasons == [{"source": "model", "code": "amount", "description": "d", "contribution": 0.1}]
        assert row.request_digest == digest and row.received_at.tzinfo is not None
        assert row.is_fraud is None and row.decision == "approve"
    replay = store.read("bank", tx, digest)
    assert isinstance(replay, DecisionOut) and replay.replayed and replay.reasons == out.reasons
    assert _store(store, tx, out, digest).replayed  # a duplicate that lost the race
    changed = tx.model_copy(update={"amount": tx.amount + 1})
    with pytest.raises(TransactionIdReused):
        store.read("bank", changed, scoring.request_digest(changed))


def test_window_reads_never_visit_the_table(migrated_sqlite: Path) -> None:
    """Each window read is answered from one index (SQLite's "COVERING INDEX"): a read visiting the
    table's wide rows for every transaction in a 30-day window grew with the database (issue 14)."""
    from services.fraud import state
    from shared.db import get_engine

    engine = get_engine()
    params = {"tenant_id": "t", "transaction_id": "x", "customer_id": "c", "terminal_id": "T", "t": 1.0e9}
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        for name in ("STORED_SQL", "CUSTOMER_WINDOWS_SQL", "TERMINAL_WINDOWS_SQL", "CARD_HISTORY_SQL"):
            sql, values = getattr(state, name).bind(engine.dialect, params)
            plan = cursor.execute(f"EXPLAIN QUERY PLAN {sql}", values).fetchall()
            details = " | ".join(str(step[-1]) for step in plan)
            assert "USING COVERING INDEX" in details, f"{name}: {details}"
    finally:
        connection.close()
