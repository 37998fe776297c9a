"""The transaction simulator: deterministic, and frauds shaped like the handbook's scenarios
(how fast it is: ``bench/simulate.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from services.fraud.simulate import (
    CARD_FRAUD_AMOUNT_FACTOR,
    FRAUD_AMOUNT_THRESHOLD,
    SimulationConfig,
    simulate_transactions,
)


@pytest.fixture(scope="module")
def month() -> pd.DataFrame:
    return simulate_transactions(SimulationConfig(n_customers=500, n_terminals=1000, n_days=30, seed=7))


def test_same_seed_same_data_and_other_seed_differs() -> None:
    config = SimulationConfig(n_customers=100, n_terminals=200, n_days=10, seed=3)
    pd.testing.assert_frame_equal(simulate_transactions(config), simulate_transactions(config))
    other = simulate_transactions(SimulationConfig(n_customers=100, n_terminals=200, n_days=10, seed=4))
    assert not other.TX_AMOUNT.head(50).equals(simulate_transactions(config).TX_AMOUNT.head(50))


def test_handbook_columns_chronological_ids(month: pd.DataFrame) -> None:
    assert list(month.columns) == ["TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT",
                                   "TX_TIME_SECONDS", "TX_TIME_DAYS", "TX_FRAUD", "TX_FRAUD_SCENARIO"]
    assert month.TX_TIME_SECONDS.is_monotonic_increasing
    assert (month.TRANSACTION_ID.to_numpy() == np.arange(len(month))).all()
    assert (month.TX_TIME_DAYS == month.TX_TIME_SECONDS // 86_400).all()


def test_labels_match_scenarios(month: pd.DataFrame) -> None:
    assert ((month.TX_FRAUD == 1) == (month.TX_FRAUD_SCENARIO > 0)).all()
    genuine = month[month.TX_FRAUD == 0]
    assert (genuine.TX_AMOUNT <= FRAUD_AMOUNT_THRESHOLD).all()
    assert (month[month.TX_FRAUD_SCENARIO == 1].TX_AMOUNT > FRAUD_AMOUNT_THRESHOLD).all()


def test_fraud_rates_by_scenario(month: pd.DataFrame) -> None:
    rates = month.TX_FRAUD_SCENARIO.value_counts(normalize=True)
    assert 0.0 < rates.get(1, 0.0) < 0.005       # large amounts are rare
    assert 0.01 < rates.get(2, 0.0) < 0.06       # 2 of 1000 terminals a day, 28 days each
    assert 0.005 < rates.get(3, 0.0) < 0.05      # 3 cards a day, a third of 14 days
    # compromised-card frauds carry inflated amounts: their median is well above genuine spend
    assert (month[month.TX_FRAUD_SCENARIO == 3].TX_AMOUNT.median()
            > 2 * month[month.TX_FRAUD == 0].TX_AMOUNT.median())
    assert CARD_FRAUD_AMOUNT_FACTOR == 5.0


def test_compromised_terminal_frauds_cover_the_whole_terminal_day(month: pd.DataFrame) -> None:
    first = month[month.TX_FRAUD_SCENARIO == 2].iloc[0]
    same = month[(month.TERMINAL_ID == first.TERMINAL_ID) & (month.TX_TIME_DAYS == first.TX_TIME_DAYS)]
    assert (same.TX_FRAUD == 1).all()
