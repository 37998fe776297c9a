"""The handbook's evaluation protocol: metrics, the Chapter 3 split and prequential folds.

Metrics follow the handbook's ``shared_functions``: AUC ROC and Average Precision over all test
transactions; Card Precision@k per day = (fraudulent cards among the k cards with the highest
max score that day) / k, where cards already found fraudulent among an earlier day's top k are
removed, averaged over the test days.

Protocol: for a training start date, 7 days train, 7 days delay (unused, labels not yet known),
7 days test with cards known compromised removed (``handbook.train_test_split``). Features for
all rows are computed once from the whole file; they only look backwards and only use labels
at least the delay old. Which training start dates: :data:`HANDBOOK_FOLDS` on the handbook's
file, :func:`folds_for_range` on any other file or date range.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from model_runtime.training_data import TrainingDataError
from services.fraud import handbook as hb
from services.fraud.features import FEATURE_NAMES, HANDBOOK_FEATURES, SECONDS_PER_DAY
from services.fraud.handbook import train_test_split


def card_precision_top_k(scores: np.ndarray, frame: pd.DataFrame, top_k: int = 100) -> float:
    """Mean daily Card Precision@k with already-detected cards removed (handbook definition).

    Parameters
    ----------
    scores : (N,) scores aligned with ``frame`` rows.
    frame : test transactions with TX_TIME_DAYS, CUSTOMER_ID, TX_FRAUD.
    """
    data = pd.DataFrame({"day": frame.TX_TIME_DAYS.to_numpy(), "card": frame.CUSTOMER_ID.to_numpy(),
                         "fraud": frame.TX_FRAUD.to_numpy(), "score": np.asarray(scores)})
    detected: set[object] = set()  # card ids as stored: integers or text such as "c-42"
    daily = []
    for _, day in data.groupby("day", sort=True):
        day = day[~day.card.isin(detected)]
        per_card = day.groupby("card")[["score", "fraud"]].max()
        top = per_card.sort_values("score", ascending=False, kind="stable").head(top_k)
        found = top.index[top.fraud == 1]
        daily.append(len(found) / top_k)
        detected.update(found)
    return float(np.mean(daily))


COMPROMISE_DAYS = 28
"""The handbook simulator's scenario 2 marks every transaction at a drawn terminal as fraud for
this many days."""


def visible_fraud(transactions: pd.DataFrame, delay_days: int = 7) -> np.ndarray:
    """(N,) bool: frauds a model could in principle see at scoring time, from the simulator's truth.

    Uses ``TX_FRAUD_SCENARIO`` (the simulator's own record, never a model input). Scenario 1 (amount
    over 220) and 3 (a card's amounts multiplied by 5) show in the transaction itself. A scenario 2
    fraud (a compromised terminal) is visible only if a fraud of the same compromise at that terminal
    is already labelled, i.e. happened in (t - 28 d, t - delay]; a terminal compromised within the
    label delay looks like any other terminal. Exact while one terminal's compromises do not
    overlap in time (the simulator draws 2 of 10,000 terminals a day); a fresh compromise within 28
    days of an earlier one at the same terminal counts as visible.
    """
    day = SECONDS_PER_DAY
    times = transactions.TX_TIME_SECONDS.to_numpy(dtype=np.int64)
    times = times - times.min() + COMPROMISE_DAYS * day  # window starts stay inside their terminal's keys
    terminals = pd.factorize(transactions.TERMINAL_ID.to_numpy())[0].astype(np.int64)
    scenario = transactions.TX_FRAUD_SCENARIO.to_numpy()
    fraud = transactions.TX_FRAUD.to_numpy() == 1
    span = int(times.max()) + 1
    terminal_frauds = np.sort(terminals[scenario == 2] * span + times[scenario == 2])
    lower = np.searchsorted(terminal_frauds, terminals * span + times - COMPROMISE_DAYS * day, side="right")
    upper = np.searchsorted(terminal_frauds, terminals * span + times - delay_days * day, side="right")
    return fraud & (np.isin(scenario, (1, 3)) | ((scenario == 2) & (upper > lower)))


def card_precision_ceiling(transactions: pd.DataFrame, test_positions: np.ndarray, top_k: int = 100) -> float:
    """Card Precision@k of an oracle that ranks every :func:`visible_fraud` card first and the
    invisible frauds last: what a model that finds every visible fraud reaches on these test days
    (one could exceed it only by catching invisible frauds by chance)."""
    visible = visible_fraud(transactions)[test_positions]
    frame = transactions.iloc[test_positions]
    oracle = np.where(visible, 1.0, np.where(frame.TX_FRAUD.to_numpy() == 1, -1.0, 0.0))
    return card_precision_top_k(oracle, frame, top_k)


def assess(scores: np.ndarray, frame: pd.DataFrame, top_k: int = 100) -> dict[str, float]:
    """AUC ROC, Average Precision and Card Precision@k of ``scores`` on ``frame``."""
    labels = frame.TX_FRAUD.to_numpy()
    return {"auc_roc": float(roc_auc_score(labels, scores)),
            "average_precision": float(average_precision_score(labels, scores)),
            f"card_precision_at_{top_k}": card_precision_top_k(scores, frame, top_k)}


FOLD_DAYS = 7 + 7 + 7
"""One fold: 7 days train, 7 days delay, 7 days test (``handbook.train_test_split``'s defaults)."""


@dataclass(frozen=True)
class FoldPlan:
    """The training start dates an evaluation runs.

    ``test_starts``: the prequential test folds, latest first; ``validation_starts``: earlier folds
    for model selection (empty: no selection); ``chapter3_start``: the handbook's single-split fold
    (None off the handbook's file).
    """

    test_starts: list[dt.datetime]
    validation_starts: list[dt.datetime]
    chapter3_start: dt.datetime | None = None


HANDBOOK_FOLDS = FoldPlan(hb.TEST_FOLD_STARTS, hb.VALIDATION_FOLD_STARTS, hb.CHAPTER3_START)


def folds_for_range(first_day: dt.date, last_day: dt.date, n_folds: int = 4) -> FoldPlan:
    """Prequential folds inside ``first_day..last_day`` (inclusive), laid out as the handbook's.

    The latest fold's test week ends on ``last_day``; each earlier fold starts a week before the
    next, as long as it starts on or after ``first_day``. Validation folds end two weeks before the
    earliest test fold starts (the handbook's test folds start 07-25..08-15, its validation folds
    07-11 back to 06-20) and are kept where they fit. Features look back up to 30 days: folds in a
    range's first month see truncated windows.

    Raises
    ------
    TrainingDataError
        The range holds no whole fold (21 days).
    """
    if n_folds < 1:
        raise TrainingDataError("--folds must be at least 1")
    first = dt.datetime.combine(first_day, dt.time())
    latest = dt.datetime.combine(last_day, dt.time()) - dt.timedelta(days=FOLD_DAYS - 1)
    test = [start for start in hb.prequential_starts(latest, n_folds) if start >= first]
    if not test:
        raise TrainingDataError(f"{first_day}..{last_day} is shorter than one fold ({FOLD_DAYS} days: "
                                "7 train, 7 delay, 7 test)")
    validation_latest = test[-1] - dt.timedelta(days=14)
    validation = [start for start in hb.prequential_starts(validation_latest, n_folds) if start >= first]
    return FoldPlan(test, validation)


@dataclass
class PreparedData:
    """The whole file with its features and sequences, row-aligned."""

    transactions: pd.DataFrame
    features: np.ndarray   # (N, F) float32, FEATURE_NAMES order
    sequences: np.ndarray  # (N, K, S) float32

    def handbook_features(self) -> np.ndarray:
        """(N, 15) the handbook's baseline inputs."""
        index = [FEATURE_NAMES.index(name) for name in HANDBOOK_FEATURES]
        return self.features[:, index]


Scorer = Callable[[PreparedData, np.ndarray, np.ndarray], np.ndarray]
"""(data, train_positions, test_positions) -> (len(test),) scores: trains and predicts one fold."""


@dataclass(frozen=True)
class FoldResult:
    """Metrics of one model on one fold."""

    start: str
    metrics: dict[str, float]
    seconds: float


def evaluate_fold(data: PreparedData, scorer: Scorer, start: dt.datetime) -> FoldResult:
    """Train and assess one model on the fold whose training starts at ``start``."""
    train_pos, test_pos = train_test_split(data.transactions, start)
    began = time.perf_counter()
    scores = scorer(data, train_pos, test_pos)
    seconds = time.perf_counter() - began
    return FoldResult(start=start.date().isoformat(),
                      metrics=assess(scores, data.transactions.iloc[test_pos]), seconds=seconds)


def evaluate_folds(data: PreparedData, scorer: Scorer, starts: list[dt.datetime]) -> dict:
    """Prequential assessment: per-fold metrics plus mean and std (population, as numpy)."""
    folds = [evaluate_fold(data, scorer, start) for start in starts]
    names = folds[0].metrics.keys()
    summary = {name: {"mean": float(np.mean([f.metrics[name] for f in folds])),
                      "std": float(np.std([f.metrics[name] for f in folds]))} for name in names}
    return {"folds": [f.__dict__ for f in folds], "summary": summary,
            "seconds": float(sum(f.seconds for f in folds))}


class Classifier(Protocol):
    """What a baseline needs of a scikit-learn-style classifier."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> object: ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


def sklearn_scorer(make_model: Callable[[], Classifier], scale: bool = True) -> Scorer:
    """A handbook baseline: sklearn-style classifier on the 15 handbook features, standard-scaled."""
    from sklearn.preprocessing import StandardScaler

    def score(data: PreparedData, train_pos: np.ndarray, test_pos: np.ndarray) -> np.ndarray:
        x = data.handbook_features()
        x_train, x_test = x[train_pos].astype(np.float64), x[test_pos].astype(np.float64)
        if scale:
            scaler = StandardScaler().fit(x_train)
            x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
        model = make_model()
        model.fit(x_train, data.transactions.TX_FRAUD.to_numpy()[train_pos])
        return model.predict_proba(x_test)[:, 1]
    return score
