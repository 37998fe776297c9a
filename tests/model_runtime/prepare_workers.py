"""Prepare functions sent to the runtime's worker processes (module level, so they pickle by name; no torch)."""

from __future__ import annotations

import os


def decode_in_worker(item: object) -> tuple[int, float]:
    """``(pid of the process that ran it, the item as a float)``; a non-number is refused."""
    if not isinstance(item, int | float | str):
        raise TypeError(f"cannot decode a {type(item).__name__}")
    return os.getpid(), float(item)
