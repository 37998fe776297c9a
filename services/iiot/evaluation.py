"""Scores of the failure-risk models and the gradient-boosting baseline they are compared with.

- RUL: :func:`rmse` and the PHM08 challenge score (:func:`phm08_score`; late predictions cost more).
- Failure classification: :func:`classification_scores` (F1, precision, recall at a threshold,
  ROC AUC and average precision), the threshold from :func:`best_f1_threshold` on **validation**
  predictions only.
- Blends: :func:`choose_blend_weight` picks the share of two models' predictions on **validation**
  predictions only (the attention model and the LightGBM baseline of the same run).
- The baseline: LightGBM (:func:`fit_gbm`, early stopping on the validation split) on the window
  statistics, trends and spectral energies of :func:`services.iiot.features.batch_window_features`
  (C-MAPSS: with each engine's history features beside them, :func:`services.iiot.features.history_features`),
  or on the tabular inputs where there is no window (AI4I).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
GbmTask = Literal["regression", "binary"]


def rmse(predicted: npt.ArrayLike, true: npt.ArrayLike) -> float:
    """Root mean squared error."""
    d = np.asarray(predicted, np.float64) - np.asarray(true, np.float64)
    return float(np.sqrt(np.mean(d ** 2)))


def phm08_score(predicted: npt.ArrayLike, true: npt.ArrayLike) -> float:
    """PHM08 score: sum of exp(-d/13) - 1 for early (d < 0) and exp(d/10) - 1 for late, d = predicted - true."""
    d = np.asarray(predicted, np.float64) - np.asarray(true, np.float64)
    return float(np.sum(np.where(d < 0, np.exp(-d / 13.0) - 1.0, np.exp(d / 10.0) - 1.0)))


def rul_scores(predicted: npt.ArrayLike, true: npt.ArrayLike, cap: float | None = None) -> dict[str, float]:
    """RMSE and PHM08 score against ``true``, and against ``true`` capped at ``cap`` when given."""
    scores = {"rmse": rmse(predicted, true), "phm08": phm08_score(predicted, true)}
    if cap is not None:
        capped = np.minimum(np.asarray(true, np.float64), cap)
        scores |= {"rmse_capped_truth": rmse(predicted, capped), "phm08_capped_truth": phm08_score(predicted, capped)}
    return scores


def best_f1_threshold(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """The probability threshold with the highest F1 on (validation) ``labels``; midway between scores."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(np.asarray(labels), np.asarray(probabilities))
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def classification_scores(labels: npt.ArrayLike, probabilities: npt.ArrayLike, threshold: float,
                          ) -> dict[str, float]:
    """F1, precision and recall at ``threshold``, ROC AUC and average precision."""
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

    y = np.asarray(labels).astype(int)
    p = np.asarray(probabilities, np.float64)
    predicted = (p >= threshold).astype(int)
    return {"f1": float(f1_score(y, predicted, zero_division=0)),
            "precision": float(precision_score(y, predicted, zero_division=0)),
            "recall": float(recall_score(y, predicted, zero_division=0)),
            "auc": float(roc_auc_score(y, p)), "average_precision": float(average_precision_score(y, p)),
            "threshold": float(threshold), "positives": int(y.sum()), "rows": int(y.size)}


BLEND_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))
"""The shares of the first model tried by :func:`choose_blend_weight` (0, 0.05, ..., 1)."""


def choose_blend_weight(first: FloatArray, second: FloatArray, loss: Callable[[FloatArray], float],
                        weights: tuple[float, ...] = BLEND_WEIGHTS) -> tuple[float, dict[float, float]]:
    """The share ``w`` of ``first`` in ``w * first + (1 - w) * second`` with the lowest ``loss`` of the blend,
    and the loss of every share tried. Ties go to the share nearest an even blend (0.5). Call it on validation
    predictions only: the chosen share is then applied once to the test predictions."""
    losses = {w: float(loss(w * np.asarray(first, np.float64) + (1.0 - w) * np.asarray(second, np.float64)))
              for w in weights}
    best = min(losses.values())
    chosen = min((w for w, value in losses.items() if value <= best + 1e-12), key=lambda w: abs(w - 0.5))
    return chosen, losses


def best_f1(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """The F1 at :func:`best_f1_threshold` (a validation figure: the threshold is fitted to these labels)."""
    return classification_scores(labels, probabilities, best_f1_threshold(labels, probabilities))["f1"]


@dataclass
class GbmModel:
    """A fitted LightGBM booster and the task it was fitted for."""

    booster: Any
    task: GbmTask

    def predict(self, features: FloatArray) -> npt.NDArray[np.float64]:
        """Predicted RUL (regression) or probability (binary) per row."""
        return np.asarray(self.booster.predict(features, num_iteration=self.booster.best_iteration))


GBM_PARAMS: dict[str, Any] = {"learning_rate": 0.03, "num_leaves": 31, "min_data_in_leaf": 20,
                              "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0}
"""LightGBM settings of :func:`fit_gbm` unless its ``params`` override them."""


def fit_gbm(task: GbmTask, train_x: FloatArray, train_y: FloatArray, val_x: FloatArray, val_y: FloatArray, *,
            seed: int = 0, rounds: int = 2000, threads: int = 2, params: Mapping[str, Any] | None = None,
            ) -> GbmModel:
    """LightGBM with early stopping on the validation split (never on test); ``params`` override
    :data:`GBM_PARAMS`."""
    import lightgbm as lgb

    params = {"objective": task, **GBM_PARAMS, **(params or {}), "seed": seed, "num_threads": threads,
              "verbose": -1, "metric": "rmse" if task == "regression" else "average_precision"}
    train = lgb.Dataset(train_x, label=train_y)
    valid = lgb.Dataset(val_x, label=val_y, reference=train)
    booster = lgb.train(params, train, num_boost_round=rounds, valid_sets=[valid],
                        callbacks=[lgb.early_stopping(100, verbose=False)])
    return GbmModel(booster, task)
