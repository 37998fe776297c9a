"""Fraud's window-state store: the one interface scoring, labels and the app's lifespan use.

Two implementations, one semantics (:mod:`shared.window_state` states the contract):
:class:`~services.fraud.state.DatabaseWindowStore` (the embedded default) and
:class:`~services.fraud.redis_state.RedisWindowStore` (``TESSERA_REDIS_URL`` set). :func:`window_store`
returns the one this process chose from its settings, once.
"""

from __future__ import annotations

from typing import Any, Protocol

from services.fraud.features import WindowAggregates
from services.fraud.redis_state import RedisWindowStore
from services.fraud.schemas import DecisionOut, TransactionIn
from services.fraud.state import DatabaseWindowStore, FlaggedHook
from shared.window_state import WindowStateStore, WindowStoreSelector


class FraudWindowStore(WindowStateStore[TransactionIn, WindowAggregates, DecisionOut], Protocol):
    """Card and terminal windows, and each transaction's decision, kept once per transaction id."""

    async def commit(self, tenant_id: str, event: TransactionIn, answer: DecisionOut, record: dict[str, Any], *,
                     on_flagged: FlaggedHook | None = None) -> DecisionOut:
        """Keep the decision and its row ``record`` (:func:`~services.fraud.scoring.decision_record`);
        the decision that won is returned (a concurrent duplicate's, replayed, if it came first).

        ``on_flagged(session, tenant_id, decision)`` queues a review or decline decision's callback
        in the row's transaction where the row is committed here; a store that writes rows behind
        leaves case and callback to its recorder.
        """
        ...

    def record_label(self, tenant_id: str, terminal_id: str, transaction_id: str, tx_time_s: float,
                     is_fraud: bool) -> None:
        """Make a label count in the terminal risk windows, or stop counting when ``is_fraud`` is false
        (blocking; called before the row's ``is_fraud`` is committed, so a retry repeats it)."""
        ...


window_store: WindowStoreSelector[FraudWindowStore] = WindowStoreSelector(
    database=DatabaseWindowStore, redis=RedisWindowStore)
"""``window_store()``: this process's store (``window_store.reset()`` makes the next call choose again)."""
