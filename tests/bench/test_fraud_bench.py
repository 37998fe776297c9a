"""``bench/fraud.py``'s in-process section on the shipped spec: the model may run in a child process there
(``TESSERA_FRAUD_MODEL_PROCESS``), so batches are counted from the runtime's own histogram, not by a wrapper that
would have to be pickled into the child."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # bench/fraud.py imports its siblings as top-level modules

import fraud as fraud_bench  # noqa: E402


@pytest.mark.parametrize("in_child", [True, False], ids=["model-in-child-process", "model-in-process"])
def test_the_in_process_section_runs_the_shipped_spec_and_counts_its_batches(
        in_child: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("TESSERA_FRAUD_MODEL_PROCESS", "true" if in_child else "false")
    get_settings.cache_clear()
    try:
        args = argparse.Namespace(quick=True, inproc_items=300, inproc_seconds=0.3, inproc_concurrency=[1, 8])
        rows = fraud_bench.run_inprocess(args, fraud_bench.find_artifact(None))
    finally:
        get_settings.cache_clear()
    batched = {row["concurrency"]: row for row in rows if row["name"] == "runtime batched (shipped spec)"}
    assert set(batched) == {1, 8}
    assert batched[1]["mean_batch"] == pytest.approx(1.0)
    assert batched[8]["mean_batch"] > 1.0 and batched[8]["throughput"] > 0
    assert all(row["cpu_cores"] > 0 for row in rows)
