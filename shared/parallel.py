"""One CPU-bound step of one request spread over the machine's cores.

A CT scan's stage 1 and its crop features are NumPy, OpenCV and SciPy calls, which release the GIL; run
one after the other on one thread they leave the other cores idle while a single study is in flight.
:func:`for_ranges` splits such a step into contiguous index ranges: the calling thread runs the first, a
shared pool the others, and the caller takes back every range the pool has not started by the time it is
done with its own, so a pool busy with other requests' ranges never makes a request wait for it (under
load each request runs on its own thread, as before). :func:`beside` does the same for one call that can
run while the caller does something else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Result = TypeVar("Result")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _shared_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tessera-ranges")
        return _pool


def split_ranges(count: int, parts: int, *, align: int = 1) -> list[tuple[int, int]]:
    """``[0, count)`` as at most ``parts`` contiguous, non-empty ``(start, stop)`` ranges of nearly equal size,
    every boundary but the last a multiple of ``align``."""
    if count <= 0:
        return []
    units = -(-count // align)  # ceil: boundaries fall on whole units of ``align``
    parts = max(1, min(parts, units))
    cuts = [min(count, (units * k // parts) * align) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def for_ranges(count: int, work: Callable[[int, int], None], *, align: int = 1, min_size: int = 1,
               parts: int | None = None) -> None:
    """Call ``work(start, stop)`` over ``[0, count)`` in :func:`split_ranges` pieces, concurrently.

    ``work`` must be safe to run on several ranges at once (each writes only its own range) and should
    spend its time in code that releases the GIL. ``parts`` defaults to :func:`cores`; pieces are at least
    ``min_size`` long. Exceptions raised by ``work`` propagate (the first one, after every piece has ended).
    """
    parts = cores() if parts is None else parts
    pieces = split_ranges(count, min(parts, max(1, count // max(min_size, 1))), align=align)
    if len(pieces) <= 1:
        for start, stop in pieces:
            work(start, stop)
        return
    pool = _shared_pool(max(cores() - 1, 1))
    futures: list[Future[None]] = [pool.submit(work, start, stop) for start, stop in pieces[1:]]
    errors: list[BaseException] = []
    try:
        work(*pieces[0])
    except BaseException as error:  # noqa: BLE001 - the other pieces must end before it is raised
        errors.append(error)
    for future, piece in zip(futures, pieces[1:], strict=True):
        if future.cancel():  # not started: the pool is busy elsewhere, so run it here
            try:
                work(*piece)
            except BaseException as error:  # noqa: BLE001
                errors.append(error)
            continue
        failure = future.exception()
        if failure is not None:
            errors.append(failure)
    if errors:
        raise errors[0]


def beside(function: Callable[[], Result]) -> Callable[[], Result]:
    """Start ``function()`` on the shared pool; the returned callable gives its result (or raises its error).

    If the pool has not started it by the time its result is asked for, the caller runs it then, so the
    caller never waits on a pool busy with others' work.
    """
    if cores() < 2:
        return function
    future = _shared_pool(max(cores() - 1, 1)).submit(function)

    def result() -> Result:
        return function() if future.cancel() else future.result()

    return result
