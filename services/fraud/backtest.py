"""Back-testing: replay a CSV of past transactions through the real scoring path.

Rows are scored in time order exactly as live traffic would be (window state, model, rules), in a
namespace of their own (tenant ``<tenant>~backtest-<job>``) so they never touch live features.
When the file carries labels they are fed back once a transaction is older than the label delay,
as chargebacks would arrive, and the run ends with AUC ROC, Average Precision and Card
Precision@100 of the scores it produced.

Accepted columns: ours (``id, timestamp, customer_id, terminal_id, amount`` [``currency, channel,
is_fraud``]) or the Fraud Detection Handbook's (``TRANSACTION_ID, TX_DATETIME, CUSTOMER_ID,
TERMINAL_ID, TX_AMOUNT`` [``TX_FRAUD``]).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError
from sqlalchemy import update

from services.fraud.db import Transaction
from services.fraud.schemas import TransactionIn
from services.fraud.scoring import load_tenant_policy, score_transaction_sync
from services.fraud.serving import default_artifact_dir, serve_tenant_model_sync
from services.fraud.state import LABEL_DELAY_S
from shared.db import session_scope
from shared.errors import UnprocessableContent

HANDBOOK_COLUMNS = {"TRANSACTION_ID": "id", "TX_DATETIME": "timestamp", "CUSTOMER_ID": "customer_id",
                    "TERMINAL_ID": "terminal_id", "TX_AMOUNT": "amount", "TX_FRAUD": "is_fraud"}
REQUIRED = ("id", "timestamp", "customer_id", "terminal_id", "amount")
MAX_ROWS = 2_000_000


class BacktestInputError(ValueError):
    """The uploaded file cannot be back-tested (missing columns, unreadable)."""


def check_backtest_header(header_line: str) -> None:
    """Refuse (422) a file whose header lacks the required columns, before any work is queued."""
    columns = {HANDBOOK_COLUMNS.get(c.strip(), c.strip()) for c in header_line.strip().split(",")}
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise UnprocessableContent(f"CSV header lacks columns: {', '.join(missing)}", required=list(REQUIRED))


def read_backtest_csv(path: Path) -> pd.DataFrame:
    """Read and normalise a back-test CSV to our column names, sorted by event time."""
    try:
        frame = pd.read_csv(path, dtype=str, nrows=MAX_ROWS + 1)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise BacktestInputError(f"unreadable CSV: {exc}") from exc
    if len(frame) > MAX_ROWS:
        raise BacktestInputError(f"more than {MAX_ROWS} rows; split the file")
    frame = frame.rename(columns=HANDBOOK_COLUMNS)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise BacktestInputError(f"missing columns: {', '.join(missing)}")
    frame["event_time"] = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce")
    return frame.sort_values(["event_time", "id"], kind="stable").reset_index(drop=True)


def ensure_model_loaded(tenant_id: str) -> None:
    """Serve ``tenant_id``'s current model in this worker (its live version, else the default)."""
    if default_artifact_dir() is None:
        raise RuntimeError("no fraud model artifact to back-test with")
    serve_tenant_model_sync(tenant_id)


def _row_transaction(row: dict[str, Any]) -> TransactionIn:
    fields = {k: row[k] for k in ("id", "timestamp", "customer_id", "terminal_id", "amount", "currency", "channel")
              if k in row and isinstance(row[k], str)}
    return TransactionIn.model_validate(fields)


def run_backtest(path: Path, tenant_id: str, namespace: str, progress: Callable[[float], None]) -> dict[str, Any]:
    """Score every row of ``path`` with the tenant's rules and thresholds, stored under ``namespace``."""
    frame = read_backtest_csv(path)
    ensure_model_loaded(tenant_id)
    policy = load_tenant_policy(tenant_id)
    labelled = "is_fraud" in frame.columns
    pending: list[tuple[float, str]] = []
    scores: dict[int, float] = {}
    decisions: Counter[str] = Counter()
    rejected: list[dict[str, Any]] = []
    for position, row in enumerate(frame.to_dict("records")):
        try:
            tx = _row_transaction(row)
        except ValidationError as exc:
            rejected.append({"row": position + 2, "id": row.get("id"), "error": exc.errors()[0]["msg"]})
            continue
        now = tx.timestamp.timestamp()
        _feed_due_labels(namespace, pending, now)
        decision = score_transaction_sync(namespace, tx, policy)
        scores[position] = decision.score
        decisions[decision.decision.value] += 1
        if labelled and str(row["is_fraud"]).strip() in ("1", "true", "True"):
            pending.append((now + LABEL_DELAY_S, tx.id))
        if position % 500 == 0:
            progress(position / max(1, len(frame)))
    _feed_due_labels(namespace, pending, float("inf"))  # the file's labels are ground truth in the end
    return {"namespace": namespace, "rows": len(frame), "scored": len(scores), "rejected_rows": rejected[:100],
            "n_rejected": len(rejected), "decisions": dict(decisions),
            "metrics": _metrics(frame, scores) if labelled else None}


def _feed_due_labels(namespace: str, pending: list[tuple[float, str]], now: float) -> None:
    due = [tx_id for known_at, tx_id in pending if known_at <= now]
    if not due:
        return
    pending[:] = [(k, t) for k, t in pending if k > now]
    with session_scope() as session:
        session.execute(update(Transaction).where(Transaction.tenant_id == namespace,
                                                  Transaction.transaction_id.in_(due))
                        .values(is_fraud=True, label_source="chargeback"))


def _metrics(frame: pd.DataFrame, scores: dict[int, float]) -> dict[str, float] | None:
    from services.fraud.evaluation import assess  # scikit-learn: loaded by the job, not by the API importing this

    positions = np.fromiter(scores, dtype=int)
    scored = frame.iloc[positions]
    labels = scored["is_fraud"].astype(str).str.strip().isin(["1", "true", "True"]).astype(int)
    if labels.nunique() < 2:
        return None
    days = scored["event_time"].dt.normalize()
    evaluation = pd.DataFrame({"TX_FRAUD": labels.to_numpy(),
                               "CUSTOMER_ID": scored["customer_id"].to_numpy(),
                               "TX_TIME_DAYS": (days - days.min()).dt.days.to_numpy()})
    return assess(np.fromiter(scores.values(), dtype=float), evaluation)
