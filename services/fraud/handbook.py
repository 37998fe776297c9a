"""The Fraud Detection Handbook's public data and protocol pieces.

Data: simulated card transactions published with *Reproducible Machine Learning for Credit Card
Fraud Detection - Practical Handbook* (Le Borgne, Siblini, Lebichot, Bontempi, ULB, 2022;
repository Fraud-Detection-Handbook; notebook code GPL-3.0, prose CC BY-SA 4.0, no data licence
stated - cite the handbook). The data are **simulated**, not real card data.

This module loads the file kept under ``../shared/datasets/fraud_handbook``, re-implements the
handbook's own pandas feature code (per-entity ``rolling``) as an independent reference, and its
train/delay/test split with removal of cards already known to be compromised.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd

HANDBOOK_FILE = "transactions_2018-06-11_to_2018-09-14.csv.gz"
EXACT_FEATURES_FROM = pd.Timestamp("2018-07-18")
"""Features from the file alone are exact from here on (30-day windows + 7-day delay)."""
CITATION = (
    "Le Borgne Y.-A., Siblini W., Lebichot B., Bontempi G. (2022). Reproducible Machine Learning for "
    "Credit Card Fraud Detection - Practical Handbook. Universite Libre de Bruxelles. "
    "https://github.com/Fraud-Detection-Handbook/fraud-detection-handbook (code GPL-3.0, "
    "prose CC BY-SA 4.0; no data licence stated). The transactions are simulated."
)
PUBLISHED = {
    "chapter3": {"random_forest_ap": 0.658, "logistic_regression_cp100": 0.291},
    "rolling": {"xgboost_ap": (0.687, 0.01), "balanced_bagging_cp100": (0.305, 0.01)},
}
"""Numbers the handbook prints for these protocols (as quoted in our brief)."""


def default_data_dir() -> Path:
    """``<repo>/../shared/datasets/fraud_handbook`` (may not exist)."""
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "fraud_handbook"


def dataset_path(data_dir: Path | None = None) -> Path:
    """Path of the handbook CSV (whether or not it exists)."""
    return (data_dir or default_data_dir()) / HANDBOOK_FILE


def load_transactions(path: Path | None = None) -> pd.DataFrame:
    """Read the handbook transactions, sorted by TRANSACTION_ID, with a fresh RangeIndex."""
    df = pd.read_csv(path or dataset_path(), parse_dates=["TX_DATETIME"])
    return df.sort_values("TRANSACTION_ID").reset_index(drop=True)


# --------------------------------------------------------------------------- reference features

def _customer_rolling(customer_tx: pd.DataFrame) -> pd.DataFrame:
    customer_tx = customer_tx.sort_values("TX_DATETIME", kind="stable")
    customer_tx.index = customer_tx.TX_DATETIME
    for days in (1, 7, 30):
        total = customer_tx["TX_AMOUNT"].rolling(f"{days}D").sum()
        count = customer_tx["TX_AMOUNT"].rolling(f"{days}D").count()
        customer_tx[f"CUSTOMER_ID_NB_TX_{days}DAY_WINDOW"] = list(count)
        customer_tx[f"CUSTOMER_ID_AVG_AMOUNT_{days}DAY_WINDOW"] = list(total / count)
    customer_tx.index = customer_tx.TRANSACTION_ID
    return customer_tx


def _terminal_rolling(terminal_tx: pd.DataFrame, delay: int) -> pd.DataFrame:
    terminal_tx = terminal_tx.sort_values("TX_DATETIME", kind="stable")
    terminal_tx.index = terminal_tx.TX_DATETIME
    fraud_delay = terminal_tx["TX_FRAUD"].rolling(f"{delay}D").sum()
    count_delay = terminal_tx["TX_FRAUD"].rolling(f"{delay}D").count()
    for days in (1, 7, 30):
        fraud = terminal_tx["TX_FRAUD"].rolling(f"{delay + days}D").sum() - fraud_delay
        count = terminal_tx["TX_FRAUD"].rolling(f"{delay + days}D").count() - count_delay
        terminal_tx[f"TERMINAL_ID_NB_TX_{days}DAY_WINDOW"] = list(count)
        terminal_tx[f"TERMINAL_ID_RISK_{days}DAY_WINDOW"] = list(fraud / count)
    terminal_tx.index = terminal_tx.TRANSACTION_ID
    return terminal_tx.fillna(0)


def handbook_reference_features(transactions: pd.DataFrame, delay_days: int = 7,
                                entities: tuple[str, ...] = ("customer", "terminal")) -> pd.DataFrame:
    """The handbook's 15 features computed its own way (Chapter 3, BaselineFeatureTransformation).

    A faithful re-implementation of the notebook: weekday/hour flags, then ``groupby`` +
    time-based ``rolling`` per customer and per terminal. Slow (seconds per 10k rows); used only
    to check :func:`services.fraud.features.compute_offline_features`. ``entities`` limits the
    work to the customer and/or terminal windows (the other columns are then absent).

    Returns
    -------
    DataFrame indexed by TRANSACTION_ID with the 15 handbook feature columns.
    """
    df = transactions.sort_values("TRANSACTION_ID").copy()
    df["TX_DURING_WEEKEND"] = (df.TX_DATETIME.dt.day_of_week >= 5).astype(int)
    df["TX_DURING_NIGHT"] = (df.TX_DATETIME.dt.hour <= 6).astype(int)
    if "customer" in entities:
        parts = [_customer_rolling(g) for _, g in df.groupby("CUSTOMER_ID")]
        df = pd.concat(parts).rename_axis(None).sort_values("TRANSACTION_ID")
    if "terminal" in entities:
        parts = [_terminal_rolling(g, delay_days) for _, g in df.groupby("TERMINAL_ID")]
        df = pd.concat(parts).rename_axis(None).sort_values("TRANSACTION_ID")
    df.index = df.TRANSACTION_ID.to_numpy()
    return df


# --------------------------------------------------------------------------- protocol splits

def train_test_split(transactions: pd.DataFrame, start_training: dt.datetime, delta_train: int = 7,
                     delta_delay: int = 7, delta_test: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the handbook's train and test sets (``get_train_test_set``).

    Train: ``delta_train`` days from ``start_training``. Test: the ``delta_test`` days after the
    delay. Cards known compromised are removed from each test day: frauds in the training set,
    plus frauds of the delay period up to (test day - delay - 1 day), as the handbook does.

    Returns
    -------
    train_positions, test_positions : int arrays of positions into ``transactions``, in
    TRANSACTION_ID order.
    """
    tx_dt = transactions.TX_DATETIME
    start = pd.Timestamp(start_training)
    in_train = (tx_dt >= start) & (tx_dt < start + pd.Timedelta(days=delta_train))
    days = transactions.TX_TIME_DAYS.to_numpy()
    fraud = transactions.TX_FRAUD.to_numpy() == 1
    customers = transactions.CUSTOMER_ID.to_numpy()
    known = set(customers[in_train.to_numpy() & fraud])
    first_train_day = int(days[in_train.to_numpy()].min())
    test_parts = []
    for day in range(delta_test):
        delay_day = first_train_day + delta_train + day - 1
        known |= set(customers[(days == delay_day) & fraud])
        test_day = first_train_day + delta_train + delta_delay + day
        keep = (days == test_day) & ~np.isin(customers, list(known))
        test_parts.append(np.flatnonzero(keep))
    order = transactions.TRANSACTION_ID.to_numpy()
    train_positions = np.flatnonzero(in_train.to_numpy())
    test_positions = np.concatenate(test_parts)
    return (train_positions[np.argsort(order[train_positions], kind="stable")],
            test_positions[np.argsort(order[test_positions], kind="stable")])


def prequential_starts(start_training: dt.datetime, n_folds: int = 4, delta_assessment: int = 7
                       ) -> list[dt.datetime]:
    """Training start dates of the handbook's prequential folds, latest first."""
    return [start_training - dt.timedelta(days=fold * delta_assessment) for fold in range(n_folds)]


CHAPTER3_START = dt.datetime(2018, 7, 25)
TEST_FOLD_STARTS = prequential_starts(dt.datetime(2018, 8, 15))
"""Chapters 5-7 test folds: training starts 08-15, 08-08, 08-01, 07-25."""
VALIDATION_FOLD_STARTS = prequential_starts(dt.datetime(2018, 7, 11))
"""Chapters 5-7 validation folds: training starts 07-11, 07-04, 06-27, 06-20."""
