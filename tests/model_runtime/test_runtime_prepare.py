"""``prepare`` runs in a worker pool (threads, or processes where it pays), never on the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest
import torch
from prepare_workers import decode_in_worker

from model_runtime import ModelRuntime, ModelSpec
from model_runtime.errors import BadInput, RuntimeTimeout

PREPARE_S = 0.2


def scale_batch(model: torch.nn.Module, items: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(model(torch.stack(items)))


def linear() -> torch.nn.Module:
    torch.manual_seed(2)
    return torch.nn.Linear(3, 2).eval()


def test_prepare_runs_off_the_loop_and_never_blocks_it(runtime: ModelRuntime) -> None:
    model = linear()
    prepared_on: list[int] = []

    def decode(item: list[float]) -> torch.Tensor:
        prepared_on.append(threading.get_ident())
        time.sleep(PREPARE_S)  # stands for decoding that holds its thread
        if len(item) != 3:
            raise ValueError(f"expected 3 values, got {len(item)}")
        return torch.tensor(item)

    async def scenario() -> tuple[int, list[Any], int]:
        await runtime.load(ModelSpec(name="decoded", version="v1", loader=lambda _ctx: model,
                                     run_batch=scale_batch, prepare=decode))
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        answers = await asyncio.gather(*(runtime.predict("decoded", item) for item in
                                         ([1.0, 2.0, 3.0], [1.0], [4.0, 5.0, 6.0])), return_exceptions=True)
        ticker.cancel()
        return threading.get_ident(), answers, ticks

    loop_thread, answers, ticks = asyncio.run(scenario())
    assert prepared_on and loop_thread not in prepared_on
    assert ticks >= 10  # the loop kept turning while three items were decoded for 0.2 s each
    assert isinstance(answers[1], BadInput)  # the bad item fails alone
    with torch.inference_mode():
        expected = model(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    torch.testing.assert_close(answers[0], expected[0])
    torch.testing.assert_close(answers[2], expected[1])


def test_prepare_time_counts_against_the_deadline(runtime: ModelRuntime) -> None:
    def slow(item: float) -> torch.Tensor:
        time.sleep(PREPARE_S)
        return torch.tensor([item, item, item])

    async def scenario() -> None:
        await runtime.load(ModelSpec(name="slow-prepare", version="v1", loader=lambda _ctx: linear(),
                                     run_batch=scale_batch, prepare=slow))
        with pytest.raises(RuntimeTimeout):
            await runtime.predict("slow-prepare", 1.0, timeout_s=PREPARE_S / 4)

    asyncio.run(scenario())


def test_a_run_inline_model_prepares_on_the_loop_as_before(runtime: ModelRuntime) -> None:
    seen: list[int] = []

    def check(item: float) -> float:
        seen.append(threading.get_ident())
        return item

    async def scenario() -> int:
        await runtime.load(ModelSpec(name="tiny", version="v1", loader=lambda _ctx: None, uses_torch=False,
                                     run_batch=lambda _m, items: [2 * x for x in items], prepare=check,
                                     run_inline=True))
        assert await runtime.predict("tiny", 2.0) == 4.0
        return threading.get_ident()

    assert seen == [asyncio.run(scenario())]


def test_process_pool_prepares_in_another_process(runtime: ModelRuntime) -> None:
    async def scenario() -> list[Any]:
        await runtime.load(ModelSpec(name="parsed", version="v1", loader=lambda _ctx: None, uses_torch=False,
                                     run_batch=lambda _m, items: items, prepare=decode_in_worker,
                                     prepare_in="process", timeout_s=60))
        return await asyncio.gather(*(runtime.predict("parsed", item) for item in ("1.5", [2], 3)),
                                    return_exceptions=True)

    answers = asyncio.run(scenario())
    assert isinstance(answers[1], BadInput)
    assert [value for _, value in answers[::2]] == [1.5, 3.0]
    assert all(pid != os.getpid() for pid, _ in answers[::2])


def test_process_prepare_must_be_a_module_level_function(runtime: ModelRuntime) -> None:
    with pytest.raises(ValueError, match="module-level"):
        runtime.load_sync(ModelSpec(name="closure", version="v1", loader=lambda _ctx: None, uses_torch=False,
                                    run_batch=lambda _m, items: items, prepare=lambda item: item,
                                    prepare_in="process"))


@pytest.mark.parametrize(("cost_s", "warm_up", "expected"), [
    (0.0, True, "loop"),       # a shape check measured at warm-up: a hand-off would cost more than it
    (0.002, True, "thread"),   # decoding: off the loop
    (0.0, False, "thread"),    # never measured: the safe side
])
def test_auto_keeps_only_a_measured_cheap_prepare_on_the_loop(runtime: ModelRuntime, cost_s: float,
                                                              warm_up: bool, expected: str) -> None:
    model = linear()
    prepared_on: list[int] = []

    def check(item: list[float]) -> torch.Tensor:
        prepared_on.append(threading.get_ident())
        if cost_s:
            time.sleep(cost_s)
        return torch.tensor(item)

    async def scenario() -> int:
        await runtime.load(ModelSpec(name="checked", version="v1", loader=lambda _ctx: model, run_batch=scale_batch,
                                     prepare=check, warmup_items=[[1.0, 2.0, 3.0]] * 4 if warm_up else ()))
        prepared_on.clear()
        await runtime.predict("checked", [1.0, 2.0, 3.0])
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert (prepared_on == [loop_thread]) == (expected == "loop")
