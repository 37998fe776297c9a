"""Admission by measured capacity, on a fake clock: the fit, the decision, and goodput past saturation."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
from runtime_fakes import GatedModel, make_spec, wait_entered, wait_until

from model_runtime import DynamicBatcher, ModelRuntime
from model_runtime.admission import (
    SATURATED_FOR_S,
    SATURATED_IN_FLIGHT_BATCHES,
    BatchTimeModel,
    CapacityAdmission,
)
from model_runtime.errors import RuntimeOverloaded

FIXED_S, PER_ITEM_S, CAPACITY, TARGET_S = 0.002, 0.0005, 64, 0.1
STEP_SLACK_S = 0.001
"""The simulation starts a batch at the first arrival after the worker frees up (< 0.3 ms late)."""


def batch_seconds(cost: float) -> float:
    return FIXED_S + PER_ITEM_S * cost


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fitted(clock: FakeClock) -> CapacityAdmission:
    admission = CapacityAdmission(TARGET_S, CAPACITY, clock=clock)
    for cost in (1, 8, 64, 3, 40, 64, 17):
        admission.batch_finished(cost, batch_seconds(cost))
    return admission


def test_the_batch_time_fit_separates_fixed_and_per_item_time() -> None:
    model = BatchTimeModel()
    for cost in (1, 2, 4, 8, 16, 32, 64, 64, 7):
        model.observe(cost, batch_seconds(cost))
    fixed, per_item = model.coefficients()
    assert fixed == pytest.approx(FIXED_S, rel=1e-6) and per_item == pytest.approx(PER_ITEM_S, rel=1e-6)
    same_size = BatchTimeModel()
    for _ in range(5):
        same_size.observe(16, 0.01)
    assert same_size.seconds(16) == pytest.approx(0.01)  # no spread: all of it per item


def test_admission_counts_the_running_batch_and_full_batches_ahead() -> None:
    clock = FakeClock()
    admission = fitted(clock)
    # record=False: only asking, so no refusal makes the model count as saturated (tested below)
    assert admission.decide(queued_cost=500, record=False).admitted is False  # 7 full batches ahead
    admission.batch_started(CAPACITY)  # 0.034 s of work, started at t=0
    clock.now = 0.010
    assert admission.decide(queued_cost=0).expected_s == pytest.approx(0.024 + batch_seconds(1), abs=1e-4)
    refused = admission.decide(queued_cost=150, record=False)  # the running batch, two full ones, then 23
    assert not refused.admitted
    expected = 0.024 + 2 * batch_seconds(CAPACITY) + batch_seconds(23)
    assert refused.expected_s == pytest.approx(expected, abs=1e-3)
    assert refused.retry_after_s == pytest.approx(refused.expected_s - TARGET_S)
    clock.now = 0.020  # 10 ms later the same queue fits
    assert admission.decide(queued_cost=150).admitted


def test_the_items_own_batch_is_priced_with_what_joins_it_under_load() -> None:
    clock = FakeClock()
    admission = fitted(clock)
    admission.batch_started(CAPACITY)
    quiet = admission.expected_answer_s(queued_cost=0, item_cost=1)
    for _ in range(6000):  # 2,000 admitted items/s for 3 s
        clock.now += 0.0005
        admission.decide(queued_cost=0)
    admission.batch_started(CAPACITY)
    busy = admission.expected_answer_s(queued_cost=0, item_cost=1)
    assert quiet == pytest.approx(batch_seconds(CAPACITY) + batch_seconds(1), abs=1e-4)
    assert busy == pytest.approx(2 * batch_seconds(CAPACITY), abs=1e-4)  # its batch will be full


def test_before_any_measurement_everything_is_admitted() -> None:
    assert CapacityAdmission(TARGET_S, CAPACITY, clock=FakeClock()).decide(queued_cost=10_000).admitted


def simulate(arrivals_per_s: float, seconds: float = 5.0, warm_up_s: float = 1.0) -> tuple[float, float]:
    """A greedy batcher fed at a steady rate on the fake clock: ``(admitted answers per s, admitted
    p99 s)`` after ``warm_up_s`` (the admitted arrival rate is learnt over about half a second)."""
    clock = FakeClock()
    admission = fitted(clock)
    queue: list[float] = []  # arrival times of admitted items waiting
    latencies: list[float] = []
    busy_until, running = 0.0, list[float]()
    step = 1.0 / arrivals_per_s
    while clock.now < seconds:
        if running and clock.now >= busy_until:
            latencies += [busy_until - arrived for arrived in running if arrived >= warm_up_s]
            admission.batch_finished(len(running), batch_seconds(len(running)))
            running = []
        if not running and queue:
            running, queue = queue[:CAPACITY], queue[CAPACITY:]
            admission.batch_started(len(running))
            busy_until = clock.now + batch_seconds(len(running))
        if admission.decide(queued_cost=len(queue)).admitted:
            queue.append(clock.now)
        clock.now += step
    latencies.sort()
    return len(latencies) / (seconds - warm_up_s), latencies[int(0.99 * (len(latencies) - 1))]


def test_past_saturation_admitted_goodput_stays_at_peak_with_bounded_latency() -> None:
    peak = CAPACITY / batch_seconds(CAPACITY)  # ~1,880 items/s in full batches
    at_saturation, p99_at_saturation = simulate(arrivals_per_s=peak)
    for overload in (2.0, 4.0, 8.0):
        goodput, p99 = simulate(arrivals_per_s=overload * peak)
        assert goodput >= 0.9 * peak, overload
        assert p99 <= max(p99_at_saturation, TARGET_S) + STEP_SLACK_S, overload
    assert at_saturation >= 0.9 * peak


def test_the_batcher_refuses_what_it_cannot_answer_within_the_target(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> RuntimeOverloaded:
        await runtime.load(make_spec(model, name="targeted", max_batch_size=2, max_queue=100,
                                     latency_target_ms=50, warmup_items=[1, 2]))
        admission = runtime._models["targeted"].batcher._admission  # type: ignore[union-attr]
        assert admission is not None
        for size in (1, 2) * 10:  # as measured: 20 ms a batch, whatever its size
            admission.batch_finished(size, 0.020)
        started = time.monotonic()
        admission.clock = lambda: started  # the running batch stays "just started": no race with a loaded machine
        model.hold()
        try:
            running = asyncio.create_task(runtime.predict("targeted", 0))
            await wait_entered(model)
            queued = [asyncio.create_task(runtime.predict("targeted", x)) for x in (1, 2)]  # answered in 40 ms
            await wait_until(lambda: runtime.stats()["targeted"]["queue_depth"] == 2)
            with pytest.raises(RuntimeOverloaded) as refused:  # a third batch: 60 ms, past the 50 ms target
                await runtime.predict("targeted", 3)
        finally:
            model.release()
        assert await asyncio.gather(running, *queued) == [0, 2, 4]
        return refused.value

    refused = asyncio.run(scenario())
    assert "target" in str(refused) and refused.retry_after_s > 0


def test_an_idle_model_admits_even_when_one_slow_batch_poisoned_the_fit() -> None:
    clock = FakeClock()
    admission = fitted(clock)
    for _ in range(60):  # the model stalled for a while (a paused VM): the fit now says seconds a batch
        admission.batch_started(CAPACITY)
        admission.batch_finished(CAPACITY, 30.0)
    assert not admission.decide(queued_cost=CAPACITY).admitted  # with work queued, the fit is believed
    assert admission.decide(queued_cost=0).admitted  # idle: only admitted work can correct the fit


async def load_small_batches(runtime: ModelRuntime, model: GatedModel, name: str) -> DynamicBatcher:
    """``model`` loaded as ``name`` (batches of 2, a 50 ms target); its batcher."""
    await runtime.load(make_spec(model, name=name, max_batch_size=2, max_queue=100, latency_target_ms=50,
                                 warmup_items=[1, 2]))
    batcher = runtime._models[name].batcher
    assert batcher is not None
    return batcher


def test_items_still_being_prepared_count_as_admitted_work(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> tuple[object, object]:
        batcher = await load_small_batches(runtime, model, "preparing")
        assert batcher._admission is not None
        for size in (1, 2) * 10:  # 20 ms a batch
            batcher._admission.batch_finished(size, 0.020)
        started = time.monotonic()
        batcher._admission.clock = lambda: started
        model.hold()
        try:
            running = asyncio.create_task(runtime.predict("preparing", 0))
            await wait_entered(model)
            tickets = [batcher.admit(), batcher.admit()]  # two admitted items on their way (a prepare pool): 40 ms
            while_preparing = runtime.refusal("preparing")  # a third batch: 60 ms, past the target
            for ticket in tickets:
                ticket.release()
            after = runtime.refusal("preparing")
        finally:
            model.release()
        await running
        return while_preparing, after

    while_preparing, after = asyncio.run(scenario())
    assert isinstance(while_preparing, RuntimeOverloaded) and after is None


def test_an_admission_ticket_counts_until_queued_and_is_not_checked_again(runtime: ModelRuntime) -> None:
    """The gate's admission is the item's admission: it counts as waiting work while the request is
    on its way, and the handler's predict neither asks again nor counts a second arrival."""
    model = GatedModel()

    async def scenario() -> tuple[float, float, float, object, float]:
        batcher = await load_small_batches(runtime, model, "ticketed")
        before = batcher._waiting_cost()
        ticket = runtime.admit_request("ticketed")
        assert not isinstance(ticket, BaseException)
        on_its_way = batcher._waiting_cost()
        refusals: list[object] = []
        batcher.refusal = lambda **_: refusals.append("asked again")  # type: ignore[method-assign,assignment,func-returns-value]
        answer = await runtime.predict("ticketed", 3)  # same task: the request's ticket is used
        ticket.release()  # the gate's release at the request's end: already released when queued
        return before, on_its_way, batcher._waiting_cost(), refusals, answer

    before, on_its_way, after, refusals, answer = asyncio.run(scenario())
    assert on_its_way == before + 1 and after == before and refusals == [] and answer is not None


def test_a_ticket_whose_request_never_reached_the_model_is_given_back(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> tuple[float, float]:
        batcher = await load_small_batches(runtime, model, "abandoned")
        ticket = runtime.admit_request("abandoned")
        assert not isinstance(ticket, BaseException)
        held = batcher._waiting_cost()
        ticket.release()
        ticket.release()  # idempotent
        return held, batcher._waiting_cost()

    held, released = asyncio.run(scenario())
    assert held == 1 and released == 0


def test_saturated_the_work_in_flight_is_two_full_batches_however_generous_the_target() -> None:
    """Before, past saturation the queue grew until the target was met: each batch queued beyond the
    next added a batch time to every answer (admitted p99 above the peak load's) and no throughput."""
    clock = FakeClock()
    admission = fitted(clock)  # a full batch: 0.034 s; two fit in the 0.1 s target
    admission.batch_started(CAPACITY)
    clock.now = 0.030  # the running batch ends in 4 ms: a second full batch would still answer in time
    assert not admission.saturated()
    assert admission.decide(queued_cost=CAPACITY, record=False).admitted  # not saturated: by the target
    assert not admission.decide(queued_cost=3 * CAPACITY).admitted  # past the target: refused, and now
    assert admission.saturated()
    in_flight = int(SATURATED_IN_FLIGHT_BATCHES * CAPACITY)  # the batch running and the next one
    assert admission.decide(queued_cost=in_flight - CAPACITY - 1, record=False).admitted
    assert not admission.decide(queued_cost=in_flight - CAPACITY, record=False).admitted  # more only waits
    clock.now += SATURATED_FOR_S  # a second without a refusal: by the target again
    assert not admission.saturated() and admission.decide(queued_cost=CAPACITY, record=False).admitted


def test_a_refusal_answered_to_a_gate_is_freed_at_once_not_left_to_the_garbage_collector(
        runtime: ModelRuntime) -> None:
    """Before, the refusal kept its traceback, whose frames reached (through ``f_back``) the gate's own
    frame that held the refusal: a reference cycle per refused request, collected only by the garbage
    collector (in the reference bench under overload: one 30-60 ms collection every few seconds)."""
    model = GatedModel()

    async def gate_holding_its_answer(batcher: DynamicBatcher) -> weakref.ref[RuntimeOverloaded]:
        batcher.refusal = lambda **_: RuntimeOverloaded("full", retry_after_s=1.0)  # type: ignore[method-assign]
        answer = runtime.admit_request("refusing")
        assert isinstance(answer, RuntimeOverloaded)
        return weakref.ref(answer)

    async def scenario() -> weakref.ref[RuntimeOverloaded]:
        batcher = await load_small_batches(runtime, model, "refusing")
        return await gate_holding_its_answer(batcher)

    gc.disable()
    try:
        refusal = asyncio.run(scenario())
        assert refusal() is None  # freed by reference counting alone
    finally:
        gc.enable()
