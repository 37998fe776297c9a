"""The fog tier: a production line's risk from the risks of its assets (pure, vectorised).

**Line risk** is the probability that at least one asset on the line fails within the horizon:
``1 − Π(1 − p_i)`` over the line's assets, taking their failures as independent. Why this and
not the alternatives:

- a line stops when any of its machines stops (lines are serial; redundancy is rare and is not
  in the registry), so "will this line have a failure in the next 72 h" is what a planner asks;
- ``max(p_i)`` answers a different question and under-states a line with many middling risks
  (ten assets at 0.2 are a line at 0.89, not 0.2); a sum is not a probability (it passes 1);
- independence is an assumption: common causes (shared power, load, coolant) correlate failures
  positively, and then the true P(any) lies between ``max(p_i)`` and this value — so the line
  risk errs on the side of warning, never below its riskiest asset.

**The driver** is the asset with the largest *contribution* ``p_i · Π_{j≠i}(1 − p_j)``: how much
the line risk would fall if that asset were made healthy (``p_i → 0``). Contributions rank
assets as ``p_i`` does, but say how much each matters in the line's units; a line at 0.89 of ten
assets at 0.2 gets 0.027 from each. **Min RUL** is the smallest remaining useful life on the
line, and whose it is.

Inputs are the scores of assets (:class:`AssetScore`, the rows of ``iiot_risk_scores`` or the
edge's risk messages, which carry ``p_failure``, ``rul_hours`` and ``window_end``). The core,
:func:`combine`, works on a matrix ``p[rows, assets]`` with NaN where an asset has no score: a
row is a line (:func:`aggregate_lines`, many lines at once) or a time step
(:func:`line_risk_over_time`, one line over a time grid with each asset's latest score held
until it goes stale).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

FloatArray = npt.NDArray[np.float64]
METHOD = "1 - prod(1 - p_i)"
"""How the line risk is computed, as the API reports it."""


@dataclass(frozen=True, slots=True)
class AssetScore:
    """An asset's risk at one time: a stored risk score or an edge risk message."""

    asset_id: str
    p_failure: float
    rul_hours: float | None = None
    window_end: datetime | None = None
    tier: str = "cloud"


@dataclass(frozen=True, slots=True)
class AssetShare:
    """One asset's part in its line's risk."""

    asset_id: str
    p_failure: float
    rul_hours: float | None
    contribution: float
    """How much the line risk would fall if this asset were healthy."""


@dataclass(frozen=True, slots=True)
class LineRisk:
    """A line's aggregated risk: the probability any asset fails, what drives it, the shortest RUL."""

    p_failure: float
    driver: str | None
    driver_contribution: float
    min_rul_hours: float | None
    min_rul_asset: str | None
    assets: tuple[AssetShare, ...]
    """Every scored asset, largest contribution first."""


def combine(p: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Line risk and each asset's contribution, for each row of ``p[rows, assets]``.

    ``p`` holds probabilities (clipped to [0, 1]); NaN means "no score" and counts as no risk.
    Returns ``line[rows]`` (NaN for a row without any score) and ``contribution[rows, assets]``
    (NaN where ``p`` is). Exact for ``p_i = 1`` (no division by ``1 − p_i``).
    """
    matrix = np.atleast_2d(np.asarray(p, dtype=np.float64))
    present = ~np.isnan(matrix)
    q = np.where(present, 1.0 - np.clip(np.nan_to_num(matrix), 0.0, 1.0), 1.0)
    zero = q == 0.0
    zeros = zero.sum(axis=1, keepdims=True)
    product_nonzero = np.where(zero, 1.0, q).prod(axis=1, keepdims=True)
    survive_all = np.where(zeros > 0, 0.0, product_nonzero)
    # Π over the others: for a certain failure (q = 0) the others' product, unless another is certain too
    others = np.where(zero, np.where(zeros == 1, product_nonzero, 0.0),
                      np.where(zeros > 0, 0.0, product_nonzero / np.where(zero, 1.0, q)))
    contribution = np.where(present, (1.0 - q) * others, np.nan)
    line = np.where(present.any(axis=1), 1.0 - survive_all[:, 0], np.nan)
    return line, contribution


def line_risk(scores: Sequence[AssetScore]) -> LineRisk | None:
    """The line risk of these assets' scores (one per asset: the caller picks the latest);
    ``None`` when there are none."""
    if not scores:
        return None
    p = np.array([[score.p_failure for score in scores]], dtype=np.float64)
    line, contribution = combine(p)
    return _line_risk(float(line[0]), scores, contribution[0])


def _line_risk(line: float, scores: Sequence[AssetScore], contribution: FloatArray) -> LineRisk:
    order = sorted(range(len(scores)), key=lambda i: (-contribution[i], scores[i].asset_id))
    shares = tuple(AssetShare(scores[i].asset_id, scores[i].p_failure, scores[i].rul_hours,
                              float(contribution[i])) for i in order)
    ruls = [(score.rul_hours, score.asset_id) for score in scores if score.rul_hours is not None]
    min_rul, min_rul_asset = min(ruls) if ruls else (None, None)
    return LineRisk(p_failure=line, driver=shares[0].asset_id, driver_contribution=shares[0].contribution,
                    min_rul_hours=min_rul, min_rul_asset=min_rul_asset, assets=shares)


def latest_scores(scores: Iterable[AssetScore], *, stale_after: timedelta | None = None) -> list[AssetScore]:
    """Each asset's newest score (by ``window_end``; a later one in the input wins a tie), without
    those older than ``stale_after`` before the newest score of all (when given)."""
    newest: dict[str, AssetScore] = {}
    for score in scores:
        held = newest.get(score.asset_id)
        if held is None or _at(score) >= _at(held):
            newest[score.asset_id] = score
    if stale_after is not None and newest:
        cutoff = max(_at(score) for score in newest.values()) - stale_after.total_seconds()
        newest = {asset: score for asset, score in newest.items() if _at(score) >= cutoff}
    return sorted(newest.values(), key=lambda score: score.asset_id)


def _at(score: AssetScore) -> float:
    return score.window_end.timestamp() if score.window_end is not None else -np.inf


def score_of_message(message: Any) -> AssetScore:
    """An edge risk message (``mqtt_io.RiskMessage`` or its JSON document) as an :class:`AssetScore`."""
    if isinstance(message, Mapping):
        window_end = message.get("window_end")
        return AssetScore(str(message.get("asset_id") or message["asset"]), float(message["p_failure"]),
                          _optional_float(message.get("rul_hours")),
                          datetime.fromisoformat(window_end) if isinstance(window_end, str) else window_end,
                          str(message.get("tier", "edge")))
    return AssetScore(message.asset_id, float(message.p_failure), _optional_float(message.rul_hours),
                      message.window_end, getattr(message, "tier", "edge"))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def aggregate_lines(scores: pd.DataFrame) -> pd.DataFrame:
    """Line risks of many lines at once.

    ``scores``: one row per asset (its current score) with columns ``line_id``, ``asset_id``,
    ``p_failure`` and optionally ``rul_hours``. Returns one row per line, indexed by ``line_id``:
    ``p_failure`` (the line risk), ``driver``, ``driver_contribution``, ``min_rul_hours``,
    ``min_rul_asset`` (both missing, NaN, for a line without any RUL), ``assets`` (how many
    scored). Vectorised: the assets of each line become a row of a padded matrix for :func:`combine`.
    """
    columns = ["p_failure", "driver", "driver_contribution", "min_rul_hours", "min_rul_asset", "assets"]
    if scores.empty:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="line_id"))
    frame = scores.sort_values(["line_id", "asset_id"], kind="stable").reset_index(drop=True)
    lines, row = np.unique(frame["line_id"].to_numpy(), return_inverse=True)
    column = frame.groupby("line_id", sort=True).cumcount().to_numpy()
    p = np.full((len(lines), int(column.max()) + 1), np.nan)
    p[row, column] = frame["p_failure"].to_numpy(dtype=np.float64)
    line, contribution = combine(p)
    contribution_of_row = np.nan_to_num(contribution[row, column], nan=-1.0)
    driver = pd.Series(contribution_of_row).groupby(row, sort=True).idxmax().to_numpy()
    rul = pd.to_numeric(frame["rul_hours"], errors="coerce") if "rul_hours" in frame else \
        pd.Series(np.nan, index=frame.index)
    shortest = pd.Series(rul.fillna(np.inf).to_numpy()).groupby(row, sort=True).idxmin().to_numpy()
    has_rul = np.isfinite(rul.to_numpy(dtype=np.float64)[shortest])
    asset_ids = frame["asset_id"].to_numpy(dtype=object)
    return pd.DataFrame({
        "p_failure": line,
        "driver": asset_ids[driver],
        "driver_contribution": contribution_of_row[driver],
        "min_rul_hours": np.where(has_rul, rul.to_numpy(dtype=np.float64)[shortest], np.nan),
        "min_rul_asset": np.where(has_rul, asset_ids[shortest], None),
        "assets": np.bincount(row),
    }, index=pd.Index(lines, name="line_id"))


@dataclass(frozen=True, slots=True)
class LineTimeline:
    """A line's risk on a time grid: what the fog view draws."""

    times: pd.DatetimeIndex
    asset_ids: tuple[str, ...]
    asset_p: FloatArray
    """``[times, assets]``: each asset's latest score at that time (NaN: none, or stale)."""
    line_p: FloatArray
    """``[times]``: the line risk (NaN where no asset has a fresh score)."""
    driver: npt.NDArray[np.int64]
    """``[times]``: the driving asset's column (-1 where no score)."""


def line_risk_over_time(scores: pd.DataFrame, times: pd.DatetimeIndex, *, stale_after: timedelta) -> LineTimeline:
    """One line's risk at each of ``times`` (sorted, tz-aware).

    ``scores``: the line's risk scores, columns ``asset_id``, ``window_end`` (tz-aware),
    ``p_failure``. At each time each asset counts with its newest score at or before it, until
    that score is older than ``stale_after`` (then the asset has none). Vectorised over time
    (one ``searchsorted`` per asset).
    """
    asset_ids = tuple(sorted(scores["asset_id"].unique())) if len(scores) else ()
    grid = times.as_unit("ns").asi8  # pandas may hold either side in us or s: compare in one unit
    stale_ns = int(stale_after.total_seconds() * 1e9)
    asset_p = np.full((len(times), len(asset_ids)), np.nan)
    for column, (asset_id, own) in enumerate(scores.groupby("asset_id", sort=True)):
        own = own.sort_values("window_end", kind="stable")
        at = pd.DatetimeIndex(own["window_end"]).as_unit("ns").asi8
        index = np.searchsorted(at, grid, side="right") - 1
        fresh = (index >= 0) & (grid - at[index.clip(0)] <= stale_ns)
        asset_p[:, column] = np.where(fresh, own["p_failure"].to_numpy(dtype=np.float64)[index.clip(0)], np.nan)
        assert asset_ids[column] == asset_id
    if not asset_ids:
        return LineTimeline(times, (), asset_p, np.full(len(times), np.nan), np.full(len(times), -1, dtype=np.int64))
    line, contribution = combine(asset_p)
    driver = np.where(np.isnan(line), -1, np.argmax(np.nan_to_num(contribution, nan=-1.0), axis=1))
    return LineTimeline(times, asset_ids, asset_p, line, driver.astype(np.int64))
