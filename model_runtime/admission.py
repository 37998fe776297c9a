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

When two full batches take longer than the target (a slow host, a big batch), an item's answer
time depends on the batch it joins, which admission itself decides; pricing that batch full and
refusing by the running batch's phase then refused the callers that return just as a batch starts
and let the model run out of work. Instead admission bounds the work waiting behind the running
batch to a *waiting limit* derived from the fit: the largest batch that, run twice (the one
running, then its own), ends within the target — but never below the smallest batch whose
throughput is within ``efficiency`` of a full batch's (for a model with a small fixed cost per
batch, smaller batches lose little throughput and cut latency; below that the model would run
under capacity). Past saturation the model then runs batches of that limit back to back:
throughput at its peak and admitted latency about two such batches, whatever the running batch's phase.

When two full batches fit in the target, admission by predicted answer time lets the queue grow
until the target is met: below saturation that absorbs bursts, but past it each queued batch beyond
the next one adds a batch time to every answer and no throughput — the model already runs full
batches back to back. Once admission has refused anything within the last
:data:`SATURATED_FOR_S` (the model is saturated), the work in flight — the batch running and the
work waiting — is therefore also bounded to two full batches (:data:`SATURATED_IN_FLIGHT_BATCHES`):
past saturation the model holds what a closed loop of two batches' callers holds at the peak, with
its latency, and the rest is refused at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.rates import DecayingRate

SATURATED_IN_FLIGHT_BATCHES = 2.0
"""Saturated, the most work in flight: the batch running and the next one, full."""
SATURATED_FOR_S = 1.0
"""How long after a refusal the model counts as saturated."""


@dataclass
class BatchTimeModel:
    """Online least squares of batch seconds against batch cost, forgetting old batches.

    A batch slower than ``outlier_ratio`` times the fit's prediction (a preempted thread, a GC
    pause, a paused VM) counts as that bound, not as measured: one stall would otherwise move the
    fit for the next ~20 batches and refuse work the model could take. A lasting slowdown still
    gets through, by up to ``outlier_ratio`` a batch (a 2x slower model is learnt in a dozen batches).

    Attributes
    ----------
    forget : float
        Weight kept by the past at each new batch (0.95: about the last 20 batches count).
    outlier_ratio : float
        Most a batch may count, relative to the prediction, once ``trusted_after`` batches were seen.
    trusted_after : float
        Weight of batches after which the fit bounds new ones.
    """

    forget: float = 0.95
    outlier_ratio: float = 2.0
    trusted_after: float = 5.0
    _sums: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)
    """Weighted sums (weight, cost, seconds, cost², cost x seconds), replaced whole: the worker thread
    records batches while the event loop reads the fit, and a reader sees one batch's state or the next."""

    def observe(self, cost: float, seconds: float) -> None:
        """Record one batch: its total cost and its run time (s), bounded by ``outlier_ratio`` x the prediction."""
        w, x, y, xx, xy = self._sums
        if w >= self.trusted_after:
            predicted = self.seconds(cost)
            if predicted > 0:
                seconds = min(seconds, self.outlier_ratio * predicted)
        keep = self.forget
        self._sums = (keep * w + 1.0, keep * x + cost, keep * y + seconds, keep * xx + cost * cost,
                      keep * xy + cost * seconds)

    @property
    def samples(self) -> float:
        """Weight of the batches seen (0 before the first)."""
        return self._sums[0]

    def coefficients(self) -> tuple[float, float]:
        """``(fixed seconds per batch, seconds per unit of cost)``, both >= 0.

        With too little spread in batch cost to separate the two, all time is per cost.
        """
        w, x, y, xx, xy = self._sums
        if w == 0:
            return 0.0, 0.0
        mean_x, mean_y = x / w, y / w
        variance = xx / w - mean_x * mean_x
        if variance <= 1e-9 * max(1.0, mean_x * mean_x):
            return 0.0, (mean_y / mean_x if mean_x > 0 else 0.0)
        slope = (xy / w - mean_x * mean_y) / variance
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
    efficiency : float
        Least share of a full batch's throughput the waiting limit keeps (module docstring).
    """

    def __init__(self, target_s: float, batch_capacity: float, *,
                 clock: Callable[[], float] = time.monotonic, model: BatchTimeModel | None = None,
                 efficiency: float = 0.95) -> None:
        if target_s <= 0 or batch_capacity <= 0 or not 0 < efficiency <= 1:
            raise ValueError("target_s and batch_capacity must be > 0, efficiency in (0, 1]")
        self.target_s = target_s
        self.batch_capacity = batch_capacity
        self.efficiency = efficiency
        self._refused_at = -math.inf  # when admission last refused an item
        self.clock = clock
        self.model = model or BatchTimeModel()
        self._running: tuple[float, float] | None = None  # (started at, cost) of the batch running
        self._arrivals = DecayingRate(clock)

    def batch_started(self, cost: float) -> None:
        """The worker started a batch of total ``cost``."""
        self._running = (self.clock(), cost)

    def batch_finished(self, cost: float, seconds: float) -> None:
        """The worker finished a batch of total ``cost`` in ``seconds`` of run time."""
        self.model.observe(cost, seconds)
        self._running = None

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

    def waiting_limit(self) -> float | None:
        """Most cost that may wait behind the running batch, when two full batches exceed the target.

        ``None`` when they fit in it (then items are admitted by their predicted answer time, which
        may span several batches). Otherwise the largest cost ``w`` with ``2 x seconds(w) <= target``,
        raised to the smallest batch whose throughput is ``efficiency`` x a full batch's, at most
        ``batch_capacity``.
        """
        capacity = self.batch_capacity
        if 2 * self.model.seconds(capacity) <= self.target_s:
            return None
        fixed, per_cost = self.coefficients()
        if per_cost <= 0:  # all time is fixed per batch: only full batches keep the throughput
            return capacity
        within_target = (self.target_s / 2 - fixed) / per_cost
        full_rate = capacity / (fixed + per_cost * capacity)  # cost per second in full batches
        spare = 1 - self.efficiency * full_rate * per_cost  # > 0 unless efficiency is 1 and nothing is fixed
        efficient = self.efficiency * full_rate * fixed / spare if spare > 0 else capacity
        return min(capacity, max(within_target, efficient, 1e-9))

    def admitted_rate(self) -> float:
        """Cost a second admitted lately (moving, ~0.5 s)."""
        return self._arrivals.per_second()

    def saturated(self) -> bool:
        """Whether admission refused an item within the last :data:`SATURATED_FOR_S`."""
        return self.clock() - self._refused_at < SATURATED_FOR_S

    def coefficients(self) -> tuple[float, float]:
        """The fit's ``(fixed seconds per batch, seconds per unit of cost)``."""
        return self.model.coefficients()

    def decide(self, queued_cost: float, item_cost: float = 1.0, *, record: bool = True) -> Decision:
        """Admit or refuse one item (``record=False``: only ask, the admitted rate is left as it is).

        Before any batch was measured everything is admitted, and so is an item that finds the model
        idle (nothing queued or running): refusing it would help no one, and a fit made stale by
        one slow batch would otherwise refuse everything for ever, since only admitted work refits it.
        When two full batches exceed the target, an item is admitted while the work waiting, with
        it, stays within :meth:`waiting_limit`; otherwise by its predicted answer time, and while
        :meth:`saturated`, also only while the work in flight stays within :data:`SATURATED_IN_FLIGHT_BATCHES`.
        """
        if self.model.samples == 0 or (queued_cost <= 0 and self._running is None):
            admitted, expected, retry_after_s = True, 0.0, 0.0
        else:
            expected = self.expected_answer_s(queued_cost, item_cost)
            limit = self.waiting_limit()
            if limit is None:
                admitted, retry_after_s = expected <= self.target_s, expected - self.target_s
                if admitted and self.saturated():
                    running = self._running  # read once: the worker thread replaces it
                    in_flight = queued_cost + item_cost + (running[1] if running is not None else 0.0)
                    excess = in_flight - SATURATED_IN_FLIGHT_BATCHES * self.batch_capacity
                    admitted, retry_after_s = excess <= 1e-9, self._running_left_s()
            else:
                excess = queued_cost + item_cost - limit
                admitted = excess <= 1e-9 or queued_cost <= 0  # an item alone behind the running batch: always
                retry_after_s = self._running_left_s() + self.model.seconds(max(excess, 0.0))
        if admitted:
            if record:
                self._arrivals.add(item_cost)
            return Decision(True, expected)
        if record:
            self._refused_at = self.clock()
        return Decision(False, expected, retry_after_s=max(retry_after_s, 1e-3))

    def _running_left_s(self) -> float:
        running = self._running  # read once: the worker thread replaces it
        if running is None:
            return 0.0
        started, cost = running
        return max(0.0, self.model.seconds(cost) - (self.clock() - started))
