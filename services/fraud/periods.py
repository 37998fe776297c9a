"""How a tenant's labelled history is split into training, delay and held-out days for a candidate
(kept apart from :mod:`services.fraud.training` so that the API counts labels without importing
torch and LightGBM)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CandidatePeriods:
    """How a labelled history is split for a candidate (days since the epoch, inclusive bounds).

    Training days, then ``delay_days`` left out (their labels were not known yet when the
    held-out days were scored), then the latest ``holdout_days``: the first half of those fits the
    Platt calibration, all of them measure the candidate.
    """

    last_day: int
    holdout_days: int = 7
    delay_days: int = 7

    @property
    def last_training_day(self) -> int:
        return self.last_day - self.holdout_days - self.delay_days

    @property
    def first_holdout_day(self) -> int:
        return self.last_day - self.holdout_days + 1

    @property
    def last_calibration_day(self) -> int:
        return self.last_day - self.holdout_days // 2
