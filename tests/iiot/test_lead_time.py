"""The lead-time and false-alert rules of ``bench/iiot.py``'s alert section (pure, no fleet)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.iiot.lead_time import AssetHistory, lead_times, summarise

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def hours(h: float) -> datetime:
    return T0 + timedelta(hours=h)


def test_the_earliest_opening_within_the_window_sets_the_lead_time_and_the_rest_are_false() -> None:
    history = AssetHistory(openings=[hours(10), hours(400), hours(450), hours(900)], failures=[hours(500)])
    leads, false_openings = lead_times(history, max_lead_h=200)
    assert leads == [pytest.approx(100.0)]  # 400 and 450 belong to the failure at 500; 10 is too early, 900 after
    assert false_openings == 2


def test_an_opening_before_an_earlier_failure_is_not_credited_to_the_next_one() -> None:
    history = AssetHistory(openings=[hours(90)], failures=[hours(100), hours(150)])
    leads, false_openings = lead_times(history, max_lead_h=200)
    assert leads == [pytest.approx(10.0), None]
    assert false_openings == 0


def test_summary_counts_failures_alerted_ahead_of_the_goal_and_false_alerts_per_asset_month() -> None:
    histories = {"a": AssetHistory([hours(0)], [hours(100)]),   # 100 h ahead
                 "b": AssetHistory([hours(50)], [hours(100)]),  # 50 h ahead
                 "c": AssetHistory([], [hours(100)]),           # missed
                 "d": AssetHistory([hours(10), hours(20)], [])}  # two false alerts
    summary = summarise(histories, observed_days=30.0, lead_goal_h=72, max_lead_h=336)
    assert summary["failures"] == 3 and summary["alerted"] == 2 and summary["alerted_at_least_goal"] == 1
    assert summary["share_alerted_at_least_goal"] == pytest.approx(1 / 3)
    assert summary["median_lead_h"] == pytest.approx(50.0)
    assert summary["false_alerts"] == 2 and summary["false_alerts_per_asset_month"] == pytest.approx(0.5)


def test_with_onsets_an_alert_kept_from_early_in_a_long_degradation_counts_and_one_before_the_onset_does_not() -> None:
    """The onset rule: a 600 h degradation alerted 400 h ahead is caught (the window rule counted a false alert
    and a miss); an opening 300 h before a failure whose degradation began 90 h before it is false."""
    long = AssetHistory(openings=[hours(100)], failures=[hours(500)], onsets=[hours(-100)])
    assert lead_times(long, max_lead_h=336) == ([pytest.approx(400.0)], 0)
    assert lead_times(long.without_onsets(), max_lead_h=336) == ([None], 1)
    short = AssetHistory(openings=[hours(200), hours(450)], failures=[hours(500)], onsets=[hours(410)])
    assert lead_times(short, max_lead_h=336) == ([pytest.approx(50.0)], 1)
    assert lead_times(short.without_onsets(), max_lead_h=336) == ([pytest.approx(300.0)], 0)


def test_an_onset_never_reaches_back_past_an_earlier_failure() -> None:
    history = AssetHistory(openings=[hours(90), hours(120)], failures=[hours(100), hours(150)],
                           onsets=[hours(50), hours(80)])
    assert lead_times(history, max_lead_h=336) == ([pytest.approx(10.0), pytest.approx(30.0)], 0)


def test_the_summary_gives_the_window_rule_beside_the_onset_rule() -> None:
    histories = {"a": AssetHistory([hours(100)], [hours(500)], [hours(-100)])}
    summary = summarise(histories, observed_days=30.0, lead_goal_h=72, max_lead_h=336)
    assert summary["rule"] == "onset" and summary["alerted_at_least_goal"] == 1 and summary["false_alerts"] == 0
    window = summary["window_rule"]
    assert window["rule"] == "window" and window["alerted"] == 0 and window["false_alerts"] == 1
    with pytest.raises(ValueError, match="onsets"):
        AssetHistory([], [hours(1), hours(2)], [hours(0)])
