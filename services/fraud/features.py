"""Fraud features: the online aggregate contract, the feature vector, and its exact offline twin.

Online, the state store (Redis or the database) answers each incoming transaction with one
:class:`WindowAggregates`; :func:`feature_vector` turns it into the model's tabular input and
:func:`sequence_matrix` turns the card's recent history into the sequence model's input.
Offline, :func:`compute_offline_features` computes the same numbers for a whole DataFrame of
transactions (the Fraud Detection Handbook's columns) with sorted-array window arithmetic, and
:func:`aggregates_for_row` is the slow, obviously-correct reference the tests compare against.

Window semantics (pandas time-based ``rolling('Nd')``, closed right): a window of width W ending
at a transaction at time t holds the same entity's transactions with time in (t - W, t] that
arrived no later than it (ties on time are broken by TRANSACTION_ID), the current one included.
Terminal label windows are shifted back by a delay (labels are known a week late): they hold the
terminal's transactions with time in (t - delay - W, t - delay], exactly as the handbook's
``rolling(delay + W) - rolling(delay)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

SECONDS_PER_DAY = 86_400
SECONDS_PER_HOUR = 3_600
HISTORY_LENGTH = 16
"""How many previous card transactions the sequence model sees."""
SEQUENCE_STEPS = HISTORY_LENGTH + 1
"""History plus the current transaction (the last step)."""
SEQUENCE_CHANNELS: tuple[str, ...] = (
    "valid", "log_amount", "log_age_s", "log_gap_s", "hour_sin", "hour_cos", "same_terminal",
)
AMOUNT_STD_FLOOR = 1.0
"""Added to a standard deviation before dividing (currency units): keeps z-scores finite."""

HANDBOOK_FEATURES: tuple[str, ...] = (
    "TX_AMOUNT", "TX_DURING_WEEKEND", "TX_DURING_NIGHT",
    "CUSTOMER_ID_NB_TX_1DAY_WINDOW", "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_7DAY_WINDOW", "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_30DAY_WINDOW", "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW",
    "TERMINAL_ID_NB_TX_1DAY_WINDOW", "TERMINAL_ID_RISK_1DAY_WINDOW",
    "TERMINAL_ID_NB_TX_7DAY_WINDOW", "TERMINAL_ID_RISK_7DAY_WINDOW",
    "TERMINAL_ID_NB_TX_30DAY_WINDOW", "TERMINAL_ID_RISK_30DAY_WINDOW",
)
"""The handbook's 15 baseline features, named and defined as in its Chapter 3."""

DERIVED_FEATURES: tuple[str, ...] = (
    "TX_HOUR",
    "CUSTOMER_NB_TX_1HOUR_WINDOW",
    "CUSTOMER_AMOUNT_1HOUR_WINDOW",
    "LOG_SECONDS_SINCE_PREV_TX",
    "AMOUNT_OVER_CUSTOMER_AVG_7DAY",
    "AMOUNT_OVER_CUSTOMER_AVG_30DAY",
    "CUSTOMER_STD_AMOUNT_30DAY",
    "AMOUNT_ZSCORE_30DAY",
    "AMOUNT_OVER_PRIOR_AVG_30DAY",
    "AMOUNT_ZSCORE_PRIOR_30DAY",
    "TERMINAL_NB_TX_1HOUR_WINDOW",
    "TERMINAL_NB_TX_1DAY_CURRENT",
    "TERMINAL_NB_FRAUD_7DAY_DELAYED",
    "TERMINAL_NB_FRAUD_30DAY_DELAYED",
    "TERMINAL_DAYS_SINCE_FIRST_FRAUD_DELAYED",
    "CARD_HISTORY_NB_TX",
    "AMOUNT_OVER_HISTORY_MEDIAN",
    "HISTORY_MAX_OVER_MEDIAN",
    "HISTORY_NB_OVER_3X_MEDIAN",
)
"""Extra features derived only from :class:`WindowAggregates` (no other state). The age of the
terminal's first labelled fraud in its delayed 30-day window tells a compromise that began
recently (still running) from one that began long ago (likely over); -1 without one. The last
four come from ``card_history`` amounts (a median is robust to the inflated amounts of a
compromised card, which a 30-day mean is not)."""

FEATURE_NAMES: tuple[str, ...] = HANDBOOK_FEATURES + DERIVED_FEATURES


@dataclass(frozen=True, slots=True)
class WindowAggregates:
    """Raw window aggregates for one transaction, as the online state store returns them.

    Counts include the current transaction wherever the window ends at it. Amounts are in the
    transaction currency; times in seconds. Terminal ``*_delayed_*`` windows cover
    (t - 7 d - W, t - 7 d]; ``seconds_since_first_terminal_fraud_delayed`` is t minus the time of
    the earliest fraud in the delayed 30-day window (None without one). ``card_history`` holds the
    card's previous (at most 16) transactions, oldest first, as ``(tx_time_seconds, amount,
    terminal_id)``.
    """

    customer_count_1h: int
    customer_count_1d: int
    customer_count_7d: int
    customer_count_30d: int
    customer_amount_sum_1h: float
    customer_amount_sum_1d: float
    customer_amount_sum_7d: float
    customer_amount_sum_30d: float
    customer_amount_sumsq_30d: float
    seconds_since_prev_customer_tx: float | None
    terminal_count_delayed_1d: int
    terminal_count_delayed_7d: int
    terminal_count_delayed_30d: int
    terminal_fraud_delayed_1d: int
    terminal_fraud_delayed_7d: int
    terminal_fraud_delayed_30d: int
    terminal_count_1h: int
    terminal_count_1d: int
    seconds_since_first_terminal_fraud_delayed: float | None
    card_history: tuple[tuple[float, float, str], ...] = ()


# --------------------------------------------------------------------------- shared formulas

def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (the handbook's fillna(0))."""
    out = np.zeros(np.broadcast_shapes(numerator.shape, denominator.shape))
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _history_columns(amount: np.ndarray, history_amounts: np.ndarray) -> list[np.ndarray]:
    """Card-history features; ``history_amounts`` (N, HISTORY_LENGTH) with NaN for absent steps.

    Returns [number of previous transactions, amount / (median + 1), max / (median + 1), number of
    previous amounts above 3 x (median + 1)]; ratios are 1 and the count 0 without history.
    """
    present = ~np.isnan(history_amounts)
    count = present.sum(axis=1)
    has = count > 0
    # np.nanmedian goes through masked arrays (~0.5 ms a call); NaNs sort last, so the median of
    # each row is the middle of its first `count` sorted values.
    ordered = np.sort(history_amounts, axis=1)
    rows = np.arange(len(ordered))
    low = ordered[rows, np.maximum((count - 1) // 2, 0)]
    high = ordered[rows, np.maximum(count // 2, 0)]
    floor = np.where(has, (low + high) / 2.0, 0.0) + AMOUNT_STD_FLOOR
    peak = np.where(present, history_amounts, -np.inf).max(axis=1)
    spikes = (np.where(present, history_amounts, 0.0) > 3.0 * floor[:, None]).sum(axis=1)
    count = count.astype(np.float64)
    return [count, np.where(has, amount / floor, 1.0), np.where(has, peak / floor, 1.0),
            spikes.astype(np.float64)]


_NUMERIC_FIELDS: tuple[str, ...] = tuple(
    f for f in WindowAggregates.__slots__ if f != "card_history"  # type: ignore[attr-defined]
)
_AT = {name: position for position, name in enumerate(_NUMERIC_FIELDS)}
_RATIO_PAIRS: tuple[tuple[str, str], ...] = (
    ("customer_amount_sum_1d", "customer_count_1d"), ("customer_amount_sum_7d", "customer_count_7d"),
    ("customer_amount_sum_30d", "customer_count_30d"), ("customer_amount_sumsq_30d", "customer_count_30d"),
    ("terminal_fraud_delayed_1d", "terminal_count_delayed_1d"),
    ("terminal_fraud_delayed_7d", "terminal_count_delayed_7d"),
    ("terminal_fraud_delayed_30d", "terminal_count_delayed_30d"),
)
_RATIO_NUMERATORS = [_AT[numerator] for numerator, _ in _RATIO_PAIRS]
_RATIO_DENOMINATORS = [_AT[denominator] for _, denominator in _RATIO_PAIRS]
_COPIED: dict[str, str] = {  # feature -> the aggregate it is, unchanged
    "CUSTOMER_ID_NB_TX_1DAY_WINDOW": "customer_count_1d", "CUSTOMER_ID_NB_TX_7DAY_WINDOW": "customer_count_7d",
    "CUSTOMER_ID_NB_TX_30DAY_WINDOW": "customer_count_30d",
    "TERMINAL_ID_NB_TX_1DAY_WINDOW": "terminal_count_delayed_1d",
    "TERMINAL_ID_NB_TX_7DAY_WINDOW": "terminal_count_delayed_7d",
    "TERMINAL_ID_NB_TX_30DAY_WINDOW": "terminal_count_delayed_30d",
    "CUSTOMER_NB_TX_1HOUR_WINDOW": "customer_count_1h", "CUSTOMER_AMOUNT_1HOUR_WINDOW": "customer_amount_sum_1h",
    "TERMINAL_NB_TX_1HOUR_WINDOW": "terminal_count_1h", "TERMINAL_NB_TX_1DAY_CURRENT": "terminal_count_1d",
    "TERMINAL_NB_FRAUD_7DAY_DELAYED": "terminal_fraud_delayed_7d",
    "TERMINAL_NB_FRAUD_30DAY_DELAYED": "terminal_fraud_delayed_30d",
}
_COPIED_TO = [FEATURE_NAMES.index(feature) for feature in _COPIED]
_COPIED_FROM = [_AT[field] for field in _COPIED.values()]
_COLUMN = {name: position for position, name in enumerate(FEATURE_NAMES)}


def _feature_columns(amount: np.ndarray, weekday: np.ndarray, hour: np.ndarray,
                     aggregates: np.ndarray, history_amounts: np.ndarray) -> np.ndarray:
    """The one formula both the online and the offline path use.

    Whole blocks of columns are computed per numpy call (a serving batch is often one row, where
    the cost is the number of calls, not their size).

    Parameters
    ----------
    amount, weekday, hour : (N,) arrays (amount in currency units, weekday 0 = Monday, hour 0-23).
    aggregates : (N, len(_NUMERIC_FIELDS)) float64, the WindowAggregates fields in that order;
        ``seconds_since_prev_customer_tx`` is NaN for "no previous transaction".
    history_amounts : (N, HISTORY_LENGTH) amounts of the card's previous transactions, NaN where
        there is none.

    Returns
    -------
    (N, len(FEATURE_NAMES)) float64.
    """
    amount = amount.astype(np.float64)
    count_30 = aggregates[:, _AT["customer_count_30d"]]
    prior_count = count_30 - 1
    pairs = len(_RATIO_PAIRS)
    numerators = np.empty((len(amount), pairs + 2))
    numerators[:, :pairs] = aggregates[:, _RATIO_NUMERATORS]
    numerators[:, pairs] = aggregates[:, _AT["customer_amount_sum_30d"]] - amount
    numerators[:, pairs + 1] = aggregates[:, _AT["customer_amount_sumsq_30d"]] - amount**2
    denominators = np.empty_like(numerators)
    denominators[:, :pairs] = aggregates[:, _RATIO_DENOMINATORS]
    denominators[:, pairs:] = prior_count[:, None]
    avg_1, avg_7, avg_30, mean_sq_30, risk_1, risk_7, risk_30, prior_avg, prior_mean_sq = \
        _safe_ratio(numerators, denominators).T
    std_30 = np.sqrt(np.maximum(mean_sq_30 - avg_30**2, 0.0))
    prior_avg = np.where(prior_count > 0, prior_avg, amount)
    prior_var = np.maximum(prior_mean_sq - prior_avg**2, 0.0)
    over_7, over_30, over_prior = _safe_ratio(amount, np.array([avg_7, avg_30, prior_avg]))
    gap = aggregates[:, _AT["seconds_since_prev_customer_tx"]]
    first_fraud_age = aggregates[:, _AT["seconds_since_first_terminal_fraud_delayed"]]

    out = np.full((len(amount), len(FEATURE_NAMES)), np.nan)  # a column left unset shows as NaN
    out[:, _COPIED_TO] = aggregates[:, _COPIED_FROM]
    computed = {
        "TX_AMOUNT": amount, "TX_DURING_WEEKEND": weekday >= 5, "TX_DURING_NIGHT": hour <= 6,
        "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW": avg_1, "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW": avg_7,
        "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW": avg_30, "TERMINAL_ID_RISK_1DAY_WINDOW": risk_1,
        "TERMINAL_ID_RISK_7DAY_WINDOW": risk_7, "TERMINAL_ID_RISK_30DAY_WINDOW": risk_30, "TX_HOUR": hour,
        "LOG_SECONDS_SINCE_PREV_TX": np.where(np.isnan(gap), -1.0, np.log1p(np.where(gap > 0.0, gap, 0.0))),
        "AMOUNT_OVER_CUSTOMER_AVG_7DAY": over_7, "AMOUNT_OVER_CUSTOMER_AVG_30DAY": over_30,
        "CUSTOMER_STD_AMOUNT_30DAY": std_30, "AMOUNT_ZSCORE_30DAY": (amount - avg_30) / (std_30 + AMOUNT_STD_FLOOR),
        "AMOUNT_OVER_PRIOR_AVG_30DAY": over_prior,
        "AMOUNT_ZSCORE_PRIOR_30DAY": (amount - prior_avg) / (np.sqrt(prior_var) + AMOUNT_STD_FLOOR),
        "TERMINAL_DAYS_SINCE_FIRST_FRAUD_DELAYED": np.where(np.isnan(first_fraud_age), -1.0,
                                                            first_fraud_age / SECONDS_PER_DAY),
    }
    for name, column in computed.items():
        out[:, _COLUMN[name]] = column
    first_history_column = _COLUMN["CARD_HISTORY_NB_TX"]
    for offset, column in enumerate(_history_columns(amount, history_amounts)):
        out[:, first_history_column + offset] = column
    return out


def feature_matrix(amounts: Sequence[float], tx_datetimes: Sequence[datetime],
                   aggregates: Sequence[WindowAggregates]) -> np.ndarray:
    """Tabular model input for a batch of transactions (the serving path builds a whole batch at once).

    Parameters
    ----------
    amounts : transaction amounts (currency units).
    tx_datetimes : transaction local times (weekend and night flags, hour of day).
    aggregates : each transaction's window aggregates.

    Returns
    -------
    (N, len(FEATURE_NAMES)) float32, in FEATURE_NAMES order.
    """
    count = len(aggregates)
    numeric = np.array([[np.nan if (value := getattr(agg, name)) is None else value for name in _NUMERIC_FIELDS]
                        for agg in aggregates], dtype=np.float64).reshape(count, len(_NUMERIC_FIELDS))
    history = np.full((count, HISTORY_LENGTH), np.nan)
    for row, agg in enumerate(aggregates):
        past = [past_amount for _, past_amount, _ in tuple(agg.card_history)[-HISTORY_LENGTH:]]
        if past:
            history[row, HISTORY_LENGTH - len(past):] = past
    weekday = np.fromiter((moment.weekday() for moment in tx_datetimes), dtype=np.int64, count=count)
    hour = np.fromiter((moment.hour for moment in tx_datetimes), dtype=np.int64, count=count)
    rows = _feature_columns(np.asarray(amounts, dtype=np.float64), weekday, hour, numeric, history)
    return rows.astype(np.float32)


def feature_vector(amount: float, tx_datetime: datetime, agg: WindowAggregates) -> np.ndarray:
    """Tabular model input for one transaction: :func:`feature_matrix` of one row.

    Returns
    -------
    (len(FEATURE_NAMES),) float32, in FEATURE_NAMES order.
    """
    return feature_matrix([amount], [tx_datetime], [agg])[0]


def _sequence_channels(amounts: np.ndarray, times: np.ndarray, same_terminal: np.ndarray,
                       valid: np.ndarray) -> np.ndarray:
    """Per-step sequence inputs.

    Parameters
    ----------
    amounts, times, same_terminal, valid : (N, K) arrays, the last step being the current
        transaction; times in seconds (hour of day taken as ``time mod 86400``).

    Returns
    -------
    (N, K, len(SEQUENCE_CHANNELS)) float32; padded steps are all zero.
    """
    # np.maximum(x, 0) rather than np.clip(x, 0, None) and one preallocated block rather than
    # np.stack: the same numbers, a fraction of the per-call cost for a batch of one.
    age = np.maximum(times[:, -1:] - times, 0.0)
    gap = np.zeros_like(times)
    gap[:, 1:] = np.maximum(times[:, 1:] - times[:, :-1], 0.0)
    gap[:, 1:] *= valid[:, :-1]  # the first real step has no predecessor
    angle = 2.0 * math.pi * (np.mod(times, SECONDS_PER_DAY) / SECONDS_PER_DAY)
    channels = np.empty((*times.shape, len(SEQUENCE_CHANNELS)))
    channels[..., 0] = 1.0
    channels[..., 1] = np.log1p(np.maximum(amounts, 0.0))
    channels[..., 2] = np.log1p(age) / 10.0
    channels[..., 3] = np.log1p(gap) / 10.0
    channels[..., 4] = np.sin(angle)
    channels[..., 5] = np.cos(angle)
    channels[..., 6] = same_terminal
    return (channels * valid[..., None]).astype(np.float32)


def sequence_tensor(amounts: Sequence[float], tx_times_seconds: Sequence[float], terminal_ids: Sequence[str],
                    card_histories: Sequence[tuple[tuple[float, float, str], ...]]) -> np.ndarray:
    """Sequence-model input for a batch of transactions: each card's history plus the transaction.

    Parameters
    ----------
    amounts, tx_times_seconds, terminal_ids : the current transactions.
    card_histories : per transaction, up to HISTORY_LENGTH previous transactions, oldest first,
        ``(tx_time_seconds, amount, terminal_id)``; older ones beyond the limit are ignored.

    Returns
    -------
    (N, SEQUENCE_STEPS, len(SEQUENCE_CHANNELS)) float32, each left-padded with zero rows.
    """
    count = len(amounts)
    times = np.zeros((count, SEQUENCE_STEPS))
    past_amounts = np.zeros((count, SEQUENCE_STEPS))
    same = np.zeros((count, SEQUENCE_STEPS))
    valid = np.zeros((count, SEQUENCE_STEPS))
    for row, (terminal_id, card_history) in enumerate(zip(terminal_ids, card_histories, strict=True)):
        history = tuple(card_history)[-HISTORY_LENGTH:]
        pad = HISTORY_LENGTH - len(history)
        for offset, (time_s, past_amount, past_terminal) in enumerate(history):
            step = pad + offset
            times[row, step], past_amounts[row, step] = time_s, past_amount
            same[row, step] = float(str(past_terminal) == str(terminal_id))
            valid[row, step] = 1.0
    times[:, -1] = tx_times_seconds
    past_amounts[:, -1] = amounts
    same[:, -1] = valid[:, -1] = 1.0
    return _sequence_channels(past_amounts, times, same, valid)


def sequence_matrix(amount: float, tx_time_seconds: float, terminal_id: str,
                    card_history: tuple[tuple[float, float, str], ...]) -> np.ndarray:
    """Sequence-model input for one transaction: :func:`sequence_tensor` of one row.

    Returns
    -------
    (SEQUENCE_STEPS, len(SEQUENCE_CHANNELS)) float32, left-padded with zero rows.
    """
    return sequence_tensor([amount], [tx_time_seconds], [terminal_id], [card_history])[0]


# --------------------------------------------------------------------------- reference (slow)

def aggregates_for_row(df: pd.DataFrame, row_index: int, delay_days: int = 7) -> WindowAggregates:
    """Aggregates for one transaction by plain filtering: slow and obviously correct.

    Parameters
    ----------
    df : transactions with the handbook columns (TRANSACTION_ID, CUSTOMER_ID, TERMINAL_ID,
        TX_AMOUNT, TX_TIME_SECONDS, TX_FRAUD).
    row_index : positional index of the transaction in ``df``.
    delay_days : label delay for the terminal windows (days).
    """
    row = df.iloc[row_index]
    t, tx_id = float(row.TX_TIME_SECONDS), int(row.TRANSACTION_ID)
    times = df.TX_TIME_SECONDS.to_numpy(dtype=np.float64)
    ids = df.TRANSACTION_ID.to_numpy()
    arrived = (times < t) | ((times == t) & (ids <= tx_id))
    customer = arrived & (df.CUSTOMER_ID.to_numpy() == row.CUSTOMER_ID)
    terminal = df.TERMINAL_ID.to_numpy() == row.TERMINAL_ID
    amounts = df.TX_AMOUNT.to_numpy(dtype=np.float64)
    fraud = df.TX_FRAUD.to_numpy()

    def in_window(mask: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return mask & (times > lo) & (times <= hi)

    cust = {w: in_window(customer, t - s, t) for w, s in
            (("1h", SECONDS_PER_HOUR), ("1d", SECONDS_PER_DAY), ("7d", 7 * SECONDS_PER_DAY),
             ("30d", 30 * SECONDS_PER_DAY))}
    delay = delay_days * SECONDS_PER_DAY
    term_delayed = {d: in_window(terminal, t - delay - d * SECONDS_PER_DAY, t - delay) for d in (1, 7, 30)}
    known_frauds = times[term_delayed[30] & (fraud == 1)]
    previous = np.flatnonzero(customer & ~(ids == tx_id))
    previous = previous[np.lexsort((ids[previous], times[previous]))]
    history = tuple((float(times[j]), float(amounts[j]), str(df.TERMINAL_ID.iat[j]))
                    for j in previous[-HISTORY_LENGTH:])
    return WindowAggregates(
        customer_count_1h=int(cust["1h"].sum()), customer_count_1d=int(cust["1d"].sum()),
        customer_count_7d=int(cust["7d"].sum()), customer_count_30d=int(cust["30d"].sum()),
        customer_amount_sum_1h=float(amounts[cust["1h"]].sum()),
        customer_amount_sum_1d=float(amounts[cust["1d"]].sum()),
        customer_amount_sum_7d=float(amounts[cust["7d"]].sum()),
        customer_amount_sum_30d=float(amounts[cust["30d"]].sum()),
        customer_amount_sumsq_30d=float((amounts[cust["30d"]] ** 2).sum()),
        seconds_since_prev_customer_tx=(t - float(times[previous[-1]])) if len(previous) else None,
        terminal_count_delayed_1d=int(term_delayed[1].sum()),
        terminal_count_delayed_7d=int(term_delayed[7].sum()),
        terminal_count_delayed_30d=int(term_delayed[30].sum()),
        terminal_fraud_delayed_1d=int(fraud[term_delayed[1]].sum()),
        terminal_fraud_delayed_7d=int(fraud[term_delayed[7]].sum()),
        terminal_fraud_delayed_30d=int(fraud[term_delayed[30]].sum()),
        terminal_count_1h=int(in_window(terminal & arrived, t - SECONDS_PER_HOUR, t).sum()),
        terminal_count_1d=int(in_window(terminal & arrived, t - SECONDS_PER_DAY, t).sum()),
        seconds_since_first_terminal_fraud_delayed=float(t - known_frauds.min()) if len(known_frauds) else None,
        card_history=history,
    )


# --------------------------------------------------------------------------- offline (vectorised)

@dataclass(frozen=True)
class _SortedGroups:
    """Transactions sorted by (entity, time, id), with a searchable composite key."""

    order: np.ndarray      # (N,) positions into the original frame
    key: np.ndarray        # (N,) int64 entity * span + time, ascending
    group_start: np.ndarray  # (N,) sorted position of the entity's first transaction

    def window_start(self, width_s: int) -> np.ndarray:
        """Sorted position of the first transaction with time > t - width (same entity)."""
        return np.searchsorted(self.key, self.key - width_s, side="right")


def _sort_groups(entity: np.ndarray, times: np.ndarray, ids: np.ndarray, max_width_s: int) -> _SortedGroups:
    codes = pd.factorize(entity)[0].astype(np.int64)
    rel = times - times.min()
    span = int(rel.max()) + max_width_s + 1
    order = np.lexsort((ids, rel, codes))
    key = codes[order] * span + rel[order]
    sorted_codes = codes[order]
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = sorted_codes[1:] != sorted_codes[:-1]
    group_start = np.maximum.accumulate(np.where(is_first, np.arange(len(order)), 0))
    return _SortedGroups(order=order, key=key, group_start=group_start)


def _window_sum(prefix: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Sum over sorted positions [start, end) from an exclusive prefix array of length N + 1."""
    return prefix[end] - prefix[start]


def _customer_aggregates(df: pd.DataFrame, times: np.ndarray, ids: np.ndarray) -> tuple[dict, _SortedGroups]:
    groups = _sort_groups(df.CUSTOMER_ID.to_numpy(), times, ids, 30 * SECONDS_PER_DAY)
    amounts = df.TX_AMOUNT.to_numpy(dtype=np.float64)
    positions = np.arange(len(df))
    end = positions + 1
    out: dict[str, np.ndarray] = {}
    for label, width in (("1h", SECONDS_PER_HOUR), ("1d", SECONDS_PER_DAY),
                         ("7d", 7 * SECONDS_PER_DAY), ("30d", 30 * SECONDS_PER_DAY)):
        start = groups.window_start(width)
        out[f"customer_count_{label}"] = (end - start).astype(np.float64)
        out[f"customer_amount_sum_{label}"] = _window_sum_grouped(amounts, groups, start, end)
        if label == "30d":
            out["customer_amount_sumsq_30d"] = _window_sum_grouped(amounts**2, groups, start, end)
    sorted_times = times[groups.order].astype(np.float64)
    gap = np.full(len(df), np.nan)
    has_prev = positions > groups.group_start
    gap[has_prev] = sorted_times[has_prev] - sorted_times[positions[has_prev] - 1]
    out["seconds_since_prev_customer_tx"] = gap
    return out, groups


def _window_sum_grouped(values: np.ndarray, groups: _SortedGroups, start: np.ndarray,
                        end: np.ndarray) -> np.ndarray:
    """Window sums of ``values`` over sorted positions [start, end) within one entity."""
    sorted_values = values[groups.order]
    inclusive = _group_inclusive_cumsum(sorted_values, groups)
    before_start = np.where(start > groups.group_start, inclusive[np.maximum(start - 1, 0)], 0.0)
    return inclusive[end - 1] - before_start


def _group_inclusive_cumsum(sorted_values: np.ndarray, groups: _SortedGroups) -> np.ndarray:
    group_ids = np.cumsum(groups.group_start == np.arange(len(sorted_values)))
    return pd.Series(sorted_values).groupby(group_ids).cumsum().to_numpy()


def _terminal_aggregates(df: pd.DataFrame, times: np.ndarray, ids: np.ndarray,
                         delay_days: int) -> tuple[dict, _SortedGroups]:
    delay = delay_days * SECONDS_PER_DAY
    groups = _sort_groups(df.TERMINAL_ID.to_numpy(), times, ids, delay + 30 * SECONDS_PER_DAY)
    sorted_fraud = df.TX_FRAUD.to_numpy(dtype=np.int64)[groups.order]
    fraud_prefix = np.concatenate([[0], np.cumsum(sorted_fraud)])
    start_delay = groups.window_start(delay)
    out: dict[str, np.ndarray] = {}
    starts = {days: groups.window_start(delay + days * SECONDS_PER_DAY) for days in (1, 7, 30)}
    for days, start in starts.items():
        out[f"terminal_count_delayed_{days}d"] = (start_delay - start).astype(np.float64)
        fraud = _window_sum(fraud_prefix, start, start_delay)
        out[f"terminal_fraud_delayed_{days}d"] = fraud.astype(np.float64)
    end = np.arange(len(df)) + 1
    first_fraud = _next_flagged(sorted_fraud == 1)[starts[30]]
    known = first_fraud < start_delay  # both bounds lie within the transaction's own terminal
    sorted_times = times[groups.order].astype(np.float64)
    out["seconds_since_first_terminal_fraud_delayed"] = np.where(
        known, sorted_times - sorted_times[np.minimum(first_fraud, len(df) - 1)], np.nan)
    out["terminal_count_1h"] = (end - groups.window_start(SECONDS_PER_HOUR)).astype(np.float64)
    out["terminal_count_1d"] = (end - groups.window_start(SECONDS_PER_DAY)).astype(np.float64)
    return out, groups


def _next_flagged(flags: np.ndarray) -> np.ndarray:
    """(N,) for each position, the first position at or after it whose flag is set (N if none)."""
    positions = np.where(flags, np.arange(len(flags)), len(flags))
    return np.minimum.accumulate(positions[::-1])[::-1]


def _unsort(values: dict[str, np.ndarray], order: np.ndarray) -> dict[str, np.ndarray]:
    """Map arrays in sorted order back to the original row order."""
    result = {}
    for name, sorted_values in values.items():
        original = np.empty_like(sorted_values)
        original[order] = sorted_values
        result[name] = original
    return result


def _offline_sequences(df: pd.DataFrame, groups: _SortedGroups, times: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Sequence inputs (N, SEQUENCE_STEPS, channels) and history amounts (N, HISTORY_LENGTH, NaN
    where absent), rows in the frame's original order."""
    positions = np.arange(len(df))
    index = positions[:, None] + np.arange(-HISTORY_LENGTH, 1)[None, :]
    valid = index >= groups.group_start[:, None]
    index = np.clip(index, 0, None)
    order = groups.order
    amounts = df.TX_AMOUNT.to_numpy(dtype=np.float64)[order][index]
    step_times = times.astype(np.float64)[order][index]
    terminals = pd.factorize(df.TERMINAL_ID.to_numpy())[0][order]
    same = terminals[index] == terminals[positions][:, None]
    sequences_sorted = _sequence_channels(amounts, step_times, same, valid.astype(np.float64))
    sequences = np.empty_like(sequences_sorted)
    sequences[order] = sequences_sorted
    history = np.empty((len(df), HISTORY_LENGTH))
    history[order] = np.where(valid, amounts, np.nan)[:, :-1]
    return sequences, history


def compute_offline_features(transactions: pd.DataFrame, delay_days: int = 7
                             ) -> tuple[pd.DataFrame, np.ndarray]:
    """Features for a whole DataFrame, equal to the online path row by row.

    Parameters
    ----------
    transactions : handbook columns TRANSACTION_ID, TX_DATETIME, CUSTOMER_ID, TERMINAL_ID,
        TX_AMOUNT, TX_TIME_SECONDS, TX_FRAUD (any row order).
    delay_days : label delay for the terminal risk windows (days).

    Returns
    -------
    features : DataFrame (N, len(FEATURE_NAMES)) float32, columns FEATURE_NAMES, same index
        and row order as ``transactions``.
    sequences : (N, SEQUENCE_STEPS, len(SEQUENCE_CHANNELS)) float32, same row order.
    """
    times = transactions.TX_TIME_SECONDS.to_numpy(dtype=np.int64)
    ids = transactions.TRANSACTION_ID.to_numpy(dtype=np.int64)
    customer, customer_groups = _customer_aggregates(transactions, times, ids)
    terminal, terminal_groups = _terminal_aggregates(transactions, times, ids, delay_days)
    agg = _unsort(customer, customer_groups.order) | _unsort(terminal, terminal_groups.order)
    sequences, history = _offline_sequences(transactions, customer_groups, times)
    tx_datetime = pd.to_datetime(transactions.TX_DATETIME)
    aggregates = np.column_stack([agg[name] for name in _NUMERIC_FIELDS]).astype(np.float64)
    matrix = _feature_columns(transactions.TX_AMOUNT.to_numpy(dtype=np.float64),
                              tx_datetime.dt.day_of_week.to_numpy(), tx_datetime.dt.hour.to_numpy(), aggregates,
                              history)
    features = pd.DataFrame(matrix.astype(np.float32), columns=list(FEATURE_NAMES),
                            index=transactions.index)
    return features, sequences
