"""Pure logic of the freshness-bounded cache (the database read is a counter that sleeps)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shared.cache import FreshnessBoundedCache

READ_S = 0.03


class Store:
    """A fake store: each read takes READ_S and returns the value as of its start; counted; may fail."""

    def __init__(self) -> None:
        self.value = 1
        self.reads = 0
        self.failing = False
        self._lock = threading.Lock()

    def read(self, key: str) -> str:
        with self._lock:  # a snapshot as of the read's start, as a database transaction gives
            self.reads += 1
            failing, value = self.failing, self.value
        time.sleep(READ_S)
        if failing:
            raise ConnectionError("store down")
        return f"{key}-{value}"


def cache_over(store: Store, **overrides: float) -> FreshnessBoundedCache[str, str]:
    options = {"max_age_s": 0.3, "refresh_after_s": 0.15, "stale_if_error_s": 0.5, **overrides}
    return FreshnessBoundedCache(store.read, name="a test value", **options)  # type: ignore[arg-type]


def test_concurrent_first_reads_share_one_read() -> None:
    store = Store()

    async def scenario() -> list[str]:
        cache = cache_over(store)
        return await asyncio.gather(*(cache.get("k") for _ in range(20)))

    assert asyncio.run(scenario()) == ["k-1"] * 20 and store.reads == 1


def test_a_fresh_entry_costs_no_read_and_an_aging_one_is_refreshed_in_the_background() -> None:
    store = Store()

    async def scenario() -> None:
        cache = cache_over(store)
        await cache.get("k")
        store.value = 2
        assert await cache.get("k") == "k-1" and store.reads == 1  # fresh
        await asyncio.sleep(0.16)
        started = time.monotonic()
        assert [await cache.get("k") for _ in range(10)] == ["k-1"] * 10  # aging: answered at once
        assert time.monotonic() - started < READ_S / 2
        await asyncio.sleep(READ_S * 2)
        assert await cache.get("k") == "k-2" and store.reads == 2  # one background read refreshed it

    asyncio.run(scenario())


def test_a_change_is_seen_within_max_age_even_after_an_idle_spell() -> None:
    store = Store()

    async def scenario() -> None:
        cache = cache_over(store)
        await cache.get("k")
        await asyncio.sleep(0.31)  # idle: no request refreshed the entry
        store.value = 2  # committed now; the entry is already past max_age
        assert await cache.get("k") == "k-2"  # the caller waited for a fresh read

    asyncio.run(scenario())


def test_changes_are_never_answered_later_than_max_age_after_they_happen() -> None:
    """Requests at random moments while the value changes: none sees a value older than the bound."""
    store = Store()
    max_age_s = 0.2

    async def scenario() -> float:
        cache = cache_over(store, max_age_s=max_age_s, refresh_after_s=0.1)
        changed_at = {1: 0.0}
        worst = 0.0
        for step in range(150):
            if step % 15 == 0:
                store.value += 1
                changed_at[store.value] = time.monotonic()
            answer = int((await cache.get("k")).split("-")[1])
            newer = [at for value, at in changed_at.items() if value > answer]
            if newer:
                worst = max(worst, time.monotonic() - min(newer))
            await asyncio.sleep(0.013 * (step % 3))
        return worst

    assert asyncio.run(scenario()) <= max_age_s + 0.02


def test_invalidate_drops_a_read_started_before_the_change() -> None:
    store = Store()

    async def scenario() -> str:
        cache = cache_over(store)
        first = asyncio.ensure_future(cache.get("k"))
        await asyncio.sleep(READ_S / 3)  # the read is in flight
        store.value = 2
        cache.invalidate("k")
        assert await first == "k-1"
        return await cache.get("k")

    assert asyncio.run(scenario()) == "k-2" and store.reads == 2


def test_while_reads_fail_the_last_value_is_answered_for_stale_if_error_then_the_error() -> None:
    store = Store()

    async def scenario() -> None:
        cache = cache_over(store)
        await cache.get("k")
        store.failing = True
        await asyncio.sleep(0.31)
        assert await cache.get("k") == "k-1"  # the awaited read failed: the last value, 0.31 s old
        reads_after_failure = store.reads
        answers = []
        for _ in range(20):  # 0.2 s of requests: answered at once, the store retried about once
            answers.append(await cache.get("k"))
            await asyncio.sleep(0.01)
        assert answers == ["k-1"] * 20
        assert store.reads - reads_after_failure <= 2
        await asyncio.sleep(0.35)  # past max_age + stale_if_error
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
