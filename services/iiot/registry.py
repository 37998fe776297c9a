"""The asset registry: a tenant's plants, lines, assets and sensors, and the rules they obey.

Every level is named by the tenant's own id (``plant_id``, ``line_id``, ``asset_id`` unique per
tenant; ``sensor_id`` unique per asset): the strings its historian, PLC tags and MQTT topics
already use, so they are restricted to letters, digits and ``_ . : -`` (no ``/``, ``+`` or ``#``,
which MQTT topics reserve). Rules checked here, each a precise 422:

- a plant's ``timezone`` is an IANA zone (naive timestamps from it are read in that zone);
- a sensor's ``unit`` is a known unit (:mod:`services.iiot.units`), stored by its canonical name;
  its ``quantity`` is derived from the unit when not given, and must agree with it when given
  (an acceleration sensor may be labelled ``vibration``; a dimensionless one, e.g. ``%``, any
  label such as ``humidity``);
- a sensor's expected range has ``min_value < max_value``; its sampling interval is > 0.

A sensor's canonical unit cannot change once it has readings (they are stored in it): 409.

Writes go through :func:`upsert`, which takes flat lists of each level and writes them with one
query per level to load what exists and one flush per level to insert what does not: the bulk
``PUT /registry`` of a whole :class:`RegistryDocument` (nested or flat) and a single ``PUT`` of
one plant are the same code. Deleting a
node deletes everything under it, the readings of its sensors included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Self, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StringConstraints, model_validator
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import ColumnElement, Select, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.iiot.db import Asset, Line, Plant, Sensor, readings
from services.iiot.units import QUANTITIES, canonical_unit, quantity_of
from shared.errors import Conflict, NotFound, UnprocessableContent

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
"""A tenant's id of a plant, line, asset or sensor: 1-64 of letters, digits, ``_ . : -``."""
QUANTITY_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
MAX_BATCH_NODES = 200_000
"""The most nodes (plants + lines + assets + sensors) one bulk upsert writes."""
_IN_CHUNK = 5_000
"""Ids per ``IN (...)`` list: below SQLite's and PostgreSQL's limits on bound parameters."""

SelectT = TypeVar("SelectT", bound=Select[*tuple[Any, ...]])
RegistryId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


def _iana_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}: an IANA name such as 'Europe/Berlin' or 'UTC'") from None
    return name


def _canonical(unit: str) -> str:
    return canonical_unit(unit)  # UnknownUnit is a ValueError: pydantic reports it as this field's 422


Timezone = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_iana_zone)]
UnitName = Annotated[str, StringConstraints(min_length=1, max_length=32), AfterValidator(_canonical)]
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)]


class _Strict(BaseModel):
    # allow_inf_nan: FastAPI reads a body with Python's json, which takes NaN and Infinity; refused in
    # every float, those inside ``details`` too (stored, they would come back as null)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- what clients send ---------------------------------------------------------------------------

class PlantIn(_Strict):
    """A plant (site) as a client sends it (create, or replace with ``PUT``)."""

    plant_id: RegistryId
    name: Name | None = None
    timezone: Timezone = Field(default="UTC", description="IANA zone of timestamps sent without an offset")


class LineIn(_Strict):
    """A production line of a plant."""

    line_id: RegistryId
    plant_id: RegistryId = Field(description="the plant it belongs to (sending another moves it)")
    name: Name | None = None


class AssetIn(_Strict):
    """A machine on a line."""

    asset_id: RegistryId
    line_id: RegistryId = Field(description="the line it stands on (sending another moves it)")
    name: Name | None = None
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description="pump, motor, compressor, ...")
    details: dict[str, JsonValue] = Field(default_factory=dict, max_length=50,
                                          description="the tenant's own attributes (make, model, serial, ...)")


class SensorIn(_Strict):
    """A sensor of an asset: its canonical unit, expected range and sampling interval."""

    sensor_id: RegistryId
    unit: UnitName = Field(description="its canonical unit (any alias; stored by canonical name): readings "
                                       "sent in another unit of the same quantity are converted to it")
    quantity: Quantity | None = Field(default=None, description="derived from the unit when absent")
    min_value: float | None = Field(default=None, description="expected range, in `unit`")
    max_value: float | None = None
    sampling_interval_s: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="a longer silence between readings is counted as a gap")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        self.quantity = checked_quantity(self.unit, self.quantity)
        checked_range(self.min_value, self.max_value)
        return self


class PlantPatch(_Strict):
    """Fields of a plant to change; absent ones stay."""

    name: Name | None = None
    timezone: Timezone | None = None


class LinePatch(_Strict):
    """Fields of a line to change; absent ones stay."""

    plant_id: RegistryId | SkipJsonSchema[None] = None  # null refused (a line has a plant); absent: stays
    name: Name | None = None


class AssetPatch(_Strict):
    """Fields of an asset to change; absent ones stay (``details`` is replaced as a whole)."""

    line_id: RegistryId | SkipJsonSchema[None] = None  # null refused (an asset has a line); absent: stays
    name: Name | None = None
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    details: dict[str, JsonValue] | None = Field(default=None, max_length=50)


class SensorPatch(_Strict):
    """Fields of a sensor to change; absent ones stay, ``null`` clears an optional one."""

    unit: UnitName | SkipJsonSchema[None] = None  # null refused (a sensor has a unit); absent: stays
    quantity: Quantity | None = None
    min_value: float | None = None
    max_value: float | None = None
    sampling_interval_s: Annotated[float, Field(gt=0)] | None = None


# --- the document of the bulk upsert ------------------------------------------------------------

class SensorEntry(SensorIn):
    """A sensor in the flat form of a registry document: it names its asset."""

    asset_id: RegistryId


class AssetNode(_Strict):
    """An asset nested in a line of a registry document, with its sensors."""

    asset_id: RegistryId
    name: Name | None = None
    kind: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    details: dict[str, JsonValue] = Field(default_factory=dict, max_length=50)
    sensors: list[SensorIn] = Field(default_factory=list, max_length=1000)


class LineNode(_Strict):
    """A line nested in a plant of a registry document, with its assets."""

    line_id: RegistryId
    name: Name | None = None
    assets: list[AssetNode] = Field(default_factory=list, max_length=20_000)


class PlantNode(PlantIn):
    """A plant of a registry document, with its lines nested (or none: they may come flat)."""

    lines: list[LineNode] = Field(default_factory=list, max_length=5_000)


class RegistryDocument(_Strict):
    """A tenant's registry (or part of it) as one document, nested, flat, or both.

    Nested: ``plants[].lines[].assets[].sensors[]``, each node under its parent. Flat (what
    ``GET /registry`` answers, the simulator's ``registry_payload()`` and ``tessera edge
    --registry`` read): ``plants``, ``lines`` (each with ``plant_id``), ``assets`` (``line_id``),
    ``sensors`` (``asset_id``). ``PUT /registry`` creates what does not exist and replaces the
    fields of what does; nodes it does not mention are left alone (it never deletes).
    """

    plants: list[PlantNode] = Field(default_factory=list, max_length=5_000)
    lines: list[LineIn] = Field(default_factory=list, max_length=50_000)
    assets: list[AssetIn] = Field(default_factory=list, max_length=MAX_BATCH_NODES)
    sensors: list[SensorEntry] = Field(default_factory=list, max_length=MAX_BATCH_NODES)


REGISTRY_EXAMPLE: dict[str, Any] = {"plants": [{
    "plant_id": "plant-1", "name": "Leipzig", "timezone": "Europe/Berlin", "lines": [{
        "line_id": "line-a", "name": "Bottling A", "assets": [{
            "asset_id": "pump-7", "kind": "pump", "details": {"make": "Grundfos"}, "sensors": [
                {"sensor_id": "bearing-temp", "unit": "degC", "min_value": -20, "max_value": 120,
                 "sampling_interval_s": 60},
                {"sensor_id": "vibration", "unit": "mm/s", "min_value": 0, "max_value": 50,
                 "sampling_interval_s": 60}]}]}]}]}
"""A registry document in the nested form."""
REGISTRY_FLAT_EXAMPLE: dict[str, Any] = {
    "plants": [{"plant_id": "plant-1", "name": "Leipzig", "timezone": "Europe/Berlin"}],
    "lines": [{"line_id": "line-a", "plant_id": "plant-1", "name": "Bottling A"}],
    "assets": [{"asset_id": "pump-7", "line_id": "line-a", "kind": "pump"}],
    "sensors": [{"asset_id": "pump-7", "sensor_id": "bearing-temp", "unit": "degC", "min_value": -20,
                 "max_value": 120, "sampling_interval_s": 60}]}
"""The same registry in the flat form (what ``GET /registry`` answers)."""


# --- what the API answers ------------------------------------------------------------------------

class PlantOut(BaseModel):
    """A stored plant."""

    plant_id: str
    name: str | None
    timezone: str
    created_at: datetime


class LineOut(BaseModel):
    """A stored line."""

    line_id: str
    plant_id: str
    name: str | None
    created_at: datetime


class AssetOut(BaseModel):
    """A stored asset."""

    asset_id: str
    line_id: str
    plant_id: str
    name: str | None
    kind: str | None
    details: dict[str, Any]
    created_at: datetime


class SensorOut(BaseModel):
    """A stored sensor, with its watermark and how many readings it has."""

    asset_id: str
    sensor_id: str
    unit: str
    quantity: str | None
    min_value: float | None
    max_value: float | None
    sampling_interval_s: float | None
    last_ts: datetime | None = Field(description="the newest reading stored (the watermark)")
    reading_count: int
    created_at: datetime


class LevelCounts(BaseModel):
    """What an upsert did at one level."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0


class UpsertResult(BaseModel):
    """What an upsert did, per level."""

    plants: LevelCounts = Field(default_factory=LevelCounts)
    lines: LevelCounts = Field(default_factory=LevelCounts)
    assets: LevelCounts = Field(default_factory=LevelCounts)
    sensors: LevelCounts = Field(default_factory=LevelCounts)


# --- rules -----------------------------------------------------------------------------------------

def checked_quantity(unit: str, quantity: str | None) -> str | None:
    """The sensor's quantity: ``unit``'s when ``quantity`` is absent; ValueError when they disagree."""
    derived = quantity_of(unit)
    if quantity is None or quantity == derived:
        return derived
    if derived == "ratio" or (derived == "acceleration" and quantity == "vibration"):
        return quantity
    allowed = "any label" if derived == "ratio" else repr(derived)
    raise ValueError(f"quantity {quantity!r} does not match unit {unit!r}, which measures {derived} "
                     f"(allowed: {allowed}; known quantities: {', '.join(QUANTITIES)})")


def checked_range(min_value: float | None, max_value: float | None) -> None:
    """ValueError unless ``min_value < max_value`` (when both are given)."""
    if min_value is not None and max_value is not None and not min_value < max_value:
        raise ValueError(f"expected range needs min_value < max_value (got {min_value} and {max_value})")


def _unprocessable(loc: list[str | int], message: str, kind: str = "value_error") -> UnprocessableContent:
    where = ".".join(str(part) for part in loc)
    return UnprocessableContent(f"{where}: {message}", errors=[{"loc": loc, "msg": message, "type": kind}])


# --- reading ---------------------------------------------------------------------------------------

_LINE_ROWS = select(Line, Plant.plant_id).join(Plant, Plant.id == Line.plant_pk)
_ASSET_ROWS = (select(Asset, Line.line_id, Plant.plant_id).join(Line, Line.id == Asset.line_pk)
               .join(Plant, Plant.id == Line.plant_pk))


def _plant_out(plant: Plant) -> PlantOut:
    return PlantOut(plant_id=plant.plant_id, name=plant.name, timezone=plant.timezone, created_at=plant.created_at)


def _line_out(line: Line, plant_id: str) -> LineOut:
    return LineOut(line_id=line.line_id, plant_id=plant_id, name=line.name, created_at=line.created_at)


def _asset_out(asset: Asset, line_id: str, plant_id: str) -> AssetOut:
    return AssetOut(asset_id=asset.asset_id, line_id=line_id, plant_id=plant_id, name=asset.name, kind=asset.kind,
                    details=asset.details, created_at=asset.created_at)


def _sensor_out(sensor: Sensor, asset_id: str) -> SensorOut:
    return SensorOut(asset_id=asset_id, sensor_id=sensor.sensor_id, unit=sensor.unit, quantity=sensor.quantity,
                     min_value=sensor.min_value, max_value=sensor.max_value,
                     sampling_interval_s=sensor.sampling_interval_s, last_ts=sensor.last_ts,
                     reading_count=sensor.reading_count, created_at=sensor.created_at)


def _plant_row(session: Session, tenant_id: str, plant_id: str) -> Plant:
    plant = session.scalars(select(Plant).where(Plant.tenant_id == tenant_id, Plant.plant_id == plant_id)).first()
    if plant is None:
        raise NotFound(f"plant '{plant_id}' does not exist for this tenant")
    return plant


def _line_row(session: Session, tenant_id: str, line_id: str) -> tuple[Line, str]:
    row = session.execute(_LINE_ROWS.where(Line.tenant_id == tenant_id, Line.line_id == line_id)).first()
    if row is None:
        raise NotFound(f"line '{line_id}' does not exist for this tenant")
    return row[0], row[1]


def _asset_row(session: Session, tenant_id: str, asset_id: str) -> tuple[Asset, str, str]:
    row = session.execute(_ASSET_ROWS.where(Asset.tenant_id == tenant_id, Asset.asset_id == asset_id)).first()
    if row is None:
        raise NotFound(f"asset '{asset_id}' does not exist for this tenant")
    return row[0], row[1], row[2]


def _sensor_row(session: Session, tenant_id: str, asset_id: str, sensor_id: str) -> Sensor:
    asset = _asset_row(session, tenant_id, asset_id)[0]
    sensor = session.scalars(select(Sensor).where(Sensor.asset_pk == asset.id, Sensor.sensor_id == sensor_id)).first()
    if sensor is None:
        raise NotFound(f"sensor '{sensor_id}' of asset '{asset_id}' does not exist for this tenant")
    return sensor


def get_plant(session: Session, tenant_id: str, plant_id: str) -> PlantOut:
    """One of the tenant's plants; NotFound otherwise."""
    return _plant_out(_plant_row(session, tenant_id, plant_id))


def get_line(session: Session, tenant_id: str, line_id: str) -> LineOut:
    """One of the tenant's lines; NotFound otherwise."""
    return _line_out(*_line_row(session, tenant_id, line_id))


def get_asset(session: Session, tenant_id: str, asset_id: str) -> AssetOut:
    """One of the tenant's assets; NotFound otherwise."""
    return _asset_out(*_asset_row(session, tenant_id, asset_id))


def get_sensor(session: Session, tenant_id: str, asset_id: str, sensor_id: str) -> SensorOut:
    """One sensor of one of the tenant's assets; NotFound otherwise."""
    return _sensor_out(_sensor_row(session, tenant_id, asset_id, sensor_id), asset_id)


def list_plants(session: Session, tenant_id: str, *, after: str | None = None, limit: int = 100) -> list[PlantOut]:
    """The tenant's plants by id, the page after the id ``after`` (keyset paging)."""
    query = select(Plant).where(Plant.tenant_id == tenant_id)
    if after is not None:
        query = query.where(Plant.plant_id > after)
    return [_plant_out(plant) for plant in session.scalars(query.order_by(Plant.plant_id).limit(limit))]


def list_lines(session: Session, tenant_id: str, *, plant_id: str | None = None, after: str | None = None,
               limit: int = 100) -> list[LineOut]:
    """The tenant's lines by id (those of ``plant_id`` when given), the page after ``after``."""
    query = _keyset(_LINE_ROWS.where(Line.tenant_id == tenant_id), Line.line_id, after, limit)
    if plant_id is not None:
        query = query.where(Plant.plant_id == plant_id)
    return [_line_out(line, plant) for line, plant in session.execute(query)]


def list_assets(session: Session, tenant_id: str, *, plant_id: str | None = None, line_id: str | None = None,
                after: str | None = None, limit: int = 100) -> list[AssetOut]:
    """The tenant's assets by id (of ``plant_id`` / ``line_id`` when given), the page after ``after``."""
    query = _keyset(_ASSET_ROWS.where(Asset.tenant_id == tenant_id), Asset.asset_id, after, limit)
    if plant_id is not None:
        query = query.where(Plant.plant_id == plant_id)
    if line_id is not None:
        query = query.where(Line.line_id == line_id)
    return [_asset_out(asset, line, plant) for asset, line, plant in session.execute(query)]


def list_sensors(session: Session, tenant_id: str, asset_id: str, *, after: str | None = None,
                 limit: int = 100) -> list[SensorOut]:
    """An asset's sensors by id, the page after ``after``; NotFound for an asset not the tenant's."""
    asset = _asset_row(session, tenant_id, asset_id)[0]
    query = select(Sensor).where(Sensor.asset_pk == asset.id)
    if after is not None:
        query = query.where(Sensor.sensor_id > after)
    return [_sensor_out(sensor, asset_id)
            for sensor in session.scalars(query.order_by(Sensor.sensor_id).limit(limit))]


def _keyset(query: SelectT, key: Any, after: str | None, limit: int) -> SelectT:
    if after is not None:
        query = query.where(key > after)
    return query.order_by(key).limit(limit)


def registry_document(session: Session, tenant_id: str) -> RegistryDocument:
    """The tenant's whole registry in the flat form of :class:`RegistryDocument`, ids in order."""
    plants = session.scalars(select(Plant).where(Plant.tenant_id == tenant_id).order_by(Plant.plant_id))
    lines = session.execute(_LINE_ROWS.where(Line.tenant_id == tenant_id).order_by(Line.line_id))
    assets = session.execute(_ASSET_ROWS.where(Asset.tenant_id == tenant_id).order_by(Asset.asset_id))
    sensors = session.execute(select(Sensor, Asset.asset_id).join(Asset, Asset.id == Sensor.asset_pk)
                              .where(Sensor.tenant_id == tenant_id).order_by(Asset.asset_id, Sensor.sensor_id))
    return RegistryDocument.model_construct(
        plants=[PlantNode.model_construct(plant_id=plant.plant_id, name=plant.name, timezone=plant.timezone)
                for plant in plants],
        lines=[LineIn.model_construct(line_id=line.line_id, plant_id=plant_id, name=line.name)
               for line, plant_id in lines],
        assets=[AssetIn.model_construct(asset_id=asset.asset_id, line_id=line_id, name=asset.name, kind=asset.kind,
                                        details=asset.details) for asset, line_id, _ in assets],
        sensors=[SensorEntry.model_construct(
            asset_id=asset_id, sensor_id=sensor.sensor_id, unit=sensor.unit, quantity=sensor.quantity,
            min_value=sensor.min_value, max_value=sensor.max_value, sampling_interval_s=sensor.sampling_interval_s)
            for sensor, asset_id in sensors])


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start:start + _IN_CHUNK]


# --- writing ---------------------------------------------------------------------------------------

@dataclass
class RegistryBatch:
    """Nodes to create or replace, flat: each names its parent by id (in the batch or stored).

    ``locs`` says where each node came from in the request, for precise 422s.
    """

    plants: list[PlantIn] = field(default_factory=list)
    lines: list[LineIn] = field(default_factory=list)
    assets: list[AssetIn] = field(default_factory=list)
    sensors: list[tuple[str, SensorIn]] = field(default_factory=list)
    """(asset_id, sensor)"""
    locs: dict[tuple[str, str], list[str | int]] = field(default_factory=dict)
    """(level, id) → its location in the request body"""

    def size(self) -> int:
        """How many nodes the batch holds."""
        return len(self.plants) + len(self.lines) + len(self.assets) + len(self.sensors)


def flatten(document: RegistryDocument) -> RegistryBatch:
    """The document as a :class:`RegistryBatch` (nested nodes first, then the flat lists); 422 for
    an id given twice at a level (a sensor's: per asset)."""
    batch = RegistryBatch()
    for p, plant in enumerate(document.plants):
        loc: list[str | int] = ["body", "plants", p]
        _add(batch, batch.plants, "plant", plant.plant_id, loc,
             PlantIn.model_construct(plant_id=plant.plant_id, name=plant.name, timezone=plant.timezone))
        for n, line in enumerate(plant.lines):
            _add_nested_line(batch, plant.plant_id, line, [*loc, "lines", n])
    for n, flat_line in enumerate(document.lines):
        _add(batch, batch.lines, "line", flat_line.line_id, ["body", "lines", n], flat_line)
    for n, flat_asset in enumerate(document.assets):
        _add(batch, batch.assets, "asset", flat_asset.asset_id, ["body", "assets", n], flat_asset)
    for n, entry in enumerate(document.sensors):
        _add(batch, batch.sensors, "sensor", f"{entry.asset_id}/{entry.sensor_id}", ["body", "sensors", n],
             (entry.asset_id, entry))
    if batch.size() > MAX_BATCH_NODES:
        raise _unprocessable(["body"], f"{batch.size()} nodes in one request; at most {MAX_BATCH_NODES}")
    return batch


def _add_nested_line(batch: RegistryBatch, plant_id: str, line: LineNode, loc: list[str | int]) -> None:
    _add(batch, batch.lines, "line", line.line_id, loc,
         LineIn.model_construct(line_id=line.line_id, plant_id=plant_id, name=line.name))
    for a, asset in enumerate(line.assets):
        asset_loc = [*loc, "assets", a]
        _add(batch, batch.assets, "asset", asset.asset_id, asset_loc, AssetIn.model_construct(
            asset_id=asset.asset_id, line_id=line.line_id, name=asset.name, kind=asset.kind, details=asset.details))
        for n, sensor in enumerate(asset.sensors):
            _add(batch, batch.sensors, "sensor", f"{asset.asset_id}/{sensor.sensor_id}",
                 [*asset_loc, "sensors", n], (asset.asset_id, sensor))


def _add(batch: RegistryBatch, nodes: list[Any], level: str, node_id: str, loc: list[str | int], node: Any) -> None:
    _remember(batch, level, node_id, loc)
    nodes.append(node)


def _remember(batch: RegistryBatch, level: str, node_id: str, loc: list[str | int]) -> None:
    first = batch.locs.setdefault((level, node_id), loc)
    if first is not loc:
        where = ".".join(str(part) for part in first)
        raise _unprocessable(loc, f"{level} '{node_id}' appears twice (first at {where})")


def _loc(batch: RegistryBatch, level: str, node_id: str, field_name: str) -> list[str | int]:
    return [*batch.locs.get((level, node_id), ["body"]), field_name]


def upsert(session: Session, tenant_id: str, batch: RegistryBatch) -> UpsertResult:
    """Create the batch's nodes that do not exist and replace the fields of those that do.

    Parents are resolved from the batch or the database (an unknown one is a 422 at the child's
    ``plant_id`` / ``line_id``); a sensor whose unit would change while it has readings is a 409.
    Flushes; the caller commits (or rolls back: nothing is half-written).
    """
    try:
        return _upsert(session, tenant_id, batch)
    except IntegrityError:  # a concurrent request inserted one of the same ids first
        raise Conflict("another request wrote some of the same ids at the same time; retry") from None


def _upsert(session: Session, tenant_id: str, batch: RegistryBatch) -> UpsertResult:
    result = UpsertResult()
    plants = _write_level(session, _PLANTS, _stored(session, _PLANTS, tenant_id, Plant.plant_id, {
        p.plant_id for p in batch.plants} | {line.plant_id for line in batch.lines}), [
        (p.plant_id, {"tenant_id": tenant_id, "plant_id": p.plant_id, "name": p.name, "timezone": p.timezone})
        for p in batch.plants], result.plants)
    lines = _write_level(session, _LINES, _stored(session, _LINES, tenant_id, Line.line_id, {
        line.line_id for line in batch.lines} | {a.line_id for a in batch.assets}), [
        (line.line_id, {"tenant_id": tenant_id, "line_id": line.line_id, "name": line.name, "plant_pk": _parent(
            plants, line.plant_id, "plant", _loc(batch, "line", line.line_id, "plant_id"))}) for line in batch.lines],
        result.lines)
    assets = _write_level(session, _ASSETS, _stored(session, _ASSETS, tenant_id, Asset.asset_id, {
        a.asset_id for a in batch.assets} | {asset_id for asset_id, _ in batch.sensors}), [
        (a.asset_id, {"tenant_id": tenant_id, "asset_id": a.asset_id, "name": a.name, "kind": a.kind,
                      "details": dict(a.details), "line_pk": _parent(
                          lines, a.line_id, "line", _loc(batch, "asset", a.asset_id, "line_id"))})
        for a in batch.assets], result.assets)
    sensors = _stored_sensors(session, set(assets.values()))
    nodes = []
    for asset_id, sensor in batch.sensors:
        asset_pk = _parent(assets, asset_id, "asset", batch.locs.get(("sensor", f"{asset_id}/{sensor.sensor_id}"),
                                                                     ["body", "asset_id"]))
        key = f"{asset_pk}/{sensor.sensor_id}"
        if key in sensors:
            _refuse_unit_change(session, sensors[key][1], sensor.unit, asset_id)
        nodes.append((key, {"tenant_id": tenant_id, "asset_pk": asset_pk, "sensor_id": sensor.sensor_id,
                            "unit": sensor.unit, "quantity": sensor.quantity, "min_value": sensor.min_value,
                            "max_value": sensor.max_value, "sampling_interval_s": sensor.sampling_interval_s}))
    _write_level(session, _SENSORS, {key: (pk, row._mapping) for key, (pk, row) in sensors.items()}, nodes,
                 result.sensors)
    return result


@dataclass(frozen=True)
class _Level:
    """How one level's rows are keyed: ``keys`` joined by ``/`` make the node id of a row."""

    model: Any
    keys: tuple[Any, ...]
    fields: tuple[Any, ...]
    """The columns an upsert writes (compared to tell an update from no change)."""


_PLANTS = _Level(Plant, (Plant.plant_id,), (Plant.name, Plant.timezone))
_LINES = _Level(Line, (Line.line_id,), (Line.name, Line.plant_pk))
_ASSETS = _Level(Asset, (Asset.asset_id,), (Asset.name, Asset.kind, Asset.details, Asset.line_pk))
_SENSORS = _Level(Sensor, (Sensor.asset_pk, Sensor.sensor_id), (
    Sensor.unit, Sensor.quantity, Sensor.min_value, Sensor.max_value, Sensor.sampling_interval_s))


def _stored(session: Session, level: _Level, tenant_id: str, key: Any, ids: set[str]) -> dict[str, tuple[int, Any]]:
    """The tenant's stored rows of ``level`` whose ``key`` is in ``ids``: id → (pk, row of its fields)."""
    rows: dict[str, tuple[int, Any]] = {}
    model = level.model
    for chunk in _chunks(sorted(ids)):
        query = select(model.id, *level.keys, *level.fields).where(model.tenant_id == tenant_id, key.in_(chunk))
        for row in session.execute(query):
            rows[row[1]] = (row[0], row._mapping)
    return rows


def _stored_sensors(session: Session, asset_pks: set[int]) -> dict[str, tuple[int, Any]]:
    """The stored sensors of these assets: ``<asset_pk>/<sensor_id>`` → (pk, row with the unit check's columns)."""
    rows: dict[str, tuple[int, Any]] = {}
    for chunk in _chunks(sorted(asset_pks)):
        query = select(Sensor.id, Sensor.asset_pk, Sensor.sensor_id, *_SENSORS.fields, Sensor.last_ts,
                       Sensor.reading_count).where(Sensor.asset_pk.in_(chunk))
        for row in session.execute(query):
            rows[f"{row.asset_pk}/{row.sensor_id}"] = (row.id, row)
    return rows


def _parent(pks: dict[str, int], parent_id: str, level: str, loc: list[str | int]) -> int:
    pk = pks.get(parent_id)
    if pk is None:
        raise _unprocessable(loc, f"{level} '{parent_id}' does not exist for this tenant", "unknown_" + level)
    return pk


def _pks(stored: dict[str, tuple[int, Any]]) -> dict[str, int]:
    return {node_id: pk for node_id, (pk, _) in stored.items()}


def _write_level(session: Session, level: _Level, stored: dict[str, tuple[int, Any]],
                 nodes: list[tuple[str, dict[str, Any]]], counts: LevelCounts) -> dict[str, int]:
    """Insert the nodes not ``stored``, update those whose fields differ (both in bulk: one
    multi-row statement per chunk, not one per row); counts each. Returns every id → pk, stored
    ones included (children resolve their parents with it)."""
    pks = _pks(stored)
    names = [column.key for column in level.fields]
    new: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for node_id, values in nodes:
        held = stored.get(node_id)
        if held is None:
            new.append(values)
        elif any(held[1][name] != values[name] for name in names):
            changed.append({"id": held[0], **{name: values[name] for name in names}})
    returning = insert(level.model).returning(level.model.id, *level.keys, sort_by_parameter_order=True)
    for chunk in _chunks(new):
        for row in session.execute(returning, list(chunk)):
            pks["/".join(str(part) for part in row[1:])] = row[0]
    for chunk in _chunks(changed):
        session.execute(update(level.model), list(chunk))
    counts.created += len(new)
    counts.updated += len(changed)
    counts.unchanged += len(nodes) - len(new) - len(changed)
    return pks


def _assign(row: Any, values: dict[str, Any]) -> bool:
    """Set ``values`` on ``row``; whether any changed."""
    changed = False
    for name, value in values.items():
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed


def _refuse_unit_change(session: Session, sensor: Any, unit: str, asset_id: str) -> None:
    """409 when ``unit`` would replace the canonical unit of a sensor that has readings (``sensor``:
    a :class:`Sensor` or a row of its ``id``, ``sensor_id``, ``unit``, ``last_ts``, ``reading_count``)."""
    if unit == sensor.unit:
        return
    has_readings = sensor.last_ts is not None or sensor.reading_count > 0 or bool(session.scalar(
        select(exists().where(readings.c.sensor_pk == sensor.id))))
    if has_readings:
        raise Conflict(f"sensor '{sensor.sensor_id}' of asset '{asset_id}' has readings stored in "
                       f"'{sensor.unit}': its unit cannot change to '{unit}' (send readings in '{unit}' "
                       "with a unit field instead; they are converted)", sensor_id=sensor.sensor_id,
                       asset_id=asset_id, unit=sensor.unit)


# --- single-node writes ----------------------------------------------------------------------------

def create(session: Session, tenant_id: str, batch: RegistryBatch, level: str, node_id: str) -> None:
    """Create one node (the batch holds just it); Conflict when its id exists."""
    if _exists(session, tenant_id, batch, level):
        raise Conflict(f"{level} '{node_id}' exists; PUT replaces it, PATCH changes it")
    upsert(session, tenant_id, batch)


def _exists(session: Session, tenant_id: str, batch: RegistryBatch, level: str) -> bool:
    where: ColumnElement[bool]
    if level == "plant":
        where = (Plant.tenant_id == tenant_id) & (Plant.plant_id == batch.plants[0].plant_id)
    elif level == "line":
        where = (Line.tenant_id == tenant_id) & (Line.line_id == batch.lines[0].line_id)
    elif level == "asset":
        where = (Asset.tenant_id == tenant_id) & (Asset.asset_id == batch.assets[0].asset_id)
    else:
        asset_id, sensor = batch.sensors[0]
        asset = _asset_row(session, tenant_id, asset_id)[0]
        where = (Sensor.asset_pk == asset.id) & (Sensor.sensor_id == sensor.sensor_id)
    return bool(session.scalar(select(exists().where(where))))


def body_id_matches(path_id: str, body_id: str, field_name: str) -> None:
    """422 unless the id in a ``PUT`` body is the path's."""
    if body_id != path_id:
        raise _unprocessable(["body", field_name], f"'{body_id}' does not match the path's '{path_id}'")


def patch_plant(session: Session, tenant_id: str, plant_id: str, patch: PlantPatch) -> PlantOut:
    """Change the fields of a plant the patch sets."""
    plant = _plant_row(session, tenant_id, plant_id)
    changes = patch.model_dump(exclude_unset=True)
    if "timezone" in changes and changes["timezone"] is None:
        raise _unprocessable(["body", "timezone"], "a plant always has a time zone (UTC by default)")
    _assign(plant, changes)
    session.flush()
    return _plant_out(plant)


def patch_line(session: Session, tenant_id: str, line_id: str, patch: LinePatch) -> LineOut:
    """Change the fields of a line the patch sets (``plant_id`` moves it)."""
    line, plant_id = _line_row(session, tenant_id, line_id)
    changes = patch.model_dump(exclude_unset=True)
    if "plant_id" in changes:
        plant_id = _required(changes.pop("plant_id"), "plant_id")
        changes["plant_pk"] = _parent(_pks(_stored(session, _PLANTS, tenant_id, Plant.plant_id, {plant_id})),
                                      plant_id, "plant", ["body", "plant_id"])
    _assign(line, changes)
    session.flush()
    return _line_out(line, plant_id)


def patch_asset(session: Session, tenant_id: str, asset_id: str, patch: AssetPatch) -> AssetOut:
    """Change the fields of an asset the patch sets (``line_id`` moves it)."""
    asset, line_id, plant_id = _asset_row(session, tenant_id, asset_id)
    changes = patch.model_dump(exclude_unset=True)
    if "line_id" in changes:
        line_id = _required(changes.pop("line_id"), "line_id")
        changes["line_pk"] = _parent(_pks(_stored(session, _LINES, tenant_id, Line.line_id, {line_id})),
                                     line_id, "line", ["body", "line_id"])
    if "details" in changes:
        changes["details"] = changes["details"] or {}
    _assign(asset, changes)
    session.flush()
    return get_asset(session, tenant_id, asset_id)


def patch_sensor(session: Session, tenant_id: str, asset_id: str, sensor_id: str, patch: SensorPatch) -> SensorOut:
    """Change the fields of a sensor the patch sets; the result must obey the sensor rules (422),
    and a unit change of a sensor with readings is a 409."""
    sensor = _sensor_row(session, tenant_id, asset_id, sensor_id)
    changes = patch.model_dump(exclude_unset=True)
    if "unit" in changes:
        changes["unit"] = _required(changes["unit"], "unit")
        _refuse_unit_change(session, sensor, changes["unit"], asset_id)
    merged = {name: getattr(sensor, name) for name in SensorPatch.model_fields} | changes
    if "unit" in changes and "quantity" not in changes:
        merged["quantity"] = None  # derived again from the new unit
    try:
        merged["quantity"] = checked_quantity(merged["unit"], merged["quantity"])
        checked_range(merged["min_value"], merged["max_value"])
    except ValueError as error:
        raise _unprocessable(["body"], str(error)) from None
    _assign(sensor, merged)
    session.flush()
    return _sensor_out(sensor, asset_id)


def _required(value: Any, field_name: str) -> Any:
    if value is None:
        raise _unprocessable(["body", field_name], "cannot be null")
    return value


# --- deleting --------------------------------------------------------------------------------------

def delete_plant(session: Session, tenant_id: str, plant_id: str) -> None:
    """Delete a plant with its lines, assets, sensors and their readings."""
    plant = _plant_row(session, tenant_id, plant_id)
    _delete_readings(session, select(Sensor.id).join(Asset, Asset.id == Sensor.asset_pk)
                     .join(Line, Line.id == Asset.line_pk).where(Line.plant_pk == plant.id))
    session.execute(delete(Plant).where(Plant.id == plant.id))


def delete_line(session: Session, tenant_id: str, line_id: str) -> None:
    """Delete a line with its assets, sensors and their readings."""
    line = _line_row(session, tenant_id, line_id)[0]
    _delete_readings(session, select(Sensor.id).join(Asset, Asset.id == Sensor.asset_pk)
                     .where(Asset.line_pk == line.id))
    session.execute(delete(Line).where(Line.id == line.id))


def delete_asset(session: Session, tenant_id: str, asset_id: str) -> None:
    """Delete an asset with its sensors, their readings, and its risk scores, alerts and maintenance."""
    asset = _asset_row(session, tenant_id, asset_id)[0]
    _delete_readings(session, select(Sensor.id).where(Sensor.asset_pk == asset.id))
    session.execute(delete(Asset).where(Asset.id == asset.id))


def delete_sensor(session: Session, tenant_id: str, asset_id: str, sensor_id: str) -> None:
    """Delete a sensor and its readings."""
    sensor = _sensor_row(session, tenant_id, asset_id, sensor_id)
    _delete_readings(session, select(Sensor.id).where(Sensor.id == sensor.id))
    session.execute(delete(Sensor).where(Sensor.id == sensor.id))


def _delete_readings(session: Session, sensor_pks: Select[Any]) -> None:
    """Readings have no foreign key (bulk-written): they go explicitly, before their sensors."""
    session.execute(delete(readings).where(readings.c.sensor_pk.in_(sensor_pks.scalar_subquery())))


def single(level: str, node: Any, asset_id: str | None = None) -> RegistryBatch:
    """A batch of one node (a sensor needs its ``asset_id``)."""
    batch = RegistryBatch()
    if level == "plant":
        batch.plants.append(node)
    elif level == "line":
        batch.lines.append(node)
    elif level == "asset":
        batch.assets.append(node)
    else:
        assert asset_id is not None
        batch.sensors.append((asset_id, node))
    return batch

