"""MQTT readings/s for ``bench/iiot.py`` (section 2): a paho publisher, Mosquitto, two subscribers.

- ``tessera``: H6's :class:`services.iiot.mqtt_io.MqttSubscriber` (QoS 1, persistent session,
  manual acks after each batch is committed) feeding H1's validation path into a fresh seeded
  database; done when the subscriber has counted every published reading as kept or quarantined.
- ``raw``: a plain paho subscriber at QoS 1 that only ``json.loads`` each payload and counts its
  readings: the broker + client + JSON ceiling on this box (no validation, no database).

The subscriber runs in its own process (``bench/iiot.py point mqtt``) so the publisher, in the
parent, does not share its interpreter; it prints ``ready`` once subscribed, and its JSON (readings
counted, seconds from the first message received to the last reading committed, CPU, peak RSS) at
the end. Readings are simulated (:func:`payloads`) for the sensors of the bench's simulated fleet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench._iiot_data import START, TENANT
from bench._measure import peak_rss_mb

Registry = dict[str, list[dict[str, Any]]]

PUBLISH_INFLIGHT = 1000
WINDOW_MESSAGES = 800
"""Messages the publisher lets be ahead of the subscriber's progress (under Mosquitto's default
per-client queue of 1,000, beyond which it drops QoS 1 messages for a slow subscriber). A closed
loop: readings/s is what the subscriber sustains, not what a flood loses."""


def payloads(registry: Registry, readings: int, batch: int) -> Iterator[tuple[str, str, str, bytes]]:
    """(plant_id, line_id, asset_id, JSON payload) of ``readings`` readings in messages of ``batch``.

    Per asset, its sensors one minute step after the other (values inside their expected range),
    in messages of ``batch`` readings; assets interleaved message by message.
    """
    plant_of = {line["line_id"]: line["plant_id"] for line in registry["lines"]}
    assets = registry["assets"]
    sensors = {asset["asset_id"]: [s for s in registry["sensors"] if s["asset_id"] == asset["asset_id"]]
               for asset in assets}
    per_asset = -(-readings // len(assets))
    sent = 0
    for message in range(-(-per_asset // batch)):
        for asset in assets:
            own = sensors[asset["asset_id"]]
            rows = []
            for index in range(message * batch, min((message + 1) * batch, per_asset)):
                if sent >= readings:
                    break
                sensor = own[index % len(own)]
                at = START + timedelta(minutes=index // len(own))
                span = sensor["max_value"] - sensor["min_value"]
                rows.append({"sensor": sensor["sensor_id"], "timestamp": at.isoformat().replace("+00:00", "Z"),
                             "value": round(sensor["min_value"] + span * (0.4 + 0.01 * (index % 7)), 3),
                             "unit": sensor["unit"]})
                sent += 1
            if rows:
                yield (plant_of[asset["line_id"]], asset["line_id"], asset["asset_id"],
                       json.dumps({"readings": rows}).encode())


def publish_all(host: str, port: int, prefix: str, registry: Registry, readings: int, batch: int,
                progress: Path) -> dict[str, Any]:
    """Publish the bench readings at QoS 1, at most :data:`WINDOW_MESSAGES` ahead of the subscriber's
    progress (readings done, in ``progress``); returns messages and seconds."""
    from services.iiot.mqtt_io import new_client, readings_topic

    client = new_client(f"tessera-bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(PUBLISH_INFLIGHT)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    try:
        started = time.perf_counter()
        infos: list[Any] = []
        for plant, line, asset, body in payloads(registry, readings, batch):
            while len(infos) - _done(progress) // batch > WINDOW_MESSAGES:
                time.sleep(0.001)
            infos.append(client.publish(readings_topic(prefix, TENANT, plant, line, asset), body, qos=1))
        for info in infos:
            info.wait_for_publish(timeout=60)
        return {"messages": len(infos), "publish_s": time.perf_counter() - started}
    finally:
        client.disconnect()
        client.loop_stop()


def _done(progress: Path) -> int:
    """The subscriber's readings done so far, as it last wrote them (0 before it has)."""
    try:
        return int(progress.read_text() or 0)
    except (OSError, ValueError):
        return 0


def subscriber_point(kind: str, broker: str, prefix: str, expected: int, timeout_s: float,
                     progress: Path) -> dict[str, Any]:
    """Run one subscriber until it has counted ``expected`` readings (``point mqtt``; see the module doc);
    its progress (readings done) is written to ``progress`` for the publisher's window."""
    watch = _raw_subscriber(broker, prefix) if kind == "raw" else _tessera_subscriber(broker, prefix)
    print("ready", flush=True)
    first: float | None = None
    deadline = time.monotonic() + timeout_s
    cpu_before = time.process_time()
    written = -1
    polled_at = time.perf_counter()  # the last poll that saw nothing received yet
    try:
        while time.monotonic() < deadline and (done := watch.done()) < expected:
            if first is None and watch.received():
                first = polled_at  # the first message came after the poll before this one
            if done != written:
                progress.write_text(str(done))
                written = done
            if first is None:
                polled_at = time.perf_counter()
            time.sleep(0.002)
        last = time.perf_counter()
        if first is None:  # every reading arrived between two polls (a small run on a busy box)
            first = polled_at
        return {"readings": watch.done(), "expected": expected, "seconds": last - first,
                "cpu_s": time.process_time() - cpu_before, "peak_rss_mb": peak_rss_mb(),
                "timed_out": watch.done() < expected}
    finally:
        watch.stop()


@dataclass(frozen=True)
class Watch:
    """A running subscriber: messages received so far, readings done (counted / committed), stop."""

    received: Callable[[], int]
    done: Callable[[], int]
    stop: Callable[[], None]



def _raw_subscriber(broker: str, prefix: str) -> Watch:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from services.iiot.mqtt_io import SubscriberConfig, new_client, parse_broker_url

    address = parse_broker_url(broker)
    count, messages = [0], [0]
    subscribed = threading.Event()
    client = new_client(f"tessera-bench-raw-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/+/+/+/+", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        messages[0] += 1
        count[0] += len(json.loads(message.payload)["readings"])

    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)
    properties.ReceiveMaximum = SubscriberConfig(url=broker, prefix=prefix).receive_maximum  # as Tessera's
    client.connect(address.host, address.port, properties=properties)
    client.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError("the raw subscriber did not subscribe")

    def stop() -> None:
        client.disconnect()
        client.loop_stop()

    return Watch(received=lambda: messages[0], done=lambda: count[0], stop=stop)


def _tessera_subscriber(broker: str, prefix: str) -> Watch:
    from services.iiot.mqtt_io import MqttSubscriber, SubscriberConfig

    subscriber = MqttSubscriber(SubscriberConfig(url=broker, prefix=prefix,
                                                 client_id=f"tessera-bench-{uuid.uuid4().hex[:8]}"))
    subscriber.start()
    if not subscriber.subscribed.wait(10):
        raise RuntimeError("the Tessera subscriber did not subscribe")

    return Watch(received=lambda: subscriber.stats.messages,
                 done=lambda: subscriber.stats.kept + subscriber.stats.quarantined, stop=subscriber.stop)


def run_mqtt_point(kind: str, broker: str, registry: Registry, readings: int, batch: int, env: dict[str, str],
                   workdir: Path, timeout_s: float) -> dict[str, Any]:
    """One subscriber way in a subprocess, the publisher here; the subscriber's figures plus the publisher's."""
    prefix = f"tessera-bench/{uuid.uuid4().hex[:8]}"
    progress = workdir / f"progress-{kind}-{batch}"
    progress.write_text("0")
    argv = [sys.executable, str(Path(__file__).resolve().parent / "iiot.py"), "point", "mqtt", "--way", kind,
            "--broker", broker, "--prefix", prefix, "--rows", str(readings), "--timeout", str(timeout_s),
            "--progress", str(progress)]
    process = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], env={**os.environ, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            process.kill()
            raise RuntimeError(f"the {kind} subscriber did not start: {process.communicate()[1][-1500:]}")
        host, port = broker.removeprefix("mqtt://").split(":")
        published = publish_all(host, int(port), prefix, registry, readings, batch, progress)
        out, err = process.communicate(timeout=timeout_s + 30)
    finally:
        if process.poll() is None:
            process.kill()
    if process.returncode != 0:
        raise RuntimeError(f"the {kind} subscriber failed: {err[-1500:]}")
    point: dict[str, Any] = {**json.loads(out.strip().splitlines()[-1]), **published, "batch": batch}
    point["readings_per_s"] = point["readings"] / point["seconds"] if point["seconds"] > 0 else None
    return point
