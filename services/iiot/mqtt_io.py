"""MQTT in and out of the IIoT vertical: the readings subscriber (a listener of ``tessera up``) and
the client plumbing the edge gateway (:mod:`services.iiot.edge`) shares with it.

Topics, under ``settings.iiot_mqtt_topic_prefix`` (``<prefix>``):

- ``<prefix>/<tenant>/<plant>/<line>/<asset>``: readings of one asset. The payload is JSON: one
  reading ``{"sensor", "timestamp", "value", "unit"?}``, a list of them, or ``{"readings": [...]}``.
  A reading may name its ``asset``; it must be the topic's. The asset must sit on the topic's plant
  and line in the tenant's registry.
- ``<prefix>/<tenant>/risk/<asset>``: an edge gateway's risk score of one asset
  (:class:`RiskMessage`), stored as a :class:`~services.iiot.db.RiskScore` of tier ``edge``.

The subscriber batches what arrives (every ``flush_interval_s`` or ``max_batch_readings``) into
:func:`services.iiot.ingest.accept_readings`, the validation path files and ``POST /readings`` take;
a payload that is not JSON, not readings or too large goes to
:func:`~services.iiot.ingest.quarantine_raw` with its reason, and the subscriber reads on. Each reading
is type-checked as ``POST /readings`` checks it (text fields without control characters, a JSON number
for ``value``): a bad one is quarantined alone, the rest of its message kept.

Delivery: QoS 1, a fixed client id and a persistent session (MQTT 5 ``clean_start=False`` with a
session expiry), so what is published while the subscriber restarts is delivered when it is back.
Messages are acknowledged by hand (paho's ``manual_ack``) only once their batch is committed: a
crash before the commit means the broker delivers them again. A batch committed just before a
connection dropped is delivered again too, and its readings are then quarantined as ``duplicate``
by the watermark rule: accepted work is never lost, at worst recorded twice in the quarantine.
Reconnection is paho's, with a backoff from 1 s to 30 s. A batch's commit is retried only while the
database is unreachable, each of its steps (quarantines, readings, risks) applied once; a message whose
commit fails for another reason is quarantined as ``malformed_row`` ("could not be stored: ...") and
acknowledged, so one poison message never holds up the ones behind it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from shared.config import get_settings
from shared.db import session_scope
from shared.text import CONTROL_CHARACTER
from shared.times import as_utc

logger = logging.getLogger("tessera.iiot.mqtt")

SOURCE = "mqtt"
MAX_PAYLOAD_BYTES = 1 << 20
"""A larger payload is refused unread (``line_too_long``): a gateway batch is far smaller."""
RAW_CHARS = 2000
"""How much of a refused payload the quarantine keeps."""
RISK_LEVEL = "risk"
"""The topic level that marks an edge risk message: ``<prefix>/<tenant>/risk/<asset>``."""
LOCATION_TTL_S = 30.0
"""How long an asset's plant and line are trusted before the registry is read again."""
READING_FIELDS = ("timestamp", "asset", "sensor", "value", "unit")
"""A reading's fields (validation's ``LONG_COLUMNS``, not imported: the edge gateway shares this module)."""
MAX_JSON_INT = (1 << 63) - 1
"""The largest magnitude of a JSON integer value taken as a reading (64 bits)."""


# --- brokers and clients ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens (from ``mqtt://[user:password@]host[:port]``; ``mqtts://`` for TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """The :class:`BrokerAddress` of ``mqtt://host:1883`` (``tcp://`` too; ``mqtts://`` or ``ssl://``: TLS, 8883)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    tls = parts.scheme in ("mqtts", "ssl")
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
        raise ValueError(f"{url!r} is not an MQTT broker URL (mqtt://host:port)")
    return BrokerAddress(host=parts.hostname, port=parts.port or (8883 if tls else 1883), tls=tls,
                         username=unquote(parts.username) if parts.username else None,
                         password=unquote(parts.password) if parts.password else None)


def new_client(client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """An MQTT 5 client (paho 2.x callback API) that reconnects with a 1–30 s backoff."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=manual_ack)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def start_client(client: mqtt.Client, address: BrokerAddress, *, persistent: bool,
                 session_expiry_s: int = 86400, receive_maximum: int = 1000) -> None:
    """Connect in the background (paho's network thread retries until the broker answers).

    ``persistent``: ``clean_start=False`` with a session that outlives the connection by
    ``session_expiry_s``, so the broker keeps subscriptions and queued QoS 1 messages meanwhile.
    ``receive_maximum`` caps the messages the broker sends before they are acknowledged.
    """
    properties = Properties(PacketTypes.CONNECT)
    properties.ReceiveMaximum = receive_maximum
    if persistent:
        properties.SessionExpiryInterval = session_expiry_s
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set()
    client.connect_async(address.host, address.port, keepalive=30, clean_start=not persistent,
                         properties=properties)
    client.loop_start()


def stop_client(client: mqtt.Client) -> None:
    """Disconnect and stop the network thread."""
    client.disconnect()
    client.loop_stop()


def default_client_id(prefix: str) -> str:
    """A fixed client id per topic prefix: the persistent session survives restarts under it."""
    return f"tessera-iiot-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}"


# --- topics and payloads ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadingsTopic:
    """``<prefix>/<tenant>/<plant>/<line>/<asset>``."""

    tenant_id: str
    plant_id: str
    line_id: str
    asset_id: str


@dataclass(frozen=True)
class RiskTopic:
    """``<prefix>/<tenant>/risk/<asset>``."""

    tenant_id: str
    asset_id: str


def readings_topic(prefix: str, tenant_id: str, plant_id: str, line_id: str, asset_id: str) -> str:
    """The topic an asset's readings are published on."""
    return f"{prefix}/{tenant_id}/{plant_id}/{line_id}/{asset_id}"


def risk_topic(prefix: str, tenant_id: str, asset_id: str) -> str:
    """The topic an edge gateway publishes an asset's risk on."""
    return f"{prefix}/{tenant_id}/{RISK_LEVEL}/{asset_id}"


def subscriptions(prefix: str, share_group: str | None = None) -> list[str]:
    """The subscriber's topic filters: readings of every asset and edge risk of every asset; as MQTT 5
    shared subscriptions (``$share/<group>/…``) when replicas split the messages between them."""
    filters = [f"{prefix}/+/+/+/+", f"{prefix}/+/{RISK_LEVEL}/+"]
    return [f"$share/{share_group}/{topic}" for topic in filters] if share_group else filters


def parse_topic(prefix: str, topic: str) -> ReadingsTopic | RiskTopic | None:
    """What ``topic`` addresses, or ``None`` when it is neither layout (or names no tenant)."""
    if not topic.startswith(prefix + "/"):
        return None
    levels = topic[len(prefix) + 1:].split("/")
    if not levels[0]:
        return None
    if len(levels) == 4:
        return ReadingsTopic(*levels)
    if len(levels) == 3 and levels[1] == RISK_LEVEL:
        return RiskTopic(levels[0], levels[2])
    return None


class PayloadRefused(ValueError):
    """A whole payload is refused: its quarantine reason code and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Refusal:
    """One reading of a payload refused before validation (reason code, detail, raw text)."""

    reason: str
    detail: str
    raw: str


@dataclass(frozen=True)
class DecodedReadings:
    """The readings of one payload, and those refused outright."""

    rows: list[dict[str, Any]]
    refused: list[Refusal]


def row_text(entry: Any) -> str:
    """One reading as JSON text for the quarantine (truncated); made only for refused readings."""
    try:
        text = orjson.dumps(entry, default=str).decode()
    except TypeError:  # an integer beyond 64 bits, say
        text = json.dumps(entry, default=str)
    return text[:RAW_CHARS]


def raw_text(payload: bytes) -> str:
    """The payload as text for the quarantine (undecodable bytes replaced; truncated; NUL is replaced where
    every quarantined text is written, :func:`services.iiot.store.write_quarantine`)."""
    return payload[:RAW_CHARS * 4].decode("utf-8", errors="replace")[:RAW_CHARS]


def _json_payload(payload: bytes) -> Any:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadRefused("line_too_long", f"payload of {len(payload)} bytes (at most {MAX_PAYLOAD_BYTES})")
    try:
        return orjson.loads(payload)
    except ValueError as exc:  # orjson.JSONDecodeError, invalid UTF-8 included
        raise PayloadRefused("payload_not_json", f"not JSON: {exc}") from None


def decode_readings(payload: bytes, asset_id: str) -> DecodedReadings:
    """The readings of a payload published on ``asset_id``'s topic, each given ``asset = asset_id``.

    Raises
    ------
    PayloadRefused
        Not JSON, JSON that is not readings (``payload_not_json``), or too large (``line_too_long``).
    """
    document = _json_payload(payload)
    if isinstance(document, dict) and isinstance(document.get("readings"), list):
        entries = document["readings"]
    elif isinstance(document, dict) and "sensor" in document:
        entries = [document]
    elif isinstance(document, list):
        entries = document
    else:
        raise PayloadRefused("payload_not_json", "JSON but not readings: expected a reading "
                             '{"sensor", "timestamp", "value"}, a list of them or {"readings": [...]}')
    decoded = DecodedReadings([], [])
    for entry in entries:
        refusal = reading_refusal(entry, asset_id)
        if refusal is not None:
            decoded.refused.append(refusal)
        else:
            decoded.rows.append({**{key: entry[key] for key in READING_FIELDS if key in entry}, "asset": asset_id})
    return decoded


def reading_refusal(entry: Any, asset_id: str) -> Refusal | None:
    """Why one reading of a payload on ``asset_id``'s topic is refused before validation (``None``: it
    is not). Types are the HTTP schema's: text for ``asset``, ``sensor``, ``unit`` and ``timestamp``
    (no control characters), a JSON number for ``value``; a missing field is left to validation."""
    if not isinstance(entry, dict):
        return Refusal("malformed_row", "a reading must be a JSON object", row_text(entry))
    problem = next(filter(None, (_field_problem(entry, key) for key in READING_FIELDS)), None)
    if problem is None and "asset" in entry and entry["asset"] != asset_id:
        problem = ("malformed_row", f"the reading names asset {entry['asset']!r} but was published on "
                   f"asset {asset_id!r}'s topic")
    return None if problem is None else Refusal(problem[0], problem[1], row_text(entry))


def _field_problem(entry: dict[str, Any], key: str) -> tuple[str, str] | None:
    if key not in entry or (key == "unit" and entry[key] is None):
        return None
    value = entry[key]
    if key == "value":
        return _number_problem(value)
    reason = "bad_timestamp" if key == "timestamp" else "malformed_row"
    if not isinstance(value, str):
        return reason, f"{key} must be text, got {_json_type(value)}"
    if CONTROL_CHARACTER.search(value):
        return reason, f"{key} {value[:40]!r} holds a control character"
    return None


def _number_problem(value: Any) -> tuple[str, str] | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "not_a_number", f"value must be a JSON number, got {_json_type(value)}"
    if isinstance(value, int) and not -MAX_JSON_INT <= value <= MAX_JSON_INT:
        try:
            float(value)
        except OverflowError:
            return "not_a_number", f"value {str(value)[:40]} is beyond the range of a float"
        return "out_of_range", f"value {str(value)[:40]} is beyond 64 bits"
    return None


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", dict: "an object", list: "a list", str: "text", type(None): "null"}
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class RiskMessage:
    """An edge gateway's score of one asset, as published on ``<prefix>/<tenant>/risk/<asset>``."""

    asset_id: str
    p_failure: float
    rul_hours: float | None
    window_end: datetime
    model_version: str | None = None
    tier: str = "edge"
    drivers: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> bytes:
        """The JSON published upstream (``window_end`` in ISO 8601 with its offset)."""
        return json.dumps({"asset": self.asset_id, "p_failure": self.p_failure, "rul_hours": self.rul_hours,
                           "window_end": self.window_end.isoformat(), "model_version": self.model_version,
                           "tier": self.tier, "drivers": self.drivers}).encode()

    @classmethod
    def from_payload(cls, payload: bytes, asset_id: str) -> RiskMessage:
        """Parse and check a risk message published on ``asset_id``'s risk topic.

        Raises
        ------
        PayloadRefused
            Not JSON (``payload_not_json``) or not a risk message (``malformed_row``, saying why).
        """
        document = _json_payload(payload)
        if not isinstance(document, dict):
            raise PayloadRefused("payload_not_json", "JSON but not a risk message object")
        try:
            return cls(asset_id=asset_id, p_failure=_probability(document.get("p_failure")),
                       rul_hours=_optional_hours(document.get("rul_hours")),
                       window_end=_aware(document.get("window_end")),
                       model_version=_optional_text(document.get("model_version")),
                       tier=_tier(document.get("tier", "edge")), drivers=_drivers(document.get("drivers")))
        except (TypeError, ValueError) as exc:
            raise PayloadRefused("malformed_row", f"not a risk message: {exc}") from None


def _probability(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"p_failure must be a number in [0, 1], got {value!r}")
    return float(value)


def _optional_hours(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"rul_hours must be a finite number >= 0, got {value!r}")
    return float(value)


def _aware(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"window_end must be ISO 8601 text, got {value!r}")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"window_end {value!r} has no UTC offset")
    utc = as_utc(moment)
    if utc is None:
        raise ValueError(f"window_end {value!r} is outside years 1-9999 in UTC")
    return utc


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)[:64]


def _tier(value: Any) -> str:
    if value != "edge":
        raise ValueError(f"tier must be 'edge' on the risk topic, got {value!r}")
    return "edge"


def _drivers(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("drivers must be an object")
    return value


# --- where readings go -----------------------------------------------------------------------------

class ReadingsSink(Protocol):
    """The validation path readings take (:mod:`services.iiot.ingest` by default)."""

    def accept_readings(self, tenant_id: str, rows: list[dict[str, Any]], *, source: str,
                        raw: list[str] | None = None) -> Any:
        """Validate and store ``rows``; answers counts (``kept``, ``quarantined``, ``reasons``)."""

    def quarantine_raw(self, tenant_id: str, source: str, reason: str, detail: str, raw: str) -> Any:
        """Quarantine a payload that is not even rows."""


def ingest_sink() -> ReadingsSink:
    """The platform's validation path: :mod:`services.iiot.ingest`."""
    sink: ReadingsSink = importlib.import_module("services.iiot.ingest")  # type: ignore[assignment]
    return sink


def store_edge_risks(tenant_id: str, messages: list[RiskMessage]) -> list[RiskMessage]:
    """Store edge risk messages of one tenant as RiskScore rows (tier ``edge``); answers those whose
    asset the tenant does not have (nothing stored for them)."""
    from services.iiot.db import Asset, RiskScore

    if not messages:
        return []
    with session_scope() as session:
        wanted = {message.asset_id for message in messages}
        asset_pks = dict(session.execute(select(Asset.asset_id, Asset.id).where(
            Asset.tenant_id == tenant_id, Asset.asset_id.in_(wanted))).all())
        session.add_all([RiskScore(tenant_id=tenant_id, asset_pk=asset_pks[message.asset_id],
                                   window_end=message.window_end, p_failure=message.p_failure,
                                   rul_hours=message.rul_hours, tier="edge", model_version=message.model_version,
                                   drivers=message.drivers)
                         for message in messages if message.asset_id in asset_pks])
    return [message for message in messages if message.asset_id not in asset_pks]


class AssetLocations:
    """``(tenant, asset) -> (plant_id, line_id)`` from the registry, each answer kept ``ttl_s``."""

    def __init__(self, reader: Callable[[str, set[str]], dict[str, tuple[str, str]]] | None = None,
                 ttl_s: float = LOCATION_TTL_S) -> None:
        self.reader = reader or read_asset_locations
        self.ttl_s = ttl_s
        self._known: dict[tuple[str, str], tuple[float, tuple[str, str] | None]] = {}

    def of(self, tenant_id: str, asset_ids: set[str]) -> dict[str, tuple[str, str] | None]:
        """The plant and line of each asset (``None``: the tenant has no such asset)."""
        now = time.monotonic()
        stale = {asset for asset in asset_ids
                 if (entry := self._known.get((tenant_id, asset))) is None or now - entry[0] > self.ttl_s}
        if stale:
            found = self.reader(tenant_id, stale)
            for asset in stale:
                self._known[(tenant_id, asset)] = (now, found.get(asset))
        return {asset: self._known[(tenant_id, asset)][1] for asset in asset_ids}


def read_asset_locations(tenant_id: str, asset_ids: set[str]) -> dict[str, tuple[str, str]]:
    """``{asset_id: (plant_id, line_id)}`` of those of ``asset_ids`` the tenant's registry has."""
    from services.iiot.db import Asset, Line, Plant

    with session_scope() as session:
        rows = session.execute(
            select(Asset.asset_id, Plant.plant_id, Line.line_id)
            .join(Line, Line.id == Asset.line_pk).join(Plant, Plant.id == Line.plant_pk)
            .where(Asset.tenant_id == tenant_id, Asset.asset_id.in_(asset_ids))).all()
    return {asset: (plant, line) for asset, plant, line in rows}


# --- the subscriber --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubscriberConfig:
    """How the readings subscriber connects and batches.

    ``flush_interval_s`` bounds how long a reading waits before validation; a batch is flushed
    sooner once it holds ``max_batch_readings`` readings or ``max_batch_messages`` messages (kept
    below ``receive_maximum``, the unacknowledged messages the broker sends at most).

    ``receive_maximum`` is MQTT 5's largest: messages wait for their commit unacknowledged, and
    Mosquitto queues only ``max_queued_messages`` (default 1000) beyond those in flight before it
    DROPS QoS 1 messages for a subscriber that falls behind (measured: with a window of 1000, a
    burst of 20 000 one-reading messages lost 2 400). Deployments should also raise the broker's
    ``max_queued_messages`` for this client.
    """

    url: str
    prefix: str
    client_id: str = ""
    share_group: str | None = None
    flush_interval_s: float = 0.2
    max_batch_readings: int = 5000
    max_batch_messages: int = 2000
    receive_maximum: int = 65535
    session_expiry_s: int = 86400
    stats_every_s: float = 10.0

    @property
    def effective_client_id(self) -> str:
        """``client_id``, or the prefix's fixed default."""
        return self.client_id or default_client_id(self.prefix)


@dataclass(frozen=True)
class _ReadingsWork:
    topic: ReadingsTopic
    decoded: DecodedReadings
    payload: bytes


@dataclass(frozen=True)
class _RefusedWork:
    tenant_id: str
    refusal: Refusal


@dataclass(frozen=True)
class _RiskWork:
    tenant_id: str
    message: RiskMessage
    raw: str


_Work = _ReadingsWork | _RefusedWork | _RiskWork


@dataclass(frozen=True)
class _Step:
    """One transaction of a batch's commit: ``run`` answers the steps it leads to; ``instead`` those
    that replace it when it fails for a reason retrying cannot fix."""

    run: Callable[[], list[_Step]]
    instead: Callable[[Exception], list[_Step]]


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError, OSError)
"""Database connectivity errors (``ConnectionError`` is an ``OSError``): a commit they stop is retried."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may fix what stopped a commit: the database or its connection was unreachable."""
    return isinstance(exc, TRANSIENT_ERRORS) or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)


@dataclass(frozen=True)
class _Delivery:
    """One received message: what it asks for, and what acknowledges it once committed."""

    generation: int
    mid: int
    qos: int
    work: _Work

    @property
    def readings(self) -> int:
        return len(self.work.decoded.rows) if isinstance(self.work, _ReadingsWork) else 0


@dataclass
class SubscriberStats:
    """Running totals of the subscriber (readings/s is logged every ``stats_every_s``)."""

    messages: int = 0
    readings: int = 0
    kept: int = 0
    quarantined: int = 0
    refused_payloads: int = 0
    edge_scores: int = 0
    flushes: int = 0
    flush_failures: int = 0


class MqttSubscriber:
    """Subscribes to readings and edge risk under a prefix and feeds them to the validation path.

    ``start()`` connects (in the background, retrying) and starts the flusher thread; ``stop()``
    commits and acknowledges what was received, then disconnects.
    """

    def __init__(self, config: SubscriberConfig, sink: ReadingsSink | None = None,
                 locations: AssetLocations | None = None) -> None:
        self.config = config
        self.sink = sink or ingest_sink()
        self.stats = SubscriberStats()
        self.subscribed = threading.Event()
        self.locations = locations or AssetLocations()
        self._client = new_client(config.effective_client_id, manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._pending: list[_Delivery] = []
        self._pending_readings = 0
        self._first_pending_at = 0.0
        self._generation = 0
        self._stopping = False
        self._stop_requested = threading.Event()
        self._wake = threading.Condition()
        self._flusher = threading.Thread(target=self._run_flusher, name="iiot-mqtt-flusher", daemon=True)

    def start(self) -> None:
        """Connect and subscribe in the background; start flushing."""
        self._flusher.start()
        start_client(self._client, parse_broker_url(self.config.url), persistent=True,
                     session_expiry_s=self.config.session_expiry_s, receive_maximum=self.config.receive_maximum)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Commit and acknowledge what is pending, then disconnect (the session stays on the broker)."""
        with self._wake:
            self._stopping = True
            self._stop_requested.set()
            self._wake.notify_all()
        self._flusher.join(timeout=timeout_s)
        stop_client(self._client)

    # -- network thread ------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: mqtt.ConnectFlags, reason_code: ReasonCode,
                    _properties: Properties | None) -> None:
        if reason_code.is_failure:
            logger.warning("mqtt: the broker refused the connection: %s", reason_code)
            return
        with self._wake:
            self._generation += 1
            if flags.session_present:
                # unacknowledged messages of the previous connection are delivered again on this one
                self._pending = [delivery for delivery in self._pending if delivery.generation == self._generation]
                self._pending_readings = sum(delivery.readings for delivery in self._pending)
        client.subscribe([(topic, 1) for topic in subscriptions(self.config.prefix, self.config.share_group)])
        logger.info("mqtt: connected as %s (session %s)", self.config.effective_client_id,
                    "resumed" if flags.session_present else "new")

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reason_codes: list[ReasonCode],
                      _properties: Properties | None) -> None:
        if any(code.is_failure for code in reason_codes):
            logger.error("mqtt: the broker refused a subscription: %s", reason_codes)
            return
        logger.info("mqtt: subscribed to %s", " and ".join(subscriptions(self.config.prefix, self.config.share_group)))
        self.subscribed.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, _properties: Properties | None) -> None:
        self.subscribed.clear()
        if not self._stopping:
            logger.warning("mqtt: disconnected (%s); reconnecting", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Queue a message's work (never raises: an exception would stop paho's network thread)."""
        try:
            self._receive(message)
        except Exception:
            logger.exception("mqtt: could not handle a message on %r", message.topic)

    def _receive(self, message: mqtt.MQTTMessage) -> None:
        work = self._work_of(message.topic, bytes(message.payload))
        with self._wake:
            if work is None:
                delivery = None
            else:
                delivery = _Delivery(self._generation, message.mid, message.qos, work)
                if not self._pending:
                    self._first_pending_at = time.monotonic()
                self._pending.append(delivery)
                self._pending_readings += delivery.readings
                self.stats.messages += 1
                if self._batch_full():
                    self._wake.notify_all()
        if delivery is None:
            self._client.ack(message.mid, message.qos)

    def _work_of(self, topic_name: str, payload: bytes) -> _Work | None:
        topic = parse_topic(self.config.prefix, topic_name)
        if topic is None:
            logger.warning("mqtt: ignored a message on %r: not <prefix>/<tenant>/<plant>/<line>/<asset> "
                           "nor <prefix>/<tenant>/risk/<asset>", topic_name)
            return None
        try:
            if isinstance(topic, RiskTopic):
                return _RiskWork(topic.tenant_id, RiskMessage.from_payload(payload, topic.asset_id),
                                 raw_text(payload))
            return _ReadingsWork(topic, decode_readings(payload, topic.asset_id), payload)
        except PayloadRefused as refused:
            return _RefusedWork(topic.tenant_id, Refusal(refused.reason, refused.detail, raw_text(payload)))
        except Exception as exc:  # a bug's victim is quarantined, not lost, and the subscriber reads on
            logger.exception("mqtt: could not read a message on %r; quarantined", topic_name)
            return _RefusedWork(topic.tenant_id, Refusal("malformed_row", f"could not be read: {type(exc).__name__}",
                                                         raw_text(payload)))

    def _batch_full(self) -> bool:
        return (self._pending_readings >= self.config.max_batch_readings
                or len(self._pending) >= self.config.max_batch_messages)

    # -- flusher thread ------------------------------------------------------------------------------
    def _run_flusher(self) -> None:
        last_report = time.monotonic()
        reported = SubscriberStats()
        while (batch := self._next_batch()) is not None:
            self._flush_until_committed(batch)
            if time.monotonic() - last_report >= self.config.stats_every_s:
                self._report(reported, time.monotonic() - last_report)
                reported, last_report = SubscriberStats(**vars(self.stats)), time.monotonic()

    def _next_batch(self) -> list[_Delivery] | None:
        """Wait for a batch: the interval since its first message passed, or it is full; ``None``
        once stopping with nothing pending."""
        with self._wake:
            while not self._pending and not self._stopping:
                self._wake.wait(0.5)
            if not self._pending:
                return None
            while not self._stopping and not self._batch_full():
                left = self._first_pending_at + self.config.flush_interval_s - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            batch, self._pending, self._pending_readings = self._pending, [], 0
            return batch

    def _flush_until_committed(self, batch: list[_Delivery]) -> None:
        """Commit a batch, retrying with a backoff while the database is unreachable; then acknowledge it.

        Each step of the commit is its own transaction and runs once: a retry goes on from the step
        that failed. A step that fails for a reason retrying cannot fix is replaced by its fallback
        (its messages one at a time, then a quarantined message: ``could not be stored``)."""
        steps = self._plan(batch)
        delay_s = 0.5
        while True:
            try:
                self._run_steps(steps)
                self.stats.flushes += 1
                break
            except Exception:
                self.stats.flush_failures += 1
                logger.exception("mqtt: could not commit %d messages; retrying in %.1f s "
                                 "(they stay unacknowledged)", len(batch), delay_s)
                if self._stop_requested.wait(delay_s):
                    logger.warning("mqtt: stopping with %d messages uncommitted: left unacknowledged, the "
                                   "broker delivers them again to the next subscriber", len(batch))
                    return
                delay_s = min(delay_s * 2, 30.0)
        self._acknowledge(batch)

    def _acknowledge(self, batch: list[_Delivery]) -> None:
        with self._wake:
            generation = self._generation
        for delivery in batch:
            if delivery.generation == generation:  # an older connection's message ids mean nothing now
                self._client.ack(delivery.mid, delivery.qos)

    @staticmethod
    def _run_steps(steps: deque[_Step]) -> None:
        """Run the steps left, each replaced by those it leads to; a transient error is raised (retry)."""
        while steps:
            step = steps[0]
            try:
                follow = step.run()
            except Exception as exc:
                if is_transient(exc):
                    raise
                logger.warning("mqtt: a commit step failed for good (%s: %s); falling back",
                               type(exc).__name__, str(exc)[:200])
                follow = step.instead(exc)
            steps.popleft()
            steps.extendleft(reversed(follow))

    def _plan(self, batch: list[_Delivery]) -> deque[_Step]:
        readings: dict[str, list[_ReadingsWork]] = defaultdict(list)
        risks: dict[str, list[_RiskWork]] = defaultdict(list)
        steps: list[_Step] = []
        for delivery in batch:
            work = delivery.work
            if isinstance(work, _ReadingsWork):
                readings[work.topic.tenant_id].append(work)
            elif isinstance(work, _RiskWork):
                risks[work.tenant_id].append(work)
            else:
                steps.append(self._quarantine_step(work.tenant_id, work.refusal, payload=True))
        steps.extend(self._placing_step(tenant_id, works) for tenant_id, works in readings.items())
        steps.extend(self._risks_step(tenant_id, works) for tenant_id, works in risks.items())
        return deque(steps)

    def _quarantine_step(self, tenant_id: str, refusal: Refusal, *, payload: bool = False) -> _Step:
        def run() -> list[_Step]:
            self._quarantine(tenant_id, refusal)
            self.stats.refused_payloads += int(payload)
            return []

        def instead(exc: Exception) -> list[_Step]:
            logger.error("mqtt: could not quarantine a message of tenant %r (%s: %s), dropped: %s",
                         tenant_id, refusal.reason, type(exc).__name__, refusal.raw[:200])
            return []
        return _Step(run, instead)

    def _unstorable(self, tenant_id: str, raw: str, exc: Exception) -> _Step:
        """Quarantining a message whose commit failed for a reason retrying cannot fix."""
        detail = f"could not be stored: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return self._quarantine_step(tenant_id, Refusal("malformed_row", detail, raw))

    def _placing_step(self, tenant_id: str, works: list[_ReadingsWork]) -> _Step:
        def run() -> list[_Step]:
            quarantines: list[_Step] = []
            kept: list[_ReadingsWork] = []
            for work, refusals in self._placed(tenant_id, works):
                kept.extend([] if refusals else [work])
                refused = refusals or work.decoded.refused
                quarantines.extend(self._quarantine_step(tenant_id, refusal) for refusal in refused)
            return [*quarantines, *([self._accept_step(tenant_id, kept)] if kept else [])]

        def instead(exc: Exception) -> list[_Step]:
            return [self._unstorable(tenant_id, raw_text(work.payload), exc) for work in works]
        return _Step(run, instead)

    def _accept_step(self, tenant_id: str, works: list[_ReadingsWork]) -> _Step:
        def run() -> list[_Step]:
            rows = [row for work in works for row in work.decoded.rows]
            if rows:
                # raw=None: validation writes a quarantined reading's JSON itself, only for those it refuses
                outcome = self.sink.accept_readings(tenant_id, rows, source=SOURCE)
                self.stats.readings += len(rows)
                self.stats.kept += int(outcome.kept)
                self.stats.quarantined += int(outcome.quarantined)
            return []

        def instead(exc: Exception) -> list[_Step]:
            if len(works) > 1:
                return [self._accept_step(tenant_id, [work]) for work in works]
            return [self._unstorable(tenant_id, raw_text(works[0].payload), exc)]
        return _Step(run, instead)

    def _placed(self, tenant_id: str, works: list[_ReadingsWork]) -> Iterator[tuple[_ReadingsWork, list[Refusal]]]:
        """Each message with the refusals of all its readings when its asset sits elsewhere than its
        topic says (an unknown asset is left to validation: ``unknown_asset``)."""
        located = self.locations.of(tenant_id, {work.topic.asset_id for work in works})
        for work in works:
            where = located[work.topic.asset_id]
            topic = work.topic
            if where is None or where == (topic.plant_id, topic.line_id):
                yield work, []
                continue
            detail = (f"asset {topic.asset_id!r} is on plant {where[0]!r} line {where[1]!r}, not on the "
                      f"topic's plant {topic.plant_id!r} line {topic.line_id!r}")
            yield work, [Refusal("unknown_asset", detail, text)
                         for text in [*map(row_text, work.decoded.rows), *(r.raw for r in work.decoded.refused)]]

    def _risks_step(self, tenant_id: str, works: list[_RiskWork]) -> _Step:
        def run() -> list[_Step]:
            unknown = {message.asset_id for message in store_edge_risks(tenant_id, [work.message for work in works])}
            self.stats.edge_scores += sum(work.message.asset_id not in unknown for work in works)
            return [self._quarantine_step(tenant_id, Refusal(
                "unknown_asset", f"edge risk for asset {work.message.asset_id!r}, which the tenant's registry "
                "does not have", work.raw)) for work in works if work.message.asset_id in unknown]

        def instead(exc: Exception) -> list[_Step]:
            if len(works) > 1:
                return [self._risks_step(tenant_id, [work]) for work in works]
            return [self._unstorable(tenant_id, works[0].raw, exc)]
        return _Step(run, instead)

    def _quarantine(self, tenant_id: str, refusal: Refusal) -> None:
        self.sink.quarantine_raw(tenant_id, SOURCE, refusal.reason, refusal.detail, refusal.raw)
        self.stats.quarantined += 1

    def _report(self, previous: SubscriberStats, elapsed_s: float) -> None:
        readings = self.stats.readings - previous.readings
        if readings or self.stats.messages != previous.messages:
            logger.info("mqtt: %.0f readings/s (%d messages, %d kept, %d quarantined in %.0f s)",
                        readings / elapsed_s, self.stats.messages - previous.messages,
                        self.stats.kept - previous.kept, self.stats.quarantined - previous.quarantined, elapsed_s)


def subscriber_from_settings() -> MqttSubscriber:
    """The subscriber ``settings.iiot_mqtt_url`` and ``iiot_mqtt_topic_prefix`` ask for."""
    settings = get_settings()
    if not settings.iiot_mqtt_url:
        raise RuntimeError("TESSERA_IIOT_MQTT_URL is not set: there is no broker to subscribe to")
    return MqttSubscriber(SubscriberConfig(url=settings.iiot_mqtt_url, prefix=settings.iiot_mqtt_topic_prefix,
                                           client_id=settings.iiot_mqtt_client_id or "",
                                           share_group=settings.iiot_mqtt_share_group))


def serve(stop: threading.Event) -> None:
    """The ``mqtt`` listener (``tessera listen iiot mqtt``): subscribe until ``stop`` is set."""
    subscriber = subscriber_from_settings()
    subscriber.start()
    try:
        stop.wait()
    finally:
        subscriber.stop()
