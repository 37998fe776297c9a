"""Registry rows for the ingestion tests, written through the ORM (the registry API is tested apart)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from services.iiot.db import Asset, Line, Plant, Sensor
from shared.db import session_scope

SENSORS = (  # sensor_id, quantity, unit, min, max, interval (s)
    ("temp", "temperature", "degC", -40.0, 200.0, 1.0),
    ("vib", "vibration", "mm/s", 0.0, 50.0, 1.0),
    ("press", "pressure", "bar", 0.0, 40.0, None),
)


@dataclass(frozen=True)
class Fleet:
    """A tenant with one plant, one line and its assets, each with :data:`SENSORS`."""

    tenant_id: str
    assets: tuple[str, ...]
    sensor_pks: dict[tuple[str, str], int]


def register_fleet(tenant_id: str | None = None, assets: int = 2, timezone: str = "Europe/Berlin",
                   database_url: str | None = None) -> Fleet:
    """Register a fresh tenant's plant (in ``timezone``), line, ``assets`` pumps and their sensors
    (in ``database_url``; the configured database by default)."""
    tenant_id = tenant_id or f"t-{uuid.uuid4().hex[:8]}"
    asset_ids = tuple(f"pump-{number}" for number in range(1, assets + 1))
    pks: dict[tuple[str, str], int] = {}
    with session_scope(database_url) as session:
        plant = Plant(tenant_id=tenant_id, plant_id="plant-1", timezone=timezone)
        session.add(plant)
        session.flush()
        line = Line(tenant_id=tenant_id, plant_pk=plant.id, line_id="line-1")
        session.add(line)
        session.flush()
        for asset_id in asset_ids:
            asset = Asset(tenant_id=tenant_id, line_pk=line.id, asset_id=asset_id)
            session.add(asset)
            session.flush()
            for sensor_id, quantity, unit, low, high, interval in SENSORS:
                sensor = Sensor(tenant_id=tenant_id, asset_pk=asset.id, sensor_id=sensor_id, quantity=quantity,
                                unit=unit, min_value=low, max_value=high, sampling_interval_s=interval)
                session.add(sensor)
                session.flush()
                pks[(asset_id, sensor_id)] = sensor.id
    return Fleet(tenant_id, asset_ids, pks)
