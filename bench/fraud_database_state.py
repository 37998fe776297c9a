"""CPU one fraud decision costs on the database window store: read its windows, store its row.

On 3,000 stored decisions (1,000 cards, 2,000 terminals), 600 more are read and stored in this
thread; their CPU (``time.thread_time``) divided by 600 is the figure. Through the ORM it was
0.9-1.1 ms on the 2-core box (read 0.56-0.71, store 0.36), so at 400 decisions/s the API's database
threads alone needed 0.6 of a core; on the DBAPI cursor and one Core INSERT it is ~0.25 ms.

Run:  .venv/bin/python bench/fraud_database_state.py                (a SQLite file in a temporary folder)
      .venv/bin/python bench/fraud_database_state.py --database-url postgresql+psycopg://...
Takes about a minute on 2 cores. Writes bench/results/fraud_database_state.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STORED, MEASURED = 3000, 600
START = datetime(2026, 1, 1, tzinfo=UTC)
FEATURES = np.linspace(0.0, 1.0, 40)


def cpu_ms_per_decision(tenant_id: str) -> float:
    """Store :data:`STORED` approvals for ``tenant_id``, then the CPU ms each of :data:`MEASURED` more costs."""
    from services.fraud import scoring
    from services.fraud.schemas import Decision, DecisionOut, TransactionIn
    from services.fraud.state import DatabaseWindowStore

    store, rng = DatabaseWindowStore(), np.random.default_rng(0)

    def decide_and_store(i: int) -> None:
        tx = TransactionIn(id=f"tx-{i}", timestamp=START + timedelta(seconds=52 * i),
                           customer_id=f"c-{rng.integers(1000)}", terminal_id=f"t-{rng.integers(2000)}",
                           amount=float(rng.integers(1, 300)))
        digest = scoring.request_digest(tx)
        store.read(tenant_id, tx, digest)
        out = DecisionOut(transaction_id=tx.id, decision=Decision.approve, score=0.01, reasons=[],
                          model_version="m", rules_version=0, replayed=False)
        store.store(tenant_id, out, scoring.decision_record(tenant_id, tx, FEATURES, out, digest))

    for i in range(STORED):
        decide_and_store(i)
    started = time.thread_time()
    for i in range(STORED, STORED + MEASURED):
        decide_and_store(i)
    return 1000 * (time.thread_time() - started) / MEASURED


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="CPU per decision on the fraud database window store.")
    parser.add_argument("--database-url", help="a migrated-or-empty database (default: a new SQLite file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-state-") as data_dir:
        os.environ["TESSERA_DATA_DIR"] = data_dir
        os.environ.pop("TESSERA_REDIS_URL", None)  # the database store, whatever the shell says
        os.environ.pop("TESSERA_DATABASE_URL", None)
        if args.database_url:
            os.environ["TESSERA_DATABASE_URL"] = args.database_url
        from services.cli import db_upgrade
        from shared.config import get_settings

        get_settings.cache_clear()
        db_upgrade()
        database = get_settings().sqlalchemy_url.split(":", 1)[0]
        ms = cpu_ms_per_decision(f"bench-{uuid.uuid4().hex[:8]}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "fraud_database_state.json").write_text(json.dumps(
        {"database": database, "stored": STORED, "measured": MEASURED, "cpu_ms_per_decision": round(ms, 3)},
        indent=2))
    print(f"{database}: {ms:.3f} ms of CPU a decision (window read + stored row, on {STORED} stored)")


if __name__ == "__main__":
    main(sys.argv[1:])
