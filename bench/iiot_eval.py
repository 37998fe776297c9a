"""The failure-risk model beside a gradient-boosting baseline, both trained in this one run, on the same splits.

Data sets (protocols as in :mod:`services.iiot.training`; nothing is tuned on a test split):

- ``cmapss``: NASA C-MAPSS FD001 RUL, as ``tessera train iiot --dataset cmapss`` runs it
  (:func:`services.iiot.training.cmapss_folds`: 5 engine-level folds, each validated on its engines cut
  off as the official test set is; RUL capped at 125 cycles); scored on the official test set (last
  cycle of each of the 100 test engines, uncapped truth) by the mean of the fold models: RMSE and the
  PHM08 score. The baseline is :func:`services.iiot.training.cmapss_gbm` on the same folds.
- ``ai4i``: AI4I 2020 machine failure without the failure-mode flags (they leak the label); 20 % test
  (stratified), the rest in 5 stratified folds; the threshold is the best out-of-fold F1; F1 /
  precision / recall / AUC on test.
- ``fleet``: the **SIMULATED** fleet (:mod:`services.iiot.simulate`): failure within 72 h on windows
  of held-out assets of a fleet drawn with another seed; AUC, AP, F1 and RUL RMSE (hours, capped).

Models: our attention model (:class:`~services.iiot.model.SensorWindowNet`; epochs and ensemble
members chosen on validation) and LightGBM (early stopping on validation) on the window statistics,
trends and spectral energies of :func:`services.iiot.features.batch_window_features` (C-MAPSS: with each
engine's history features beside them, :func:`services.iiot.training.cmapss_gbm_inputs`; AI4I: the same
tabular inputs the model gets).

Plans: ``--plan quick`` (default: one seed, few epochs, a small fleet: about ten minutes on a busy
2-core box), ``--plan full`` (the settings of ``tessera train iiot --dataset ...``) and ``--plan
smoke`` (one epoch: the tests' check that the bench runs, its figures mean nothing).

Run:  .venv/bin/python bench/iiot_eval.py [--plan quick|full] [--sets cmapss,ai4i,fleet]
      (``tessera bench iiot_eval``). Writes bench/results/iiot_eval.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.iiot import datasets, training  # noqa: E402
from services.iiot.evaluation import (  # noqa: E402
    best_f1_threshold,
    classification_scores,
    fit_gbm,
    rul_scores,
)
from services.iiot.features import batch_window_features  # noqa: E402
from services.iiot.training import Arrays, FitSettings, FleetPlan, Splits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "iiot_eval.json"
SETS = ("cmapss", "ai4i", "fleet")


@dataclass(frozen=True)
class Plan:
    """How much training each model gets in this run."""

    seeds: int
    keep: int
    settings: dict[str, FitSettings]
    fleet: FleetPlan
    folds: int = training.AI4I_FOLDS
    """AI4I: stratified folds of the development rows (one network and one booster per fold)."""
    cmapss_folds: int = training.CMAPSS_FOLDS
    """C-MAPSS: engine-level folds (one network per seed and one booster per fold)."""


PLANS = {
    "quick": Plan(seeds=1, keep=1, settings={
        "cmapss": replace(training.REAL_SETTINGS["cmapss"], epochs=8, patience=3),
        "ai4i": replace(training.REAL_SETTINGS["ai4i"], epochs=25, patience=8),
        "fleet": replace(training.FLEET_SETTINGS, epochs=6, patience=3)},
        fleet=FleetPlan(assets=12, days=60.0, test_assets=6)),
    "smoke": Plan(seeds=1, keep=1, settings={
        "cmapss": replace(training.REAL_SETTINGS["cmapss"], epochs=1),
        "ai4i": replace(training.REAL_SETTINGS["ai4i"], epochs=1),
        "fleet": replace(training.FLEET_SETTINGS, epochs=1)},
        fleet=FleetPlan(assets=4, days=20.0, test_assets=2), folds=2, cmapss_folds=2),
    "full": Plan(seeds=3, keep=3, settings={**training.REAL_SETTINGS, "fleet": training.FLEET_SETTINGS},
                 fleet=FleetPlan()),
}


def window_inputs(arrays: Arrays) -> np.ndarray:
    """The baseline's inputs: window statistics (tabular rows of one step: the row itself)."""
    if arrays.x.shape[1] == 1:
        return arrays.x[:, 0, :]
    return batch_window_features(arrays.x, arrays.mask)


def gbm_rul(data: Splits, cap: float) -> dict[str, Any]:
    """LightGBM RUL regression on the same splits; predictions clipped to [0, cap] like the model's."""
    assert data.train.rul is not None and data.validation.rul is not None and data.test.rul is not None
    model = fit_gbm("regression", window_inputs(data.train), data.train.rul, window_inputs(data.validation),
                    data.validation.rul)
    predicted = np.clip(model.predict(window_inputs(data.test)), 0.0, cap)
    return {"iterations": model.booster.best_iteration,
            "test": rul_scores(predicted, data.test.rul, cap=datasets.RUL_CAP)}


def gbm_failure(data: Splits) -> dict[str, Any]:
    """LightGBM failure classification on the same splits, threshold = best validation F1."""
    assert data.train.failure is not None and data.validation.failure is not None and data.test.failure is not None
    model = fit_gbm("binary", window_inputs(data.train), data.train.failure, window_inputs(data.validation),
                    data.validation.failure)
    threshold = best_f1_threshold(data.validation.failure, model.predict(window_inputs(data.validation)))
    scores = classification_scores(data.test.failure, model.predict(window_inputs(data.test)), threshold)
    return {"iterations": model.booster.best_iteration, "test": scores}


def gbm_fleet(data: Splits, cap: float) -> dict[str, Any]:
    """Both fleet targets: failure within 72 h and RUL (hours, capped)."""
    figures = gbm_failure(data)
    assert data.test.rul is not None
    rul = gbm_rul(data, cap)
    figures["test"]["rul_rmse_hours"] = rul["test"]["rmse"]
    return figures


def run_set(name: str, plan: Plan) -> dict[str, Any]:
    """Train and score our model and the baseline on one data set."""
    settings = plan.settings[name]
    ours: Callable[[], dict[str, Any]]
    baseline: Callable[[], dict[str, Any]]
    if name == "cmapss":
        engine_folds = training.cmapss_folds(folds=plan.cmapss_folds)
        ours = partial(training.run_cmapss, seeds=plan.seeds, keep=plan.keep, settings=settings,
                       sizes=training.REAL_SIZES["cmapss"], data=engine_folds)
        baseline = partial(training.cmapss_gbm, engine_folds)
    elif name == "ai4i":
        folds = training.ai4i_folds(folds=plan.folds)
        ours = partial(training.run_ai4i, seeds=1, settings=settings, data=folds, baseline=False)
        baseline = partial(training.ai4i_gbm, folds)
    else:
        data = training.fleet_splits(plan.fleet)
        def fleet_model() -> dict[str, Any]:
            return training.run_fleet("cloud", plan.fleet, settings, seeds=plan.seeds, data=data)[1]

        ours = fleet_model
        baseline = partial(gbm_fleet, data, plan.fleet.rul_cap_hours)
    figures: dict[str, Any] = {"seconds": {}}
    for label, run in (("ours", ours), ("baseline", baseline)):
        started = time.perf_counter()
        figures[label] = run()
        figures["seconds"][label] = round(time.perf_counter() - started, 1)
    return figures


ROWS = {
    "cmapss": [("RMSE (cycles, official test)", "rmse"), ("PHM08 score", "phm08"),
               ("RMSE vs truth capped at 125", "rmse_capped_truth")],
    "ai4i": [("F1 (test)", "f1"), ("precision", "precision"), ("recall", "recall"), ("ROC AUC", "auc")],
    "fleet": [("ROC AUC (72 h)", "auc"), ("avg precision", "average_precision"), ("F1", "f1"),
              ("RUL RMSE (h)", "rul_rmse_hours")],
}
GOALS = {("cmapss", "rmse"): "<= 11", ("cmapss", "phm08"): "<= 200", ("ai4i", "f1"): ">= 0.90"}


def table(results: dict[str, Any]) -> str:
    """The figures as a markdown table: metric per data set, our model against the baseline."""
    rows = ["| data set | metric | attention model | LightGBM baseline | goal |", "|---|---|---|---|---|"]
    for name, figures in results["sets"].items():
        for label, key in ROWS[name]:
            ours, baseline = figures["ours"]["test"][key], figures["baseline"]["test"][key]
            rows.append(f"| {name} | {label} | {ours:.3f} | {baseline:.3f} | {GOALS.get((name, key), '')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Train and score both models on the chosen sets; print the table and write the JSON."""
    import torch

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="quick")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {', '.join(SETS)}")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.sets.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SETS))
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; known: {', '.join(SETS)}")
    torch.set_num_threads(1)
    plan = PLANS[args.plan]
    results: dict[str, Any] = {"plan": args.plan, "seeds": plan.seeds, "fleet_plan": asdict(plan.fleet),
                               "host": platform.node(), "python": platform.python_version(), "sets": {}}
    for name in chosen:
        results["sets"][name] = run_set(name, plan)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
