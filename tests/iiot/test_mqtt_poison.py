"""Poison messages on the MQTT topics (found by a fuzzer): a reading or risk message the validation
path cannot even hold is quarantined once with its reason, and the subscriber reads on: the valid
reading published after it is stored. Against the real listener process, Mosquitto and the database
(as ``test_mqtt_ingest.py``); the in-process subscriber for a commit that fails for good.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.iiot.mqtt_io import AssetLocations, MqttSubscriber, SubscriberConfig, readings_topic, risk_topic
from tests.iiot.mqtt_support import BROKER_URL, Publisher, require_broker
from tests.iiot.test_mqtt_ingest import (  # noqa: F401  (listener: a fixture)
    add_registry,
    listener,
    quarantine_reasons,
    reading,
    stored_values,
)
from tests.support import ManagedProcess, wait_until

GOOD = 21.5
VALID_TS = (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=1)).isoformat()

POISONS: dict[str, tuple[dict[str, Any], str]] = {
    "sensor_object": ({"sensor": {"a": 1}}, "malformed_row"),
    "sensor_list": ({"sensor": ["temp"]}, "malformed_row"),
    "unit_object": ({"unit": {"u": 1}}, "malformed_row"),
    "unit_list": ({"unit": ["degC"]}, "malformed_row"),
    "timestamp_object": ({"timestamp": {"x": 1}}, "bad_timestamp"),
    "timestamp_list": ({"timestamp": [1]}, "bad_timestamp"),
    "timestamp_true": ({"timestamp": True}, "bad_timestamp"),
    "timestamp_year_1": ({"timestamp": "0001-01-01T00:00:00+14:00"}, "bad_timestamp"),
    "value_beyond_64_bits": ({"value": 18446744073709551615}, "out_of_range"),
    "sensor_nul": ({"sensor": "te\u0000mp"}, "malformed_row"),
    "unit_control_character": ({"unit": "deg\u0007C"}, "malformed_row"),
}


def quarantined_once(tenant: str, reasons: dict[str, int]) -> None:
    """Wait for the valid reading and ``reasons``; then check no retry quarantines anything again."""
    wait_until(lambda: stored_values(tenant) == [GOOD] and quarantine_reasons(tenant) == reasons, 30,
               f"the valid reading stored and {reasons} quarantined")
    threading.Event().wait(2.0)  # a retried commit would quarantine again by now (first backoff 0.5 s)
    assert quarantine_reasons(tenant) == reasons
    assert stored_values(tenant) == [GOOD]


@pytest.mark.parametrize("name", sorted(POISONS))
def test_a_poison_reading_is_quarantined_once_and_the_next_reading_stored(
        listener: tuple[str, ManagedProcess], name: str) -> None:  # noqa: F811
    prefix, process = listener
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    add_registry(tenant)
    topic = readings_topic(prefix, tenant, "p1", "l1", "a1")
    fields, reason = POISONS[name]
    with Publisher.connected() as publisher:
        publisher.publish(topic, json.dumps({**reading("temp", 0, 20.0), **fields}))
        publisher.publish(topic, b"{not json")
        publisher.publish(topic, json.dumps(reading("temp", 1, GOOD)))
        quarantined_once(tenant, {reason: 1, "payload_not_json": 1})
    assert process.process.poll() is None, "the listener died"


def test_a_risk_message_beyond_year_1_is_quarantined_and_readings_go_on(
        listener: tuple[str, ManagedProcess]) -> None:  # noqa: F811
    prefix, _process = listener
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    add_registry(tenant)
    risk = {"asset": "a1", "p_failure": 0.4, "rul_hours": 9.0, "window_end": "0001-01-01T00:00:00+14:00",
            "tier": "edge"}
    with Publisher.connected() as publisher:
        publisher.publish(risk_topic(prefix, tenant, "a1"), json.dumps(risk))
        publisher.publish(readings_topic(prefix, tenant, "p1", "l1", "a1"), json.dumps(reading("temp", 1, GOOD)))
        quarantined_once(tenant, {"malformed_row": 1})


class PoisonSink:
    """The validation path, but one reading (value 666) fails its commit for good, as a bug would."""

    def __init__(self) -> None:
        self.attempts = 0
        self.rows: list[dict[str, Any]] = []
        self.quarantined: list[tuple[str, str, str]] = []

    def accept_readings(self, tenant_id: str, rows: list[dict[str, Any]], *, source: str,
                        raw: list[str] | None = None) -> Any:
        """Keep ``rows`` unless one holds the poison value."""
        self.attempts += 1
        if any(row["value"] == 666 for row in rows):
            raise TypeError("unhashable type: 'dict' (simulated)")
        self.rows.extend(rows)
        return type("Outcome", (), {"kept": len(rows), "quarantined": 0})()

    def quarantine_raw(self, tenant_id: str, source: str, reason: str, detail: str, raw: str) -> None:
        """Record the refusal."""
        self.quarantined.append((reason, detail, raw))


def test_a_commit_that_fails_for_good_quarantines_its_message_once_and_keeps_the_others() -> None:
    require_broker()
    prefix = f"tessera-test/{uuid.uuid4().hex[:12]}"
    sink = PoisonSink()
    subscriber = MqttSubscriber(SubscriberConfig(url=BROKER_URL, prefix=prefix, flush_interval_s=0.3), sink=sink,
                                locations=AssetLocations(lambda _tenant, assets: {a: ("p1", "l1") for a in assets}))
    subscriber.start()
    try:
        assert subscriber.subscribed.wait(10), "the subscriber did not subscribe"
        topic = readings_topic(prefix, "t1", "p1", "l1", "a1")
        with Publisher.connected() as publisher:
            publisher.publish(topic, json.dumps(reading("temp", 1, 1.0)))
            publisher.publish(topic, b"{not json")
            publisher.publish(topic, json.dumps(reading("temp", 2, 666)))
            publisher.publish(topic, json.dumps(reading("temp", 3, 3.0)))
            wait_until(lambda: len(sink.rows) == 2 and len(sink.quarantined) == 2, 10, "2 kept, 2 quarantined")
        threading.Event().wait(1.5)
    finally:
        subscriber.stop()
    assert [row["value"] for row in sink.rows] == [1.0, 3.0]
    assert sorted(reason for reason, _detail, _raw in sink.quarantined) == ["malformed_row", "payload_not_json"]
    stored_for_good = next(item for item in sink.quarantined if item[0] == "malformed_row")
    assert stored_for_good[1].startswith("could not be stored: TypeError") and "666" in stored_for_good[2]
    assert subscriber.stats.flush_failures == 0
