"""The MQTT readings subscriber against the real Mosquitto on loopback: payload decoding, batching,
the persistent session (messages published while it is down arrive when it is back) and
acknowledgement only after commit. The database end to end is in ``test_mqtt_ingest.py``.

Each test publishes under its own topic prefix (and so its own client id): two xdist workers share
the broker.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from services.iiot.mqtt_io import (
    AssetLocations,
    MqttSubscriber,
    PayloadRefused,
    ReadingsTopic,
    RiskMessage,
    RiskTopic,
    SubscriberConfig,
    decode_readings,
    parse_broker_url,
    parse_topic,
    readings_topic,
    subscriptions,
)
from tests.iiot.mqtt_support import BROKER_URL, Publisher, require_broker
from tests.support import wait_until


@dataclass
class Outcome:
    kept: int
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class RecordingSink:
    """Stands in for the validation path: records what the subscriber hands it; can fail on demand."""

    def __init__(self, *, failing: bool = False) -> None:
        self.failing = failing
        self.attempts = 0
        self.rows: list[dict[str, Any]] = []
        self.quarantined: list[tuple[str, str, str, str]] = []
        self.lock = threading.Lock()

    def accept_readings(self, tenant_id: str, rows: list[dict[str, Any]], *, source: str,
                        raw: list[str] | None = None) -> Outcome:
        with self.lock:
            self.attempts += 1
            if self.failing:
                raise ConnectionError("the database is down (simulated)")
            assert source == "mqtt"
            self.rows.extend({**row, "tenant": tenant_id} for row in rows)
        return Outcome(kept=len(rows))

    def quarantine_raw(self, tenant_id: str, source: str, reason: str, detail: str, raw: str) -> None:
        with self.lock:
            self.quarantined.append((tenant_id, reason, detail, raw))


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test alone."""
    require_broker()
    return f"tessera-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    require_broker()
    with Publisher.connected() as client:
        yield client


REGISTRY = {"a1": ("p1", "l1"), "a2": ("p1", "l2")}
"""Where the stand-in registry puts assets (any other asset is unknown: left to validation)."""


def running(prefix: str, sink: RecordingSink) -> MqttSubscriber:
    locations = AssetLocations(lambda _tenant, assets: {asset: REGISTRY[asset] for asset in assets & set(REGISTRY)})
    subscriber = MqttSubscriber(SubscriberConfig(url=BROKER_URL, prefix=prefix, flush_interval_s=0.05), sink=sink,
                                locations=locations)
    subscriber.start()
    assert subscriber.subscribed.wait(10), "the subscriber did not subscribe"
    return subscriber


def reading(sensor: str, minute: int, value: float) -> dict[str, Any]:
    return {"sensor": sensor, "timestamp": f"2026-01-01T00:{minute:02d}:00+00:00", "value": value}


# --- decoding (no broker) -----------------------------------------------------------------------------

def test_topics_address_readings_of_an_asset_or_its_edge_risk() -> None:
    assert parse_topic("p/x", "p/x/t1/plant/line/a1") == ReadingsTopic("t1", "plant", "line", "a1")
    assert parse_topic("p/x", "p/x/t1/risk/a1") == RiskTopic("t1", "a1")
    assert parse_topic("p/x", "p/x/t1/plant/line") is None
    assert parse_topic("p/x", "other/t1/plant/line/a1") is None
    assert parse_broker_url("mqtt://u:p%40ss@broker:1884").password == "p@ss"
    assert parse_broker_url("mqtts://broker").port == 8883
    with pytest.raises(ValueError):
        parse_broker_url("http://broker")


def test_replicas_in_a_share_group_subscribe_to_shared_filters() -> None:
    assert subscriptions("p/x") == ["p/x/+/+/+/+", "p/x/+/risk/+"]
    assert subscriptions("p/x", "ingest") == ["$share/ingest/p/x/+/+/+/+", "$share/ingest/p/x/+/risk/+"]


@pytest.mark.parametrize("payload", [
    reading("temp", 1, 20.5),
    [reading("temp", 1, 20.5), reading("temp", 2, 21.0)],
    {"readings": [reading("temp", 1, 20.5)]},
])
def test_a_reading_a_list_or_a_readings_object_decode_to_rows_of_the_topics_asset(payload: Any) -> None:
    decoded = decode_readings(json.dumps(payload).encode(), "a1")
    assert decoded.rows and all(row["asset"] == "a1" and row["sensor"] == "temp" for row in decoded.rows)
    assert not decoded.refused


def test_payloads_that_are_not_readings_are_refused_with_a_reason() -> None:
    for payload, reason in ((b"\xff\xfe not json", "payload_not_json"), (b'{"hello": 1}', "payload_not_json"),
                            (b"42", "payload_not_json"), (b"[" + b" " * (1 << 20) + b"]", "line_too_long")):
        with pytest.raises(PayloadRefused) as refused:
            decode_readings(payload, "a1")
        assert refused.value.reason == reason
    decoded = decode_readings(json.dumps([reading("temp", 1, 1.0), {**reading("temp", 2, 2.0), "asset": "a2"},
                                          "text"]).encode(), "a1")
    assert len(decoded.rows) == 1
    assert [refusal.reason for refusal in decoded.refused] == ["malformed_row", "malformed_row"]
    assert "'a2'" in decoded.refused[0].detail


def test_risk_messages_round_trip_and_bad_ones_are_refused() -> None:
    message = RiskMessage("a1", 0.25, 130.0, datetime(2026, 1, 2, 3, tzinfo=UTC), "edge-v1")
    assert RiskMessage.from_payload(message.to_payload(), "a1") == message
    for bad in ({"p_failure": 1.5, "window_end": "2026-01-01T00:00:00+00:00"},
                {"p_failure": 0.5, "window_end": "2026-01-01T00:00:00"},
                {"p_failure": 0.5, "window_end": "2026-01-01T00:00:00+00:00", "tier": "cloud"}):
        with pytest.raises(PayloadRefused):
            RiskMessage.from_payload(json.dumps(bad).encode(), "a1")


# --- against Mosquitto --------------------------------------------------------------------------------

def test_readings_published_by_a_client_reach_the_sink_and_a_bad_payload_stops_nothing(
        prefix: str, publisher: Publisher) -> None:
    sink = RecordingSink()
    subscriber = running(prefix, sink)
    try:
        topic = readings_topic(prefix, "t1", "p1", "l1", "a1")
        publisher.publish(topic, json.dumps([reading("temp", 1, 20.0), reading("temp", 2, 21.0)]))
        publisher.publish(topic, b"this is not json")
        publisher.publish(topic, json.dumps({"readings": [reading("temp", 3, 22.0)]}))
        # a2 sits on line l2: readings published under l1 are refused, not filed under the wrong line
        publisher.publish(readings_topic(prefix, "t1", "p1", "l1", "a2"), json.dumps(reading("temp", 4, 23.0)))
        wait_until(lambda: len(sink.rows) == 3 and len(sink.quarantined) == 2, 10, "3 readings and 2 refusals")
    finally:
        subscriber.stop()
    assert [row["value"] for row in sink.rows] == [20.0, 21.0, 22.0]
    assert {(row["tenant"], row["asset"]) for row in sink.rows} == {("t1", "a1")}
    refusals = {reason: (tenant, raw, detail) for tenant, reason, detail, raw in sink.quarantined}
    assert refusals["payload_not_json"][:2] == ("t1", "this is not json")
    assert "line 'l2'" in refusals["unknown_asset"][2]
    assert subscriber.stats.messages == 4 and subscriber.stats.readings == 3


def test_messages_published_while_the_subscriber_is_down_arrive_when_it_is_back(
        prefix: str, publisher: Publisher) -> None:
    running(prefix, RecordingSink()).stop()  # the broker now keeps a session for its client id
    topic = readings_topic(prefix, "t1", "p1", "l1", "a1")
    for minute in range(5):
        publisher.publish(topic, json.dumps(reading("temp", minute, float(minute))))
    sink = RecordingSink()
    subscriber = running(prefix, sink)
    try:
        wait_until(lambda: len(sink.rows) == 5, 10, "the 5 readings published while it was down")
    finally:
        subscriber.stop()


def test_a_batch_that_could_not_be_committed_is_not_acknowledged_and_is_delivered_again(
        prefix: str, publisher: Publisher) -> None:
    failing = RecordingSink(failing=True)
    subscriber = running(prefix, failing)
    topic = readings_topic(prefix, "t1", "p1", "l1", "a1")
    publisher.publish(topic, json.dumps([reading("temp", 1, 1.0), reading("temp", 2, 2.0)]))
    wait_until(lambda: failing.attempts >= 1, 10, "a commit attempt")
    subscriber.stop()  # gives up on the batch: it stays unacknowledged
    assert subscriber.stats.flush_failures >= 1
    sink = RecordingSink()
    subscriber = running(prefix, sink)
    try:
        wait_until(lambda: len(sink.rows) == 2, 10, "the uncommitted readings delivered again")
    finally:
        subscriber.stop()


def test_tessera_up_starts_the_subscriber_only_when_an_mqtt_url_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.cli import listener_commands
    from shared.config import get_settings

    assert "iiot:mqtt" not in dict(listener_commands())
    monkeypatch.setenv("TESSERA_IIOT_MQTT_URL", BROKER_URL)
    get_settings.cache_clear()
    assert dict(listener_commands())["iiot:mqtt"][-3:] == ["listen", "iiot", "mqtt"]
