"""``run_in_process``: a model served from a child process, its batches sent from the event loop.

Real child processes (``spawn``) throughout: the answers carry the pid of the process that ran them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from typing import Any

import pytest

from model_runtime import ModelRuntime, ModelSpec
from model_runtime.errors import ModelNotReady
from model_runtime.process_model import PROCESS_RESTARTS, ModelProcessExited
from tests.model_runtime.process_models import load_failing, load_pid_echo, run_pid_echo, tag_answer

ECHO = ModelSpec(name="echo", version="v1", loader=load_pid_echo, run_batch=run_pid_echo, uses_torch=False,
                 run_in_process=True, max_batch_size=8)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_batches_run_in_the_child_process_and_answer_on_the_loop(runtime: ModelRuntime) -> None:
    async def scenario() -> list[Any]:
        await runtime.load(ECHO)
        return list(await asyncio.gather(*(runtime.predict("echo", n) for n in range(20))))

    answers = asyncio.run(scenario())
    pids = {pid for pid, _ in answers}
    assert [item for _, item in answers] == list(range(20))
    assert len(pids) == 1 and os.getpid() not in pids
    assert "child process" in runtime.loaded()["echo"]["backend"]


def test_the_loop_keeps_serving_while_the_child_runs_a_batch(runtime: ModelRuntime) -> None:
    async def scenario() -> tuple[int, Any]:
        await runtime.load(ECHO)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        answer = await runtime.predict("echo", 0.5)  # the child sleeps half a second
        ticker.cancel()
        return ticks, answer

    ticks, (_pid, item) = asyncio.run(scenario())
    assert item == 0.5
    assert ticks >= 20  # a loop blocked by the batch would have ticked about once


def test_outputs_are_finalized_once_in_the_child_warm_up_included(runtime: ModelRuntime) -> None:
    finalized = dataclasses.replace(ECHO, finalize=tag_answer, warmup_items=[1, 2, 3])

    async def scenario() -> Any:
        await runtime.load(finalized)  # warm-up runs through the child: finalizing again would fail the load
        return await runtime.predict("echo", 7)

    answer = asyncio.run(scenario())
    assert answer["item"] == 7 and answer["pid"] != os.getpid()


def test_a_bad_item_fails_alone_and_errors_cross_the_pipe(runtime: ModelRuntime) -> None:
    windowed = dataclasses.replace(ECHO, fill="window", max_wait_ms=200.0)  # the four items share one batch

    async def scenario() -> list[Any]:
        await runtime.load(windowed)
        return list(await asyncio.gather(*(runtime.predict("echo", item) for item in (1, "poison", 2, "unpicklable")),
                                         return_exceptions=True))

    one, poison, two, unpicklable = asyncio.run(scenario())
    assert one[1] == 1 and two[1] == 2
    assert isinstance(poison, ValueError) and str(poison) == "poison item"
    assert isinstance(unpicklable, RuntimeError) and "UnpicklableError: carries a lambda" in str(unpicklable)


def test_a_killed_child_fails_its_batch_with_not_ready_and_is_replaced(runtime: ModelRuntime) -> None:
    restarts_before = PROCESS_RESTARTS.labels("echo")._value.get()

    async def scenario() -> tuple[int, BaseException | None, int]:
        await runtime.load(ECHO)
        first_pid, _ = await runtime.predict("echo", 0)
        in_flight = asyncio.create_task(runtime.predict("echo", 5.0))
        await asyncio.sleep(0.3)
        os.kill(first_pid, signal.SIGKILL)
        failure = None
        try:
            await in_flight
        except BaseException as exc:
            failure = exc
        deadline = time.monotonic() + 120
        while True:  # calls fail fast (503 at the edge) until the replacement is ready
            try:
                new_pid, _ = await runtime.predict("echo", 1)
                return first_pid, failure, new_pid
            except ModelNotReady:
                assert time.monotonic() < deadline, "no replacement child within 120 s"
                await asyncio.sleep(0.2)

    first_pid, failure, new_pid = asyncio.run(scenario())
    assert isinstance(failure, ModelProcessExited) and isinstance(failure, ModelNotReady)
    assert new_pid != first_pid and not _alive(first_pid)
    assert PROCESS_RESTARTS.labels("echo")._value.get() == restarts_before + 1


def test_unloading_and_replacing_a_version_stop_its_child(runtime: ModelRuntime) -> None:
    async def scenario() -> tuple[int, int, bool, bool]:
        await runtime.load(ECHO)
        v1_pid, _ = await runtime.predict("echo", 0)
        await runtime.load(dataclasses.replace(ECHO, version="v2"))  # v1 drains, then its child stops
        v2_pid, _ = await runtime.predict("echo", 0)
        v1_alive = _alive(v1_pid)
        await runtime.unload("echo")
        return v1_pid, v2_pid, v1_alive, _alive(v2_pid)

    v1_pid, v2_pid, v1_alive_after_swap, v2_alive_after_unload = asyncio.run(scenario())
    assert v1_pid != v2_pid
    assert not v1_alive_after_swap and not v2_alive_after_unload


def test_a_loader_that_fails_in_the_child_fails_the_load(runtime: ModelRuntime) -> None:
    failing = dataclasses.replace(ECHO, name="failing", loader=load_failing)
    with pytest.raises(RuntimeError, match="no weights here"):
        asyncio.run(runtime.load(failing))
    assert "failing" not in runtime.loaded()


def test_a_synchronous_load_serves_in_this_process(runtime: ModelRuntime) -> None:
    """Workers and scripts (no event loop to read the pipe from) keep the model in-process."""
    runtime.load_sync(ECHO)
    [(pid, item)] = runtime.predict_many_sync("echo", [7])
    assert (pid, item) == (os.getpid(), 7)
