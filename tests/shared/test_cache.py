"""Pure logic of the freshness-bounded cache, on a clock the test moves: no assertion waits on wall time.

The store is a fake whose read returns the value as of its start and is counted; it can fail, and
can be held open (``store.held``) to keep a read in flight while the test looks at what callers get.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from shared import cache as cache_module
from shared.cache import FreshnessBoundedCache
from tests.support import wait_until_async

WAIT_S = 10.0
"""Generous: how long a test waits for something it knows will happen (a read to start or land)."""


class Clock:
    """Stands in for the ``time`` module inside shared.cache: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(cache_module, "time", fake)
    return fake


class Store:
    """A fake store: each read snapshots the value at its start, is counted, may fail or be held open."""

    def __init__(self) -> None:
        self.value = 1
        self.reads = 0
        self.failing = False
        self.released = threading.Event()
        self.released.set()
        self._lock = threading.Lock()

    def hold(self) -> None:
        """Keep the reads that start from now on in flight until :meth:`release`."""
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def read(self, key: str) -> str:
        with self._lock:  # a snapshot as of the read's start, as a database transaction gives
            self.reads += 1
            failing, value = self.failing, self.value
        assert self.released.wait(WAIT_S), "a held read was never released"
        if failing:
            raise ConnectionError("store down")
        return f"{key}-{value}"


def cache_over(store: Store, **overrides: float) -> FreshnessBoundedCache[str, str]:
    options = {"max_age_s": 0.3, "refresh_after_s": 0.15, "stale_if_error_s": 0.5, **overrides}
    return FreshnessBoundedCache(store.read, name="a test value", **options)  # type: ignore[arg-type]


async def reads_landed(cache: FreshnessBoundedCache[str, str]) -> None:
    """Wait until no read is in flight: with the clock standing still, a read takes no time."""
    await wait_until_async(lambda: not cache._reads, WAIT_S, "the reads in flight to land")


def test_concurrent_first_reads_share_one_read(clock: Clock) -> None:
    store = Store()

    async def scenario() -> list[str]:
        cache = cache_over(store)
        store.hold()
        callers = asyncio.gather(*(cache.get("k") for _ in range(20)))
        await wait_until_async(lambda: store.reads == 1, WAIT_S, "the first read to start")
        store.release()
        return await callers

    assert asyncio.run(scenario()) == ["k-1"] * 20 and store.reads == 1


def test_a_fresh_entry_costs_no_read_and_an_aging_one_is_refreshed_in_the_background(clock: Clock) -> None:
    store = Store()

    async def scenario() -> None:
        cache = cache_over(store)
        await cache.get("k")
        store.value = 2
        assert await cache.get("k") == "k-1" and store.reads == 1  # fresh
        clock.advance(0.16)  # aging: past refresh_after_s, before max_age_s
        store.hold()
        callers = asyncio.gather(*(cache.get("k") for _ in range(10)))
        answers = await asyncio.wait_for(callers, WAIT_S)  # none waits for the read held in flight
        assert answers == ["k-1"] * 10
        await wait_until_async(lambda: store.reads == 2, WAIT_S, "the background read to start")
        store.release()
        await reads_landed(cache)
        assert await cache.get("k") == "k-2" and store.reads == 2  # one background read refreshed it for all

    asyncio.run(scenario())


def test_a_change_is_seen_within_max_age_even_after_an_idle_spell(clock: Clock) -> None:
    store = Store()

    async def scenario() -> None:
        cache = cache_over(store)
        await cache.get("k")
        clock.advance(0.31)  # idle: no request refreshed the entry
        store.value = 2  # committed now; the entry is already past max_age
        assert await cache.get("k") == "k-2"  # the caller waited for a fresh read

    asyncio.run(scenario())


def test_changes_are_never_answered_later_than_max_age_after_they_happen(clock: Clock) -> None:
    """Requests at uneven moments, with idle spells, while the value changes: none sees a value
    older than the bound (reads land before the clock moves on)."""
    store = Store()
    max_age_s = 0.2

    async def scenario() -> float:
        cache = cache_over(store, max_age_s=max_age_s, refresh_after_s=0.1)
        changed_at = {1: 0.0}
        worst = 0.0
        for step in range(150):
            if step % 15 == 0:
                store.value += 1
                changed_at[store.value] = clock.now
            answer = int((await cache.get("k")).split("-")[1])
            newer = [at for value, at in changed_at.items() if value > answer]
            if newer:
                worst = max(worst, clock.now - min(newer))
            await reads_landed(cache)
            clock.advance(0.25 if step % 40 == 39 else 0.013 * (step % 3))
        return worst

    assert asyncio.run(scenario()) <= max_age_s


def test_invalidate_drops_a_read_started_before_the_change(clock: Clock) -> None:
    store = Store()

    async def scenario() -> str:
        cache = cache_over(store)
        store.hold()
        first = asyncio.ensure_future(cache.get("k"))
        await wait_until_async(lambda: store.reads == 1, WAIT_S, "the read to be in flight")
        store.value = 2
        cache.invalidate("k")
        store.release()
        assert await first == "k-1"
        return await cache.get("k")

    assert asyncio.run(scenario()) == "k-2" and store.reads == 2


def test_while_reads_fail_the_last_value_is_answered_for_stale_if_error_then_the_error(clock: Clock) -> None:
    store = Store()

    async def scenario() -> None:
        cache = cache_over(store)
        await cache.get("k")
        store.failing = True
        clock.advance(0.31)
        assert await cache.get("k") == "k-1"  # the awaited read failed: the last value, 0.31 s old
        reads_after_failure = store.reads
        answers = []
        for _ in range(20):  # 0.2 s of requests: answered at once, the store retried once
            answers.append(await cache.get("k"))
            await reads_landed(cache)
            clock.advance(0.01)
        assert answers == ["k-1"] * 20
        assert store.reads - reads_after_failure == 1  # once per refresh_after_s
        clock.advance(0.35)  # past max_age + stale_if_error
        with pytest.raises(ConnectionError):
            await cache.get("k")
        with pytest.raises(ConnectionError):
            await cache.get("never-read")
        store.failing = False
        assert await cache.get("k") == "k-1"

    asyncio.run(scenario())


def test_the_number_of_entries_is_bounded() -> None:
    store = Store()

    async def scenario() -> int:
        cache = FreshnessBoundedCache(store.read, name="a test value", max_age_s=10, refresh_after_s=5,
                                      max_entries=5)
        for index in range(12):
            await cache.get(f"k{index}")
        return len(cache._entries)

    assert asyncio.run(scenario()) <= 5
