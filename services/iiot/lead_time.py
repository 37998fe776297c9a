"""Alert lead time and false alerts from replayed alert openings: one set of rules for choosing the
alert policy at training (:mod:`services.iiot.training`) and for the benchmark (``bench/iiot.py``).

Pure bookkeeping over one held-out **simulated** fleet, given per asset the times its alerts
opened (from :func:`services.iiot.alerts.replay`) and its failure times (the simulator's truth):

- an alert opening is *true* for a failure when it lies within that failure's degradation: from
  its **onset** (the simulator's ground truth, when the history carries it) to the failure, and after
  any earlier failure of the asset. An alert raised as the degradation began is a correct warning
  however long the degradation then lasts (up to 28 days in the simulator), and one raised before
  it began is not, however close to the failure. Without onsets (the *window rule*, the only rule
  before 2026-12-03) an opening is true when the failure follows within ``max_lead_h``: it counted
  an alert opened 400 h into a 600 h degradation, and kept open to the failure, as one false alert
  and one missed failure;
- every other opening is a *false alert*, including one before a preventive maintenance that cut
  a degradation short (conservative: we cannot tell it was acted on);
- a failure's *lead time* is from the earliest true opening for it to the failure; a failure with
  none is *missed* (lead time 0 h);
- false alerts per asset-month = false openings / (assets x observed days / 30).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

LEAD_GOAL_H = 72.0
DEFAULT_MAX_LEAD_H = 14 * 24.0
DAYS_PER_MONTH = 30.0


@dataclass(frozen=True)
class AssetHistory:
    """One asset's alert openings and failure times, both ascending, and each failure's degradation
    onset (ground truth, aligned with ``failures``; empty: the window rule)."""

    openings: Sequence[datetime]
    failures: Sequence[datetime]
    onsets: Sequence[datetime] = ()

    def __post_init__(self) -> None:
        if self.onsets and len(self.onsets) != len(self.failures):
            raise ValueError(f"{len(self.onsets)} onsets for {len(self.failures)} failures")

    def without_onsets(self) -> AssetHistory:
        """The same history scored by the window rule."""
        return AssetHistory(self.openings, self.failures)


def lead_times(history: AssetHistory, max_lead_h: float) -> tuple[list[float | None], int]:
    """(lead time in hours per failure, None when missed; the number of false openings).

    ``max_lead_h`` bounds a failure's openings only when the history has no onsets (the window rule)."""
    window = timedelta(hours=max_lead_h)
    claimed: set[int] = set()
    leads: list[float | None] = []
    previous_failure: datetime | None = None
    for index, failure in enumerate(history.failures):
        earliest = history.onsets[index] if history.onsets else failure - window
        if previous_failure is not None:
            earliest = max(earliest, previous_failure)
        candidates = [i for i, opened in enumerate(history.openings)
                      if earliest <= opened <= failure and (previous_failure is None or opened > previous_failure)]
        claimed.update(candidates)
        leads.append((failure - history.openings[candidates[0]]).total_seconds() / 3600 if candidates else None)
        previous_failure = failure
    return leads, len(history.openings) - len(claimed)


def summarise(histories: Mapping[str, AssetHistory], observed_days: float, lead_goal_h: float = LEAD_GOAL_H,
              max_lead_h: float = DEFAULT_MAX_LEAD_H) -> dict[str, Any]:
    """The section's figures over every asset (see the module's docstring for the rules); with onsets,
    the onset rule's, and the window rule's beside them under ``"window_rule"``."""
    all_leads: list[float | None] = []
    false_alerts = 0
    for history in histories.values():
        leads, false_openings = lead_times(history, max_lead_h)
        all_leads.extend(leads)
        false_alerts += false_openings
    caught = [lead for lead in all_leads if lead is not None]
    asset_months = len(histories) * observed_days / DAYS_PER_MONTH
    failures = len(all_leads)
    figures = {
        "assets": len(histories), "observed_days": observed_days, "asset_months": asset_months,
        "failures": failures, "alerted": len(caught),
        "alerted_at_least_goal": sum(lead >= lead_goal_h for lead in caught),
        "share_alerted_at_least_goal": sum(lead >= lead_goal_h for lead in caught) / failures if failures else None,
        "median_lead_h": statistics.median([lead or 0.0 for lead in all_leads]) if failures else None,
        "median_lead_h_of_alerted": statistics.median(caught) if caught else None,
        "false_alerts": false_alerts,
        "false_alerts_per_asset_month": false_alerts / asset_months if asset_months else None,
        "lead_goal_h": lead_goal_h, "max_lead_h": max_lead_h,
    }
    if any(history.onsets for history in histories.values()):
        window_rule = summarise({asset: h.without_onsets() for asset, h in histories.items()}, observed_days,
                                lead_goal_h, max_lead_h)
        return {**figures, "rule": "onset", "window_rule": window_rule}
    return {**figures, "rule": "window"}
