"""Fraud scoring on the Fraud Detection Handbook's public (simulated) transactions.

Reproduces the handbook protocol (Le Borgne et al., 2022): the Chapter 3 split and the
Chapters 5-7 prequential test folds, for our models (LightGBM alone, LightGBM stacked with the
card-sequence transformer) and the handbook baselines trained here, next to the numbers the
handbook publishes. Our hyperparameters and the use of the transformer are chosen on the
validation folds (training starts 2018-06-20 ... 07-11), which end before any test period.

Run:  .venv/bin/python bench/fraud_eval.py          (about 10-15 minutes on 2 cores)
Writes bench/results/fraud_eval.json and prints one table.

Other data: ``--data FILE`` (a bank's export, the columns ``tessera train fraud --data`` reads)
and/or ``--from DATE --to DATE`` run the same models on prequential folds laid out inside that
range (``evaluation.folds_for_range``: the latest test week ends on the range's last day,
``--folds`` of them), with model selection on earlier folds where the range holds them. The
handbook's published figures are shown for the handbook's own protocol only; the oracle ceiling
where the file has the simulator's ``TX_FRAUD_SCENARIO``. Writes
bench/results/fraud_eval-<file stem>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_runtime.training_data import (  # noqa: E402
    DateRange,
    TrainingDataError,
    add_data_arguments,
    date_range_from,
)
from services.fraud import handbook as hb  # noqa: E402
from services.fraud.evaluation import (  # noqa: E402
    HANDBOOK_FOLDS,
    FoldPlan,
    PreparedData,
    Scorer,
    card_precision_ceiling,
    evaluate_fold,
    evaluate_folds,
    folds_for_range,
    sklearn_scorer,
)
from services.fraud.features import compute_offline_features  # noqa: E402
from services.fraud.training import (  # noqa: E402
    COLUMNS_HELP,
    GbmParams,
    SequenceTraining,
    fit_model,
    load_transactions_file,
)

RESULTS = Path(__file__).resolve().parent / "results" / "fraud_eval.json"
GBM_GRID = {
    "leaves31_lr0.05_n300": GbmParams(),
    "leaves63_lr0.03_n500": GbmParams(num_leaves=63, learning_rate=0.03, n_estimators=500),
    "leaves31_lr0.05_n300_posweight5": GbmParams(scale_pos_weight=5.0),
}


def ours(params: GbmParams, with_sequence: bool) -> Scorer:
    """Our model as a fold scorer (ranking by booster margin; Platt would not change it)."""
    def score(data: PreparedData, train_pos: np.ndarray, test_pos: np.ndarray) -> np.ndarray:
        labels = data.transactions.TX_FRAUD.to_numpy()
        model = fit_model(data.features[train_pos], labels[train_pos],
                          sequences=data.sequences[train_pos] if with_sequence else None,
                          customers=data.transactions.CUSTOMER_ID.to_numpy()[train_pos], params=params,
                          sequence_settings=SequenceTraining() if with_sequence else None)
        return model.margin(data.features[test_pos], data.sequences[test_pos] if with_sequence else None)
    return score


def baselines() -> dict[str, Scorer]:
    """The handbook's Chapter 3 classifiers with its settings (features standard-scaled).

    XGBoost comes with the ``bench`` extra (``pip install -e '.[bench]'``); without it its row is
    left out, saying so.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    scorers = {
        "logistic regression": sklearn_scorer(lambda: LogisticRegression(random_state=0)),
        "decision tree depth 2": sklearn_scorer(lambda: DecisionTreeClassifier(max_depth=2, random_state=0)),
        "decision tree unlimited": sklearn_scorer(lambda: DecisionTreeClassifier(random_state=0)),
        "random forest": sklearn_scorer(lambda: RandomForestClassifier(random_state=0, n_jobs=2)),
    }
    try:
        import xgboost
    except ImportError:
        print("  xgboost is not installed (pip install -e '.[bench]'): its baseline is left out", flush=True)
        return scorers
    return scorers | {"xgboost default": sklearn_scorer(lambda: xgboost.XGBClassifier(random_state=0, n_jobs=2))}


def select_on_validation(data: PreparedData, starts: list[dt.datetime]) -> tuple[str, bool, dict]:
    """Pick the GBM config by mean validation AP + CP@100, then whether the transformer helps."""
    report: dict = {}
    for name, params in GBM_GRID.items():
        report[name] = evaluate_folds(data, ours(params, False), starts)
        print(f"  validation {name}: {_fmt(report[name]['summary'])}", flush=True)
    best = max(GBM_GRID, key=lambda n: _selection_score(report[n]["summary"]))
    report[f"{best}+sequence"] = evaluate_folds(data, ours(GBM_GRID[best], True), starts)
    print(f"  validation {best}+sequence: {_fmt(report[f'{best}+sequence']['summary'])}", flush=True)
    gain = _selection_score(report[f"{best}+sequence"]["summary"]) - _selection_score(report[best]["summary"])
    return best, gain > 0.0, report


def _selection_score(summary: dict) -> float:
    """Validation criterion: mean AP + mean CP@100 (the two metrics the handbook ranks by)."""
    return summary["average_precision"]["mean"] + summary["card_precision_at_100"]["mean"]


def _fmt(summary: dict) -> str:
    return "  ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in summary.items())


@dataclass(frozen=True)
class EvaluationData:
    """What one run evaluates: the transactions, which folds, and what to compare against."""

    transactions: pd.DataFrame
    folds: FoldPlan
    source: str
    published: dict | None = None
    citation: str = ""


def handbook_data() -> EvaluationData:
    """The handbook's file under its own protocol, with its published figures."""
    return EvaluationData(hb.load_transactions(), HANDBOOK_FOLDS, str(hb.dataset_path()), hb.PUBLISHED, hb.CITATION)


def file_data(path: Path, period: DateRange, n_folds: int) -> EvaluationData:
    """A bank's export (or the handbook's file) on prequential folds inside ``period``.

    Rows before the range stay as look-back history; rows after it are left out.
    """
    transactions = load_transactions_file(path)
    used = period.select(transactions, "TX_DATETIME")
    folds = folds_for_range(used.TX_DATETIME.min().date(), used.TX_DATETIME.max().date(), n_folds)
    history = transactions[used.TX_DATETIME.max() >= transactions.TX_DATETIME].reset_index(drop=True)
    return EvaluationData(history, folds, f"{path}{period.option_text()}")


def run(evaluated: EvaluationData, quick: bool = False) -> dict:
    """Everything the table needs; ``quick`` (or no validation folds) skips model selection."""
    torch.set_num_threads(2)
    began = time.perf_counter()
    transactions, folds = evaluated.transactions, evaluated.folds
    features, sequences = compute_offline_features(transactions)
    data = PreparedData(transactions, features.to_numpy(np.float32), sequences)
    print(f"data: {evaluated.source}, {len(transactions)} tx, features in {time.perf_counter() - began:.0f}s; "
          f"test folds start {', '.join(str(s.date()) for s in folds.test_starts)}", flush=True)
    validation: dict
    if quick or not folds.validation_starts:
        best, use_sequence, validation = "leaves31_lr0.05_n300", True, {}
    else:
        best, use_sequence, validation = select_on_validation(data, folds.validation_starts)
    models: dict[str, Scorer] = {
        f"ours: LightGBM ({best})": ours(GBM_GRID[best], False),
        f"ours: LightGBM + sequence transformer ({best})": ours(GBM_GRID[best], True),
    } | {f"baseline: {n}": s for n, s in baselines().items()}
    chapter3, rolling = {}, {}
    for name, scorer in models.items():
        if folds.chapter3_start is not None:
            chapter3[name] = evaluate_fold(data, scorer, folds.chapter3_start).__dict__
        rolling[name] = evaluate_folds(data, scorer, folds.test_starts)
        print(f"  {name}: ch3 {chapter3.get(name, {}).get('metrics')}  rolling {_fmt(rolling[name]['summary'])}",
              flush=True)
    return {"data": evaluated.source, "test_fold_starts": [str(s.date()) for s in folds.test_starts],
            "selected": {"gbm": best, "use_sequence_on_validation": use_sequence},
            "validation": validation, "chapter3": chapter3, "rolling": rolling,
            "card_precision_ceiling": ceilings(transactions, folds), "published": evaluated.published,
            "citation": evaluated.citation, "seconds": round(time.perf_counter() - began, 1)}


def ceilings(transactions: pd.DataFrame, folds: FoldPlan) -> dict | None:
    """CP@100 of the oracle that ranks every fraud visible at scoring time first, per protocol.

    Needs the simulator's record of each fraud (TX_FRAUD_SCENARIO): None for a file without it.
    """
    if "TX_FRAUD_SCENARIO" not in transactions.columns:
        return None

    def on(start: dt.datetime) -> float:
        return card_precision_ceiling(transactions, hb.train_test_split(transactions, start)[1])
    rolling = [on(start) for start in folds.test_starts]
    return {"chapter3": on(folds.chapter3_start) if folds.chapter3_start else None,
            "rolling": {"mean": float(np.mean(rolling)), "std": float(np.std(rolling)), "folds": rolling}}


def print_table(results: dict) -> None:
    """One table: Chapter 3 (handbook only) and rolling metrics per model, then the published ones."""
    print(f"\n{'model':58s} | {'ch3 AUC':>7s} {'ch3 AP':>7s} {'ch3 CP100':>9s} | "
          f"{'roll AUC':>13s} {'roll AP':>13s} {'roll CP@100':>13s}")
    for name, rolled_result in results["rolling"].items():
        s = rolled_result["summary"]
        rolled = " ".join(f"{s[k]['mean']:.3f}±{s[k]['std']:.3f}"
                          for k in ("auc_roc", "average_precision", "card_precision_at_100"))
        m = results["chapter3"].get(name, {}).get("metrics")
        single = (f"{m['auc_roc']:7.3f} {m['average_precision']:7.3f} {m['card_precision_at_100']:9.3f}" if m
                  else f"{'-':>7s} {'-':>7s} {'-':>9s}")
        print(f"{name:58s} | {single} | {rolled}")
    if results["published"]:
        print_published(results["published"])
    ceiling = results["card_precision_ceiling"]
    if ceiling:
        single_ceiling = f"{ceiling['chapter3']:9.3f}" if ceiling["chapter3"] is not None else f"{'-':>9s}"
        print(f"{'ceiling: every fraud visible at scoring time ranked first':58s} | {'':15s} "
              f"{single_ceiling} | {'':27s} {ceiling['rolling']['mean']:.3f}±{ceiling['rolling']['std']:.3f}")


def print_published(pub: dict) -> None:
    """The handbook's own figures for its protocols."""
    print(f"{'handbook published: random forest (ch3 AP)':58s} | {'':7s} {pub['chapter3']['random_forest_ap']:7.3f}")
    print(f"{'handbook published: logistic regression (ch3 CP@100)':58s} | {'':15s} "
          f"{pub['chapter3']['logistic_regression_cp100']:9.3f}")
    ap, cp = pub["rolling"]["xgboost_ap"], pub["rolling"]["balanced_bagging_cp100"]
    print(f"{'handbook published: XGBoost (rolling AP)':58s} | {'':27s} | {'':13s} {ap[0]:.3f}±{ap[1]:.3f}")
    print(f"{'handbook published: balanced bagging (rolling CP@100)':58s} | {'':27s} | "
          f"{'':27s} {cp[0]:.3f}±{cp[1]:.3f}")


def _timings_ms(call, repeats: int) -> dict[str, float]:
    call()  # warm-up
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1e3)
    return {"p50_ms": round(float(np.percentile(samples, 50)), 3),
            "p99_ms": round(float(np.percentile(samples, 99)), 3)}


def latency(artifact: Path, repeats: int = 300) -> dict:
    """Single-thread latency at B = 1, 8, 64: the sequence model per backend (eager torch, ONNX
    Runtime fp32, ONNX Runtime int8), predict_batch per tree backend, reasons; plus the ranking
    quality of each sequence backend on the Chapter 3 test set."""
    from services.fraud.evaluation import assess
    from services.fraud.model import SEQUENCE_BACKENDS, FraudScorer

    transactions = hb.load_transactions()
    features, sequences = compute_offline_features(transactions)
    _, test_pos = hb.train_test_split(transactions, hb.CHAPTER3_START)
    x, seq = features.to_numpy(np.float32)[test_pos], sequences[test_pos]
    sizes = (1, 8, 64)
    report: dict = {"artifact": str(artifact), "threads": 1, "sequence_model": {}, "predict_batch": {}}
    for backend in SEQUENCE_BACKENDS:
        scorer = FraudScorer(artifact, sequence_backend=backend)
        run_sequence = scorer._sequence
        report["sequence_model"][backend] = {
            f"B={b}": _timings_ms(lambda b=b, f=run_sequence: f(seq[:b]), repeats) for b in sizes}
        report["sequence_model"][backend]["chapter3_test"] = assess(scorer.predict_batch(x, seq),
                                                                    transactions.iloc[test_pos])
        print(f"  sequence model {backend}: {report['sequence_model'][backend]}", flush=True)
    for trees in ("lightgbm", "numpy"):
        scorer = FraudScorer(artifact, tree_backend=trees)
        report["predict_batch"][f"onnx+{trees}"] = {
            f"B={b}": _timings_ms(lambda b=b, sc=scorer: sc.predict_batch(x[:b], seq[:b]), repeats) for b in sizes}
        print(f"  predict_batch onnx+{trees}: {report['predict_batch'][f'onnx+{trees}']}", flush=True)
    scorer = FraudScorer(artifact)
    report["top_contributions_path"] = {f"B={b}": _timings_ms(
        lambda b=b: scorer.top_contributions(x[:b], k=3, sequences=seq[:b]), repeats) for b in sizes}
    report["score_with_reasons"] = {f"B={b}": _timings_ms(
        lambda b=b: scorer.score_with_reasons(x[:b], seq[:b], k=3), repeats) for b in sizes}
    report["top_contributions_shap"] = {f"B={b}": _timings_ms(
        lambda b=b: scorer.top_contributions(x[:b], k=3, sequences=seq[:b], method="shap"), 5) for b in (1, 8)}
    for key in ("top_contributions_path", "score_with_reasons", "top_contributions_shap"):
        print(f"  {key}: {report[key]}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the protocol, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip model selection on validation folds")
    parser.add_argument("--latency", type=Path, help="only time FraudScorer from this artifact directory")
    add_data_arguments(parser, columns_help=COLUMNS_HELP)
    parser.add_argument("--folds", type=int, default=4, help="with --data/--from/--to: test folds (default 4)")
    args = parser.parse_args(argv)
    if not args.data and not hb.dataset_path().exists():
        sys.exit(f"handbook data not found at {hb.dataset_path()}; pass --data FILE")
    if args.latency:
        out = RESULTS.with_name("fraud_latency.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(latency(args.latency), indent=2) + "\n")
        print(f"wrote {out}")
        return
    try:
        period = date_range_from(args)
        if args.data or period != DateRange():
            source = args.data or hb.dataset_path()
            evaluated = file_data(source, period, args.folds)
            out = RESULTS.with_name(f"fraud_eval-{_stem(source)}.json")
        else:
            evaluated, out = handbook_data(), RESULTS
    except TrainingDataError as exc:
        parser.error(str(exc))
    results = run(evaluated, quick=args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print(f"\nwrote {out} in {results['seconds']:.0f}s")


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


if __name__ == "__main__":
    main()
