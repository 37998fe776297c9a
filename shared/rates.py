"""A moving rate of events, for load decisions (admission, load shedding)."""

from __future__ import annotations

import math
from collections.abc import Callable


class DecayingRate:
    """A rate (per second) of recent events, each weighted by its amount, forgetting with time constant ``tau_s``."""

    def __init__(self, clock: Callable[[], float], tau_s: float = 0.5) -> None:
        self.clock = clock
        self.tau_s = tau_s
        self._value = 0.0
        self._at = clock()

    def add(self, amount: float = 1.0) -> None:
        """Count one event of ``amount`` now."""
        self._value = self.per_second() + amount / self.tau_s

    def per_second(self) -> float:
        """The rate now (amount per second)."""
        now = self.clock()
        self._value *= math.exp(-(now - self._at) / self.tau_s)
        self._at = now
        return self._value
