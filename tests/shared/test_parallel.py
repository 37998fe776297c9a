"""shared.parallel: a step spread over the cores covers every index once, fails as one, and never waits on a
busy pool."""

from __future__ import annotations

import threading

import pytest

from shared import parallel
from shared.parallel import beside, for_ranges, split_ranges


@pytest.mark.parametrize(("count", "parts", "align"), [(10, 2, 1), (7, 3, 1), (1, 4, 1), (1000, 2, 64), (65, 2, 64),
                                                        (3, 8, 1), (0, 2, 1)])
def test_ranges_cover_the_indices_in_order_on_aligned_boundaries(count: int, parts: int, align: int) -> None:
    pieces = split_ranges(count, parts, align=align)
    assert [i for start, stop in pieces for i in range(start, stop)] == list(range(count))
    assert len(pieces) <= parts and all(stop > start for start, stop in pieces)
    assert all(stop % align == 0 for _, stop in pieces[:-1])


def test_every_index_is_worked_once_across_threads() -> None:
    seen: list[int] = []
    threads: set[str] = set()
    lock = threading.Lock()

    def work(start: int, stop: int) -> None:
        with lock:
            seen.extend(range(start, stop))
            threads.add(threading.current_thread().name)

    for_ranges(100, work, parts=2)
    assert sorted(seen) == list(range(100))
    assert len(threads) <= 2


def test_a_failing_piece_fails_the_call_after_the_others_end() -> None:
    finished: list[int] = []

    def work(start: int, stop: int) -> None:
        if start == 0:
            raise ValueError("bad range")
        finished.append(start)

    with pytest.raises(ValueError, match="bad range"):
        for_ranges(10, work, parts=2)
    assert finished == [5]


def test_pieces_the_busy_pool_has_not_started_run_on_the_caller() -> None:
    if parallel.cores() < 2:
        pytest.skip("one core: nothing runs on the pool")
    release = threading.Event()
    blockers = [beside(lambda: release.wait(30)) for _ in range(parallel.cores())]  # every worker of the pool
    try:
        callers: set[str] = set()
        for_ranges(8, lambda start, stop: callers.add(threading.current_thread().name), parts=2)
        assert callers == {threading.current_thread().name}
        assert beside(lambda: threading.current_thread().name)() == threading.current_thread().name
    finally:
        release.set()
    assert all(blocker() is True for blocker in blockers)


def test_beside_returns_the_result_or_raises_the_error() -> None:
    assert beside(lambda: 6 * 7)() == 42

    def fails() -> int:
        raise RuntimeError("no lungs")

    with pytest.raises(RuntimeError, match="no lungs"):
        beside(fails)()
