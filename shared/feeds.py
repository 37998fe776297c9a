"""Live event feeds: a publisher appends events to a topic, every subscriber of the topic gets them.

A vertical that pushes events to watchers (customer service's agent-assist and supervisor feeds;
IIoT alerts later) publishes dicts to a topic and serves subscribers from :func:`event_feed`::

    feed = event_feed()
    await feed.publish(f"cs:{tenant}:call:{call_id}", {"type": "emotion", ...})

    async for event in feed.subscribe(f"cs:{tenant}:call:{call_id}", replay=50):
        await connection.send_json(event)

Topics are plain strings; the caller puts the tenant in the topic, which is the wall between
tenants (a subscriber names one topic and gets that topic only). Each event gets a monotonically
increasing ``feed_id`` (a string) within its topic, so a client that reconnects can ask for what it
missed (``after=``) instead of a blind replay. A ``feed_id`` is the implementation's: a decimal
integer (:class:`LocalFeed`) or a Redis stream id ``<ms>-<seq>`` (:class:`RedisFeed`); an ``after``
of another shape is :class:`InvalidFeedId` (``check_feed_id`` says so up front).

Two implementations, one contract:

- :class:`LocalFeed` (embedded defaults, one process): per-topic history in memory and one bounded
  queue per subscriber. A subscriber that falls ``max_backlog`` events behind is cut off with
  :class:`FeedLagged` rather than making the publisher wait or memory grow: a stalled agent's
  browser must not slow a live call down.
- :class:`RedisFeed` (``TESSERA_REDIS_URL`` set, several replicas): each topic is a capped Redis
  stream (``XADD MAXLEN ~``), so a subscriber connected to any replica gets events published on
  any other, and the replay survives a process restart. Subscribers read with ``XREAD BLOCK``
  from their own position, so a slow one reads behind instead of blocking anyone; one more than
  ``history`` events behind loses the trimmed ones and goes on from the oldest kept event.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared import kv

Event = dict[str, Any]

DEFAULT_HISTORY = 500
"""Events kept per topic for replay (a call's assist events; older ones are in the database)."""

DEFAULT_MAX_BACKLOG = 1000
"""Events a local subscriber may fall behind before it is cut off."""

TOPIC_IDLE_S = 3600.0
"""A local topic with no publish and no subscriber for this long is forgotten."""


MAX_ID_PART = 2**64 - 1
"""The largest part of a feed id (a Redis stream id is two unsigned 64-bit integers)."""
_LOCAL_ID = re.compile(r"[0-9]{1,20}")
_REDIS_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")


class InvalidFeedId(ValueError):
    """An ``after`` that is not a ``feed_id`` of this feed; the message names the expected format."""


def _checked_parts(feed_id: str, pattern: re.Pattern[str], expected: str) -> str:
    """``feed_id`` when ``pattern`` matches it whole and no part exceeds :data:`MAX_ID_PART`."""
    match = pattern.fullmatch(feed_id)
    if match is None or any(int(part) > MAX_ID_PART for part in match.groups(default="0") or (feed_id,)):
        raise InvalidFeedId(f"after={feed_id[:40]!r} is not a feed_id: expected {expected}")
    return feed_id


class FeedLagged(Exception):
    """The subscriber fell too far behind the topic and was cut off; it may resubscribe with ``after``."""


class EventFeed(Protocol):
    """Publish events to topics; subscribe to one topic's events (with a replay of recent ones)."""

    async def publish(self, topic: str, event: Event) -> str:
        """Append ``event`` to ``topic`` and return its ``feed_id``."""
        ...

    def subscribe(self, topic: str, *, replay: int = 0, after: str | None = None) -> AsyncIterator[Event]:
        """Events of ``topic`` as they come: first the last ``replay`` ones (or every kept one after
        ``feed_id`` ``after``), then new ones, each with its ``feed_id``; ends only when cancelled."""
        ...

    def check_feed_id(self, feed_id: str) -> str:
        """``feed_id`` when it has the shape of this feed's ids, else :class:`InvalidFeedId`."""
        ...


@dataclass
class _Topic:
    history: deque[Event]
    subscribers: set[asyncio.Queue[Event | None]] = field(default_factory=set)
    next_id: int = 1
    touched: float = field(default_factory=time.monotonic)


class LocalFeed:
    """The in-process feed (see the module docstring)."""

    def __init__(self, *, history: int = DEFAULT_HISTORY, max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        self._history = history
        self._max_backlog = max_backlog
        self._topics: dict[str, _Topic] = {}

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            self._forget_idle_topics()
            topic = self._topics[name] = _Topic(history=deque(maxlen=self._history))
        topic.touched = time.monotonic()
        return topic

    def _forget_idle_topics(self) -> None:
        cutoff = time.monotonic() - TOPIC_IDLE_S
        for name in [name for name, topic in self._topics.items() if not topic.subscribers and topic.touched < cutoff]:
            del self._topics[name]

    async def publish(self, topic: str, event: Event) -> str:
        """Append ``event`` to ``topic`` and hand it to every subscriber; never waits on one."""
        state = self._topic(topic)
        feed_id = str(state.next_id)
        state.next_id += 1
        stamped = {**event, "feed_id": feed_id}
        state.history.append(stamped)
        for queue in list(state.subscribers):
            if queue.qsize() >= self._max_backlog:
                state.subscribers.discard(queue)
                queue.put_nowait(None)  # the cut-off marker; the queue is unbounded, so this fits
            else:
                queue.put_nowait(stamped)
        return feed_id

    def check_feed_id(self, feed_id: str) -> str:
        """See :meth:`EventFeed.check_feed_id`: a decimal integer."""
        return _checked_parts(feed_id, _LOCAL_ID, "a decimal integer such as 42")

    async def subscribe(self, topic: str, *, replay: int = 0, after: str | None = None) -> AsyncIterator[Event]:
        """See :meth:`EventFeed.subscribe`; raises :class:`FeedLagged` when cut off, :class:`InvalidFeedId`
        for a malformed ``after``."""
        if after is not None:
            self.check_feed_id(after)
        state = self._topic(topic)
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        for kept in _replayed(list(state.history), replay=replay, after=after):
            queue.put_nowait(kept)
        state.subscribers.add(queue)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    raise FeedLagged(f"fell {self._max_backlog} events behind topic {topic!r}")
                yield event
        finally:
            state.subscribers.discard(queue)
            state.touched = time.monotonic()


def _replayed(history: list[Event], *, replay: int, after: str | None) -> list[Event]:
    if after is not None:
        return [event for event in history if int(event["feed_id"]) > int(after)]
    return history[-replay:] if replay > 0 else []


class RedisFeed:
    """The Redis-stream feed shared by replicas (see the module docstring)."""

    KEY_PREFIX = "tessera:feed:"
    FIELD = b"event"
    BLOCK_MS = 5000

    def __init__(self, *, history: int = DEFAULT_HISTORY) -> None:
        self._history = history

    def _key(self, topic: str) -> str:
        return self.KEY_PREFIX + topic

    async def publish(self, topic: str, event: Event) -> str:
        """``XADD`` the event to the topic's capped stream; the stream id is its ``feed_id``."""
        with kv.redis_unavailable_as_503("the event feed"):
            entry_id = await kv.async_redis().xadd(self._key(topic), {self.FIELD: json.dumps(event, default=str)},
                                                   maxlen=self._history, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def check_feed_id(self, feed_id: str) -> str:
        """See :meth:`EventFeed.check_feed_id`: a Redis stream id, ``<ms>`` or ``<ms>-<seq>``."""
        return _checked_parts(feed_id, _REDIS_ID, "a Redis stream id <ms>-<seq> such as 1700000000000-0")

    async def subscribe(self, topic: str, *, replay: int = 0, after: str | None = None) -> AsyncIterator[Event]:
        """See :meth:`EventFeed.subscribe`; :class:`InvalidFeedId` for a malformed ``after``."""
        if after is not None:
            self.check_feed_id(after)
        client = kv.async_redis()
        key = self._key(topic)
        position = after if after is not None else "$"
        if after is None and replay > 0:
            newest_first: Any = await client.xrevrange(key, count=replay)
            for entry_id, fields in reversed(newest_first):
                yield self._decoded(entry_id, fields)
            if newest_first:
                position = _text(newest_first[0][0])
        elif after is None:
            position = await self._last_id(key)
        while True:
            answer: Any = await client.xread({key: position}, count=100, block=self.BLOCK_MS)
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    position = _text(entry_id)
                    yield self._decoded(entry_id, fields)

    async def _last_id(self, key: str) -> str:
        newest: Any = await kv.async_redis().xrevrange(key, count=1)
        return _text(newest[0][0]) if newest else "0-0"

    def _decoded(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
        event: Event = json.loads(fields[self.FIELD])
        event["feed_id"] = _text(entry_id)
        return event


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_feeds: dict[bool, EventFeed] = {}


def event_feed() -> EventFeed:
    """The process's feed: :class:`RedisFeed` when Redis is configured, else :class:`LocalFeed`."""
    use_redis = kv.redis_configured()
    feed = _feeds.get(use_redis)
    if feed is None:
        feed = _feeds[use_redis] = RedisFeed() if use_redis else LocalFeed()
    return feed


def reset_event_feeds() -> None:
    """Forget the process's feeds (tests switch settings between deployments)."""
    _feeds.clear()
