"""Offline (vectorised) features equal the online contract, and the handbook's own definitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.fraud import handbook
from services.fraud.features import (
    FEATURE_NAMES,
    HANDBOOK_FEATURES,
    HISTORY_LENGTH,
    aggregates_for_row,
    compute_offline_features,
    feature_vector,
    sequence_matrix,
)
from services.fraud.simulate import SimulationConfig, simulate_transactions

HANDBOOK_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "fraud_handbook"


@pytest.fixture(scope="module")
def simulated() -> pd.DataFrame:
    # 40 days so that 30-day and delayed 7 + 30-day windows are both exercised
    return simulate_transactions(SimulationConfig(n_customers=150, n_terminals=300, n_days=40, seed=11))


def _online(df: pd.DataFrame, i: int) -> tuple[np.ndarray, np.ndarray]:
    agg = aggregates_for_row(df, i)
    row = df.iloc[i]
    features = feature_vector(float(row.TX_AMOUNT), row.TX_DATETIME.to_pydatetime(), agg)
    sequence = sequence_matrix(float(row.TX_AMOUNT), float(row.TX_TIME_SECONDS), str(row.TERMINAL_ID),
                               agg.card_history)
    return features, sequence


def test_vectorised_features_equal_the_online_path(simulated: pd.DataFrame) -> None:
    offline, sequences = compute_offline_features(simulated)
    assert list(offline.columns) == list(FEATURE_NAMES) and offline.dtypes.eq(np.float32).all()
    rng = np.random.default_rng(0)
    compromise_age_known = np.flatnonzero(offline["TERMINAL_DAYS_SINCE_FIRST_FRAUD_DELAYED"].to_numpy() >= 0)
    assert len(compromise_age_known) >= 20, "the simulation must exercise labelled terminal frauds"
    rows = np.concatenate([rng.choice(len(simulated), 300, replace=False),
                           rng.choice(compromise_age_known, 20, replace=False)])
    for i in rows:
        features, sequence = _online(simulated, int(i))
        # counts are exact; sums differ only by float summation order (well below float32 ulp)
        np.testing.assert_allclose(features, offline.iloc[i].to_numpy(), rtol=1e-6, atol=1e-6,
                                   err_msg=f"row {i}")
        np.testing.assert_allclose(sequence, sequences[i], rtol=1e-6, atol=1e-6, err_msg=f"row {i}")


def test_row_order_does_not_matter_and_ties_follow_arrival(simulated: pd.DataFrame) -> None:
    head = simulated.head(400).copy()
    head.loc[head.index[10:20], "TX_TIME_SECONDS"] = head.TX_TIME_SECONDS.iloc[10]  # tied clock
    head["TX_DATETIME"] = pd.Timestamp("2018-04-01") + pd.to_timedelta(head.TX_TIME_SECONDS, unit="s")
    shuffled = head.sample(frac=1.0, random_state=0)
    offline, _ = compute_offline_features(shuffled)
    for label in head.index[5:25]:
        position = shuffled.index.get_loc(label)
        features, _ = _online(shuffled, position)
        np.testing.assert_allclose(features, offline.loc[label].to_numpy(), rtol=1e-6, atol=1e-6)


def test_first_transaction_has_no_history(simulated: pd.DataFrame) -> None:
    first = simulated.groupby("CUSTOMER_ID").head(1).index[0]
    agg = aggregates_for_row(simulated, int(first))
    assert agg.seconds_since_prev_customer_tx is None and agg.card_history == ()
    assert agg.customer_count_1h == 1 and agg.customer_count_30d == 1
    features = feature_vector(1.0, simulated.TX_DATETIME.iloc[first].to_pydatetime(), agg)
    assert features[FEATURE_NAMES.index("LOG_SECONDS_SINCE_PREV_TX")] == -1.0
    busy = simulated.CUSTOMER_ID.value_counts().index[0]
    last = simulated.index[simulated.CUSTOMER_ID.to_numpy() == busy][-1]
    assert len(aggregates_for_row(simulated, int(last)).card_history) == HISTORY_LENGTH


@pytest.mark.handbook
def test_handbook_features_match_the_handbooks_pandas_code() -> None:
    path = HANDBOOK_DIR / handbook.HANDBOOK_FILE
    if not path.exists():
        pytest.skip(f"handbook data absent: {path} (see ../shared/datasets/fraud_handbook/README.md)")
    df = handbook.load_transactions(path)
    rng = np.random.default_rng(0)
    customers = rng.choice(df.CUSTOMER_ID.unique(), 60, replace=False)
    terminals = rng.choice(df.TERMINAL_ID.unique(), 120, replace=False)
    # windows only see their own entity, so entity subsets give exact per-entity features
    for subset, entity in ((df[df.CUSTOMER_ID.isin(customers)], "customer"),
                           (df[df.TERMINAL_ID.isin(terminals)], "terminal")):
        subset = subset.reset_index(drop=True)
        ours, _ = compute_offline_features(subset)
        reference = handbook.handbook_reference_features(subset, entities=(entity,))
        reference = reference.loc[subset.TRANSACTION_ID.to_numpy()]
        prefix = f"{entity.upper()}_ID_"
        exact = (subset.TX_DATETIME >= handbook.EXACT_FEATURES_FROM).to_numpy()
        assert exact.sum() > 1000
        columns = [c for c in HANDBOOK_FEATURES if c.startswith(prefix) or c.startswith("TX_")]
        expected = reference[columns].to_numpy(np.float64)[exact].astype(np.float32)
        np.testing.assert_array_equal(ours[columns].to_numpy()[exact], expected)
