"""Maintenance records: work done on an asset, the labels retraining learns from.

A ``failure`` record is a label (the asset failed then, in ``failure_mode``); a ``repair`` ends a
failure; ``preventive`` work and ``inspection`` are kept for the timeline. A failure or repair
record resolves the asset's active alert (the machine was dealt with), with a note naming it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.iiot.alerts import active_alert, resolve
from services.iiot.db import MAINTENANCE_KINDS, Asset, MaintenanceRecord
from services.iiot.validation import TIME_WINDOW, aware_utc
from shared.db import utcnow
from shared.errors import NotFound, UnprocessableContent
from shared.times import is_iso_datetime_text

RESOLVING_KINDS = ("failure", "repair")
MAX_FUTURE_SKEW = timedelta(days=1)
MaintenanceKind = Literal["failure", "repair", "preventive", "inspection"]
assert set(MaintenanceKind.__args__) == set(MAINTENANCE_KINDS)  # type: ignore[attr-defined]


class MaintenanceIn(BaseModel):
    """A maintenance record as the API takes it."""

    model_config = ConfigDict(extra="forbid")

    kind: MaintenanceKind
    occurred_at: AwareDatetime = Field(description="when it happened: ISO 8601 with a UTC offset, accepted "
                                                   f"{TIME_WINDOW} and at most a day ahead of the server clock")
    failure_mode: str | None = Field(default=None, min_length=1, max_length=64,
                                     description="what failed (bearing, seal, overheating, ...)")
    note: str | None = Field(default=None, max_length=1000)

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _offset_time_text(cls, value: Any) -> Any:
        # pydantic's lax mode reads a number (or a text of digits) as Unix seconds: the contract is text
        if isinstance(value, datetime):  # built in Python, not parsed from a request
            return value
        if not is_iso_datetime_text(value, offset_required=True):
            raise ValueError("occurred_at must be an ISO 8601 date and time with a UTC offset, "
                             "e.g. 2026-11-23T10:15:00Z")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _in_window(cls, value: datetime) -> datetime:
        return aware_utc(value, "occurred_at")


class MaintenanceOut(BaseModel):
    """A stored maintenance record, and the alert it resolved if any."""

    id: int
    asset_id: str
    kind: str
    occurred_at: datetime
    failure_mode: str | None
    note: str | None
    created_at: datetime
    resolved_alert_id: int | None = Field(default=None, description="the active alert this record resolved")


class AssetNotFound(NotFound):
    """No asset with this id for this tenant (404, also for another tenant's asset)."""


def asset_pk_of(session: Session, tenant_id: str, asset_id: str) -> int:
    """The surrogate key of the tenant's asset ``asset_id``, or :class:`AssetNotFound`."""
    pk = session.scalar(select(Asset.id).where(Asset.tenant_id == tenant_id, Asset.asset_id == asset_id))
    if pk is None:
        raise AssetNotFound(f"asset {asset_id} does not exist")
    return pk


def record_maintenance(session: Session, tenant_id: str, asset_id: str, record: MaintenanceIn, *, by: str,
                       notify_url: str | None) -> MaintenanceOut:
    """Store the record; a failure or repair resolves the asset's active alert (notified once)."""
    asset_pk = asset_pk_of(session, tenant_id, asset_id)
    if record.occurred_at > utcnow() + MAX_FUTURE_SKEW:
        raise UnprocessableContent("occurred_at is more than a day in the future")
    row = MaintenanceRecord(tenant_id=tenant_id, asset_pk=asset_pk, kind=record.kind,
                            failure_mode=record.failure_mode, occurred_at=record.occurred_at, note=record.note)
    session.add(row)
    session.flush()
    resolved_id = None
    alert = active_alert(session, tenant_id, asset_pk) if record.kind in RESOLVING_KINDS else None
    if alert is not None:
        note = f"resolved by maintenance record {row.id} ({record.kind})"
        if resolve(session, tenant_id, alert.id, by=by, note=note, notify_url=notify_url) is not None:
            resolved_id = alert.id
    return _out(row, asset_id, resolved_id)


def list_maintenance(session: Session, tenant_id: str, asset_id: str, *, limit: int = 100,
                     before_id: int | None = None) -> list[MaintenanceOut]:
    """The asset's records, newest first (``before_id``: the page after that record)."""
    asset_pk = asset_pk_of(session, tenant_id, asset_id)
    query = select(MaintenanceRecord).where(MaintenanceRecord.tenant_id == tenant_id,
                                            MaintenanceRecord.asset_pk == asset_pk)
    if before_id is not None:
        query = query.where(MaintenanceRecord.id < before_id)
    rows = session.scalars(query.order_by(MaintenanceRecord.id.desc()).limit(limit))
    return [_out(row, asset_id) for row in rows]


def failure_times(session: Session, tenant_id: str) -> dict[int, list[datetime]]:
    """Labels for retraining: each asset's recorded failure times (by asset key), oldest first."""
    rows = session.execute(select(MaintenanceRecord.asset_pk, MaintenanceRecord.occurred_at).where(
        MaintenanceRecord.tenant_id == tenant_id, MaintenanceRecord.kind == "failure")
        .order_by(MaintenanceRecord.occurred_at))
    labels: dict[int, list[datetime]] = {}
    for asset_pk, occurred_at in rows:
        labels.setdefault(asset_pk, []).append(occurred_at)
    return labels


def _out(row: MaintenanceRecord, asset_id: str, resolved_alert_id: int | None = None) -> MaintenanceOut:
    return MaintenanceOut(id=row.id, asset_id=asset_id, kind=row.kind, occurred_at=row.occurred_at,
                          failure_mode=row.failure_mode, note=row.note, created_at=row.created_at,
                          resolved_alert_id=resolved_alert_id)
