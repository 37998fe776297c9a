"""The pure alert policy: hysteresis, consecutive scores, severity and escalation, RUL, offline replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from services.iiot.alerts import CRITICAL, WARNING, AlertPolicy, ScorePoint, replay

START = datetime(2026, 3, 1, tzinfo=UTC)


def series(*p: float, rul: list[float | None] | None = None) -> list[ScorePoint]:
    """Hourly scores from START."""
    ruls = rul or [None] * len(p)
    return [ScorePoint(START + timedelta(hours=i), value, r) for i, (value, r) in enumerate(zip(p, ruls, strict=True))]


def transitions(points: list[ScorePoint], policy: AlertPolicy, **kwargs: object) -> list[tuple[int, str, str]]:
    """(hour, transition, severity) of each event."""
    return [(int((e.at - START).total_seconds() // 3600), e.transition, e.severity)
            for e in replay(points, policy, **kwargs)]  # type: ignore[arg-type]


def test_one_high_score_opens_nothing_two_in_a_row_do() -> None:
    policy = AlertPolicy(open_threshold=0.5, close_threshold=0.3, consecutive=2)
    assert transitions(series(0.1, 0.9, 0.2, 0.6, 0.1), policy) == []
    assert transitions(series(0.1, 0.6, 0.7, 0.6), policy) == [(2, "opened", WARNING)]


def test_hysteresis_scores_between_the_thresholds_keep_the_alert_open() -> None:
    policy = AlertPolicy(open_threshold=0.5, close_threshold=0.3, consecutive=2)
    # open at hour 2; 0.4 and 0.35 are below open but not below close: still open; one low is not enough
    points = series(0.6, 0.6, 0.55, 0.4, 0.35, 0.2, 0.45, 0.1, 0.05, 0.6)
    assert transitions(points, policy) == [(1, "opened", WARNING), (8, "resolved", WARNING)]


def test_a_resolved_alert_needs_a_fresh_run_to_open_again() -> None:
    policy = AlertPolicy(open_threshold=0.5, close_threshold=0.3, consecutive=2)
    points = series(0.9, 0.9, 0.1, 0.1, 0.9, 0.9)
    assert transitions(points, policy) == [(1, "opened", CRITICAL), (3, "resolved", CRITICAL), (5, "opened", CRITICAL)]


def test_escalation_to_critical_happens_once() -> None:
    policy = AlertPolicy(open_threshold=0.5, close_threshold=0.3, critical_threshold=0.8, consecutive=2)
    points = series(0.6, 0.6, 0.85, 0.6, 0.95, 0.1, 0.1)
    assert transitions(points, policy) == [(1, "opened", WARNING), (2, "escalated", CRITICAL),
                                           (6, "resolved", CRITICAL)]


def test_a_short_remaining_life_opens_and_keeps_an_alert_when_asked_to() -> None:
    points = series(0.1, 0.1, 0.1, 0.1, rul=[200.0, 50.0, 40.0, 300.0])
    assert transitions(points, AlertPolicy(open_threshold=0.5, close_threshold=0.3, consecutive=2,
                                           rul_open_hours=None)) == []
    with_rul = AlertPolicy(open_threshold=0.5, close_threshold=0.3, consecutive=2, rul_open_hours=72.0,
                           rul_critical_hours=45.0)
    assert transitions(points, with_rul) == [(2, "opened", CRITICAL)]


def test_the_default_policy_opens_on_a_short_remaining_life_or_a_high_risk() -> None:
    """The shipped default (chosen on validation fleets, see AlertPolicy): P >= 0.2 or RUL <= 216 h on 4
    hourly scores in a row opens; P < 0.12 with RUL above 288 h on 4 in a row closes."""
    policy = AlertPolicy()
    assert (policy.open_threshold, policy.close_threshold, policy.consecutive, policy.rul_open_hours,
            policy.rul_close_hours) == (0.2, 0.12, 4, 216.0, 288.0)
    by_rul = series(0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01,
                    rul=[300.0, 210.0, 200.0, 190.0, 180.0, 300.0, 300.0, 300.0])
    assert transitions(by_rul, policy) == [(4, "opened", WARNING)]
    by_rul_closes = series(*[0.01] * 9, rul=[210.0, 210.0, 210.0, 210.0, 300.0, 300.0, 300.0, 300.0, 300.0])
    assert transitions(by_rul_closes, policy) == [(3, "opened", WARNING), (7, "resolved", WARNING)]
    assert transitions(series(0.1, 0.19, 0.15, 0.19, 0.3, 0.25, 0.2, 0.2), policy) == [(7, "opened", WARNING)]


def test_a_rul_margin_keeps_an_alert_open_through_daily_dips() -> None:
    """RUL dipping around the open limit every shift: without a margin the alert opens and closes with each
    dip; closing only above rul_close_hours opens it once and closes it once RUL is clearly back up."""
    dips: list[float | None] = [*[210.0, 210.0, 250.0, 250.0] * 3, 300.0, 300.0]
    points = series(*[0.01] * len(dips), rul=dips)
    flapping = AlertPolicy(open_threshold=0.5, close_threshold=0.3, consecutive=2, rul_open_hours=216.0,
                           rul_close_hours=None)
    assert transitions(points, flapping) == [(1, "opened", WARNING), (3, "resolved", WARNING),
                                             (5, "opened", WARNING), (7, "resolved", WARNING),
                                             (9, "opened", WARNING), (11, "resolved", WARNING)]
    with_margin = flapping.model_copy(update={"rul_close_hours": 288.0})
    assert transitions(points, with_margin) == [(1, "opened", WARNING), (13, "resolved", WARNING)]
    assert AlertPolicy(rul_open_hours=None).rul_close_limit is None  # no RUL opening: no RUL closing either


def test_maintenance_resets_resolve_the_active_alert() -> None:
    policy = AlertPolicy(consecutive=1)
    points = series(0.9, 0.9, 0.9, 0.9)
    assert transitions(points, policy, resets=[START + timedelta(hours=1, minutes=30)]) == [
        (0, "opened", CRITICAL), (1, "resolved", CRITICAL), (2, "opened", CRITICAL)]


@pytest.mark.parametrize("bad", [
    {"open_threshold": 0.3, "close_threshold": 0.5},
    {"open_threshold": 0.6, "critical_threshold": 0.5},
    {"consecutive": 0},
    {"consecutive": "2"},
    {"open_threshold": "0.5"},
    {"open_threshold": 1.5},
    {"surprise": 1},
    {"rul_close_hours": 200.0},
    {"rul_open_hours": 100.0, "rul_close_hours": 99.0},
    {"rul_close_hours": "300"},
])
def test_policies_are_validated_strictly(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AlertPolicy.model_validate(bad)
