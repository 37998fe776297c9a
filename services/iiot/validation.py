"""Validation of sensor readings against a tenant's registry, vectorised over a whole chunk.

One path for every source (files, gateway batches, MQTT): a chunk arrives as a
:class:`RawReadings` frame (long format, every column as received) and leaves as readings to keep
(``sensor_pk``, ``ts`` in UTC, ``value`` in the sensor's canonical unit) plus quarantined rows, each
with a stable reason code (:data:`Reason`). No row is dropped silently: each source row is kept
or quarantined exactly once.

Two stages:

- :func:`check_rows` needs only the registry: timestamps (ISO 8601 with an offset, or naive = the
  plant's time zone; unparseable, ambiguous/non-existent local times, those before
  :data:`EARLIEST_READING` and those more than :data:`MAX_FUTURE` ahead are ``bad_timestamp``),
  unknown asset or sensor, units (unknown, incompatible, converted otherwise), NaN/inf/text values,
  values beyond :data:`MAX_ABS_VALUE` or the sensor's expected range (``out_of_range``).
- :func:`check_watermarks` needs each sensor's watermark (``Sensor.last_ts``): rows are sorted by
  ``(sensor, ts)`` first, so a chunk need not be ordered. A reading at ``ts <= watermark`` is a
  ``duplicate`` when the same ``(sensor, ts)`` is stored or earlier in the chunk, else
  ``out_of_order``; a second reading at a ``ts`` already in the chunk is a ``duplicate``. Silences
  longer than :data:`GAP_FACTOR` sampling intervals are counted as gaps (not quarantined).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.iiot.db import Asset, Line, Plant, Sensor
from services.iiot.limits import (
    EARLIEST_READING,
    LATEST_TIME,
    MAX_ABS_VALUE,
    MAX_FUTURE,
    MAX_UTC_OFFSET,
    TIME_WINDOW,
)
from services.iiot.units import IncompatibleUnits, UnknownUnit, canonical_unit, converter
from shared.times import as_utc

Reason = Literal["malformed_row", "bad_timestamp", "unknown_asset", "unknown_sensor", "unknown_unit",
                 "incompatible_unit", "not_a_number", "out_of_range", "duplicate", "out_of_order",
                 "line_too_long", "payload_not_json", "schema"]
"""Quarantine reason codes (``QuarantinedRow.reason``): stable strings clients may match on."""
LONG_COLUMNS = ("timestamp", "asset", "sensor", "value", "unit")
"""The columns of a :class:`RawReadings` frame besides ``row_number`` (``unit`` may be empty)."""
GAP_FACTOR = 2.0
"""A silence longer than this many sampling intervals is a gap (1x would count every late sample)."""
TS_DTYPE = "datetime64[us, UTC]"
_OFFSET_PATTERN = r"(?:[zZ]|[+-]\d\d(?::?\d\d)?)$"
_KEY_SEPARATOR = "\x1f"

KeptFrame: TypeAlias = pd.DataFrame
"""Readings to store: ``sensor_pk`` (int64), ``ts`` (datetime64[us, UTC]), ``value`` (float64, canonical
unit), ``row_number`` (int64)."""
QuarantineFrame: TypeAlias = pd.DataFrame
"""Refused rows: ``row_number`` (int64), ``reason``, ``detail``, ``asset_id``, ``sensor_id`` (str or None)."""
StoredLookup = Callable[[pd.DataFrame], npt.NDArray[np.bool_]]
"""Given rows (``sensor_pk``, ``ts``), whether each ``(sensor, ts)`` is already stored."""


@dataclass(frozen=True)
class Registry:
    """A tenant's sensors, indexed for vectorised lookups by ``asset`` + ``sensor`` id.

    ``keys`` holds ``"<asset_id>\\x1f<sensor_id>"``; the arrays are aligned with it.
    """

    keys: pd.Index
    sensor_pk: npt.NDArray[np.int64]
    unit: npt.NDArray[np.object_]
    min_value: npt.NDArray[np.float64]
    max_value: npt.NDArray[np.float64]
    interval_s: npt.NDArray[np.float64]
    asset_ids: pd.Index
    asset_timezone: npt.NDArray[np.object_]

    @classmethod
    def load(cls, session: Session, tenant_id: str) -> Registry:
        """The registry of ``tenant_id`` as it is in ``session`` now."""
        sensors = session.execute(
            select(Asset.asset_id, Sensor.sensor_id, Sensor.id, Sensor.unit, Sensor.min_value, Sensor.max_value,
                   Sensor.sampling_interval_s)
            .join(Asset, Asset.id == Sensor.asset_pk).where(Sensor.tenant_id == tenant_id, Asset.tenant_id == tenant_id)
        ).all()
        assets = session.execute(
            select(Asset.asset_id, Plant.timezone).join(Line, Line.id == Asset.line_pk)
            .join(Plant, Plant.id == Line.plant_pk).where(Asset.tenant_id == tenant_id)
        ).all()
        return cls(
            keys=pd.Index([f"{row[0]}{_KEY_SEPARATOR}{row[1]}" for row in sensors], dtype=object),
            sensor_pk=np.array([row[2] for row in sensors], dtype=np.int64),
            unit=np.array([canonical_or_same(row[3]) for row in sensors], dtype=object),
            min_value=_floats([row[4] for row in sensors]),
            max_value=_floats([row[5] for row in sensors]),
            interval_s=_floats([row[6] for row in sensors]),
            asset_ids=pd.Index([row[0] for row in assets], dtype=object),
            asset_timezone=np.array([row[1] or "UTC" for row in assets], dtype=object),
        )

    @cached_property
    def position_of(self) -> dict[tuple[str, str], int]:
        """(asset id, sensor id) → position in the arrays."""
        return {tuple(str(key).split(_KEY_SEPARATOR, 1)): index  # type: ignore[misc]
                for index, key in enumerate(self.keys)}

    @cached_property
    def zone_of(self) -> dict[str, str]:
        """asset id → its plant's time zone."""
        return {str(asset): str(zone) for asset, zone in zip(self.asset_ids, self.asset_timezone, strict=True)}

    def knows_all(self, assets: pd.Series, sensors: pd.Series) -> bool:
        """Whether every (asset, sensor) pair is registered."""
        if not len(assets):
            return True
        if not len(self.keys):
            return False
        keys = _as_text(assets) + _KEY_SEPARATOR + _as_text(sensors)
        return bool((self.keys.get_indexer(keys) >= 0).all())

    def interval_of(self, sensor_pks: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """Each sensor's sampling interval in seconds (NaN when it has none)."""
        order = np.argsort(self.sensor_pk)
        found = order[np.searchsorted(self.sensor_pk, sensor_pks, sorter=order).clip(0, max(len(order) - 1, 0))]
        return self.interval_s[found] if len(order) else np.full(len(sensor_pks), np.nan)


def canonical_or_same(unit: str) -> str:
    """A sensor's unit by its canonical name (as stored when the registry does not know it)."""
    try:
        return canonical_unit(unit)
    except UnknownUnit:
        return unit


def _floats(values: list[float | None]) -> npt.NDArray[np.float64]:
    return np.array([np.nan if value is None else value for value in values], dtype=np.float64)


@dataclass
class Checked:
    """The outcome of a validation stage: rows kept and rows quarantined (disjoint)."""

    kept: KeptFrame
    quarantined: QuarantineFrame
    gaps: int = 0
    watermarks: dict[int, datetime] = field(default_factory=dict)
    """The new watermark of each sensor with kept rows."""
    counts: dict[int, int] = field(default_factory=dict)
    """Kept readings per sensor."""
    keep: npt.NDArray[np.bool_] | None = None
    """:func:`check_watermarks`: which rows of its :class:`Ordered` input are kept."""


def empty_quarantine() -> QuarantineFrame:
    """A quarantine frame without rows."""
    return pd.DataFrame({"row_number": pd.Series([], dtype=np.int64), "reason": pd.Series([], dtype=object),
                         "detail": pd.Series([], dtype=object), "asset_id": pd.Series([], dtype=object),
                         "sensor_id": pd.Series([], dtype=object)})


Detail = str | Callable[[pd.DataFrame], Iterable[str]]
"""A quarantine detail: one text for every row, or a function of the refused rows."""


class _Rejections:
    """Collects quarantined rows of one frame; each row is refused for its first failure only."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.refused = np.zeros(len(frame), dtype=bool)
        self.parts: list[pd.DataFrame] = []

    def reject(self, mask: npt.NDArray[np.bool_], reason: str, detail: Detail) -> None:
        """Quarantine the rows in ``mask`` not refused yet, with ``detail``: one text, or a function
        of those rows (as a frame with their ``value``/``ts`` positions) giving one text per row."""
        mask = mask & ~self.refused
        if not mask.any():
            return
        self.refused |= mask
        rows = self.frame.loc[mask]
        details = detail if isinstance(detail, str) else np.asarray(list(detail(rows)), dtype=object)
        self.parts.append(pd.DataFrame({
            "row_number": rows["row_number"].to_numpy(np.int64), "reason": reason, "detail": details,
            "asset_id": _text_or_none(rows["asset"]), "sensor_id": _text_or_none(rows["sensor"])}))

    def quarantined(self) -> QuarantineFrame:
        if not self.parts:
            return empty_quarantine()
        return pd.concat(self.parts, ignore_index=True)


def _text_or_none(column: pd.Series) -> npt.NDArray[np.object_]:
    return np.array([None if value is None or value != value else str(value)[:64] for value in column], dtype=object)


def check_rows(frame: pd.DataFrame, registry: Registry, now: datetime | None = None) -> Checked:
    """Validate a long-format chunk against ``registry`` (no database access; see the module doc).

    ``frame``: ``row_number`` plus :data:`LONG_COLUMNS`, values as received (text, numbers,
    datetimes). Returns kept rows (``sensor_pk``, ``ts``, ``value``, ``row_number``) in input order.
    """
    frame = frame.reset_index(drop=True)
    rejections = _Rejections(frame)
    sensor_index, zones = _lookup_sensors(frame, registry, rejections)
    ts = _parse_timestamps(frame, zones, rejections, now or datetime.now(UTC))
    values = _parse_values(frame, rejections)
    values = _convert_units(frame, values, registry, sensor_index, rejections)
    _check_ranges(frame, values, registry, sensor_index, rejections)
    keep = ~rejections.refused
    kept = pd.DataFrame({"sensor_pk": registry.sensor_pk[sensor_index[keep]],
                         "ts": ts[keep].reset_index(drop=True),
                         "value": values[keep], "row_number": frame["row_number"].to_numpy(np.int64)[keep]})
    return Checked(kept=kept, quarantined=rejections.quarantined())


def _as_text(column: pd.Series) -> pd.Series:
    """A column as python strings ('' for missing)."""
    return column.fillna("").astype(str)


def _codes(column: pd.Series) -> tuple[npt.NDArray[np.int64], list[str]]:
    """Each row's code (0: missing) and the distinct texts (code - 1 indexes them)."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    return np.asarray(codes, dtype=np.int64) + 1, [str(value) for value in uniques]


def _lookup_sensors(frame: pd.DataFrame, registry: Registry,
                    rejections: _Rejections) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.object_]]:
    """Each row's position in ``registry`` (0 where unknown, those rows quarantined) and its plant's zone.

    Distinct (asset, sensor) pairs are looked up once each: a chunk names few of them.
    """
    asset_codes, assets = _codes(frame["asset"])
    sensor_codes, sensors = _codes(frame["sensor"])
    pair_codes = asset_codes * (len(sensors) + 1) + sensor_codes
    inverse, pairs = pd.factorize(pair_codes)
    by_key, zone_of = registry.position_of, registry.zone_of
    names = [(assets[code // (len(sensors) + 1) - 1] if code // (len(sensors) + 1) else "",
              sensors[code % (len(sensors) + 1) - 1] if code % (len(sensors) + 1) else "") for code in pairs.tolist()]
    position = np.array([by_key.get(name, -1) for name in names], dtype=np.int64)[inverse]
    asset_known = np.array([name[0] in zone_of for name in names], dtype=bool)[inverse]
    zones = np.array([zone_of.get(name[0], "UTC") for name in names], dtype=object)[inverse]
    unknown = position < 0
    if unknown.any():
        rejections.reject(unknown & ~asset_known, "unknown_asset",
                          lambda rows: [f"asset '{asset}' is not in the registry" for asset in rows["asset"]])
        rejections.reject(unknown & asset_known, "unknown_sensor",
                          lambda rows: [f"sensor '{sensor}' is not on asset '{asset}'"
                                        for asset, sensor in zip(rows["asset"], rows["sensor"], strict=True)])
    return np.where(unknown, 0, position), zones


def _parse_timestamps(frame: pd.DataFrame, zones: npt.NDArray[np.object_], rejections: _Rejections,
                      now: datetime) -> pd.Series:
    """Timestamps in UTC (NaT where refused): offsets honoured, naive ones in the asset's plant zone."""
    column = frame["timestamp"]
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        ts, naive = column.dt.tz_convert("UTC"), np.zeros(len(frame), dtype=bool)
    elif pd.api.types.is_datetime64_dtype(column.dtype):
        ts, naive = column.dt.tz_localize("UTC"), np.ones(len(frame), dtype=bool)
    else:
        ts, naive = _parse_iso(column, zones)
        rejections.reject(ts.isna().to_numpy(), "bad_timestamp",
                          lambda rows: [f"unparseable timestamp {str(text)[:40]!r}" for text in rows["timestamp"]])
    ts = pd.Series(ts, index=frame.index).astype(TS_DTYPE)
    _refuse_outside_window(ts, rejections, now, slack=MAX_UTC_OFFSET)  # localising fails on such wall times
    ts = _localise_naive(ts, naive, zones, rejections)
    rejections.reject(ts.isna().to_numpy(), "bad_timestamp", "missing timestamp")
    _refuse_outside_window(ts, rejections, now)
    return ts


def _refuse_outside_window(ts: pd.Series, rejections: _Rejections, now: datetime,
                           slack: timedelta = timedelta(0)) -> None:
    """Refuse times before :data:`EARLIEST_READING` or more than :data:`MAX_FUTURE` after ``now``, by
    more than ``slack`` (NaT is left alone)."""
    too_old = (ts < pd.Timestamp(EARLIEST_READING - slack)).to_numpy(dtype=bool)
    rejections.reject(too_old, "bad_timestamp", f"before {EARLIEST_READING:%Y-%m-%dT%H:%M:%SZ}: older than "
                                                "any reading these sensors take")
    future = (ts > pd.Timestamp(now + MAX_FUTURE + slack)).to_numpy(dtype=bool)
    rejections.reject(future, "bad_timestamp", f"more than {MAX_FUTURE} ahead of the server's clock")


def aware_utc(value: datetime, what: str) -> datetime:
    """``value`` in UTC (naive: taken as UTC); ValueError naming ``what`` outside :data:`TIME_WINDOW`.

    The API's times (a maintenance record's, a time range's), through :func:`shared.times.as_utc`: an offset
    that moves a time past year 1 or 9999 (``0001-01-01T00:00:00+14:00``) is refused like any time outside.
    """
    utc = as_utc(value)
    if utc is None:
        raise ValueError(f"{what} is outside the datetime range (accepted {TIME_WINDOW})")
    if not EARLIEST_READING <= utc <= LATEST_TIME:
        raise ValueError(f"{what} {utc.isoformat()} is outside the accepted times ({TIME_WINDOW})")
    return utc


def _parse_iso(column: pd.Series, zones: npt.NDArray[np.object_]) -> tuple[pd.Series, npt.NDArray[np.bool_]]:
    """ISO 8601 text as UTC (naive ones as if UTC), and which were naive (only asked where the plant's
    zone is not UTC: there naive and UTC are the same)."""
    if column.dtype == object:
        column = column.map(lambda value: value.isoformat() if isinstance(value, datetime) else value)
    codes, uniques = pd.factorize(column, use_na_sentinel=True)  # a chunk repeats each time once per sensor
    texts = pd.Series(uniques, dtype=object).map(lambda value: value.strip() if isinstance(value, str) else value)
    parsed = pd.to_datetime(texts, format="ISO8601", utc=True, errors="coerce", cache=False).astype(TS_DTYPE)
    # code -1 (a missing value) takes the NaT appended last
    parsed_codes = np.append(parsed.dt.tz_convert(None).to_numpy(), np.datetime64("NaT"))
    ts = pd.Series(pd.DatetimeIndex(parsed_codes[codes]).tz_localize("UTC"), index=column.index)
    naive = np.zeros(len(column), dtype=bool)
    local = zones != "UTC"
    if local.any():
        text = _as_text(column[local]).str.strip()
        naive[local] = ~text.str.contains(_OFFSET_PATTERN, regex=True).to_numpy(dtype=bool)
    return ts, naive


def _localise_naive(ts: pd.Series, naive: npt.NDArray[np.bool_], zones: npt.NDArray[np.object_],
                    rejections: _Rejections) -> pd.Series:
    """Naive timestamps (parsed as if UTC) re-read as wall time of their asset's plant time zone (rows
    already refused are left as they are)."""
    naive = naive & ~rejections.refused
    if not naive.any():
        return ts
    for zone in pd.unique(zones[naive]):
        if zone == "UTC":
            continue
        rows = naive & (zones == zone)
        wall = ts[rows].dt.tz_localize(None)
        try:
            local = wall.dt.tz_localize(zone, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC")
        except Exception:  # an unknown zone name in the registry: refuse rather than guess
            local = pd.Series(pd.NaT, index=wall.index, dtype=TS_DTYPE)
        unresolved = rows.copy()
        unresolved[rows] = local.isna().to_numpy() & wall.notna().to_numpy()
        rejections.reject(unresolved, "bad_timestamp", f"local time ambiguous or non-existent in {zone}")
        ts[rows] = local.astype(TS_DTYPE)
    return ts


def _parse_values(frame: pd.DataFrame, rejections: _Rejections) -> npt.NDArray[np.float64]:
    """Values as float64; NaN, inf, text and missing values quarantined as ``not_a_number``."""
    column = frame["value"]
    if pd.api.types.is_bool_dtype(column.dtype):
        numbers = np.full(len(frame), np.nan)
    elif pd.api.types.is_numeric_dtype(column.dtype):
        numbers = column.to_numpy(dtype=np.float64, na_value=np.nan)
    elif column.dtype == object:  # JSON values: a boolean is no number
        booleans = np.fromiter((isinstance(value, bool) for value in column), dtype=bool, count=len(frame))
        numbers = pd.to_numeric(column.where(~booleans, None), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)
    else:
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(numbers)
    if bad.any():
        rejections.reject(bad, "not_a_number", lambda rows: [f"value {_shown(value)} is not a finite number"
                                                             for value in rows["value"]])
    return numbers


def _shown(value: object) -> str:
    if value is None or value is pd.NA:
        return "missing"
    return repr(value)[:40] if isinstance(value, str) else str(value)[:40]


def _convert_units(frame: pd.DataFrame, values: npt.NDArray[np.float64], registry: Registry,
                   sensor_index: npt.NDArray[np.int64], rejections: _Rejections) -> npt.NDArray[np.float64]:
    """Values in each sensor's canonical unit; unknown or incompatible units quarantined."""
    unit_codes, units = _codes(frame["unit"])
    if not any(unit.strip() for unit in units):
        return values
    values = values.copy()
    # Each distinct (given unit, sensor's unit) pair once, as integer codes (no per-row object compare),
    # by unit and then by first appearance of the sensor's unit among its rows.
    target_codes, targets = pd.factorize(pd.Series(registry.unit, dtype=object))
    width = len(targets) + 1
    sensor_targets = np.asarray(target_codes, dtype=np.int64) + 1  # 0: no sensor at all (all rows refused)
    pairs = unit_codes * width + (sensor_targets[sensor_index] if len(sensor_targets) else 0)
    distinct, first, inverse = np.unique(pairs, return_index=True, return_inverse=True)
    for index in np.lexsort((first, distinct // width)).tolist():
        code, target_code = divmod(int(distinct[index]), width)
        unit = units[code - 1].strip() if code else ""
        if not unit or not target_code:
            continue
        rows = inverse == index
        try:
            convert = converter(unit, str(targets[target_code - 1]))
        except UnknownUnit:
            rejections.reject(rows, "unknown_unit", f"unknown unit {unit[:32]!r}")
            continue
        except IncompatibleUnits as exc:
            rejections.reject(rows, "incompatible_unit", str(exc)[:200])
            continue
        values[rows] = convert(values[rows])
    return values


def _check_ranges(frame: pd.DataFrame, values: npt.NDArray[np.float64], registry: Registry,
                  sensor_index: npt.NDArray[np.int64], rejections: _Rejections) -> None:
    """Values beyond :data:`MAX_ABS_VALUE` or outside the sensor's expected range (in its canonical
    unit) quarantined."""
    with np.errstate(invalid="ignore"):
        implausible = np.abs(values) > MAX_ABS_VALUE
    if implausible.any():
        rejections.reject(implausible, "out_of_range", lambda rows: [
            f"{values[index]:g} is beyond ±{MAX_ABS_VALUE:g}, the bound of every sensor's readings"
            for index in rows.index])
    if not len(registry.min_value):  # an empty registry: every row was already refused as unknown
        return
    low, high = registry.min_value[sensor_index], registry.max_value[sensor_index]
    with np.errstate(invalid="ignore"):
        outside = (values < low) | (values > high)
    if outside.any():
        rejections.reject(outside, "out_of_range", lambda rows: [
            f"{values[index]:g} outside [{low[index]:g}, {high[index]:g}]" for index in rows.index])


@dataclass
class Ordered:
    """Kept rows sorted by ``(sensor_pk, ts, row_number)`` as arrays: what :func:`check_watermarks`
    takes. Needs no database, so the ingestion job makes it in its read-ahead thread."""

    pks: npt.NDArray[np.int64]
    micros: npt.NDArray[np.int64]
    numbers: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    same_as_previous: npt.NDArray[np.bool_]
    """The row repeats the previous one's ``(sensor, ts)``: a duplicate within the batch."""

    @cached_property
    def sensors(self) -> npt.NDArray[np.int64]:
        """The distinct sensor pks, ascending."""
        if not len(self.pks):
            return np.zeros(0, dtype=np.int64)
        return self.pks[np.flatnonzero(np.append(True, self.pks[1:] != self.pks[:-1]))]


def order_rows(kept: KeptFrame) -> Ordered:
    """:func:`check_rows`' kept rows sorted by ``(sensor_pk, ts, row_number)``."""
    pks, micros = kept["sensor_pk"].to_numpy(np.int64), epoch_micros(kept["ts"])
    numbers = kept["row_number"].to_numpy(np.int64)
    order = np.lexsort((numbers, micros, pks))
    pks, micros, numbers = pks[order], micros[order], numbers[order]
    same_as_previous = np.zeros(len(pks), dtype=bool)
    same_as_previous[1:] = (pks[1:] == pks[:-1]) & (micros[1:] == micros[:-1])
    return Ordered(pks=pks, micros=micros, numbers=numbers, values=kept["value"].to_numpy(np.float64)[order],
                   same_as_previous=same_as_previous)


def check_watermarks(kept: KeptFrame | Ordered, watermarks: dict[int, datetime | None], stored: StoredLookup,
                     registry: Registry) -> Checked:
    """Refuse duplicates and out-of-order rows against each sensor's watermark; count gaps.

    ``kept`` comes from :func:`check_rows` (or :func:`order_rows` of it); ``watermarks`` maps sensor
    pk → its stored watermark; ``stored`` answers whether a late ``(sensor, ts)`` is already stored.
    Returns the rows to write sorted by ``(sensor_pk, ts)`` (``keep``: which of the ordered rows they
    are), the refused ones, the gap count and the new watermarks.
    """
    ordered = kept if isinstance(kept, Ordered) else order_rows(kept)
    pks, micros, numbers, values = ordered.pks, ordered.micros, ordered.numbers, ordered.values
    marks = _watermark_micros(pks, watermarks)
    late = micros <= marks
    same_as_previous = ordered.same_as_previous
    already_stored = np.zeros(len(pks), dtype=bool)
    lookup = late & ~same_as_previous
    if lookup.any():
        already_stored[lookup] = stored(pd.DataFrame({"sensor_pk": pks[lookup], "ts": micros_to_ts(micros[lookup])}))
    duplicate = same_as_previous | already_stored
    refused = duplicate | late
    quarantined = pd.DataFrame({
        "row_number": numbers[refused],
        "reason": np.where(duplicate[refused], "duplicate", "out_of_order").astype(object),
        "detail": np.where(duplicate[refused], "this sensor already has a reading at this time",
                           "older than the sensor's newest stored reading").astype(object),
        "asset_id": None, "sensor_id": None})
    keep = ~refused
    if keep.all():
        kept_pks, kept_micros, kept_numbers, kept_values, kept_marks = pks, micros, numbers, values, marks
    else:
        kept_pks, kept_micros, kept_numbers = pks[keep], micros[keep], numbers[keep]
        kept_values, kept_marks = values[keep], marks[keep]
    written = pd.DataFrame({"sensor_pk": kept_pks, "ts": micros_to_ts(kept_micros), "value": kept_values,
                            "row_number": kept_numbers})
    newest, counts = _per_sensor(kept_pks, kept_micros)
    gaps = count_gaps(kept_pks, kept_micros, kept_marks, registry)
    return Checked(kept=written, quarantined=quarantined, gaps=gaps, watermarks=newest, counts=counts, keep=keep)


def micros_to_ts(micros: npt.NDArray[np.int64]) -> pd.Series:
    """Epoch microseconds as a UTC timestamp series."""
    return pd.Series(np.asarray(micros, dtype=np.int64).view("datetime64[us]")).dt.tz_localize("UTC")


def _per_sensor(pks: npt.NDArray[np.int64],
                micros: npt.NDArray[np.int64]) -> tuple[dict[int, datetime], dict[int, int]]:
    """Newest time and count of readings per sensor, of readings sorted by (sensor, time)."""
    if not len(pks):
        return {}, {}
    last = np.flatnonzero(np.append(pks[1:] != pks[:-1], True))
    sizes = np.diff(np.append(-1, last))
    newest = {int(pks[index]): _EPOCH + timedelta(microseconds=int(micros[index])) for index in last.tolist()}
    return newest, {int(pks[index]): int(size) for index, size in zip(last.tolist(), sizes.tolist(), strict=True)}


def epoch_micros(ts: pd.Series) -> npt.NDArray[np.int64]:
    """UTC timestamps as integer microseconds since the epoch."""
    return np.asarray(ts.astype(TS_DTYPE).array.asi8, dtype=np.int64)


_NO_WATERMARK = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _watermark_micros(pks: npt.NDArray[np.int64], watermarks: dict[int, datetime | None]) -> npt.NDArray[np.int64]:
    """Each row's sensor watermark in epoch microseconds (the int64 minimum where there is none);
    ``pks`` sorted."""
    if not len(pks):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.append(True, pks[1:] != pks[:-1]))
    per_sensor = np.array([_micros_of(watermarks.get(int(pk))) for pk in pks[starts].tolist()], dtype=np.int64)
    return np.repeat(per_sensor, np.diff(np.append(starts, len(pks))))


def _micros_of(moment: datetime | None) -> int:
    if moment is None:
        return int(_NO_WATERMARK)
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def count_gaps(pks: npt.NDArray[np.int64], micros: npt.NDArray[np.int64], marks: npt.NDArray[np.int64],
               registry: Registry) -> int:
    """Silences longer than :data:`GAP_FACTOR` sampling intervals in readings sorted by (sensor, ts),
    the first of each sensor measured from its watermark ``marks`` (none: no gap)."""
    if not len(pks):
        return 0
    previous = np.empty(len(pks), dtype=np.int64)
    previous[1:] = micros[:-1]
    first = np.ones(len(pks), dtype=bool)
    first[1:] = pks[1:] != pks[:-1]
    previous[first] = marks[first]
    known = previous != _NO_WATERMARK
    silence_s = (micros - np.where(known, previous, micros)) / 1e6
    limit = registry.interval_of(pks) * GAP_FACTOR
    with np.errstate(invalid="ignore"):
        return int(np.count_nonzero(known & (silence_s > limit)))


def wide_to_long(frame: pd.DataFrame, sensor_columns: list[str]) -> pd.DataFrame:
    """A wide chunk (``row_number``, ``timestamp``, ``asset``, one column per sensor) as long rows.

    Empty cells are no reading (not quarantined); values keep their type; units are canonical.
    """
    parts = []
    for sensor in sensor_columns:
        cells = frame[sensor]
        present = cells.notna().to_numpy() & (cells.astype(object) != "").to_numpy()
        if not present.any():
            continue
        parts.append(pd.DataFrame({"row_number": frame["row_number"].to_numpy()[present],
                                   "timestamp": frame["timestamp"][present].reset_index(drop=True),
                                   "asset": frame["asset"].to_numpy()[present], "sensor": sensor,
                                   "value": cells.to_numpy()[present], "unit": ""}))
    if not parts:
        return pd.DataFrame({"row_number": pd.Series([], dtype=np.int64),
                             **{column: pd.Series([], dtype=object) for column in LONG_COLUMNS}})
    return pd.concat(parts, ignore_index=True)
