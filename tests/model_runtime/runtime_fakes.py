"""Test helpers for the model runtime: a fake model held on a gate, a spec factory, loop-friendly waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from model_runtime import ModelSpec


class GatedModel:
    """A fake model: ``output = 2 * x (+ offset)``; it blocks on ``gate`` so tests control timing.

    Attributes
    ----------
    batches : list of list
        Every batch it ran, in order (warm-up included).
    entered : threading.Event
        Set when a batch starts running.
    """

    def __init__(self, offset: float = 0.0, tag: str | None = None) -> None:
        self.offset = offset
        self.tag = tag
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[Any]] = []

    def run_batch(self, items: list[Any]) -> list[Any]:
        self.entered.set()
        if not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        self.batches.append(list(items))
        if any(isinstance(x, (int, float)) and x < 0 for x in items):
            raise ValueError("negative input poisons the batch")
        outputs = [2 * x + self.offset for x in items]
        return [(self.tag, out) for out in outputs] if self.tag else outputs

    def hold(self) -> None:
        """Close the gate: the next batch blocks until :meth:`release`."""
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def seen(self) -> list[Any]:
        """Every item it has run, flattened."""
        return [x for batch in self.batches for x in batch]


def make_spec(model: GatedModel, *, name: str = "double", version: str = "v1", **options: Any) -> ModelSpec:
    """A spec serving ``model`` (loader returns it as is)."""
    return ModelSpec(name=name, version=version, loader=lambda _ctx: model,
                     run_batch=lambda m, items: m.run_batch(items), **options)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Yield to the event loop until ``condition()`` holds (the model thread is held, not slept)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def wait_entered(model: GatedModel, timeout_s: float = 5.0) -> None:
    """Wait (without blocking the loop) until the model thread is inside ``run_batch``."""
    await wait_until(model.entered.is_set, timeout_s)


def model_threads() -> list[str]:
    """Names of live model worker threads."""
    return [t.name for t in threading.enumerate() if t.name.startswith("model-")]
