"""``tessera bench iiot_eval`` runs end to end (smoke plan: one epoch, a tiny simulated fleet): our model
and the LightGBM baseline trained in the one run on the same splits, one table row per metric."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from services.iiot import datasets

BENCH = Path(__file__).resolve().parents[2] / "bench" / "iiot_eval.py"


def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("iiot_eval_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # minutes on a busy 2-core box: simulation, two fleets, LightGBM to early stopping
def test_the_bench_trains_both_models_and_writes_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           ) -> None:
    sets = ["fleet"]
    if (datasets.datasets_dir() / datasets.AI4I_FOLDER).is_dir():
        sets.append("ai4i")
    output = tmp_path / "iiot_eval.json"
    assert bench_module().main(["--plan", "smoke", "--sets", ",".join(sets), "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert list(results["sets"]) == sets
    for figures in results["sets"].values():
        assert set(figures) == {"ours", "baseline", "seconds"}
    fleet = results["sets"]["fleet"]
    assert set(fleet["ours"]["test"]) >= {"auc", "f1", "rul_rmse_hours"}
    assert "rul_rmse_hours" in fleet["baseline"]["test"]
    printed = capsys.readouterr().out
    assert "| fleet | ROC AUC (72 h) |" in printed and "LightGBM baseline" in printed
