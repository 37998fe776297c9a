"""Alert lead time and false alerts from replayed alert openings: one set of rules for choosing the
alert policy at training (:mod:`services.iiot.training`) and for the benchmark (``bench/iiot.py``).

Pure bookkeeping over one held-out **simulated** fleet, given per asset the times its alerts
opened (from :func:`services.iiot.alerts.replay`) and its failure times (the simulator's truth):

- an alert opening is *true* when the asset fails within ``max_lead_h`` after it (and no earlier
  failure of the asset lies between); every other opening is a *false alert*, including one
  before a preventive maintenance that cut a degradation short (conservative: we cannot tell it
  was acted on);
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
    """One asset's alert openings and failure times, both ascending."""

    openings: Sequence[datetime]
    failures: Sequence[datetime]


def lead_times(history: AssetHistory, max_lead_h: float) -> tuple[list[float | None], int]:
    """(lead time in hours per failure, None when missed; the number of false openings)."""
    window = timedelta(hours=max_lead_h)
    claimed: set[int] = set()
    leads: list[float | None] = []
    previous_failure: datetime | None = None
    for failure in history.failures:
        earliest = failure - window if previous_failure is None else max(failure - window, previous_failure)
        candidates = [i for i, opened in enumerate(history.openings)
                      if earliest <= opened <= failure and (previous_failure is None or opened > previous_failure)]
        claimed.update(candidates)
        leads.append((failure - history.openings[candidates[0]]).total_seconds() / 3600 if candidates else None)
        previous_failure = failure
    return leads, len(history.openings) - len(claimed)


def summarise(histories: Mapping[str, AssetHistory], observed_days: float, lead_goal_h: float = LEAD_GOAL_H,
              max_lead_h: float = DEFAULT_MAX_LEAD_H) -> dict[str, Any]:
    """The section's figures over every asset (see the module's docstring for the rules)."""
    all_leads: list[float | None] = []
    false_alerts = 0
    for history in histories.values():
        leads, false_openings = lead_times(history, max_lead_h)
        all_leads.extend(leads)
        false_alerts += false_openings
    caught = [lead for lead in all_leads if lead is not None]
    asset_months = len(histories) * observed_days / DAYS_PER_MONTH
    failures = len(all_leads)
    return {
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
