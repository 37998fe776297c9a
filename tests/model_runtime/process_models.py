"""Models served from a child process in the tests (module level, so they pickle by name; no torch)."""

from __future__ import annotations

import os
import time
from typing import Any

from model_runtime import LoadContext


class UnpicklableError(RuntimeError):
    """An error carrying a function: pickle refuses it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: None


def load_pid_echo(_context: LoadContext) -> dict[str, int]:
    """A "model" that remembers the process that loaded it."""
    return {"pid": os.getpid()}


def run_pid_echo(model: dict[str, int], items: list[Any]) -> list[tuple[int, Any]]:
    """``(pid, item)`` per item; ``"poison"`` fails its batch, ``"unpicklable"`` with an error pickle refuses,
    a float sleeps that many seconds first."""
    for item in items:
        if item == "poison":
            raise ValueError("poison item")
        if item == "unpicklable":
            raise UnpicklableError("carries a lambda")
        if isinstance(item, float):
            time.sleep(item)
    return [(model["pid"], item) for item in items]


def load_failing(_context: LoadContext) -> None:
    """A loader whose weights are missing."""
    raise FileNotFoundError("no weights here")


def tag_answer(output: tuple[int, Any]) -> dict[str, Any]:
    """A ``finalize`` that changes the output's shape, so finalizing twice would fail."""
    if not isinstance(output, tuple):
        raise TypeError(f"finalize got {type(output).__name__}, not a model output: finalized twice?")
    pid, item = output
    return {"pid": pid, "item": item}
