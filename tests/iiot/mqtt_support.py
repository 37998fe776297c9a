"""Helpers of the MQTT and edge tests: the loopback Mosquitto, a publishing client, a collecting one."""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt

from services.iiot.mqtt_io import new_client, parse_broker_url, start_client, stop_client
from tests.conftest import require_listening

BROKER_URL = "mqtt://127.0.0.1:1883"


def require_broker() -> None:
    """Skip (fail under CI) unless Mosquitto listens on loopback."""
    require_listening("Mosquitto", BROKER_URL, 1883)


class Publisher:
    """A paho client publishing at QoS 1 and waiting for each PUBACK."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client

    @classmethod
    @contextlib.contextmanager
    def connected(cls, port: int = 1883) -> Iterator[Publisher]:
        """A publisher connected to the loopback broker on ``port``."""
        client = new_client(f"tessera-test-pub-{uuid.uuid4().hex[:12]}")
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            yield cls(client)
        finally:
            client.disconnect()
            client.loop_stop()

    def publish(self, topic: str, payload: str | bytes) -> None:
        """Publish at QoS 1; return once the broker has it."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"the broker did not acknowledge a message on {topic}"


class Collector:
    """A paho client subscribed to one filter, keeping every JSON message it receives."""

    def __init__(self, topic_filter: str) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.subscribed = threading.Event()
        self.client = new_client(f"tessera-test-sub-{uuid.uuid4().hex[:12]}")
        self.client.on_connect = lambda client, *_: client.subscribe(topic_filter, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _client, _userdata, message: self.messages.append(
            (message.topic, json.loads(message.payload)))

    @classmethod
    @contextlib.contextmanager
    def on(cls, topic_filter: str, url: str = BROKER_URL, *, persistent: bool = False) -> Iterator[Collector]:
        """Subscribed on the broker at ``url`` (``persistent``: its session outlives a broker restart)."""
        collector = cls(topic_filter)
        start_client(collector.client, parse_broker_url(url), persistent=persistent)
        try:
            assert collector.subscribed.wait(10), "the collector did not subscribe"
            yield collector
        finally:
            stop_client(collector.client)
