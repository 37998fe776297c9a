"""How long the fraud transaction simulator takes (``tessera simulate fraud``, the tests' data).

Times :func:`services.fraud.simulate.simulate_transactions` for a few sizes, best of ``--repeat``
runs each (the tests check what it produces, not how fast).

Run:  .venv/bin/python bench/simulate.py          (under a minute on 2 cores)
Writes bench/results/simulate.json and prints one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.fraud.simulate import SimulationConfig, simulate_transactions  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIZES = [(100, 200, 10), (500, 1000, 30), (2000, 4000, 30)]
"""(customers, terminals, days): the tests' small run, their month, and a bank-sized month."""


def best_seconds(config: SimulationConfig, repeat: int) -> tuple[float, int]:
    """The fastest of ``repeat`` runs (seconds) and how many transactions one run makes."""
    timings, rows = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = len(simulate_transactions(config))
        timings.append(time.perf_counter() - started)
    return min(timings), rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Time the fraud transaction simulator.")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the fastest is reported")
    args = parser.parse_args(argv)
    rows = []
    for customers, terminals, days in SIZES:
        config = SimulationConfig(n_customers=customers, n_terminals=terminals, n_days=days, seed=1)
        seconds, transactions = best_seconds(config, args.repeat)
        rows.append({"customers": customers, "terminals": terminals, "days": days,
                     "transactions": transactions, "seconds": round(seconds, 3)})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "simulate.json").write_text(json.dumps({"repeat": args.repeat, "rows": rows}, indent=2))
    print("| customers | terminals | days | transactions | seconds |\n|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['customers']} | {row['terminals']} | {row['days']} | {row['transactions']} | {row['seconds']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
