"""Build fraud models from labelled transactions: booster, card-sequence transformer, calibrator.

Two entry points:

- :func:`train_fraud_model` - raw handbook-format transactions in, sealed artifact out (features
  computed here, Platt calibration on the held-out ``valid_df`` period, model card written).
- :func:`train_candidate` - for a retraining task: a DataFrame of labelled transactions whose
  features are already computed; trains on all but the latest days and evaluates on those.

The pieces (:func:`fit_model`, :func:`fit_platt`, :func:`export_artifact`) are ordinary functions
so the evaluation protocol reuses exactly what ships.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch
from torch import nn

from model_runtime.artifacts import ArtifactManifest, load_manifest, save_artifact
from model_runtime.backends import export_onnx, quantize_onnx_int8, record_backend_choice
from model_runtime.training_data import (
    TRAINING_DATA_KEY,
    DataProvenance,
    DateRange,
    TrainingDataError,
    add_data_arguments,
    bad_rows_text,
    date_range_from,
    parse_timestamps,
    read_table,
)
from services.fraud.features import (
    FEATURE_NAMES,
    SECONDS_PER_DAY,
    SEQUENCE_CHANNELS,
    SEQUENCE_STEPS,
    compute_offline_features,
)
from services.fraud.model import (
    BOOSTER_FILE,
    CONFIG_FILE,
    SEQUENCE_COMPONENT,
    SEQUENCE_FEATURE,
    SEQUENCE_INT8_FILE,
    SEQUENCE_ONNX_FILE,
    SEQUENCE_STATE_FILE,
    TREES_FILE,
    CompactTrees,
    SequenceConfig,
    measure_sequence_backends,
    platt_probability,
)
from services.fraud.periods import CandidatePeriods
from services.fraud.sequence_net import CardSequenceEncoder, SequenceEnsemble
from shared.config import get_settings

MODEL_NAME = "fraud"


@dataclass(frozen=True)
class GbmParams:
    """LightGBM settings (the ones model selection may vary)."""

    num_leaves: int = 31
    learning_rate: float = 0.05
    n_estimators: int = 300
    min_child_samples: int = 50
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    reg_lambda: float = 1.0
    scale_pos_weight: float = 1.0
    seed: int = 0

    def lgb_params(self) -> dict[str, Any]:
        """Parameters for ``lgb.train`` (binary objective, 2 threads, quiet)."""
        return {"objective": "binary", "num_leaves": self.num_leaves, "learning_rate": self.learning_rate,
                "min_child_samples": self.min_child_samples, "feature_fraction": self.feature_fraction,
                "bagging_fraction": self.bagging_fraction, "bagging_freq": 1, "lambda_l2": self.reg_lambda,
                "scale_pos_weight": self.scale_pos_weight, "seed": self.seed, "num_threads": 2,
                "verbose": -1, "deterministic": True, "force_row_wise": True}


SELECTED_PARAMS = GbmParams(num_leaves=63, learning_rate=0.03, n_estimators=500)
"""Chosen on the handbook's validation folds (training starts 2018-06-20..07-11) by
``bench/fraud_eval.py`` (mean AP + CP@100), before looking at any test fold with these features."""


@dataclass(frozen=True)
class SequenceTraining:
    """How the card-sequence transformer is trained."""

    model: SequenceConfig = field(default_factory=lambda: SequenceConfig(d_model=16, n_heads=2, n_layers=1,
                                                                         d_ff=32))
    epochs: int = 5
    batch_size: int = 512
    negative_fraction: float = 0.2
    """Share of genuine transactions kept for training (all frauds are kept): CPU time."""
    learning_rate: float = 3e-3
    stacking_folds: int = 2
    seed: int = 0


# --------------------------------------------------------------------------- sequence model

def train_sequence_model(sequences: np.ndarray, labels: np.ndarray,
                         settings: SequenceTraining = SequenceTraining()) -> CardSequenceEncoder:
    """Fit the transformer with binary cross-entropy.

    Parameters
    ----------
    sequences : (N, K, S) float32 from ``features.compute_offline_features``.
    labels : (N,) 0/1 fraud labels.
    """
    torch.manual_seed(settings.seed)
    keep = (np.asarray(labels) == 1) | (
        np.random.default_rng(settings.seed).random(len(labels)) < settings.negative_fraction)
    sequences, labels = sequences[keep], np.asarray(labels)[keep]
    model = CardSequenceEncoder(settings.model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    x = torch.from_numpy(np.ascontiguousarray(sequences, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(settings.seed)
    steps = settings.epochs * ((len(x) + settings.batch_size - 1) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.learning_rate, total_steps=steps)
    model.train()
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(settings.batch_size):
            optimiser.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def sequence_logits(models: list[CardSequenceEncoder], sequences: np.ndarray,
                    batch_size: int = 8192) -> np.ndarray:
    """Mean logit of one or more sequence models; (N, K, S) -> (N,) float64."""
    x = torch.from_numpy(np.ascontiguousarray(sequences, dtype=np.float32))
    out = np.zeros(len(x))
    with torch.inference_mode():
        for model in models:
            out += np.concatenate([model(chunk).numpy() for chunk in x.split(batch_size)]) if len(x) else 0.0
    return out / len(models)


def out_of_fold_sequence_logits(sequences: np.ndarray, labels: np.ndarray, customers: np.ndarray,
                                settings: SequenceTraining = SequenceTraining()
                                ) -> tuple[np.ndarray, list[CardSequenceEncoder]]:
    """Stacking inputs without leakage: each card's logits come from a model that never saw it.

    Cards are split into ``stacking_folds`` groups by customer id; the fold models are returned
    and their mean logit is used on new data.

    Returns
    -------
    oof_logits : (N,) float64; models : the fold models.
    """
    cards = np.asarray(customers)
    if not np.issubdtype(cards.dtype, np.integer):  # text ids such as "c-42"
        cards = pd.factorize(cards)[0]
    fold_of = cards.astype(np.int64) % settings.stacking_folds
    oof = np.zeros(len(labels))
    models = []
    for fold in range(settings.stacking_folds):
        held = fold_of == fold
        model = train_sequence_model(sequences[~held], labels[~held], settings)
        oof[held] = sequence_logits([model], sequences[held])
        models.append(model)
    return oof, models


# --------------------------------------------------------------------------- whole model

@dataclass
class FittedModel:
    """A trained booster (+ optional stacked sequence models) and its Platt calibration."""

    booster: lgb.Booster
    sequence_models: list[CardSequenceEncoder]
    model_features: tuple[str, ...]
    platt: tuple[float, float] = (1.0, 0.0)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_sequence(self) -> bool:
        """Whether the booster reads the stacked sequence logit."""
        return bool(self.sequence_models)

    def inputs(self, features: np.ndarray, sequences: np.ndarray | None) -> np.ndarray:
        """(N, F) features [+ sequences (N, K, S)] -> booster inputs (N, F [+ 1]) float64."""
        features = np.asarray(features, dtype=np.float64)
        if not self.uses_sequence:
            return features
        if sequences is None:
            raise ValueError("this model stacks the card-sequence transformer: pass sequences")
        return np.column_stack([features, sequence_logits(self.sequence_models, sequences)])

    def margin(self, features: np.ndarray, sequences: np.ndarray | None = None) -> np.ndarray:
        """Raw booster score (log-odds) per row; (N,) float64."""
        return np.asarray(self.booster.predict(self.inputs(features, sequences), raw_score=True))

    def predict(self, features: np.ndarray, sequences: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probability per row; (N,) float64."""
        return platt_probability(self.margin(features, sequences), *self.platt)


def fit_model(features: np.ndarray, labels: np.ndarray, *, sequences: np.ndarray | None = None,
              customers: np.ndarray | None = None, params: GbmParams = GbmParams(),
              sequence_settings: SequenceTraining | None = None) -> FittedModel:
    """Train the booster, stacked on out-of-fold sequence logits when ``sequence_settings`` is given.

    Parameters
    ----------
    features : (N, F) float32 in FEATURE_NAMES order; labels : (N,) 0/1.
    sequences : (N, K, S) float32, needed with ``sequence_settings``; customers : (N,) card ids
        used to split the stacking folds.
    """
    names = tuple(FEATURE_NAMES)
    sequence_models: list[CardSequenceEncoder] = []
    x = np.asarray(features, dtype=np.float64)
    if sequence_settings is not None:
        if sequences is None or customers is None:
            raise ValueError("the sequence model needs sequences and customers")
        oof, sequence_models = out_of_fold_sequence_logits(sequences, labels, customers, sequence_settings)
        x = np.column_stack([x, oof])
        names = names + (SEQUENCE_FEATURE,)
    dataset = lgb.Dataset(x, label=labels, feature_name=list(names), free_raw_data=True)
    booster = lgb.train(params.lgb_params(), dataset, num_boost_round=params.n_estimators)
    return FittedModel(booster=booster, sequence_models=sequence_models, model_features=names,
                       params={"gbm": asdict(params),
                               "sequence": asdict(sequence_settings) if sequence_settings else None})


def fit_platt(margin: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling on a held-out period: (slope, intercept) of sigmoid(slope * margin + b).

    Strictly monotone (slope > 0 on any sensible model), so rankings are unchanged.
    """
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(margin).reshape(-1, 1), labels)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


# --------------------------------------------------------------------------- metrics on a period

def holdout_metrics(scores: np.ndarray, frame: pd.DataFrame, top_k: int = 100) -> dict[str, float]:
    """AUC ROC, AP, Card Precision@k, Brier on a labelled period (handbook definitions)."""
    from services.fraud.evaluation import assess

    return assess(scores, frame, top_k=top_k) | {
        "brier": float(np.mean((scores - frame.TX_FRAUD.to_numpy()) ** 2))}


def train_candidate(labelled: pd.DataFrame, sequences: np.ndarray | None = None, *,
                    holdout_days: int = 7, delay_days: int = 7, params: GbmParams = GbmParams(),
                    sequence_settings: SequenceTraining | None = None
                    ) -> tuple[FittedModel, dict[str, float]]:
    """Train a candidate on older labelled days and evaluate it on the latest ``holdout_days``.

    For a retraining task: ``labelled`` already holds FEATURE_NAMES columns plus TX_FRAUD,
    TX_DATETIME, CUSTOMER_ID and TX_TIME_DAYS. The periods are :class:`CandidatePeriods`: the
    training part ends ``delay_days`` before the holdout (labels are known a week late), the
    booster is Platt-calibrated on the first half of the holdout, and metrics are measured on the
    whole holdout (ranking metrics do not depend on the calibration). The calibration half needs a
    fraud and a legitimate transaction, the training days some rows of each (else scikit-learn
    or LightGBM refuse): :func:`services.fraud.retraining.check_enough_labels` says so first.

    Returns
    -------
    The fitted model and its holdout metrics (auc_roc, average_precision, card_precision_at_100,
    brier, n_train, n_holdout, train_seconds).
    """
    labelled = labelled.loc[:, ~labelled.columns.duplicated(keep="last")]  # e.g. TX_AMOUNT twice
    days = labelled.TX_TIME_DAYS.to_numpy()
    periods = CandidatePeriods(int(days.max()), holdout_days, delay_days)
    holdout = days >= periods.first_holdout_day
    train = days <= periods.last_training_day
    started = time.perf_counter()
    seq = None if sequences is None else sequences[train]
    model = fit_model(labelled.loc[train, list(FEATURE_NAMES)].to_numpy(np.float32),
                      labelled.TX_FRAUD.to_numpy()[train], sequences=seq,
                      customers=labelled.CUSTOMER_ID.to_numpy()[train], params=params,
                      sequence_settings=sequence_settings)
    seconds = time.perf_counter() - started
    hold = labelled[holdout]
    hold_seq = None if sequences is None else sequences[holdout]
    margin = model.margin(hold[list(FEATURE_NAMES)].to_numpy(np.float32), hold_seq)
    first_half = hold.TX_TIME_DAYS.to_numpy() <= periods.last_calibration_day
    model.platt = fit_platt(margin[first_half], hold.TX_FRAUD.to_numpy()[first_half])
    metrics = holdout_metrics(platt_probability(margin, *model.platt), hold)
    return model, metrics | {"n_train": int(train.sum()), "n_holdout": int(holdout.sum()),
                             "train_seconds": round(seconds, 1)}


# --------------------------------------------------------------------------- artifact

def export_sequence_onnx(model: nn.Module, directory: Path) -> None:
    """The sequence model as ONNX (dynamic batch) and its int8 copy, by the runtime's exporter."""
    example = torch.zeros(2, SEQUENCE_STEPS, len(SEQUENCE_CHANNELS))
    example[:, -1, 0] = 1.0  # the current step is always valid
    quantize_onnx_int8(export_onnx(model, example, directory / SEQUENCE_ONNX_FILE), directory / SEQUENCE_INT8_FILE)


def write_payload(model: FittedModel, directory: Path) -> None:
    """Write booster, compact trees, sequence weights/ONNX and scorer config into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.booster.save_model(str(directory / BOOSTER_FILE))
    CompactTrees.from_booster(model.booster).save(directory / TREES_FILE)
    config = {"model_features": list(model.model_features), "platt": list(model.platt),
              "params": model.params}
    if model.uses_sequence:
        merged = SequenceEnsemble(model.sequence_models).eval()
        torch.save({"config": asdict(model.sequence_models[0].config), "n_models": len(model.sequence_models),
                    "weights": merged.state_dict()}, directory / SEQUENCE_STATE_FILE)
        export_sequence_onnx(merged, directory)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def train_fraud_model(train_df: pd.DataFrame, valid_df: pd.DataFrame, *, output_dir: Path,
                      version: str, context_df: pd.DataFrame | None = None,
                      test_df: pd.DataFrame | None = None, params: GbmParams = GbmParams(),
                      sequence_settings: SequenceTraining | None = None, data_description: str = "",
                      rebuild_command: str = "", card_notes: str = "",
                      extra: dict[str, Any] | None = None) -> ArtifactManifest:
    """Train on ``train_df``, Platt-calibrate and measure on the later ``valid_df``, seal an artifact.

    With the sequence model, its serving backend is then chosen by the runtime's measurement on
    ``valid_df``'s sequences and recorded in the card (:func:`record_sequence_backend`).

    Parameters
    ----------
    train_df, valid_df : labelled transactions in the handbook format (valid_df strictly later).
    output_dir : the models root; the artifact goes to ``output_dir / version``.
    context_df : optional transactions whose only role is window history for the features
        (e.g. the whole file); features only look backwards, so later rows change nothing.
    test_df : optional later labelled period, measured after calibration (``test_*`` metrics).
    card_notes : extra Markdown appended to the model card (provenance, citation, caveats).
    extra : more manifest ``extra`` fields (e.g. the training data's provenance).

    Returns
    -------
    The sealed manifest; metrics hold ``valid_*`` (calibration period) and ``test_*``.
    """
    frames = [f for f in (context_df, train_df, valid_df, test_df) if f is not None]
    allrows = pd.concat(frames).drop_duplicates("TRANSACTION_ID").reset_index(drop=True)
    features, sequences = compute_offline_features(allrows)
    position = pd.Series(np.arange(len(allrows)), index=allrows.TRANSACTION_ID.to_numpy())
    x, y = features.to_numpy(np.float32), allrows.TX_FRAUD.to_numpy()
    train_pos = position.loc[train_df.TRANSACTION_ID.to_numpy()].to_numpy()
    started = time.perf_counter()
    model = fit_model(x[train_pos], y[train_pos], sequences=sequences[train_pos],
                      customers=allrows.CUSTOMER_ID.to_numpy()[train_pos], params=params,
                      sequence_settings=sequence_settings)
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {"n_train": len(train_pos), "train_seconds": round(train_seconds, 1)}
    for prefix, frame in (("valid", valid_df), ("test", test_df)):
        if frame is None:
            continue
        pos = position.loc[frame.TRANSACTION_ID.to_numpy()].to_numpy()
        margin = model.margin(x[pos], sequences[pos])
        if prefix == "valid":
            model.platt = fit_platt(margin, y[pos])
        scores = platt_probability(margin, *model.platt)
        metrics |= {f"{prefix}_{k}": round(v, 4) for k, v in holdout_metrics(scores, allrows.iloc[pos]).items()}
        metrics[f"n_{prefix}"] = len(pos)
    directory = Path(output_dir) / version
    write_payload(model, directory)
    card = model_card(version, metrics, model, data_description, rebuild_command, card_notes)
    manifest = save_artifact(directory, name=MODEL_NAME, version=version, framework="lightgbm+onnx",
                             metrics=metrics, data=data_description, rebuild_command=rebuild_command,
                             model_card=card, extra={"model_features": list(model.model_features),
                                                     "params": model.params} | (extra or {}))
    if not model.uses_sequence:
        return manifest
    valid_pos = position.loc[valid_df.TRANSACTION_ID.to_numpy()].to_numpy()
    record_sequence_backend(directory, example_rows(sequences[valid_pos]), "calibration period")
    return load_manifest(directory, verify=False)


MEASURED_EXAMPLE_ROWS = 512


def example_rows(sequences: np.ndarray, rows: int = MEASURED_EXAMPLE_ROWS, seed: int = 0) -> np.ndarray:
    """Up to ``rows`` sequences drawn without replacement (the accuracy check's inputs)."""
    pick = np.random.default_rng(seed).permutation(len(sequences))[:rows]
    return sequences[np.sort(pick)]


def record_sequence_backend(directory: Path, example_sequences: np.ndarray, example_source: str,
                            command: str = "") -> str:
    """Measure the artifact's sequence backends, record the choice in its card; the chosen name.

    The record (manifest ``extra["serving_backend"]["sequence"]`` and a card section) holds each
    candidate's latency at batch 1, 8 and 64 and its largest logit difference from eager torch;
    :class:`~services.fraud.model.FraudScorer` serves the chosen one.
    """
    choice = measure_sequence_backends(directory, example_sequences)
    choice.conditions["example"] = f"{len(example_sequences)} sequences of the {example_source}"
    if command:
        choice.conditions["recorded_by"] = command
    record_backend_choice(directory, SEQUENCE_COMPONENT, choice)
    return choice.name


def model_card(version: str, metrics: dict[str, Any], model: FittedModel, data: str, rebuild: str,
               notes: str) -> str:
    """Markdown model card: what it is, data, metrics as measured, how to rebuild."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    sequence = ("LightGBM stacked with the card-sequence transformer's out-of-fold logit "
                f"(`{SEQUENCE_FEATURE}`)" if model.uses_sequence else "LightGBM on the tabular features")
    return (f"# fraud {version}\n\nCard-transaction fraud score: {sequence}, Platt-calibrated on a "
            "held-out period. Inputs: `services.fraud.features.FEATURE_NAMES` "
            f"({len(FEATURE_NAMES)} features) from the online `WindowAggregates` contract.\n\n"
            f"## Data\n{data or 'not recorded'}\n\n## Metrics (as measured)\n| metric | value |\n"
            f"|---|---|\n{rows}\n\n## Parameters\n```json\n{json.dumps(model.params, indent=1)}\n```\n\n"
            f"{notes}\n\n## Rebuild\n`{rebuild or 'not recorded'}`\n")


HANDBOOK_CARD_NOTES = """## Reading the metrics
`test_*`: the handbook's Chapter 3 test set (2018-08-08..08-14, cards known compromised removed), a week
after the calibration period - comparable with the handbook's Chapter 3 numbers (random forest AP 0.658,
logistic regression CP@100 0.291), though this model trains on 14 days instead of 7.
`valid_*`: the calibration week 2018-07-25..07-31 - the booster never saw it but Platt was fitted on it,
and known-compromised cards are not removed there, so its CP@100 is not comparable.
Protocol results (7-day train / 7-day delay / 7-day test folds): `.venv/bin/python bench/fraud_eval.py`.

## Provenance and licence
{citation}

The data are simulated by the handbook's generator; metrics on real card traffic will differ. Intended
use: ranking transactions for review in Tessera's fraud vertical; not a credit decision."""


def train_handbook_model(output_dir: Path, version: str, *, with_sequence: bool,
                         params: GbmParams = SELECTED_PARAMS) -> ArtifactManifest:
    """The shipped model: handbook data, trained 2018-07-11..07-24, calibrated 07-25..07-31.

    Measured on the handbook's Chapter 3 test set (2018-08-08..08-14, cards known compromised by
    then removed); nothing from after 2018-07-31 is used for fitting.
    """
    from services.fraud import handbook as hb

    df = hb.load_transactions()
    when = df.TX_DATETIME
    train = df[(when >= "2018-07-11") & (when < "2018-07-25")]
    valid = df[(when >= "2018-07-25") & (when < "2018-08-01")]
    _, test_pos = hb.train_test_split(df, hb.CHAPTER3_START)
    rebuild = (f".venv/bin/python -m services.fraud.training --output {output_dir} --version {version}"
               + ("" if with_sequence else " --no-sequence"))
    data = ("Fraud Detection Handbook simulated transactions (SIMULATED data, not real cards), file "
            f"{hb.HANDBOOK_FILE}: train 2018-07-11..07-24 ({len(train)} tx, {int(train.TX_FRAUD.sum())} "
            f"frauds), Platt calibration 2018-07-25..07-31 ({len(valid)} tx), test = handbook Chapter 3 "
            "test set 2018-08-08..08-14 with known-compromised cards removed. Features use the whole "
            "file as look-back history (exact from 2018-07-18; the first training week has truncated "
            "terminal windows).")
    notes = HANDBOOK_CARD_NOTES.format(citation=hb.CITATION)
    return train_fraud_model(train, valid, output_dir=output_dir, version=version, context_df=df,
                             test_df=df.iloc[test_pos], params=params,
                             sequence_settings=SequenceTraining() if with_sequence else None,
                             data_description=data, rebuild_command=rebuild, card_notes=notes)


# --------------------------------------------------------------------------- a bank's own export

REQUIRED_COLUMNS = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD")
"""The columns of a bank's export (the handbook's names); any other column is ignored."""
COLUMNS_HELP = ("one row a card transaction with columns TRANSACTION_ID (unique), TX_DATETIME (ISO 8601; UTC "
                "unless it has an offset), CUSTOMER_ID (the card), TERMINAL_ID, TX_AMOUNT (>= 0) and TX_FRAUD "
                "(1 fraud, 0 legitimate; true/false accepted)")
CALIBRATION_DAYS = 7
"""The last days of the range: Platt calibration and the card's ``valid_*`` metrics; the rest trains."""
FRAUD_LABELS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}

USER_DATA_NOTES = """## Reading the metrics
`valid_*`: the last days of the range, held out from the trees and the transformer but used to fit the
Platt calibration (AUC, AP and CP@100 rank, so the calibration does not move them; the Brier score is
optimistic). Earlier rows of the file serve as look-back history for the features. For prequential
folds on the same file: `tessera bench fraud_eval --data FILE [--from DATE --to DATE]`.
Intended use: ranking this bank's transactions for review in Tessera's fraud vertical; not a credit decision."""


def load_transactions_file(path: Path) -> pd.DataFrame:
    """A bank's export (CSV or Parquet, :data:`REQUIRED_COLUMNS`) as handbook-format transactions.

    TX_DATETIME becomes naive UTC; TX_TIME_SECONDS (Unix time, as the webhook computes it) and
    TX_TIME_DAYS are derived from it, replacing any such columns of the file; TX_FRAUD becomes 0/1.
    Text transaction ids are numbered in time order (the features break time ties by id).

    Raises
    ------
    TrainingDataError
        Naming the missing columns, or the column and rows of unreadable values.
    """
    frame = read_table(path, REQUIRED_COLUMNS)
    frame["TX_DATETIME"] = parse_timestamps(frame.TX_DATETIME, "TX_DATETIME")
    frame["TX_AMOUNT"] = _amounts(frame.TX_AMOUNT)
    frame["TX_FRAUD"] = _labels(frame.TX_FRAUD)
    for column in ("TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID"):
        _require_values(frame[column], column)
    duplicated = frame.TRANSACTION_ID.duplicated(keep=False).to_numpy()
    if duplicated.any():
        raise TrainingDataError(f"TRANSACTION_ID: {int(duplicated.sum())} rows share an id: "
                                f"{bad_rows_text(duplicated, frame.TRANSACTION_ID)}")
    seconds = (frame.TX_DATETIME - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    frame["TX_TIME_SECONDS"] = seconds.astype(np.int64)
    frame["TX_TIME_DAYS"] = frame.TX_TIME_SECONDS // SECONDS_PER_DAY
    if not pd.api.types.is_integer_dtype(frame.TRANSACTION_ID):
        frame["SOURCE_TRANSACTION_ID"] = frame.TRANSACTION_ID
        order = np.lexsort((np.arange(len(frame)), frame.TX_TIME_SECONDS.to_numpy()))
        frame["TRANSACTION_ID"] = np.argsort(order).astype(np.int64)
    return frame.sort_values("TRANSACTION_ID", kind="stable").reset_index(drop=True)


def _require_values(values: pd.Series, column: str) -> None:
    empty = (values.isna() | (values.astype("string").str.strip() == "")).to_numpy()
    if empty.any():
        raise TrainingDataError(f"{column}: {int(empty.sum())} empty value(s): {bad_rows_text(empty, values)}")


def _amounts(values: pd.Series) -> pd.Series:
    amounts = pd.to_numeric(values, errors="coerce")
    bad = (amounts.isna() | ~np.isfinite(amounts) | (amounts < 0)).to_numpy()
    if bad.any():
        raise TrainingDataError(f"TX_AMOUNT: {int(bad.sum())} value(s) are not amounts >= 0: "
                                f"{bad_rows_text(bad, values)}")
    return amounts.astype(np.float64)


def _labels(values: pd.Series) -> pd.Series:
    labels = values.astype("string").str.strip().str.lower().map(FRAUD_LABELS)
    bad = labels.isna().to_numpy()
    if bad.any():
        raise TrainingDataError(f"TX_FRAUD: {int(bad.sum())} value(s) are not labels (1 fraud, 0 legitimate; "
                                f"every row needs one): {bad_rows_text(bad, values)}")
    return labels.astype(np.int64)


def split_calibration(transactions: pd.DataFrame, calibration_days: int = CALIBRATION_DAYS
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, calibration rows): the last ``calibration_days`` calendar days calibrate.

    Each part needs a fraud and a legitimate transaction (LightGBM and the calibrator learn from
    both): :class:`TrainingDataError` says which part lacks what.
    """
    first_calibration_day = transactions.TX_DATETIME.max().normalize() - pd.Timedelta(days=calibration_days - 1)
    later = (first_calibration_day <= transactions.TX_DATETIME).to_numpy()
    parts = transactions[~later], transactions[later]
    for name, part in zip(("training", "calibration"), parts, strict=True):
        frauds = int(part.TX_FRAUD.sum())
        if frauds == 0 or frauds == len(part):
            span = f"{part.TX_DATETIME.min().date()}..{part.TX_DATETIME.max().date()}" if len(part) else "none"
            raise TrainingDataError(
                f"the {name} days ({span}; the last {calibration_days} days of the range calibrate, the days "
                f"before train) hold {frauds} fraud(s) among {len(part)} transactions: each part needs frauds "
                "and legitimate transactions; widen --from/--to or change --calibration-days")
    return parts


def train_on_file(path: Path, output_dir: Path, version: str | None = None, *, period: DateRange = DateRange(),
                  calibration_days: int = CALIBRATION_DAYS, with_sequence: bool = True,
                  params: GbmParams | None = None,
                  sequence_settings: SequenceTraining | None = None) -> ArtifactManifest:
    """A model of a bank's own export: trained on ``period`` but its last days, calibrated on those.

    The card records the file (its sha256, rows and dates) and the rows and dates used
    (manifest ``extra["training_data"]``). ``version`` defaults to ``data-<sha256 prefix>``;
    ``params`` to :data:`SELECTED_PARAMS`, ``sequence_settings`` to :class:`SequenceTraining`'s.

    Raises
    ------
    TrainingDataError
        The file, its columns, the range or the labels in it cannot be trained on.
    """
    transactions = load_transactions_file(path)
    used = period.select(transactions, "TX_DATETIME")
    train, calibration = split_calibration(used, calibration_days)
    provenance = DataProvenance.of(path, transactions.TX_DATETIME, used.TX_DATETIME)
    version = version or f"data-{provenance.sha256[:12]}"
    history = transactions[used.TX_DATETIME.max() >= transactions.TX_DATETIME]
    rebuild = (f"tessera train fraud --data {path}{period.option_text()} --version {version}"
               + ("" if calibration_days == CALIBRATION_DAYS else f" --calibration-days {calibration_days}")
               + ("" if with_sequence else " --no-sequence"))
    data = (f"{provenance.describe()} Training {_span(train)} ({len(train)} tx, {int(train.TX_FRAUD.sum())} "
            f"frauds); Platt calibration and `valid_*` metrics {_span(calibration)} ({len(calibration)} tx, "
            f"{int(calibration.TX_FRAUD.sum())} frauds).")
    record = provenance.as_card() | {"training_days": _span(train), "calibration_days": _span(calibration)}
    sequence = (sequence_settings or SequenceTraining()) if with_sequence else None
    return train_fraud_model(train, calibration, output_dir=output_dir, version=version, context_df=history,
                             params=params or SELECTED_PARAMS, sequence_settings=sequence, data_description=data,
                             rebuild_command=rebuild, card_notes=USER_DATA_NOTES, extra={TRAINING_DATA_KEY: record})


def _span(part: pd.DataFrame) -> str:
    return f"{part.TX_DATETIME.min().date()}..{part.TX_DATETIME.max().date()}"


def simulated_example_sequences(rows: int = MEASURED_EXAMPLE_ROWS) -> np.ndarray:
    """Card sequences of simulated traffic: inputs for re-measuring an artifact's backends."""
    from services.fraud.simulate import SimulationConfig, simulate_transactions

    transactions = simulate_transactions(SimulationConfig(n_customers=300, n_terminals=600, n_days=20, seed=0))
    return example_rows(compute_offline_features(transactions)[1], rows)


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """``tessera train fraud`` options (``python -m services.fraud.training`` takes the same)."""
    parser = argparse.ArgumentParser(
        prog="tessera train fraud",
        description="Train a fraud model artifact: on the handbook data (the shipped model) or, with --data, "
                    "on a bank's own export.")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="folder of the fraud artifacts (default: TESSERA_MODELS_DIR/fraud)")
    parser.add_argument("--version", help="artifact version (required for the handbook model; default "
                                          "with --data: data-<first 12 hex digits of the file's sha256>)")
    parser.add_argument("--no-sequence", action="store_true", help="LightGBM only, no transformer")
    add_data_arguments(parser, columns_help=COLUMNS_HELP)
    parser.add_argument("--calibration-days", type=int, default=CALIBRATION_DAYS, metavar="N",
                        help=f"with --data: the last N days calibrate and measure (default {CALIBRATION_DAYS})")
    parser.add_argument("--measure-backend", type=Path, metavar="ARTIFACT",
                        help="no training: re-measure the sequence-model backends of this artifact directory "
                             "on simulated traffic and record the choice in its card")
    return parser


def main(argv: list[str] | None = None) -> None:
    """CLI: train the handbook model or a bank's export into ``<output>/<version>``; print its metrics.

    Bad files, columns, values or dates exit with status 2 and one line saying what and where.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    output = args.output or get_settings().models_dir / MODEL_NAME
    try:
        if args.measure_backend:
            chosen = record_sequence_backend(args.measure_backend, simulated_example_sequences(), "simulated traffic",
                                             f"tessera train fraud --measure-backend {args.measure_backend}")
            print(json.dumps(load_manifest(args.measure_backend, verify=False).extra["serving_backend"], indent=1))
            print(f"serving backend of {args.measure_backend}: {chosen}")
            return
        if args.data:
            if args.calibration_days < 1:
                parser.error("--calibration-days must be at least 1")
            manifest = train_on_file(args.data, output, args.version, period=date_range_from(args),
                                     calibration_days=args.calibration_days, with_sequence=not args.no_sequence)
        else:
            manifest = _train_handbook_from_args(parser, args, output)
    except TrainingDataError as exc:
        parser.error(str(exc))
    print(json.dumps(manifest.metrics | {"version": manifest.version}, indent=1))


def _train_handbook_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                              output: Path) -> ArtifactManifest:
    from services.fraud import handbook as hb

    if args.date_from or args.date_to:
        parser.error("--from/--to select days of --data; the handbook model's days are fixed")
    if not args.version:
        parser.error("--version is required for the handbook model")
    if not hb.dataset_path().exists():
        parser.error(f"handbook data not found at {hb.dataset_path()}; pass --data FILE to train on your own")
    return train_handbook_model(output, args.version, with_sequence=not args.no_sequence)


if __name__ == "__main__":
    main()
