"""Child processes that never outlive their parent.

On Linux, :func:`end_with_parent` asks the kernel to signal the calling process when its parent
dies, however it dies (SIGKILL, a crash): `tessera up` arranges it for every server it starts, and
a server for the worker processes it spawns itself (speech decoders), so nothing keeps running
once the process that owns it is gone. Elsewhere it does nothing.

:data:`ALLOCATOR_ENV` is glibc's allocator told to keep freed memory: every process `tessera up` starts gets it
(the image sets it too), because glibc reads it only when a process starts.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

PR_SET_PDEATHSIG = 1
# Looked up once at import, before any fork: a child between fork and exec must not load libraries.
_PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def end_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Have ``signum`` sent to this process when its parent dies; if ``parent_pid`` is already gone
    (it died before this took effect), send it now."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
                 "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
"""glibc malloc settings for Tessera's servers and workers: one arena (the main heap) for every thread, blocks
under 256 MiB from that heap rather than their own ``mmap``, and up to 1 GiB of freed heap kept rather than handed
back to the kernel.

Why: each CT scan's stage 1 allocates and frees ~20 float32 volumes of tens of MB, on worker threads. With glibc's
defaults those come from fresh ``mmap`` s or per-thread arenas whose heaps are unmapped again on free, so every scan
page-faults them in anew (~12,000 faults and +50-90 ms a scan of the 2 mm bench volume); with these settings a
worker reuses the memory of the previous scan (0 faults). Only the main heap honours the trim threshold, hence one
arena. The cost is that a process's resident memory stays near its peak; fraud scoring's latency was unchanged in
the same measurement (docs/benchmarks/nodule.md, "The allocator").
"""


def with_allocator_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus :data:`ALLOCATOR_ENV`, whose values yield to any already set in ``env``."""
    return {**ALLOCATOR_ENV, **env}


Result = TypeVar("Result")


class DedicatedProcess:
    """One spawned worker process for long, GIL-holding calls made from an event loop (seconds of
    pure-Python work that would starve the loop in a thread). It ends with its parent and, on
    :meth:`close`, at once, even in the middle of a call."""

    def __init__(self) -> None:
        self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=end_with_parent, initargs=(os.getpid(), signal.SIGKILL))

    async def run(self, function: Callable[..., Result], *args: Any) -> Result:
        """``function(*args)`` in the process (``function`` and its arguments must pickle)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def close(self) -> None:
        """End the process now: a call under way is abandoned, not waited for."""
        # the executor has no public way to stop a worker that is busy; its process map is the only handle
        processes: dict[int, Any] = getattr(self._executor, "_processes", None) or {}
        for process in list(processes.values()):
            process.terminate()
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
