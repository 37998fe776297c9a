"""Process measurements the benchmarks share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def peak_rss_mb() -> float:
    """This process's peak resident set (MB), from ``/proc/self/status`` (VmHWM); NaN when unknown."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def threaded_callers(work: Callable[[T], object], items: Sequence[T], callers: int) -> tuple[list[float], float]:
    """``callers`` threads, caller ``i`` running ``work`` on ``items[i::callers]`` one after the other.

    Returns each call's seconds and the wall-clock seconds of the whole run.
    """
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(mine: Sequence[T]) -> None:
        for item in mine:
            started = time.perf_counter()
            work(item)
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=caller, args=(items[i::callers],)) for i in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started
