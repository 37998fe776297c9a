"""Event feeds: every subscriber of a topic gets its events in order, with a replay; topics are
walls; a stalled local subscriber is cut off instead of slowing the publisher; with Redis, a
subscriber on one replica gets what another replica publishes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from shared.feeds import EventFeed, FeedLagged, LocalFeed, RedisFeed, event_feed, reset_event_feeds
from tests.conftest import POSTGRESQL_REDIS, Stack


async def take(events: AsyncIterator[dict[str, object]], count: int, timeout_s: float = 5.0) -> list[dict[str, object]]:
    """The next ``count`` events of a subscription."""

    async def collect() -> list[dict[str, object]]:
        return [await anext(events) for _ in range(count)]

    return await asyncio.wait_for(collect(), timeout_s)


def fresh_topic() -> str:
    return f"test:{uuid.uuid4().hex}"


@pytest.fixture
def feed(stack: Stack) -> EventFeed:
    """The feed the process picks on each deployment: local on SQLite, Redis streams with Redis."""
    reset_event_feeds()
    chosen = event_feed()
    assert isinstance(chosen, RedisFeed if stack.redis_url else LocalFeed)
    return chosen


def test_every_subscriber_gets_new_events_in_order_and_only_its_topics(feed: EventFeed) -> None:
    topic, other = fresh_topic(), fresh_topic()

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        first, second = feed.subscribe(topic), feed.subscribe(topic)
        # a subscription starts when first awaited: start both before publishing
        pending = [asyncio.ensure_future(take(first, 3)), asyncio.ensure_future(take(second, 3))]
        await asyncio.sleep(0.2)
        await feed.publish(other, {"n": -1})
        for n in range(3):
            await feed.publish(topic, {"n": n})
        got_first, got_second = await asyncio.gather(*pending)
        return got_first, got_second

    got_first, got_second = asyncio.run(scenario())
    assert [event["n"] for event in got_first] == [0, 1, 2]
    assert got_first == got_second
    assert len({event["feed_id"] for event in got_first}) == 3


def test_a_late_subscriber_gets_a_replay_then_new_events(feed: EventFeed) -> None:
    topic = fresh_topic()

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        ids = [await feed.publish(topic, {"n": n}) for n in range(5)]
        replayed = await take(feed.subscribe(topic, replay=2), 2)
        late = feed.subscribe(topic, after=ids[2])
        missed = await take(late, 2)
        await feed.publish(topic, {"n": 5})
        return replayed, missed + await take(late, 1)

    replayed, resumed = asyncio.run(scenario())
    assert [event["n"] for event in replayed] == [3, 4]
    assert [event["n"] for event in resumed] == [3, 4, 5]


def test_a_stalled_local_subscriber_is_cut_off_and_the_publisher_never_waits() -> None:
    feed = LocalFeed(max_backlog=10)
    topic = fresh_topic()

    async def scenario() -> int:
        stalled = feed.subscribe(topic)
        first = asyncio.ensure_future(anext(stalled))
        await asyncio.sleep(0)
        for n in range(50):
            await feed.publish(topic, {"n": n})
        await first
        received = 1
        with pytest.raises(FeedLagged):
            while True:
                await anext(stalled)
                received += 1
        return received

    assert 1 < asyncio.run(scenario()) <= 11


@pytest.mark.stack_variants(POSTGRESQL_REDIS)
def test_a_subscriber_on_another_replica_gets_the_events(stack: Stack) -> None:
    publisher, subscriber = RedisFeed(), RedisFeed()  # two processes' feeds, one Redis
    topic = fresh_topic()

    async def scenario() -> list[dict[str, object]]:
        events = subscriber.subscribe(topic)
        pending = asyncio.ensure_future(take(events, 2))
        await asyncio.sleep(0.2)
        await publisher.publish(topic, {"text": "hello"})
        await publisher.publish(topic, {"text": "again"})
        return await pending

    assert [event["text"] for event in asyncio.run(scenario())] == ["hello", "again"]
