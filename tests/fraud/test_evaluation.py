"""The handbook protocol's card metrics on small hand-made frames (pure logic)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from model_runtime.training_data import TrainingDataError
from services.fraud.evaluation import (
    HANDBOOK_FOLDS,
    card_precision_ceiling,
    card_precision_top_k,
    folds_for_range,
    visible_fraud,
)

DAY = 86_400


def _frame(rows: list[tuple[int, int, int, int, int]]) -> pd.DataFrame:
    """rows of (day, card, terminal, fraud, scenario); one transaction a row, at noon."""
    day, card, terminal, fraud, scenario = map(np.asarray, zip(*rows, strict=True))
    return pd.DataFrame({"TX_TIME_DAYS": day, "TX_TIME_SECONDS": day * DAY + DAY // 2, "CUSTOMER_ID": card,
                         "TERMINAL_ID": terminal, "TX_FRAUD": fraud, "TX_FRAUD_SCENARIO": scenario})


def test_card_precision_counts_cards_once_and_drops_cards_found_earlier() -> None:
    frame = _frame([(0, 1, 9, 1, 1), (0, 1, 9, 1, 1), (0, 2, 9, 0, 0),
                    (1, 1, 9, 1, 1), (1, 3, 9, 1, 3), (1, 4, 9, 0, 0)])
    scores = np.array([0.9, 0.8, 0.1, 0.9, 0.2, 0.5])
    # day 0: top 2 cards {1, 2}, one fraud; day 1: card 1 already found, top 2 {4, 3}, one fraud
    assert card_precision_top_k(scores, frame, top_k=2) == 0.5


def test_a_fresh_terminal_compromise_is_invisible_until_its_labels_arrive() -> None:
    frame = _frame([(0, 1, 7, 1, 2),    # first fraud of terminal 7's compromise
                    (3, 2, 7, 1, 2),    # 3 days in: nothing labelled yet
                    (8, 3, 7, 1, 2),    # 8 days in: day 0's fraud is labelled (7-day delay)
                    (40, 4, 7, 1, 2),   # a new compromise: the last one ended 12 days ago
                    (5, 5, 8, 1, 1),    # scenario 1 and 3 show in the transaction itself
                    (5, 6, 8, 1, 3),
                    (5, 7, 8, 0, 0)])
    assert visible_fraud(frame).tolist() == [False, False, True, False, True, True, False]


def test_the_ceiling_ranks_visible_frauds_first_and_invisible_ones_last() -> None:
    frame = _frame([(8, 1, 7, 0, 0), (8, 2, 7, 1, 2), (8, 3, 6, 1, 2), (0, 4, 7, 1, 2)])
    test_positions = np.array([0, 1, 2])
    # card 2 is visible (terminal 7 labelled since day 0), card 3 is not: one of the top 2
    assert card_precision_ceiling(frame, test_positions, top_k=2) == 0.5


def test_card_precision_takes_text_card_ids_as_stored() -> None:
    """Stored customer ids are text (the README's ``c-42``); CP@k used to int() them."""
    frame = _frame([(0, 1, 9, 1, 1), (0, 2, 9, 0, 0), (1, 1, 9, 1, 1), (1, 3, 9, 1, 3), (1, 4, 9, 0, 0)])
    frame["CUSTOMER_ID"] = [f"c-{card}" for card in frame.CUSTOMER_ID]
    scores = np.array([0.9, 0.1, 0.9, 0.2, 0.5])
    # day 0: top 2 cards {c-1, c-2}, one fraud; day 1: c-1 already found, top 2 {c-4, c-3}, one fraud
    assert card_precision_top_k(scores, frame, top_k=2) == 0.5


def test_folds_for_a_range_are_laid_out_as_the_handbooks() -> None:
    """The handbook's own folds come back from its dates: its latest test week ends 2018-09-04."""
    plan = folds_for_range(dt.date(2018, 6, 11), dt.date(2018, 9, 4))
    assert plan.test_starts == HANDBOOK_FOLDS.test_starts
    assert plan.validation_starts == HANDBOOK_FOLDS.validation_starts and plan.chapter3_start is None


def test_a_short_range_keeps_the_folds_that_fit_and_refuses_less_than_one() -> None:
    plan = folds_for_range(dt.date(2024, 1, 1), dt.date(2024, 1, 28))  # 28 days: two folds, no validation
    assert plan.test_starts == [dt.datetime(2024, 1, 8), dt.datetime(2024, 1, 1)] and plan.validation_starts == []
    with pytest.raises(TrainingDataError, match=r"2024-01-01..2024-01-20 is shorter than one fold \(21 days"):
        folds_for_range(dt.date(2024, 1, 1), dt.date(2024, 1, 20))
