"""The MQTT listener as ``tessera up`` runs it (``tessera listen iiot mqtt``, a real process) between
a real paho client publishing to Mosquitto and the database, on both databases: readings through
the validation path into ``iiot_readings``, bad payloads quarantined with their reason while the
next good payload is still kept, edge risk stored as tier-``edge`` scores.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from services.iiot.db import Asset, Line, Plant, QuarantinedRow, RiskScore, Sensor, readings
from services.iiot.mqtt_io import RiskMessage, readings_topic, risk_topic
from shared.db import session_scope
from tests.conftest import Stack
from tests.iiot.mqtt_support import BROKER_URL, Publisher, require_broker
from tests.support import ManagedProcess, python_argv, wait_until

START = datetime(2026, 1, 1, tzinfo=UTC)


def require_ingest() -> None:
    from services.iiot import ingest

    if not hasattr(ingest, "accept_readings"):
        pytest.skip("services.iiot.ingest.accept_readings (the validation path) has not landed yet")


def add_registry(tenant_id: str) -> None:
    """Plant p1 → line l1 → asset a1 with a temperature and a vibration sensor."""
    with session_scope() as session:
        plant = Plant(tenant_id=tenant_id, plant_id="p1")
        session.add(plant)
        session.flush()
        line = Line(tenant_id=tenant_id, plant_pk=plant.id, line_id="l1")
        session.add(line)
        session.flush()
        asset = Asset(tenant_id=tenant_id, line_pk=line.id, asset_id="a1")
        session.add(asset)
        session.flush()
        session.add_all([
            Sensor(tenant_id=tenant_id, asset_pk=asset.id, sensor_id="temp", quantity="temperature", unit="degC",
                   min_value=-20.0, max_value=150.0, sampling_interval_s=60.0),
            Sensor(tenant_id=tenant_id, asset_pk=asset.id, sensor_id="vib", quantity="vibration", unit="mm/s",
                   min_value=0.0, max_value=25.0, sampling_interval_s=60.0),
        ])


def stored_values(tenant_id: str) -> list[float]:
    with session_scope() as session:
        return list(session.scalars(
            select(readings.c.value).join(Sensor, Sensor.id == readings.c.sensor_pk)
            .where(Sensor.tenant_id == tenant_id).order_by(readings.c.ts, readings.c.value)))


def quarantine_reasons(tenant_id: str) -> dict[str, int]:
    with session_scope() as session:
        return dict(session.execute(select(QuarantinedRow.reason, func.count()).where(
            QuarantinedRow.tenant_id == tenant_id, QuarantinedRow.source == "mqtt")
            .group_by(QuarantinedRow.reason)).all())


def edge_scores(tenant_id: str) -> list[tuple[float, str]]:
    with session_scope() as session:
        return list(session.execute(select(RiskScore.p_failure, RiskScore.tier)
                                    .where(RiskScore.tenant_id == tenant_id)).all())


def reading(sensor: str, minute: int, value: float, **extra: object) -> dict[str, object]:
    return {"sensor": sensor, "timestamp": (START + timedelta(minutes=minute)).isoformat(), "value": value, **extra}


@pytest.fixture
def listener(migrated_stack: Stack) -> Iterator[tuple[str, ManagedProcess]]:
    """``tessera listen iiot mqtt`` under a prefix of this test alone; yields (prefix, process)."""
    require_broker()
    require_ingest()
    prefix = f"tessera-test/{uuid.uuid4().hex[:12]}"
    env = {**migrated_stack.env, "TESSERA_IIOT_MQTT_URL": BROKER_URL, "TESSERA_IIOT_MQTT_TOPIC_PREFIX": prefix,
           "TESSERA_LOG_LEVEL": "INFO"}
    process = ManagedProcess(python_argv("-m", "services.cli", "listen", "iiot", "mqtt"), env, "mqtt listener")
    try:
        process.wait_for_output(r"mqtt: subscribed", timeout_s=60)
        yield prefix, process
    finally:
        assert process.stop() == 0, process.output[-3000:]


def test_readings_from_a_paho_client_are_validated_into_the_database_and_bad_payloads_quarantined(
        listener: tuple[str, ManagedProcess]) -> None:
    prefix, _process = listener
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    add_registry(tenant)
    topic = readings_topic(prefix, tenant, "p1", "l1", "a1")
    with Publisher.connected() as publisher:
        publisher.publish(topic, json.dumps([reading("temp", 1, 20.0), reading("vib", 1, 2.5)]))
        publisher.publish(topic, b"{not json")
        publisher.publish(topic, json.dumps({"readings": [reading("temp", 2, 68.0, unit="degF"),
                                                          reading("temp", 3, 21.0, asset="a9")]}))
        publisher.publish(topic, json.dumps(reading("nope", 4, 1.0)))
        publisher.publish(risk_topic(prefix, tenant, "a1"),
                          RiskMessage("a1", 0.4, 90.0, START + timedelta(minutes=2), "edge-test").to_payload())
        publisher.publish(risk_topic(prefix, tenant, "a404"),
                          RiskMessage("a404", 0.4, 90.0, START, "edge-test").to_payload())
        wait_until(lambda: len(stored_values(tenant)) == 3 and sum(quarantine_reasons(tenant).values()) == 4
                   and len(edge_scores(tenant)) == 1, 30, "3 readings, 4 quarantined, 1 edge score")
    assert stored_values(tenant) == pytest.approx([2.5, 20.0, 20.0])  # 68 degF stored as 20 degC
    assert quarantine_reasons(tenant) == {"payload_not_json": 1, "malformed_row": 1, "unknown_sensor": 1,
                                          "unknown_asset": 1}
    assert edge_scores(tenant) == [(0.4, "edge")]
