"""The customer-service models' lifecycle in a gateway: a stop while they are still loading (a
`tessera up` ended seconds after it started) leaves no decoder process and no model behind."""

from __future__ import annotations

import asyncio
import contextlib
import os

from model_runtime import get_runtime
from services.customer_service import assist
from tests.support import alive, descendants, model_child


def child_pids() -> set[int]:
    """Live worker processes this process spawned (not its resource tracker, which lives as long as it)."""
    return {pid for pid in descendants(os.getpid()) if model_child(pid) and alive(pid)}


async def start_then_stop_while_loading() -> tuple[set[int], set[int]]:
    """Start the assist models, stop as soon as the decoders are up (before the emotion model is):
    (the decoder processes started, the children still alive after the stop)."""
    before = child_pids()
    runtime = get_runtime()
    loading = asyncio.create_task(assist.start_assist())
    for _ in range(1200):
        if assist.ASR_MODEL in runtime.loaded() or loading.done():
            break
        await asyncio.sleep(0.05)
    started = child_pids() - before
    loading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loading
    await assist.stop_assist()
    return started, child_pids() & started


def test_a_stop_while_the_models_load_ends_the_decoder_processes() -> None:
    started, left = asyncio.run(start_then_stop_while_loading())
    assert started, "the speech decoders should have started processes"
    assert not left, f"decoder processes outlived the stop: {sorted(left)}"
    assert assist.ASR_MODEL not in get_runtime().loaded()
