"""``tessera edge iiot``: a standalone gateway that scores its assets' windows on the device.

It subscribes to the readings on a LOCAL broker (``<local-prefix>/<tenant>/<plant>/<line>/<asset>``,
the payloads the cloud subscriber takes, see :mod:`services.iiot.mqtt_io`), keeps a rolling
window of each sensor in memory, and every ``--every-s`` seconds scores each asset that has new
readings with the tiny edge ONNX model (``models/iiot/edge/<version>``), served by the shared
runtime (:class:`model_runtime.ModelRuntime`, ONNX Runtime on one thread) on the window that
:func:`services.iiot.features.window_tensor` builds, the same input the cloud model gets. Each
score is published upstream at QoS 1 on ``<upstream-prefix>/<tenant>/risk/<asset>``
(:class:`~services.iiot.mqtt_io.RiskMessage`: p_failure, rul_hours, window_end, model version,
tier ``edge``), where the cloud subscriber stores it as a tier-``edge`` risk score and the fog
step aggregates it per line.

Both connections reconnect on their own (1–30 s backoff) with persistent sessions: readings
published on the local broker while the gateway was away from it are delivered when it is back,
and risk published while the upstream broker is unreachable is queued by the client and sent
once it answers. What the gateway knows comes from ``--registry``: the JSON a registry upsert
takes (``simulate.registry_payload()``: plants, lines, assets, sensors with quantity, unit and
expected range). A reading of a sensor it does not know, in a unit it cannot convert, or with a
value that is not a finite number is dropped and counted (the gateway keeps no quarantine: the
cloud validates the readings it receives itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import pandas as pd
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from services.iiot.limits import EARLIEST_READING, MAX_ABS_VALUE, MAX_FUTURE
from services.iiot.mqtt_io import (
    PayloadRefused,
    ReadingsTopic,
    RiskMessage,
    decode_readings,
    new_client,
    parse_broker_url,
    parse_topic,
    risk_topic,
    start_client,
    stop_client,
)
from shared.times import as_utc

logger = logging.getLogger("tessera.iiot.edge")

EDGE_MODEL_NAME = "iiot-edge"
UPSTREAM_QUEUE = 100_000
"""Risk messages the gateway holds while upstream is unreachable (about 30 MB); newer ones are dropped, said so."""


# --- the gateway's registry --------------------------------------------------------------------------

@dataclass(frozen=True)
class EdgeSensor:
    """A sensor the gateway reads (attribute names as :class:`services.iiot.db.Sensor`'s, which
    :func:`~services.iiot.features.window_tensor` reads); ``id`` is local to the gateway."""

    id: int
    asset_id: str
    sensor_id: str
    quantity: str | None
    unit: str
    min_value: float | None
    max_value: float | None
    sampling_interval_s: float | None
    timezone: str = "UTC"


@dataclass(frozen=True)
class GatewayRegistry:
    """The assets and sensors behind this gateway (``--registry``)."""

    sensors: dict[tuple[str, str], EdgeSensor]

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> GatewayRegistry:
        """From a registry upsert document ``{"plants", "lines", "assets", "sensors"}``."""
        zones = {plant["plant_id"]: plant.get("timezone") or "UTC" for plant in payload.get("plants", [])}
        line_zones = {line["line_id"]: zones.get(line.get("plant_id"), "UTC") for line in payload.get("lines", [])}
        asset_zones = {asset["asset_id"]: line_zones.get(asset.get("line_id"), "UTC")
                       for asset in payload.get("assets", [])}
        sensors = {}
        for index, entry in enumerate(payload.get("sensors", [])):
            sensor = EdgeSensor(id=index + 1, asset_id=str(entry["asset_id"]), sensor_id=str(entry["sensor_id"]),
                                quantity=entry.get("quantity"), unit=str(entry["unit"]),
                                min_value=entry.get("min_value"), max_value=entry.get("max_value"),
                                sampling_interval_s=entry.get("sampling_interval_s"),
                                timezone=asset_zones.get(str(entry["asset_id"]), "UTC"))
            sensors[(sensor.asset_id, sensor.sensor_id)] = sensor
        if not sensors:
            raise ValueError("the registry names no sensors")
        return cls(sensors)

    @classmethod
    def read(cls, path: Path) -> GatewayRegistry:
        """The registry in a JSON file."""
        return cls.from_payload(json.loads(path.read_text()))

    @property
    def assets(self) -> list[str]:
        """Every asset id, sorted."""
        return sorted({asset for asset, _sensor in self.sensors})

    def sensors_of(self, asset_id: str) -> list[EdgeSensor]:
        """The sensors of one asset, in registry order."""
        return [sensor for (asset, _), sensor in self.sensors.items() if asset == asset_id]


# --- rolling windows ---------------------------------------------------------------------------------

@dataclass
class _SensorSeries:
    times_s: deque[float] = field(default_factory=deque)
    values: deque[float] = field(default_factory=deque)


class RollingWindows:
    """The last ``hours`` of every sensor's readings, in memory; thread-safe.

    Readings are converted to the sensor's canonical unit on arrival; each series is trimmed to
    ``hours`` before its newest reading.
    """

    def __init__(self, registry: GatewayRegistry, hours: float) -> None:
        self.registry = registry
        self.span_s = hours * 3600.0
        self.dropped: Counter[str] = Counter()
        self._series = {sensor.id: _SensorSeries() for sensor in registry.sensors.values()}
        self._newest: dict[str, float] = {}
        self._scored: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, asset_id: str, rows: Sequence[dict[str, Any]]) -> int:
        """Take the readings of one asset; answers how many were kept (the rest counted in ``dropped``)."""
        parsed = [(sensor, moment, value) for row in rows if (reading := self._parse(asset_id, row)) is not None
                  for sensor, moment, value in [reading]]
        with self._lock:
            for sensor, moment, value in parsed:
                series = self._series[sensor.id]
                series.times_s.append(moment)
                series.values.append(value)
                self._newest[asset_id] = max(self._newest.get(asset_id, moment), moment)
                self._trim(series, self._newest[asset_id])
        return len(parsed)

    def _trim(self, series: _SensorSeries, newest_s: float) -> None:
        while series.times_s and series.times_s[0] <= newest_s - self.span_s:
            series.times_s.popleft()
            series.values.popleft()

    def _parse(self, asset_id: str, row: dict[str, Any]) -> tuple[EdgeSensor, float, float] | None:
        sensor = self.registry.sensors.get((asset_id, str(row.get("sensor"))))
        if sensor is None:
            self.dropped["unknown_sensor"] += 1
            return None
        try:
            moment = datetime.fromisoformat(str(row.get("timestamp")))
        except ValueError:
            self.dropped["bad_timestamp"] += 1
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=ZoneInfo(sensor.timezone))
        utc = as_utc(moment)
        if utc is None or not EARLIEST_READING <= utc <= datetime.now(UTC) + MAX_FUTURE:
            self.dropped["bad_timestamp"] += 1  # the server's bounds (services.iiot.limits)
            return None
        value = _canonical_value(row.get("value"), row.get("unit"), sensor.unit)
        if isinstance(value, str):
            self.dropped[value] += 1
            return None
        if abs(value) > MAX_ABS_VALUE:
            self.dropped["out_of_range"] += 1
            return None
        return sensor, utc.timestamp(), value

    def due(self) -> list[str]:
        """Assets with readings newer than their last score."""
        with self._lock:
            return [asset for asset, newest in self._newest.items() if newest > self._scored.get(asset, -math.inf)]

    def frame(self, asset_id: str) -> tuple[pd.DataFrame, datetime]:
        """The asset's window as ``DataFrame[sensor_pk, ts, value]`` (ts UTC, sorted) and its newest time;
        marks the asset scored up to that time."""
        with self._lock:
            newest = self._newest[asset_id]
            parts = [(sensor.id, np.array(series.times_s), np.array(series.values))
                     for sensor in self.registry.sensors_of(asset_id)
                     if (series := self._series[sensor.id]).times_s]
            self._scored[asset_id] = newest
        frame = pd.DataFrame({
            "sensor_pk": np.concatenate([np.full(len(times), pk) for pk, times, _ in parts]),
            "ts": pd.to_datetime(np.concatenate([times for _, times, _ in parts]), unit="s", utc=True),
            "value": np.concatenate([values for _, _, values in parts]),
        }).sort_values(["sensor_pk", "ts"], kind="stable", ignore_index=True)
        return frame, datetime.fromtimestamp(newest, UTC)


def _canonical_value(value: Any, unit: Any, canonical: str) -> float | str:
    """The value in the sensor's unit, or the reason it cannot be used."""
    from services.iiot.units import UnitError, converter

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "not_a_number"
    if unit is None or unit == canonical:
        return float(value)
    try:
        converted = float(converter(str(unit), canonical)(np.array([float(value)]))[0])
    except UnitError:
        return "unknown_unit"
    return converted if math.isfinite(converted) else "not_a_number"


# --- scoring on the device ---------------------------------------------------------------------------

class EdgeScorer:
    """The edge model in a runtime of its own: ONNX Runtime, one thread."""

    def __init__(self, model_dir: Path) -> None:
        from model_runtime import ModelRuntime
        from services.iiot.model import read_config, risk_model_spec

        self.config = read_config(model_dir)
        self.runtime = ModelRuntime()
        self.runtime.load_sync(risk_model_spec(model_dir, name=EDGE_MODEL_NAME, tier="edge", backend="onnx",
                                               threads=1))
        self.version = self.runtime.version(EDGE_MODEL_NAME)

    @property
    def window_hours(self) -> float:
        """The span of the model's window."""
        return self.config.window * self.config.step_hours

    def score(self, windows: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]) -> list[Any]:
        """One :class:`~services.iiot.model.RiskResult` (or the exception that failed it) per window."""
        from services.iiot.model import RiskRequest

        return self.runtime.predict_many_sync(EDGE_MODEL_NAME, [RiskRequest(x, mask) for x, mask in windows],
                                              return_exceptions=True)

    def close(self) -> None:
        """Stop serving."""
        self.runtime.close_sync()


def build_window(frame: pd.DataFrame, sensors: Sequence[EdgeSensor], end: datetime, hours: float,
                 step_h: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The model's input for one asset: :func:`services.iiot.features.window_tensor`, as the cloud builds it."""
    from services.iiot.features import window_tensor

    window: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] = window_tensor(
        frame, sensors, end, hours=hours, step_h=step_h)
    return window


# --- the gateway ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EdgeConfig:
    """What ``tessera edge iiot`` was asked to do (see :func:`main`)."""

    local_url: str
    upstream_url: str
    tenant_id: str
    registry_path: Path
    model_dir: Path
    every_s: float = 60.0
    local_prefix: str = "tessera/iiot"
    upstream_prefix: str = "tessera/iiot"
    client_id: str = ""

    @property
    def gateway_id(self) -> str:
        """The client id both connections derive theirs from (fixed, so sessions persist)."""
        return self.client_id or f"tessera-edge-{self.tenant_id}"


class EdgeGateway:
    """Reads local readings, scores due assets on the device, publishes risk upstream."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.registry = GatewayRegistry.read(config.registry_path)
        self.scorer = EdgeScorer(config.model_dir)
        self.windows = RollingWindows(self.registry, self.scorer.window_hours)
        self.published = 0
        self.received = 0
        self._local = new_client(f"{config.gateway_id}-local")
        self._local.on_connect = self._on_local_connect
        self._local.on_message = self._on_local_message
        self._upstream = new_client(f"{config.gateway_id}-upstream")
        self._upstream.max_queued_messages_set(UPSTREAM_QUEUE)
        self._upstream.on_connect = _log_connection("upstream")
        self._local.on_disconnect = _log_disconnection("local")
        self._upstream.on_disconnect = _log_disconnection("upstream")

    def start(self) -> None:
        """Connect to both brokers (in the background; both retry until they answer)."""
        start_client(self._local, parse_broker_url(self.config.local_url), persistent=True)
        start_client(self._upstream, parse_broker_url(self.config.upstream_url), persistent=True)
        logger.info("edge: gateway of tenant %s: %d assets, edge model %s, scoring every %.1f s",
                    self.config.tenant_id, len(self.registry.assets), self.scorer.version, self.config.every_s)

    def stop(self) -> None:
        """Disconnect from both brokers and stop the model."""
        stop_client(self._local)
        stop_client(self._upstream)
        self.scorer.close()

    def _on_local_connect(self, client: mqtt.Client, _userdata: Any, flags: mqtt.ConnectFlags,
                          reason_code: ReasonCode, _properties: Properties | None) -> None:
        if reason_code.is_failure:
            logger.warning("edge: the local broker refused the connection: %s", reason_code)
            return
        client.subscribe(f"{self.config.local_prefix}/{self.config.tenant_id}/+/+/+", qos=1)
        logger.info("edge: connected to the local broker (session %s)", "resumed" if flags.session_present else "new")

    def _on_local_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = parse_topic(self.config.local_prefix, message.topic)
        if not isinstance(topic, ReadingsTopic):
            return
        try:
            decoded = decode_readings(bytes(message.payload), topic.asset_id)
        except PayloadRefused as refused:
            self.windows.dropped[refused.reason] += 1
            return
        self.windows.dropped.update(refusal.reason for refusal in decoded.refused)
        self.received += self.windows.add(topic.asset_id, decoded.rows)

    def score_due(self) -> int:
        """Score every asset with new readings and publish its risk; answers how many were published."""
        due = self.windows.due()
        if not due:
            return 0
        started = time.perf_counter()
        windows, ends = [], []
        for asset in due:
            frame, end = self.windows.frame(asset)
            windows.append(build_window(frame, self.registry.sensors_of(asset), end, self.scorer.window_hours,
                                        self.scorer.config.step_hours))
            ends.append(end)
        results = self.scorer.score(windows)
        published = sum(self._publish(asset, end, result)
                        for asset, end, result in zip(due, ends, results, strict=True))
        self.published += published
        logger.info("edge: published the risk of %d assets, windows up to %s (%.1f ms for %d windows; %d readings "
                    "received, dropped %s)", published, max(ends).isoformat(), (time.perf_counter() - started) * 1000,
                    len(windows), self.received, dict(self.windows.dropped) or "none")
        return published

    def _publish(self, asset_id: str, end: datetime, result: Any) -> bool:
        if isinstance(result, Exception):
            logger.warning("edge: could not score %s: %s", asset_id, result)
            return False
        drivers = {"channels": [list(pair) for pair in result.drivers.channels],
                   "time_steps": [list(pair) for pair in result.drivers.time_steps]}
        message = RiskMessage(asset_id, float(result.p_failure), max(float(result.rul_hours), 0.0), end,
                              self.scorer.version, drivers=drivers)
        info = self._upstream.publish(risk_topic(self.config.upstream_prefix, self.config.tenant_id, asset_id),
                                      message.to_payload(), qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            logger.warning("edge: upstream unreachable and %d risk messages waiting: %s's score of %s dropped",
                           UPSTREAM_QUEUE, asset_id, end.isoformat())
            return False
        return True


def _log_connection(which: str) -> Any:
    def on_connect(_client: mqtt.Client, _userdata: Any, _flags: mqtt.ConnectFlags, reason_code: ReasonCode,
                   _properties: Properties | None) -> None:
        if reason_code.is_failure:
            logger.warning("edge: the %s broker refused the connection: %s", which, reason_code)
        else:
            logger.info("edge: connected to the %s broker", which)
    return on_connect


def _log_disconnection(which: str) -> Any:
    def on_disconnect(_client: mqtt.Client, _userdata: Any, _flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                      _properties: Properties | None) -> None:
        logger.warning("edge: lost the %s broker (%s); reconnecting in the background", which, reason_code)
    return on_disconnect


def run_gateway(config: EdgeConfig, stop: threading.Event) -> None:
    """Run the gateway until ``stop`` is set, scoring every ``config.every_s``."""
    gateway = EdgeGateway(config)
    gateway.start()
    try:
        while not stop.wait(config.every_s):
            gateway.score_due()
    finally:
        gateway.stop()


def _topic_level(text: str) -> str:
    """An id that is one MQTT topic level (no ``/``, ``+``, ``#``)."""
    if not text or any(character in text for character in "/+#"):
        raise argparse.ArgumentTypeError(f"{text!r} must be one topic level: non-empty, without / + #")
    return text


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``tessera edge iiot``."""
    parser = argparse.ArgumentParser(prog="tessera edge iiot", description=__doc__.splitlines()[0])
    parser.add_argument("--local-mqtt", required=True, help="the gateway's local broker (mqtt://host:1883)")
    parser.add_argument("--upstream-mqtt", required=True, help="the broker risk is published to")
    parser.add_argument("--tenant", required=True, type=_topic_level, help="the tenant of the gateway's assets")
    parser.add_argument("--registry", type=Path, required=True,
                        help="JSON of the gateway's plants, lines, assets and sensors (a registry upsert document)")
    parser.add_argument("--model-dir", type=Path, help="an edge model artifact (default: the newest shipped one)")
    parser.add_argument("--every-s", type=float, default=60.0, help="scoring cadence in seconds (default 60)")
    parser.add_argument("--local-prefix", default="tessera/iiot", help="topic prefix of readings on the local broker")
    parser.add_argument("--upstream-prefix", default=None,
                        help="topic prefix of risk upstream (default: settings.iiot_mqtt_topic_prefix)")
    parser.add_argument("--client-id", default="", help="base of both client ids (default tessera-edge-<tenant>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``tessera edge iiot ...``: run the gateway in the foreground until SIGTERM/SIGINT."""
    from services.iiot.model import default_risk_dir
    from shared.config import get_settings
    from shared.listeners import stop_on_signals
    from shared.observability import configure_logging

    args = build_parser().parse_args(argv)
    if args.every_s <= 0:
        raise SystemExit("tessera edge iiot: --every-s must be > 0")
    configure_logging()
    config = EdgeConfig(local_url=args.local_mqtt, upstream_url=args.upstream_mqtt, tenant_id=args.tenant,
                        registry_path=args.registry, model_dir=args.model_dir or default_risk_dir("edge"),
                        every_s=args.every_s, local_prefix=args.local_prefix,
                        upstream_prefix=args.upstream_prefix or get_settings().iiot_mqtt_topic_prefix,
                        client_id=args.client_id)
    stop = threading.Event()
    stop_on_signals(stop)
    run_gateway(config, stop)
    return 0
