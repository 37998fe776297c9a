"""``inline_below_ms``: batches predicted short run on the event loop, longer ones in the worker thread."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from model_runtime import ModelRuntime, ModelSpec
from model_runtime.batcher import BatchPolicy, DynamicBatcher
from model_runtime.metrics import ModelMetrics

ITEM_S = 0.002
"""The fake model's time per item: a batch of 1 takes 2 ms, a batch of 8 16 ms."""


class TimedModel:
    """Doubles numbers, sleeping ``ITEM_S`` per item; records each batch's size and the thread that ran it."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (size, thread ident)

    def run_batch(self, items: list[Any]) -> list[Any]:
        self.batches.append((len(items), threading.get_ident()))
        time.sleep(ITEM_S * len(items))
        if any(item < 0 for item in items):
            raise ValueError("negative item")
        return [2 * item for item in items]


def timed_spec(model: TimedModel, **options: Any) -> ModelSpec:
    """A spec serving ``model`` with ``inline_below_ms=8``: once learnt, a batch of 1 or 2 runs on the loop
    (2-4 ms, margin for a slow sleep), a batch of 8 (16 ms at least) in the worker."""
    return ModelSpec(name="timed", version="v1", loader=lambda _ctx: model,
                     run_batch=lambda m, items: m.run_batch(items), max_batch_size=16, inline_below_ms=8.0,
                     uses_torch=False, **options)


def test_short_batches_run_on_the_loop_once_their_time_is_learnt_and_long_ones_in_the_worker(
        runtime: ModelRuntime) -> None:
    model = TimedModel()

    async def scenario() -> int:
        await runtime.load(timed_spec(model))
        for item in range(4):  # one caller: batches of 1, predicted ~2 ms once the first is timed
            assert await runtime.predict("timed", item) == 2 * item
        answers = await asyncio.gather(*(runtime.predict("timed", item) for item in range(8)))  # one batch of 8
        assert answers == [2 * item for item in range(8)]
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    sizes = [size for size, _ in model.batches]
    threads = [thread for _, thread in model.batches]
    assert sizes == [1, 1, 1, 1, 8]
    assert threads[0] != loop_thread  # nothing learnt yet: the worker
    assert threads[1:4] == [loop_thread] * 3  # ~2 ms predicted, under 8
    assert threads[4] != loop_thread  # ~16 ms predicted


def test_a_poison_item_in_an_inline_batch_fails_alone(runtime: ModelRuntime) -> None:
    model = TimedModel()

    async def scenario() -> tuple[list[object], int]:
        await runtime.load(timed_spec(model))
        await runtime.predict("timed", 1)  # learn the batch time
        await runtime.predict("timed", 1)
        answers = await asyncio.gather(runtime.predict("timed", 3), runtime.predict("timed", -1),
                                       return_exceptions=True)
        return list(answers), threading.get_ident()

    answers, loop_thread = asyncio.run(scenario())
    assert model.batches[2] == (2, loop_thread)  # the batch of 2 ran on the loop, then each item alone
    assert answers[0] == 6
    assert isinstance(answers[1], Exception) and "negative item" in str(answers[1])


def test_without_the_option_every_batch_runs_in_the_worker(runtime: ModelRuntime) -> None:
    model = TimedModel()

    async def scenario() -> int:
        await runtime.load(ModelSpec(name="timed", version="v1", loader=lambda _ctx: model,
                                     run_batch=lambda m, items: m.run_batch(items), uses_torch=False))
        for item in range(4):
            await runtime.predict("timed", item)
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert all(thread != loop_thread for _, thread in model.batches)


def initializer_threads(policy: BatchPolicy) -> tuple[list[int], int]:
    """Serve three items one after another with ``policy``: the threads the initializer ran on, and the loop's."""
    initialized_on: list[int] = []
    model = TimedModel()

    async def scenario() -> int:
        batcher = DynamicBatcher("initialized", model.run_batch, policy, ModelMetrics("initialized"),
                                 thread_initializer=lambda: initialized_on.append(threading.get_ident()))
        batcher.start()
        try:
            for item in range(3):
                assert await batcher.submit(item) == 2 * item
        finally:
            await batcher.close()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    return initialized_on, loop_thread


def test_the_worker_thread_initializer_runs_on_the_loop_before_its_first_inline_batch() -> None:
    initialized_on, loop_thread = initializer_threads(BatchPolicy(inline_below_ms=8.0))
    assert initialized_on.count(loop_thread) == 1  # once, however many inline batches
    assert len(initialized_on) == 2  # and once in the worker, for the first batch


def test_a_run_inline_batcher_also_initializes_the_loop_thread_once() -> None:
    initialized_on, loop_thread = initializer_threads(BatchPolicy(run_inline=True))
    assert initialized_on == [loop_thread]  # every batch ran on the loop: the worker thread never started


def test_inline_below_ms_must_be_positive() -> None:
    with pytest.raises(ValueError, match="inline_below_ms"):
        BatchPolicy(inline_below_ms=0.0)
