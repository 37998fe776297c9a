"""Per-key window state behind one interface: a database store and a Redis store, chosen once.

A vertical that scores each event against sliding windows of the events before it (fraud: a
card's velocity and a terminal's risk; IIoT: a sensor's recent readings) keeps that state in one
of two places:

- the database (the embedded default): the stored events *are* the state, read per event, and an
  event's answer is committed with its row before it is answered;
- Redis (``TESSERA_REDIS_URL`` set): windows every API replica shares, read and extended in one
  atomic step; the answer is kept there and the row is written behind (``written_behind``) by a
  recorder that drains a stream.

:class:`WindowStateStore` is what both promise, so callers never ask which one they have;
:class:`WindowStoreSelector` makes the choice once per process (per settings object, so tests that
change the settings get a fresh choice; :meth:`WindowStoreSelector.reset` forces one). The two
base classes hold what every database or Redis store does the same way.

The contract, for events identified by ``(tenant_id, event id)``:

- :meth:`~WindowStateStore.admit` a new event: its windows as if it were already in them (counted
  once however often it is sent); a resend gets the stored answer instead and changes nothing, or
  409 when its ``digest`` (of the request body) differs; a duplicate arriving while the first is
  being scored ends with the first one's answer.
- :meth:`~WindowStateStore.commit` an answer: the first committed answer of an event wins and is
  what every later caller gets.
- :meth:`~WindowStateStore.release` an admitted event whose scoring failed, so its retry is admitted
  at once and still counted once.
- A store that cannot be reached raises :class:`~shared.errors.NotReady` (503 + Retry-After):
  nothing was answered, so the caller's retry is safe.

Hot paths call these once per event: implementations add no thread hop or round trip of their own
(a database store reads SQLite on the event loop, see :attr:`DatabaseWindowStoreBase.on_event_loop`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from shared.config import Settings, get_settings
from shared.db import get_engine
from shared.kv import async_redis, close_async_redis, warm_async_redis


class WindowBackend(StrEnum):
    """Where window state lives."""

    DATABASE = "database"
    REDIS = "redis"


def configured_backend(settings: Settings | None = None) -> WindowBackend:
    """Redis when ``TESSERA_REDIS_URL`` is set, else the database."""
    return WindowBackend.REDIS if (settings or get_settings()).redis_url else WindowBackend.DATABASE


EventT = TypeVar("EventT", contravariant=True)
WindowsT = TypeVar("WindowsT", covariant=True)
AnswerT = TypeVar("AnswerT")


class WindowStateStore(Protocol[EventT, WindowsT, AnswerT]):
    """Windows of earlier events per key, and each event's answer, kept exactly once.

    Type parameters: ``EventT`` the incoming event (it names its id and window keys), ``WindowsT``
    the aggregates an admitted event is scored with, ``AnswerT`` what the caller is answered.
    """

    @property
    def backend(self) -> WindowBackend:
        """Which store this is (for logs, readiness and backend-only tools)."""
        ...

    @property
    def written_behind(self) -> bool:
        """True when answers are committed before their database rows (a recorder must run)."""
        ...

    def connected(self) -> AbstractAsyncContextManager[None]:
        """For an app's lifespan: connections opened (warm) on entry, closed on exit."""
        ...

    async def check_ready(self) -> None:
        """Raise when the store cannot be reached (a readiness check)."""
        ...

    async def admit(self, tenant_id: str, event: EventT, digest: str) -> WindowsT | AnswerT:
        """The windows of a new event (it included), or the answer a resend gets (409 if ``digest`` differs)."""
        ...

    async def commit(self, tenant_id: str, event: EventT, answer: AnswerT, record: dict[str, Any]) -> AnswerT:
        """Keep ``answer`` and the event's database ``record``; returns the answer that won
        (``answer``, or a concurrent duplicate's that was committed first)."""
        ...

    async def release(self, tenant_id: str, event: EventT) -> None:
        """Forget an admission whose scoring failed (never raises): its retry is admitted at once."""
        ...

    def unrecorded_answer(self, tenant_id: str, event_id: str) -> AnswerT | None:
        """An answer given whose database row may not be written yet (None when there is none);
        blocking, for worker threads."""
        ...


class DatabaseWindowStoreBase:
    """What every database store shares: nothing to connect, release or write behind.

    ``on_event_loop`` says where a store runs its statements: SQLite reads and writes that never
    wait (the in-process write gate queues writers) run on the event loop, since a thread hop costs
    more in GIL hand-offs than it overlaps; a server database is visited from a worker thread.
    """

    backend = WindowBackend.DATABASE
    written_behind = False

    def __init__(self) -> None:
        self.on_event_loop = get_engine().dialect.name == "sqlite"

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Nothing to open: the database engine is the app's."""
        yield

    async def check_ready(self) -> None:
        """Always ready: the database's own readiness is the app's check."""

    async def release(self, tenant_id: str, event: Any) -> None:
        """Nothing to release: nothing is written before the commit."""

    def unrecorded_answer(self, tenant_id: str, event_id: str) -> Any:
        """None: every answer is a committed row before it is given."""
        return None


class RedisWindowStoreBase:
    """What every Redis store shares: the loop's connections, a PING for readiness, rows written behind."""

    backend = WindowBackend.REDIS
    written_behind = True

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Warm the running loop's Redis connections at start-up; close them at shutdown."""
        await warm_async_redis()
        try:
            yield
        finally:
            await close_async_redis()

    async def check_ready(self) -> None:
        """PING Redis (raises ``RedisError`` when it cannot be reached)."""
        await async_redis().ping()


StoreT = TypeVar("StoreT")

_selectors: weakref.WeakSet[WindowStoreSelector[Any]] = weakref.WeakSet()


class WindowStoreSelector(Generic[StoreT]):
    """The window-state store of this process: built once from the settings, then the same object.

    Parameters
    ----------
    database, redis : Callable[[], StoreT]
        Build the store for each :class:`WindowBackend` (called once per choice).
    """

    def __init__(self, *, database: Callable[[], StoreT], redis: Callable[[], StoreT]) -> None:
        self._builders = {WindowBackend.DATABASE: database, WindowBackend.REDIS: redis}
        self._chosen: tuple[Settings, StoreT] | None = None
        _selectors.add(self)

    def __call__(self) -> StoreT:
        """The store (the settings object is compared, not re-read: one call and one identity test)."""
        settings = get_settings()
        chosen = self._chosen
        if chosen is not None and chosen[0] is settings:
            return chosen[1]
        store = self._builders[configured_backend(settings)]()
        self._chosen = (settings, store)
        return store

    def reset(self) -> None:
        """Choose again on the next call (tests that change the settings or the database)."""
        self._chosen = None


def reset_window_stores() -> None:
    """Reset every :class:`WindowStoreSelector` of the process (tests that switch stacks)."""
    for selector in list(_selectors):
        selector.reset()
