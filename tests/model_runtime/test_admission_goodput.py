"""Goodput under overload, on a fake clock: a capacity estimate robust to a slow batch, and closed-loop
clients (each retries when answered or refused) past saturation."""

from __future__ import annotations

import heapq

import pytest

from model_runtime.admission import BatchTimeModel, CapacityAdmission

FIXED_S, PER_ITEM_S, CAPACITY = 0.002, 0.0005, 64


def batch_seconds(cost: float) -> float:
    return FIXED_S + PER_ITEM_S * cost


def trained() -> BatchTimeModel:
    model = BatchTimeModel()
    for cost in (1, 8, 64, 3, 40, 64, 17, 64, 64, 32) * 4:
        model.observe(cost, batch_seconds(cost))
    return model


def test_one_stalled_batch_barely_moves_the_capacity_estimate() -> None:
    model = trained()
    model.observe(CAPACITY, 30.0)  # a paused VM, a preempted thread: one batch took 30 s
    assert model.seconds(CAPACITY) <= 1.15 * batch_seconds(CAPACITY)  # unbounded: ~1.7 s
    for _ in range(20):  # and is forgotten as the next batches come
        model.observe(CAPACITY, batch_seconds(CAPACITY))
    assert model.seconds(CAPACITY) == pytest.approx(batch_seconds(CAPACITY), rel=0.06)


def test_a_lasting_slowdown_is_still_learnt() -> None:
    model = trained()
    for _ in range(40):  # the model now runs 3x slower (a GPU shared with another model)
        model.observe(CAPACITY, 3 * batch_seconds(CAPACITY))
    assert model.seconds(CAPACITY) == pytest.approx(3 * batch_seconds(CAPACITY), rel=0.1)


def test_the_first_batches_are_taken_as_measured() -> None:
    model = BatchTimeModel()
    model.observe(CAPACITY, 1.0)  # nothing to bound it by yet (warm-up on a cold cache is slow)
    assert model.seconds(CAPACITY) == pytest.approx(1.0)


TARGET_S = 0.05
SLOW_PER_ITEM_S = 0.0005
"""A slow host: a full batch of 64 takes 34 ms, two of them (68 ms) more than the 50 ms target."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fitted(clock: FakeClock, fixed_s: float = FIXED_S, per_item_s: float = SLOW_PER_ITEM_S) -> CapacityAdmission:
    admission = CapacityAdmission(TARGET_S, CAPACITY, clock=clock)
    for cost in (1, 8, 64, 3, 40, 64, 17):
        admission.batch_finished(cost, fixed_s + per_item_s * cost)
    return admission


def test_when_two_full_batches_exceed_the_target_the_waiting_work_is_bounded_whatever_the_phase() -> None:
    clock = FakeClock()
    admission = fitted(clock)
    limit = admission.waiting_limit()
    assert limit == pytest.approx((TARGET_S / 2 - FIXED_S) / SLOW_PER_ITEM_S, rel=1e-3)  # 46 items: 2 x 25 ms
    admission.batch_started(CAPACITY)
    for elapsed in (0.0, 0.020, 0.033):  # a batch just started, half way, about to end: the same answer
        clock.now = elapsed
        assert admission.decide(queued_cost=45).admitted
        refused = admission.decide(queued_cost=46)
        assert not refused.admitted and refused.retry_after_s > 0


def test_the_waiting_limit_keeps_batches_big_enough_for_the_throughput() -> None:
    clock = FakeClock()
    admission = fitted(clock, fixed_s=0.010)  # 10 ms a batch whatever its size: small batches cost throughput
    limit = admission.waiting_limit()
    assert limit is not None and limit > (TARGET_S / 2 - 0.010) / SLOW_PER_ITEM_S  # raised above the target's 30
    rate = lambda batch: batch / (0.010 + SLOW_PER_ITEM_S * batch)  # noqa: E731
    assert rate(limit) == pytest.approx(0.95 * rate(CAPACITY), rel=1e-3)


def test_with_room_for_two_full_batches_admission_is_by_predicted_answer_time() -> None:
    assert fitted(FakeClock(), per_item_s=0.0002).waiting_limit() is None  # 2 x 14.8 ms <= 50 ms


def closed_loop(clients: int, *, per_item_s: float = SLOW_PER_ITEM_S, hold_s: float = 0.2,
                seconds: float = 6.0, warm_up_s: float = 1.0) -> tuple[float, float]:
    """``clients`` closed-loop callers of a greedy batcher, on the fake clock: each sends again 1 ms
    after its answer, or ``hold_s`` after a refusal (the gate's hold). Returns (admitted answers per
    s, admitted p99 s) after ``warm_up_s``."""
    clock = FakeClock()
    admission = fitted(clock, per_item_s=per_item_s)
    events = [(index * 1e-5, 0, index) for index in range(clients)]  # (time, 0 arrival / 1 batch end, client)
    heapq.heapify(events)
    queue: list[tuple[int, float]] = []  # (client, arrived)
    running: list[tuple[int, float]] = []
    latencies: list[float] = []

    def start() -> None:
        nonlocal running, queue
        running, queue = queue[:CAPACITY], queue[CAPACITY:]
        admission.batch_started(len(running))
        heapq.heappush(events, (clock.now + FIXED_S + per_item_s * len(running), 1, -1))

    while events:
        clock.now, kind, client = heapq.heappop(events)
        if clock.now > seconds:
            break
        if kind == 1:
            admission.batch_finished(len(running), FIXED_S + per_item_s * len(running))
            for answered, arrived in running:
                if arrived >= warm_up_s:
                    latencies.append(clock.now - arrived)
                heapq.heappush(events, (clock.now + 0.001, 0, answered))
            running = []
            if queue:
                start()
        elif admission.decide(queued_cost=len(queue)).admitted:
            queue.append((client, clock.now))
            if not running:
                start()
        else:
            heapq.heappush(events, (clock.now + hold_s, 0, client))
    latencies.sort()
    return len(latencies) / (seconds - warm_up_s), latencies[int(0.99 * (len(latencies) - 1))]


@pytest.mark.parametrize("per_item_s", [0.0003, SLOW_PER_ITEM_S, 0.0007])
def test_closed_loop_callers_past_saturation_keep_the_peak_and_its_latency(per_item_s: float) -> None:
    capacity_per_s = CAPACITY / (FIXED_S + per_item_s * CAPACITY)
    peak, p99_at_peak = closed_loop(2 * CAPACITY, per_item_s=per_item_s)  # the bench's c=128
    assert peak >= 0.95 * capacity_per_s
    for clients in (4 * CAPACITY, 8 * CAPACITY):  # c=256, c=512
        goodput, p99 = closed_loop(clients, per_item_s=per_item_s)
        assert goodput >= 0.95 * capacity_per_s, clients
        assert p99 <= max(p99_at_peak, TARGET_S) + 0.001, clients
