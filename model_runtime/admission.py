"""Admission by measured capacity: take an item only if the model can answer it within its latency target.

A queue bound in items lets admitted latency grow when the model slows down (a busy loop, a
longer input, a GPU shared with another model), and refusing by the last batch's wall time
refuses more as batches shrink, which shrinks them further. Instead, :class:`BatchTimeModel` fits
``batch seconds = fixed + per_cost x batch cost`` over recent batches (exponentially forgotten), and
:class:`CapacityAdmission` predicts when a new item would be answered if admitted now: what is
left of the batch running, then the queued work (and the item) cut into full batches, each
priced by the fit. Past saturation the queue then holds about what the model clears within the
target: batches stay full (throughput stays at its peak) and admitted latency stays bounded; the
rest is refused at once, with a Retry-After of the expected excess.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class BatchTimeModel:
    """Online least squares of batch seconds against batch cost, forgetting old batches.

    Attributes
    ----------
    forget : float
        Weight kept by the past at each new batch (0.95: about the last 20 batches count).
    """

    forget: float = 0.95
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, cost: float, seconds: float) -> None:
        """Record one batch: its total cost and its run time (s)."""
        keep = self.forget
        self._w = keep * self._w + 1.0
        self._x = keep * self._x + cost
        self._y = keep * self._y + seconds
        self._xx = keep * self._xx + cost * cost
        self._xy = keep * self._xy + cost * seconds

    @property
    def samples(self) -> float:
        """Weight of the batches seen (0 before the first)."""
        return self._w

    def coefficients(self) -> tuple[float, float]:
        """``(fixed seconds per batch, seconds per unit of cost)``, both >= 0.

        With too little spread in batch cost to separate the two, all time is per cost.
        """
        if self._w == 0:
            return 0.0, 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        variance = self._xx / self._w - mean_x * mean_x
        if variance <= 1e-9 * max(1.0, mean_x * mean_x):
            return 0.0, (mean_y / mean_x if mean_x > 0 else 0.0)
        slope = (self._xy / self._w - mean_x * mean_y) / variance
        if slope < 0:  # noise: time does not fall with more work
            return mean_y, 0.0
        fixed = mean_y - slope * mean_x
        if fixed < 0:  # nor is a batch's fixed cost negative
            return 0.0, mean_y / mean_x
        return fixed, slope

    def seconds(self, cost: float) -> float:
        """Predicted run time (s) of a batch of total ``cost``."""
        fixed, per_cost = self.coefficients()
        return fixed + per_cost * cost


class DecayingRate:
    """A rate (per second) of recent events, each weighted by its amount, forgetting with time constant ``tau_s``."""

    def __init__(self, clock: Callable[[], float], tau_s: float = 0.5) -> None:
        self.clock = clock
        self.tau_s = tau_s
        self._value = 0.0
        self._at = clock()

    def add(self, amount: float) -> None:
        """Count one event of ``amount`` now."""
        self._value = self.per_second() + amount / self.tau_s

    def per_second(self) -> float:
        """The rate now (amount per second)."""
        now = self.clock()
        self._value *= math.exp(-(now - self._at) / self.tau_s)
        self._at = now
        return self._value


@dataclass(frozen=True)
class Decision:
    """An admission decision: ``admitted``, the predicted answer time and, when refused, a retry hint."""

    admitted: bool
    expected_s: float
    retry_after_s: float = 0.0


class CapacityAdmission:
    """Admits an item when its predicted answer time fits ``target_s``.

    Parameters
    ----------
    target_s : float
        Latency target of an admitted item (s), from admission to answer.
    batch_capacity : float
        Most cost in one batch (``max_batch_cost``, or ``max_batch_size`` when items cost 1).
    clock : callable
        Monotonic seconds (a fake one in tests).
    """

    def __init__(self, target_s: float, batch_capacity: float, *,
                 clock: Callable[[], float] = time.monotonic, model: BatchTimeModel | None = None) -> None:
        if target_s <= 0 or batch_capacity <= 0:
            raise ValueError("target_s and batch_capacity must be > 0")
        self.target_s = target_s
        self.batch_capacity = batch_capacity
        self.clock = clock
        self.model = model or BatchTimeModel()
        self._running_since: float | None = None
        self._running_cost = 0.0
        self._arrivals = DecayingRate(clock)

    def batch_started(self, cost: float) -> None:
        """The worker started a batch of total ``cost``."""
        self._running_since, self._running_cost = self.clock(), cost

    def batch_finished(self, cost: float, seconds: float) -> None:
        """The worker finished a batch of total ``cost`` in ``seconds`` of run time."""
        self.model.observe(cost, seconds)
        self._running_since = None

    def expected_answer_s(self, queued_cost: float, item_cost: float) -> float:
        """Seconds from now until an item of ``item_cost``, queued behind ``queued_cost``, is answered.

        The item's own batch is priced with what will have joined it by the time it starts, at
        the admitted arrival rate (under load: a full batch), not only with what is ahead of it.
        """
        ahead = queued_cost + item_cost
        full_batches = max(1, math.ceil(ahead / self.batch_capacity))
        starts_in = self._running_left_s() + (full_batches - 1) * self.model.seconds(self.batch_capacity)
        joined = self._arrivals.per_second() * starts_in
        last_batch = min(self.batch_capacity, ahead - (full_batches - 1) * self.batch_capacity + joined)
        return starts_in + self.model.seconds(last_batch)

    def decide(self, queued_cost: float, item_cost: float = 1.0, *, record: bool = True) -> Decision:
        """Admit or refuse one item (``record=False``: only ask, the admitted rate is left as it is).

        Before any batch was measured everything is admitted, and so is an item that finds the model
        idle (nothing queued or running): refusing it would help no one, and a fit made stale by
        one slow batch would otherwise refuse everything for ever, since only admitted work refits it.
        """
        if self.model.samples == 0 or (queued_cost <= 0 and self._running_since is None):
            expected = 0.0
        else:
            expected = self.expected_answer_s(queued_cost, item_cost)
        if expected <= self.target_s:
            if record:
                self._arrivals.add(item_cost)
            return Decision(True, expected)
        return Decision(False, expected, retry_after_s=expected - self.target_s)

    def _running_left_s(self) -> float:
        if self._running_since is None:
            return 0.0
        return max(0.0, self.model.seconds(self._running_cost) - (self.clock() - self._running_since))
