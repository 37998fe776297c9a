"""The fog tier's line risk: the formula, contributions, the driver, min RUL, staleness, and the
vectorised paths (many lines at once, one line over time) agreeing with the scalar one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from services.iiot.fog import (
    AssetScore,
    aggregate_lines,
    combine,
    latest_scores,
    line_risk,
    line_risk_over_time,
    score_of_message,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_line_risk_is_the_probability_that_any_asset_fails() -> None:
    line, contribution = combine([[0.2] * 10])
    assert line[0] == pytest.approx(1 - 0.8 ** 10)  # 0.89: well above max(p) = 0.2
    np.testing.assert_allclose(contribution[0], 0.2 * 0.8 ** 9)  # the fall if that asset were healthy
    line, contribution = combine([[0.5, 0.1, np.nan], [np.nan, np.nan, np.nan], [1.0, 0.3, 0.0]])
    assert line[0] == pytest.approx(1 - 0.5 * 0.9)
    assert np.isnan(line[1]) and np.isnan(contribution[1]).all()
    assert line[2] == 1.0
    np.testing.assert_allclose(contribution[2], [0.7, 0.0, 0.0])  # exact at p = 1: no division by 0
    assert np.isnan(contribution[0, 2])
    both_certain = combine([[1.0, 1.0]])
    assert both_certain[0][0] == 1.0 and both_certain[1].tolist() == [[0.0, 0.0]]


def test_contributions_match_removing_the_asset() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, size=(50, 6))
    line, contribution = combine(p)
    for column in range(6):
        without = combine(np.delete(p, column, axis=1))[0]
        np.testing.assert_allclose(contribution[:, column], line - without, atol=1e-12)
    assert (line >= p.max(axis=1) - 1e-12).all()  # never below its riskiest asset


def test_the_driver_and_the_shortest_rul_are_named() -> None:
    risk = line_risk([AssetScore("pump-1", 0.1, 400.0), AssetScore("motor-2", 0.6, 90.0),
                      AssetScore("fan-3", 0.3, None)])
    assert risk is not None
    assert risk.p_failure == pytest.approx(1 - 0.9 * 0.4 * 0.7)
    assert (risk.driver, risk.min_rul_asset, risk.min_rul_hours) == ("motor-2", "motor-2", 90.0)
    assert [share.asset_id for share in risk.assets] == ["motor-2", "fan-3", "pump-1"]
    assert risk.driver_contribution == pytest.approx(0.6 * 0.9 * 0.7)
    assert line_risk([]) is None


def test_latest_scores_keep_each_assets_newest_and_drop_stale_ones() -> None:
    scores = [AssetScore("a", 0.1, window_end=T0), AssetScore("a", 0.4, window_end=T0 + timedelta(hours=2)),
              AssetScore("b", 0.9, window_end=T0 - timedelta(days=3)), AssetScore("c", 0.2, window_end=T0)]
    assert [(s.asset_id, s.p_failure) for s in latest_scores(scores)] == [("a", 0.4), ("b", 0.9), ("c", 0.2)]
    fresh = latest_scores(scores, stale_after=timedelta(hours=24))
    assert [s.asset_id for s in fresh] == ["a", "c"]


def test_edge_messages_are_scores() -> None:
    document = {"asset": "pump-7", "p_failure": 0.42, "rul_hours": 51.5, "window_end": "2026-03-01T10:00:00+00:00",
                "tier": "edge"}
    score = score_of_message(document)
    assert (score.asset_id, score.p_failure, score.rul_hours, score.tier) == ("pump-7", 0.42, 51.5, "edge")
    assert score.window_end == datetime(2026, 3, 1, 10, tzinfo=UTC)


def test_many_lines_at_once_agree_with_one_at_a_time() -> None:
    rng = np.random.default_rng(1)
    rows = [{"line_id": f"line-{line}", "asset_id": f"a-{line}-{asset}", "p_failure": float(rng.uniform()),
             "rul_hours": float(rng.uniform(10, 500)) if asset % 3 else np.nan}
            for line in range(40) for asset in range(int(rng.integers(1, 8)))]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=2)  # any order
    lines = aggregate_lines(frame)
    assert len(lines) == 40
    for line_id, own in frame.groupby("line_id"):
        expected = line_risk([AssetScore(r.asset_id, r.p_failure, None if np.isnan(r.rul_hours) else r.rul_hours)
                              for r in own.itertuples()])
        assert expected is not None
        got = lines.loc[line_id]
        assert got["p_failure"] == pytest.approx(expected.p_failure)
        assert got["driver"] == expected.driver
        assert got["driver_contribution"] == pytest.approx(expected.driver_contribution)
        assert got["min_rul_asset"] == expected.min_rul_asset or \
            (expected.min_rul_asset is None and pd.isna(got["min_rul_asset"]))
        assert got["assets"] == len(own)
    only_nan_rul = aggregate_lines(pd.DataFrame({"line_id": ["l"], "asset_id": ["a"], "p_failure": [0.3],
                                                 "rul_hours": [np.nan]}))
    assert pd.isna(only_nan_rul.loc["l", "min_rul_asset"]) and np.isnan(only_nan_rul.loc["l", "min_rul_hours"])
    assert aggregate_lines(pd.DataFrame(columns=["line_id", "asset_id", "p_failure"])).empty


def test_a_line_over_time_holds_each_score_until_it_goes_stale() -> None:
    scores = pd.DataFrame({
        "asset_id": ["a", "a", "b"],
        "window_end": [T0, T0 + timedelta(hours=3), T0 + timedelta(hours=1)],
        "p_failure": [0.1, 0.5, 0.8],
    })
    times = pd.date_range(T0 - timedelta(hours=1), T0 + timedelta(hours=10), freq="1h")
    timeline = line_risk_over_time(scores, times, stale_after=timedelta(hours=4))
    assert timeline.asset_ids == ("a", "b")
    assert np.isnan(timeline.line_p[0]) and timeline.driver[0] == -1  # before any score
    assert timeline.line_p[1] == pytest.approx(0.1)  # T0: a alone
    assert timeline.line_p[2] == pytest.approx(1 - 0.9 * 0.2) and timeline.driver[2] == 1  # b drives
    assert timeline.asset_p[4, 0] == 0.5  # a's second score from T0+3h
    assert np.isnan(timeline.asset_p[7, 1])  # b's score (T0+1h) is stale after T0+5h
    assert timeline.line_p[7] == pytest.approx(0.5) and timeline.driver[7] == 0
    assert np.isnan(timeline.line_p[-1])  # everything stale
    empty = line_risk_over_time(scores.iloc[:0], times, stale_after=timedelta(hours=4))
    assert empty.asset_ids == () and np.isnan(empty.line_p).all()
