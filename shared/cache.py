"""A per-process cache of database reads with an exact bound on staleness (API keys, tenant policies).

Each entry remembers when the read that produced it *started*. An entry is answered at once while
it is younger than ``refresh_after_s``; between that and ``max_age_s`` it is still answered at once
while one background read refreshes it; from ``max_age_s`` on, callers await a fresh read. So a
change committed to the database at time T is seen by every request that starts after
T + ``max_age_s``, and a busy process reads each key about once per ``refresh_after_s`` without
any request waiting for it. At most one read per key is in flight; callers share it.

While reads fail (the database is down or unreachable) a known entry keeps being answered for up
to ``stale_if_error_s`` past ``max_age_s``, with one retry per ``refresh_after_s``; after that, and
for a key never read, the read's error reaches the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger("tessera.cache")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    read_started: float
    """``time.monotonic()`` when the read that produced ``value`` began."""


class FreshnessBoundedCache(Generic[K, V]):
    """Values of ``load(key)`` (run in a worker thread), never answered later than ``max_age_s`` after
    the start of the read that produced them, except while reads fail (``stale_if_error_s``)."""

    def __init__(self, load: Callable[[K], V], *, name: str, max_age_s: float, refresh_after_s: float,
                 stale_if_error_s: float = 0.0, max_entries: int = 10_000) -> None:
        if not 0 <= refresh_after_s <= max_age_s:
            raise ValueError("refresh_after_s must be within [0, max_age_s]")
        self._load = load
        self.name = name
        self.max_age_s = max_age_s
        self.refresh_after_s = refresh_after_s
        self.stale_if_error_s = stale_if_error_s
        self.max_entries = max_entries
        self._entries: dict[K, _Entry[V]] = {}
        self._reads: dict[K, asyncio.Future[V]] = {}
        self._failed_at: dict[K, float] = {}
        self._generation: dict[K, int] = {}  # bumped by invalidate: a read started before is not kept

    async def get(self, key: K) -> V:
        """The value for ``key``: from the cache while fresh enough, else from a (shared) read."""
        entry = self._entries.get(key)
        if entry is not None:
            age = time.monotonic() - entry.read_started
            if age < self.refresh_after_s:
                return entry.value
            if age < self.max_age_s:
                self._read_in_background(key)
                return entry.value
            if self._answering_stale(key, age):
                self._read_in_background(key)
                return entry.value
        try:
            return await asyncio.shield(self._read(key))
        except Exception:
            if entry is not None and time.monotonic() - entry.read_started < self.max_age_s + self.stale_if_error_s:
                return entry.value
            raise

    def invalidate(self, key: K) -> None:
        """Forget ``key`` (after this process changed it): the next caller reads it again."""
        self._generation[key] = self._generation.get(key, 0) + 1
        self._entries.pop(key, None)
        self._reads.pop(key, None)
        self._failed_at.pop(key, None)

    def clear(self) -> None:
        """Forget every key."""
        for key in list(self._entries) + list(self._reads):
            self.invalidate(key)

    def _answering_stale(self, key: K, age: float) -> bool:
        """Past ``max_age_s``: only while the last read failed, within ``stale_if_error_s``."""
        return key in self._failed_at and age < self.max_age_s + self.stale_if_error_s

    def _read_in_background(self, key: K) -> None:
        failed_at = self._failed_at.get(key)
        if failed_at is not None and time.monotonic() - failed_at < self.refresh_after_s:
            return  # retry a failing store at most once per refresh interval
        self._read(key)

    def _read(self, key: K) -> asyncio.Future[V]:
        read = self._reads.get(key)
        if read is None:
            read = self._reads[key] = asyncio.ensure_future(self._load_and_store(key))
            read.add_done_callback(self._log_failure)
        return read

    async def _load_and_store(self, key: K) -> V:
        generation = self._generation.get(key, 0)
        started = time.monotonic()
        try:
            value = await asyncio.to_thread(self._load, key)
        except Exception:
            if self._generation.get(key, 0) == generation:
                if len(self._failed_at) >= self.max_entries:
                    self._failed_at.clear()
                self._failed_at[key] = time.monotonic()
            raise
        finally:
            if self._generation.get(key, 0) == generation:  # else invalidate() already forgot this read
                self._reads.pop(key, None)
        if self._generation.get(key, 0) == generation:
            if len(self._entries) >= self.max_entries and key not in self._entries:
                self._entries.clear()  # bounded: a flood of unknown keys must not grow memory
            self._entries[key] = _Entry(value, started)
            self._failed_at.pop(key, None)
        return value

    def _log_failure(self, read: asyncio.Future[V]) -> None:
        if not read.cancelled() and read.exception() is not None:
            logger.warning("reading %s failed: %r", self.name, read.exception())
