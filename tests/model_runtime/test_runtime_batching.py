"""Dynamic batching behaviour a caller notices: right answers, no idle wait, failures that stay local."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from prometheus_client import REGISTRY
from runtime_fakes import GatedModel, make_spec, wait_entered, wait_until

from model_runtime import BatchOutputMismatch, ModelRuntime
from model_runtime.errors import BadInput, RuntimeOverloaded, RuntimeTimeout, problem_for

WAIT_S = 10.0
"""Generous: how long a test waits for an answer it knows will come (a hang fails instead of blocking)."""


def _sample(metric: str, model: str) -> float:
    return REGISTRY.get_sample_value(metric, {"model": model}) or 0.0


def test_concurrent_callers_are_batched_and_get_their_own_answers(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> None:
        await runtime.load(make_spec(model, max_batch_size=16))
        model.hold()
        first = asyncio.create_task(runtime.predict("double", 1000))
        await wait_entered(model)
        others = [asyncio.create_task(runtime.predict("double", x)) for x in range(64)]
        await wait_until(lambda: runtime.stats()["double"]["queue_depth"] == 64)
        model.release()
        assert await first == 2000
        assert await asyncio.gather(*others) == [2 * x for x in range(64)]

    asyncio.run(scenario())
    served = model.batches[1:]  # after the batch of 1 that held the gate
    assert [len(batch) for batch in served] == [16, 16, 16, 16]
    assert sorted(x for batch in served for x in batch) == list(range(64))


def test_single_caller_does_not_wait_for_a_batch_to_fill(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> int:
        await runtime.load(make_spec(model, max_batch_size=64, max_wait_ms=600_000))
        # answered long before the 10-minute window could end: it only applies to the "window" policy
        return await asyncio.wait_for(runtime.predict("double", 3), WAIT_S)

    assert asyncio.run(scenario()) == 6


def test_window_policy_runs_a_partial_batch_when_the_wait_ends(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> float:
        await runtime.load(make_spec(model, max_batch_size=8, max_wait_ms=50, fill="window"))
        started = time.perf_counter()
        assert await asyncio.gather(*(runtime.predict("double", x) for x in range(3))) == [0, 2, 4]
        return time.perf_counter() - started

    elapsed = asyncio.run(scenario())
    assert model.batches == [[0, 1, 2]]
    assert elapsed >= 0.045  # the window was waited out (a lower bound: a slow machine cannot break it)


def test_poison_item_fails_alone_when_isolation_is_on(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> list[object]:
        await runtime.load(make_spec(model, max_batch_size=8))
        model.hold()
        blocker = asyncio.create_task(runtime.predict("double", 0))
        await wait_entered(model)
        batch = [asyncio.create_task(runtime.predict("double", x)) for x in (1, 2, -1, 3)]
        await wait_until(lambda: runtime.stats()["double"]["queue_depth"] == 4)
        model.release()
        await blocker
        return await asyncio.gather(*batch, return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[:2] == [2, 4] and results[3] == 6
    assert isinstance(results[2], ValueError)
    assert [1, 2, -1, 3] in model.batches  # the batch ran once together, then item by item


def test_without_isolation_an_error_fails_its_whole_batch_and_the_loop_goes_on(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> tuple[list[object], int]:
        await runtime.load(make_spec(model, max_batch_size=8, isolate_failures=False))
        model.hold()
        blocker = asyncio.create_task(runtime.predict("double", 0))
        await wait_entered(model)
        batch = [asyncio.create_task(runtime.predict("double", x)) for x in (1, -1, 3)]
        await wait_until(lambda: runtime.stats()["double"]["queue_depth"] == 3)
        model.release()
        await blocker
        failed = await asyncio.gather(*batch, return_exceptions=True)
        return failed, await runtime.predict("double", 5)

    failed, after = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) for r in failed)
    assert after == 10


def test_output_count_mismatch_fails_every_item_of_the_batch(runtime: ModelRuntime) -> None:
    model = GatedModel()
    short = dataclasses.replace(make_spec(model, name="short", max_batch_size=8),
                                run_batch=lambda m, items: m.run_batch(items)[:-1])

    async def scenario() -> list[object]:
        await runtime.load(short)
        return await asyncio.gather(*(runtime.predict("short", x) for x in (1, 2, 3)),
                                    return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, BatchOutputMismatch) for r in results)
    assert _sample("tessera_model_errors_total", "short") >= 3


def test_cancelled_caller_does_not_block_the_others(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> int:
        await runtime.load(make_spec(model, max_batch_size=8))
        model.hold()
        blocker = asyncio.create_task(runtime.predict("double", 0))
        await wait_entered(model)
        abandoned = asyncio.create_task(runtime.predict("double", 111))
        kept = asyncio.create_task(runtime.predict("double", 5))
        await wait_until(lambda: runtime.stats()["double"]["queue_depth"] == 2)
        abandoned.cancel()
        model.release()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        return await kept

    assert asyncio.run(scenario()) == 10
    assert 111 not in model.seen()


def test_full_queue_answers_overloaded_with_retry_after(runtime: ModelRuntime) -> None:
    model = GatedModel()
    rejected_before = _sample("tessera_model_rejected_total", "bounded")

    async def scenario() -> RuntimeOverloaded:
        await runtime.load(make_spec(model, name="bounded", max_batch_size=4, max_queue=2))
        model.hold()
        admitted = [asyncio.create_task(runtime.predict("bounded", 0))]
        await wait_entered(model)
        admitted += [asyncio.create_task(runtime.predict("bounded", x)) for x in (1, 2)]
        await wait_until(lambda: runtime.stats()["bounded"]["queue_depth"] == 2)
        with pytest.raises(RuntimeOverloaded) as refused:
            await runtime.predict("bounded", 3)
        model.release()
        assert await asyncio.gather(*admitted) == [0, 2, 4]
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.retry_after_s > 0
    problem = problem_for(refused)  # what the HTTP edge answers
    assert problem is not None and problem.status == 503 and int(problem.headers["Retry-After"]) >= 1
    assert _sample("tessera_model_rejected_total", "bounded") == rejected_before + 1
    assert 3 not in model.seen()


def test_item_past_its_deadline_is_answered_504_and_never_run(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> None:
        await runtime.load(make_spec(model, name="deadline", max_batch_size=4))
        model.hold()
        blocker = asyncio.create_task(runtime.predict("deadline", 0))
        await wait_entered(model)
        with pytest.raises(RuntimeTimeout):  # while the model is held: only the deadline can answer it
            await asyncio.wait_for(runtime.predict("deadline", 7, timeout_s=0.05), WAIT_S)
        model.release()
        assert await blocker == 0
        assert await runtime.predict("deadline", 8) == 16  # the queue moves on

    asyncio.run(scenario())
    assert 7 not in model.seen()
    assert _sample("tessera_model_deadline_exceeded_total", "deadline") >= 1


def test_prepare_failure_fails_alone_before_queueing(runtime: ModelRuntime) -> None:
    model = GatedModel()

    def prepare(item: object) -> float:
        if not isinstance(item, (int, float)):
            raise TypeError(f"expected a number, got {type(item).__name__}")
        return float(item)

    async def scenario() -> list[object]:
        await runtime.load(make_spec(model, prepare=prepare))
        return await asyncio.gather(*(runtime.predict("double", x) for x in (1, "bad", 2)),
                                    return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[0] == 2.0 and results[2] == 4.0
    assert isinstance(results[1], BadInput)
    assert "bad" not in model.seen()


def test_queue_delay_bound_refuses_work_that_would_wait_too_long(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> RuntimeOverloaded:
        await runtime.load(make_spec(model, name="slow", max_batch_size=1, max_queue=100,
                                     max_queue_delay_ms=50))
        runtime._models["slow"].batcher._recent.batch_s = 0.02  # type: ignore[union-attr]
        model.hold()
        running = asyncio.create_task(runtime.predict("slow", 0))
        await wait_entered(model)
        queued = [asyncio.create_task(runtime.predict("slow", x)) for x in (1, 2)]  # admitted: <= 40 ms
        await wait_until(lambda: runtime.stats()["slow"]["queue_depth"] == 2)
        with pytest.raises(RuntimeOverloaded) as refused:  # running + 2 queued batches = 60 ms > 50 ms
            await runtime.predict("slow", 3)
        model.release()
        assert await asyncio.gather(running, *queued) == [0, 2, 4]
        return refused.value

    assert "expected wait" in str(asyncio.run(scenario()))


def test_a_full_batch_waits_in_the_worker_so_a_busy_loop_does_not_idle_the_model(runtime: ModelRuntime) -> None:
    model = GatedModel()

    async def scenario() -> list[object]:
        await runtime.load(make_spec(model, name="handover", max_batch_size=4))
        model.hold()
        running = asyncio.create_task(runtime.predict("handover", 0))
        await wait_entered(model)
        full = [asyncio.create_task(runtime.predict("handover", x)) for x in (1, 2, 3, 4)]
        more = [asyncio.create_task(runtime.predict("handover", x)) for x in (5, 6, 7)]
        await wait_until(lambda: runtime.stats()["handover"]["queue_depth"] == 7)
        full[2].cancel()  # its caller leaves while it waits: the worker skips it
        await asyncio.sleep(0)
        model.release()
        time.sleep(0.3)  # the loop is busy: the worker takes the next batches from the queue by itself
        assert model.batches[-2:] == [[1, 2, 4, 5], [6, 7]]
        return await asyncio.gather(running, full[0], full[1], full[3], *more)

    assert asyncio.run(scenario()) == [0, 2, 4, 8, 10, 12, 14]
    assert 3 not in model.seen()
