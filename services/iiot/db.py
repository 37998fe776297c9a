"""Tables of the IIoT vertical (names prefixed ``iiot_``), every row owned by a tenant.

The asset registry is a tree: :class:`Plant` → :class:`Line` → :class:`Asset` → :class:`Sensor`.
Each level has the tenant's own id for it (``plant_id``, ``line_id``, ``asset_id``, unique per
tenant; ``sensor_id``, unique per asset) beside an integer surrogate key the other tables point to.

- :data:`readings`: one sensor value at one time. A plain Core table without a primary key,
  written only in bulk (COPY on PostgreSQL, executemany on SQLite) and read by time range per
  sensor: ``(sensor_pk, ts)`` indexed (BRIN on PostgreSQL, over chunks the writer clusters by
  sensor; a B-tree on SQLite). The owning tenant is the sensor's.
- :class:`Sensor` carries its canonical unit, expected range, sampling interval and the watermark
  (``last_ts``) the validator checks new readings against (duplicates, out-of-order rows, gaps).
- :class:`Ingest`: one ingestion (a file, a gateway batch) with its counts and a checkpoint
  (``rows_done``) committed with each chunk, so a retried job resumes where it stopped and a row
  is written once; a file's digest is unique per tenant, so re-ingesting it is idempotent.
- :class:`QuarantinedRow`: a refused row with its reason code, detail and raw text.
- :class:`RiskScore`: one scoring of an asset (tier ``cloud``, ``edge`` or ``fog``).
- :class:`Alert`: a risk alert's lifecycle (open → acknowledged → resolved); ``active_key`` is
  set while it is not resolved and unique per tenant, so an asset has at most one active alert of
  a kind (de-duplication in the database, not in memory).
- :class:`MaintenanceRecord`: repairs, failures, preventive work: labels for retraining and the
  reset point of an asset's degradation.
- :class:`TenantSettings`: a tenant's alert policy and notification URL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Index, Integer, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, UTCDateTime, utcnow

ID_LENGTH = 64
TIERS = ("cloud", "edge", "fog")
OPEN, ACKNOWLEDGED, RESOLVED = "open", "acknowledged", "resolved"
ALERT_STATES = (OPEN, ACKNOWLEDGED, RESOLVED)
MAINTENANCE_KINDS = ("failure", "repair", "preventive", "inspection")
INGEST_SOURCES = ("file", "api", "mqtt")


class Plant(Base):
    """A site of a tenant."""

    __tablename__ = "iiot_plants"
    __table_args__ = (Index("ix_iiot_plants_tenant_plant", "tenant_id", "plant_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    plant_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC",
                                          doc="IANA zone of timestamps sent without an offset")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Line(Base):
    """A production line of a plant: the fog tier aggregates risk per line."""

    __tablename__ = "iiot_lines"
    __table_args__ = (Index("ix_iiot_lines_tenant_line", "tenant_id", "line_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    plant_pk: Mapped[int] = mapped_column(ForeignKey("iiot_plants.id", ondelete="CASCADE"), index=True)
    line_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Asset(Base):
    """A machine on a line (pump, motor, compressor, ...)."""

    __tablename__ = "iiot_assets"
    __table_args__ = (Index("ix_iiot_assets_tenant_asset", "tenant_id", "asset_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    line_pk: Mapped[int] = mapped_column(ForeignKey("iiot_lines.id", ondelete="CASCADE"), index=True)
    asset_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    kind: Mapped[str | None] = mapped_column(String(64), default=None)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Sensor(Base):
    """A sensor on an asset: canonical unit, expected range, sampling interval, and its watermark."""

    __tablename__ = "iiot_sensors"
    __table_args__ = (Index("ix_iiot_sensors_asset_sensor", "asset_pk", "sensor_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    asset_pk: Mapped[int] = mapped_column(ForeignKey("iiot_assets.id", ondelete="CASCADE"))
    sensor_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    quantity: Mapped[str | None] = mapped_column(String(32), default=None,
                                                 doc="temperature, pressure, vibration, ... (see units)")
    unit: Mapped[str] = mapped_column(String(32), doc="canonical unit: readings in another unit are converted")
    min_value: Mapped[float | None] = mapped_column(Float, default=None, doc="expected range, in `unit`")
    max_value: Mapped[float | None] = mapped_column(Float, default=None)
    sampling_interval_s: Mapped[float | None] = mapped_column(Float, default=None,
                                                              doc="a longer silence is reported as a gap")
    last_ts: Mapped[datetime | None] = mapped_column(default=None,
                                                     doc="watermark: the newest reading stored")
    reading_count: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


readings = Table(
    "iiot_readings", Base.metadata,
    Column("sensor_pk", Integer, nullable=False, doc="iiot_sensors.id (no foreign key: bulk-written)"),
    Column("ts", UTCDateTime, nullable=False),
    Column("value", Float, nullable=False, doc="in the sensor's canonical unit"),
    Column("ingest_pk", Integer, nullable=True, doc="the ingestion that wrote it"),
)
# BRIN on PostgreSQL: the writer clusters each chunk by sensor, so a sensor's rows sit in few page ranges.
Index("ix_iiot_readings_sensor_ts", readings.c.sensor_pk, readings.c.ts,
      postgresql_using="brin", postgresql_with={"pages_per_range": 16})
"""Sensor readings: written in bulk, read by time range per sensor (see the module doc)."""


class Ingest(Base):
    """One ingestion: a file job, a gateway batch or an MQTT flush, with counts and checkpoint."""

    __tablename__ = "iiot_ingests"
    __table_args__ = (Index("ix_iiot_ingests_tenant_digest", "tenant_id", "digest", unique=True),
                      Index("ix_iiot_ingests_tenant_created", "tenant_id", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), doc="file, api or mqtt")
    job_id: Mapped[str | None] = mapped_column(String(64), default=None, doc="the platform job (files)")
    digest: Mapped[str] = mapped_column(String(64), doc="sha256 of the content: re-ingesting it is idempotent")
    filename: Mapped[str | None] = mapped_column(String(255), default=None)
    file_format: Mapped[str | None] = mapped_column(String(16), default=None, doc="csv, parquet, jsonl")
    layout: Mapped[str | None] = mapped_column(String(8), default=None, doc="long or wide")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_read: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_kept: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_quarantined: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0,
                                           doc="checkpoint: source rows whose outcome is committed")
    gaps: Mapped[int] = mapped_column(Integer, default=0, doc="silences longer than a sensor's interval")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class QuarantinedRow(Base):
    """A refused row: kept with its reason so nothing is silently lost."""

    __tablename__ = "iiot_quarantine"
    __table_args__ = (Index("ix_iiot_quarantine_tenant_ingest", "tenant_id", "ingest_pk", "row_number"),
                      Index("ix_iiot_quarantine_tenant_reason", "tenant_id", "reason", "received_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    ingest_pk: Mapped[int | None] = mapped_column(ForeignKey("iiot_ingests.id", ondelete="CASCADE"), default=None)
    source: Mapped[str] = mapped_column(String(16), doc="file, api or mqtt")
    row_number: Mapped[int | None] = mapped_column(BigInteger, default=None, doc="1-based, in its file or batch")
    reason: Mapped[str] = mapped_column(String(32), doc="a stable code: unknown_sensor, out_of_range, ...")
    detail: Mapped[str | None] = mapped_column(String(500), default=None)
    raw: Mapped[str | None] = mapped_column(Text, default=None, doc="the row as received (truncated)")
    asset_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), default=None)
    sensor_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class RiskScore(Base):
    """One scoring of an asset: failure probability within the horizon and remaining useful life."""

    __tablename__ = "iiot_risk_scores"
    __table_args__ = (Index("ix_iiot_risk_scores_asset_time", "asset_pk", "window_end"),
                      Index("ix_iiot_risk_scores_tenant_time", "tenant_id", "window_end"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    asset_pk: Mapped[int] = mapped_column(ForeignKey("iiot_assets.id", ondelete="CASCADE"))
    window_end: Mapped[datetime] = mapped_column(doc="the newest reading the window holds")
    p_failure: Mapped[float] = mapped_column(Float, doc="P(failure within the horizon)")
    rul_hours: Mapped[float | None] = mapped_column(Float, default=None, doc="remaining useful life")
    tier: Mapped[str] = mapped_column(String(8), default="cloud", doc="cloud, edge or fog")
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    drivers: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="sensors the model attended to most")
    scored_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alert(Base):
    """A risk alert of an asset: opened with hysteresis, acknowledged and resolved over the API."""

    __tablename__ = "iiot_alerts"
    __table_args__ = (Index("ix_iiot_alerts_tenant_active", "tenant_id", "active_key", unique=True),
                      Index("ix_iiot_alerts_tenant_state", "tenant_id", "state", "opened_at"),
                      Index("ix_iiot_alerts_asset", "asset_pk", "opened_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    asset_pk: Mapped[int] = mapped_column(ForeignKey("iiot_assets.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32), default="failure_risk")
    state: Mapped[str] = mapped_column(String(16), default=OPEN)
    active_key: Mapped[str | None] = mapped_column(String(100), default=None,
                                                   doc="`<asset_pk>:<kind>` until resolved, then NULL")
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    opened_p: Mapped[float] = mapped_column(Float)
    peak_p: Mapped[float] = mapped_column(Float)
    last_p: Mapped[float] = mapped_column(Float)
    rul_hours: Mapped[float | None] = mapped_column(Float, default=None)
    acknowledged_at: Mapped[datetime | None] = mapped_column(default=None)
    acknowledged_by: Mapped[str | None] = mapped_column(String(100), default=None)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    resolved_by: Mapped[str | None] = mapped_column(String(100), default=None, doc="a key's name, or `policy`")
    note: Mapped[str | None] = mapped_column(String(1000), default=None)


class MaintenanceRecord(Base):
    """Work done on an asset: a failure or repair is a label; any of them resets degradation."""

    __tablename__ = "iiot_maintenance"
    __table_args__ = (Index("ix_iiot_maintenance_asset_time", "asset_pk", "occurred_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    asset_pk: Mapped[int] = mapped_column(ForeignKey("iiot_assets.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), doc="failure, repair, preventive or inspection")
    failure_mode: Mapped[str | None] = mapped_column(String(64), default=None)
    occurred_at: Mapped[datetime] = mapped_column()
    note: Mapped[str | None] = mapped_column(String(1000), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantSettings(Base):
    """A tenant's alert policy and where its alert notifications go (defaults from settings)."""

    __tablename__ = "iiot_tenant_settings"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="alert thresholds and hysteresis")
    notify_url: Mapped[str | None] = mapped_column(String(2000), default=None,
                                                   doc="signed alert webhooks go here (platform webhooks)")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
