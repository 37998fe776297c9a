"""Windowed sensor features, vectorised: the model's input tensor and the baseline's statistics.

**Window tensor** (the attention model's input): the last ``hours`` before ``end`` cut into ``T =
hours / step_h`` steps; per step and channel (:data:`CHANNELS`; a sensor's ``quantity`` names its
channel, several sensors of one quantity are averaged) the mean and the standard deviation of the
readings, each normalised by the sensor's expected range (``(value - min) / (max - min)``;
std / (max - min)). ``x`` is ``float32[T, F]`` with ``F = 2 * len(CHANNELS)`` in the order of
:data:`STEP_FEATURES` (the means, then the stds), ``mask`` is ``float32[T]``: 1 where the step
holds at least one reading. A window covers ``(end - hours, end]``: a reading exactly at ``end``
is in the last step. A channel with no reading in a step carries its last value from earlier in
the window (the first one seen when the gap opens the window; 0 when the channel has no reading
in the window at all, e.g. a motor's pressure), so the model never sees NaN; the mask only says
which steps had no reading at all. Filling is done per window, so training windows and scoring
windows are built the same way.

**Window features** (the gradient-boosting baseline's input, :func:`batch_window_features`): per
step feature over the observed steps of each window: mean, std, min, max, last, least-squares
slope (per step), recent-vs-earlier delta (mean of the last quarter minus the mean of the rest)
and spectral energy in three bands of the rFFT (low / mid / high thirds of the non-zero
frequencies), vectorised over ``N`` windows.

**History features** (:func:`history_features`): what a window alone cannot see, from a unit's whole
history up to the window's end (C-MAPSS engines are observed from their first cycle, test engines
too): per channel, the drift of the window's mean from the unit's early (healthy) level and the
least-squares slope over every cycle so far. Causal: only cycles up to each window's end are read.

**Training windows** (:func:`training_windows`) over a simulated fleet: see its docstring for the
labels (failure within the horizon, capped remaining useful life) and what is excluded.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pandas as pd

if TYPE_CHECKING:
    from services.iiot.simulate import SimulatedFleet

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

CHANNELS = ("temperature", "vibration", "pressure", "current", "speed")
"""The quantities the model reads, one channel each (other quantities are ignored)."""
STEP_FEATURES = tuple(f"{channel}_mean" for channel in CHANNELS) + tuple(f"{channel}_std" for channel in CHANNELS)
"""The ``F`` features of a window step, in tensor order."""
DEFAULT_RANGES: dict[str, tuple[float, float]] = {"temperature": (-20.0, 150.0), "vibration": (0.0, 25.0),
                                                  "pressure": (0.0, 16.0), "current": (0.0, 200.0),
                                                  "speed": (0.0, 3600.0)}
"""A channel's range when a sensor has no expected range (canonical units: degC, mm/s, bar, A, rpm)."""
WINDOW_STATISTICS = ("mean", "std", "min", "max", "last", "slope", "delta", "band_low", "band_mid", "band_high")
"""What :func:`batch_window_features` computes for each step feature."""
HISTORY_STATISTICS = ("drift", "history_slope")
"""What :func:`history_features` computes for each channel (all drifts, then all slopes)."""
HISTORY_BASELINE_CYCLES = 20
"""The first cycles of a unit's life whose mean stands for its healthy level in :func:`history_features`."""
RUL_CAP_H = 336.0
"""Remaining useful life labels are capped at 14 days (as C-MAPSS RUL is capped): beyond it, 'healthy'."""
_HOUR_NS = 3_600_000_000_000


@dataclass(frozen=True, slots=True)
class SensorScale:
    """How one sensor enters a window: its channel index, expected range, and owner (its asset)."""

    channel: int
    low: float
    high: float
    owner: Hashable = None


def _field(sensor: Any, name: str) -> Any:
    return sensor.get(name) if isinstance(sensor, Mapping) else getattr(sensor, name, None)


def sensor_scales(sensors: Iterable[Any], key: str = "sensor_id", owner: str | None = "asset_id"
                  ) -> dict[Hashable, SensorScale]:
    """Scales of sensors (objects or mappings with ``quantity``, ``min_value``, ``max_value``).

    ``key`` names the attribute the readings refer to them by (``sensor_id``; ``id`` for ORM rows
    whose readings carry ``sensor_pk``), ``owner`` the attribute naming their asset (``asset_id``,
    ``asset_pk``; None: one owner). Sensors of a quantity outside :data:`CHANNELS` are left out; a
    missing or empty range falls back to :data:`DEFAULT_RANGES`.
    """
    scales: dict[Hashable, SensorScale] = {}
    for sensor in sensors:
        quantity = _field(sensor, "quantity")
        if quantity not in CHANNELS:
            continue
        low, high = _field(sensor, "min_value"), _field(sensor, "max_value")
        if low is None or high is None or not high > low:
            low, high = DEFAULT_RANGES[quantity]
        scales[_field(sensor, key)] = SensorScale(CHANNELS.index(quantity), float(low), float(high),
                                                  _field(sensor, owner) if owner else None)
    return scales


def _reading_columns(readings: pd.DataFrame) -> tuple[str, str]:
    sensor = next((c for c in ("sensor", "sensor_pk", "sensor_id") if c in readings.columns), None)
    time = next((c for c in ("timestamp", "ts") if c in readings.columns), None)
    if sensor is None or time is None or "value" not in readings.columns:
        raise ValueError("readings need a sensor (sensor, sensor_pk or sensor_id), a time (timestamp or ts) "
                         f"and a value column; got {list(readings.columns)}")
    return sensor, time


def _as_utc_ns(moment: datetime | pd.Timestamp | str) -> int:
    stamp = pd.Timestamp(moment)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.value)


def _times_ns(column: pd.Series) -> IntArray:
    times = pd.to_datetime(column, utc=True)
    return np.asarray(times.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]").to_numpy()
                      .view(np.int64), dtype=np.int64)


def _sensor_codes(readings: pd.DataFrame, column: str, keys: list[Hashable]) -> IntArray:
    """Each reading's index in ``keys`` (-1 when its sensor has no scale)."""
    values = readings[column]
    if isinstance(values.dtype, pd.CategoricalDtype):    # look up each category once, not each row
        per_category = pd.Index(keys, tupleize_cols=False).get_indexer(values.cat.categories)
        codes = values.cat.codes.to_numpy()
        return np.where(codes >= 0, per_category[codes], -1).astype(np.int64)
    return np.asarray(pd.Index(keys, tupleize_cols=False).get_indexer(values.to_numpy()), dtype=np.int64)


def _step_grid(sensor_code: IntArray, step: IntArray, values: FloatArray, scales: list[SensorScale],
               owner_code: IntArray, n_owners: int, n_steps: int) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Per owner and step: channel means and stds (NaN where the channel has no reading) and presence.

    Per (sensor, step): mean and population std of the normalised readings (bincount sums), then
    per (owner, channel, step) the average over the channel's sensors that have readings.
    """
    n_sensors = len(scales)
    ok = (sensor_code >= 0) & (step >= 0) & (step < n_steps) & np.isfinite(values)
    sensor_code, step, values = sensor_code[ok], step[ok], values[ok]
    low = np.array([s.low for s in scales], dtype=np.float64)
    width = np.array([s.high - s.low for s in scales], dtype=np.float64)
    normalised = (values - low[sensor_code]) / width[sensor_code]
    key = sensor_code * n_steps + step
    size = n_sensors * n_steps
    count = np.bincount(key, minlength=size).astype(np.float64)
    total = np.bincount(key, normalised, minlength=size)
    squares = np.bincount(key, normalised * normalised, minlength=size)
    has = count > 0
    mean = np.divide(total, count, out=np.zeros(size), where=has)
    std = np.sqrt(np.maximum(np.divide(squares, count, out=np.zeros(size), where=has) - mean * mean, 0.0))
    channel = np.array([s.channel for s in scales], dtype=np.int64)
    target = ((owner_code * len(CHANNELS) + channel)[:, None] * n_steps + np.arange(n_steps)[None, :]).ravel()
    out_size = n_owners * len(CHANNELS) * n_steps
    n_present = np.bincount(target, has, minlength=out_size)
    grid = np.empty((n_owners, len(CHANNELS), 2, n_steps))
    for j, stat in enumerate((mean, std)):
        summed = np.bincount(target, stat * has, minlength=out_size)
        grid[:, :, j, :] = np.divide(summed, n_present, out=np.full(out_size, np.nan), where=n_present > 0) \
            .reshape(n_owners, len(CHANNELS), n_steps)
    x = grid.transpose(0, 3, 2, 1).reshape(n_owners, n_steps, 2 * len(CHANNELS))  # means then stds
    owner_steps = np.bincount(owner_code[sensor_code] * n_steps + step, minlength=n_owners * n_steps)
    return x, (owner_steps > 0).reshape(n_owners, n_steps)


def fill_missing(x: FloatArray) -> FloatArray:
    """Windows ``[N, T, F]`` with NaN for missing values → filled: carried forward along T, the
    first value carried back over a leading gap, 0 where a feature has no value in the window."""
    n, t, f = x.shape
    valid = ~np.isnan(x)
    last_valid = np.where(valid, np.arange(t)[None, :, None], -1)
    np.maximum.accumulate(last_valid, axis=1, out=last_valid)
    forward = np.take_along_axis(x, np.maximum(last_valid, 0), axis=1)
    first_valid = np.argmax(valid, axis=1)[:, None, :]
    backward = np.take_along_axis(x, first_valid, axis=1)
    filled = np.where(last_valid >= 0, forward, backward)
    return np.nan_to_num(filled, nan=0.0)


def _scales_from(sensors: Mapping[Any, SensorScale] | Iterable[Any], sensor_column: str
                 ) -> dict[Hashable, SensorScale]:
    if isinstance(sensors, Mapping) and all(isinstance(v, SensorScale) for v in sensors.values()):
        return dict(sensors)
    key = "id" if sensor_column == "sensor_pk" else "sensor_id"
    return sensor_scales(sensors, key=key, owner=None)


def batch_window_tensors(readings: pd.DataFrame, scales: Mapping[Any, SensorScale],
                         end: datetime | pd.Timestamp | str, hours: float = 48.0, step_h: float = 1.0
                         ) -> tuple[list[Any], Float32Array, Float32Array]:
    """Windows ending at ``end`` for every owner (asset) at once: ``(owners, x[N, T, F], mask[N, T])``.

    ``scales`` (see :func:`sensor_scales`) key the readings' sensor column and name each sensor's
    owner; owners are listed in first-seen order of ``scales``, one window each (all-masked when
    an owner has no reading in the window). One pass of bincounts over all readings: scoring
    every asset of a tenant costs one call.
    """
    sensor_column, time_column = _reading_columns(readings)
    keys = list(scales)
    scale_list = [scales[k] for k in keys]
    owners = list(dict.fromkeys(s.owner for s in scale_list))
    owner_index = {owner: i for i, owner in enumerate(owners)}
    owner_code = np.array([owner_index[s.owner] for s in scale_list], dtype=np.int64)
    n_steps = int(round(hours / step_h))
    step_ns = int(round(step_h * _HOUR_NS))
    before_end = _as_utc_ns(end) - _times_ns(readings[time_column])
    step = np.where(before_end >= 0, n_steps - 1 - before_end // step_ns, -1)
    grid, present = _step_grid(_sensor_codes(readings, sensor_column, keys), step,
                               readings["value"].to_numpy(dtype=np.float64), scale_list, owner_code,
                               len(owners), n_steps)
    return owners, fill_missing(grid).astype(np.float32), present.astype(np.float32)


def window_tensor(readings: pd.DataFrame, sensors: Mapping[Any, SensorScale] | Iterable[Any],
                  end: datetime | pd.Timestamp | str, hours: float = 48.0, step_h: float = 1.0
                  ) -> tuple[Float32Array, Float32Array]:
    """One asset's window ending at ``end``: ``(x float32[T, F], mask float32[T])`` (module doc).

    ``readings``: a frame with a sensor column (``sensor``/``sensor_id``, or ``sensor_pk``), a
    time column (``timestamp`` or ``ts``; naive = UTC) and ``value`` in canonical units.
    ``sensors``: :class:`SensorScale` by sensor key, or sensor rows/mappings (keyed by
    ``sensor_id``, or by ``id`` when the readings carry ``sensor_pk``).
    """
    sensor_column, _ = _reading_columns(readings)
    scales = {k: SensorScale(s.channel, s.low, s.high, None) for k, s in _scales_from(sensors, sensor_column).items()}
    if not scales:
        n_steps = int(round(hours / step_h))
        return np.zeros((n_steps, len(STEP_FEATURES)), np.float32), np.zeros(n_steps, np.float32)
    _, x, mask = batch_window_tensors(readings, scales, end, hours, step_h)
    return x[0], mask[0]


# ---------------------------------------------------------------------------------------------- statistics

def feature_names(channels: Iterable[str] = STEP_FEATURES) -> list[str]:
    """Names of :func:`batch_window_features`' columns: ``<channel>.<statistic>`` (the step features by default)."""
    return [f"{channel}.{stat}" for channel in channels for stat in WINDOW_STATISTICS]


def _band_energies(x: FloatArray, mean: FloatArray) -> FloatArray:
    """Energy of the demeaned series in the low/mid/high thirds of the non-zero rFFT bins: [N, F, 3]."""
    t = x.shape[1]
    power = np.abs(np.fft.rfft(x - mean[:, None, :], axis=1)) ** 2 / t
    bins = power[:, 1:, :]
    edges = np.linspace(0, bins.shape[1], 4).round().astype(int)
    return np.stack([bins[:, edges[i]:edges[i + 1], :].sum(axis=1) for i in range(3)], axis=-1)


def batch_window_features(x: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> Float32Array:
    """Statistics, trends and spectral energies of ``N`` windows: ``x[N, T, F]`` → ``float32[N, F * 10]``.

    Per step feature (columns grouped by feature, :data:`WINDOW_STATISTICS` order; names from
    :func:`feature_names`): mean, std, min, max over the observed steps (``mask`` 1; all steps
    when None), the last value, the least-squares slope per step, the mean of the last quarter
    of the observed steps minus the mean of the others, and the rFFT band energies. A window with
    no observed step gets zeros.
    """
    values = np.asarray(x, dtype=np.float64)
    n, t, f = values.shape
    weight = np.ones((n, t)) if mask is None else np.asarray(mask, dtype=np.float64).reshape(n, t)
    w = weight[:, :, None]
    observed = np.maximum(weight.sum(axis=1), 1e-12)[:, None]
    mean = (values * w).sum(axis=1) / observed
    std = np.sqrt(np.maximum(((values - mean[:, None, :]) ** 2 * w).sum(axis=1) / observed, 0.0))
    seen = w > 0
    minimum = np.where(seen, values, np.inf).min(axis=1)
    maximum = np.where(seen, values, -np.inf).max(axis=1)
    last_index = np.where(weight > 0, np.arange(t)[None, :], -1).max(axis=1)
    last = values[np.arange(n), np.maximum(last_index, 0), :]
    steps = np.arange(t, dtype=np.float64)[None, :]
    step_mean = (weight * steps).sum(axis=1, keepdims=True) / observed
    centred = (steps - step_mean) * weight
    slope = (centred[:, :, None] * (values - mean[:, None, :])).sum(axis=1) / \
        np.maximum((centred * (steps - step_mean)).sum(axis=1), 1e-12)[:, None]
    rank = np.cumsum(weight, axis=1)
    recent = (rank > 0.75 * weight.sum(axis=1, keepdims=True)) & (weight > 0)
    earlier = (weight > 0) & ~recent
    delta = _masked_mean(values, recent) - _masked_mean(values, earlier)
    stats = np.stack([mean, std, minimum, maximum, last, slope, delta], axis=-1)
    features = np.concatenate([stats, _band_energies(values, mean)], axis=-1)      # [N, F, 10]
    features = np.where((weight.sum(axis=1) > 0)[:, None, None], features, 0.0)
    return np.nan_to_num(features.reshape(n, f * len(WINDOW_STATISTICS)), posinf=0.0, neginf=0.0) \
        .astype(np.float32)


def _masked_mean(values: FloatArray, selected: npt.NDArray[np.bool_]) -> FloatArray:
    count = selected.sum(axis=1)[:, None]
    total = (values * selected[:, :, None]).sum(axis=1)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def window_features(x: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> Float32Array:
    """:func:`batch_window_features` of one window ``x[T, F]`` → ``float32[F * 10]``."""
    window = np.asarray(x)[None]
    return batch_window_features(window, None if mask is None else np.asarray(mask)[None])[0]


def history_feature_names(channels: Iterable[str]) -> list[str]:
    """Names of :func:`history_features`' columns: ``<channel>.<statistic>``, all drifts then all slopes."""
    names = list(channels)
    return [f"{channel}.{stat}" for stat in HISTORY_STATISTICS for channel in names]


def history_features(values: npt.ArrayLike, ends: npt.ArrayLike, window: int,
                     baseline_cycles: int = HISTORY_BASELINE_CYCLES) -> Float32Array:
    """Whole-history features of one unit's series ``values[cycles, F]`` at each window end → ``float32[N, 2F]``.

    ``ends[N]``: the 0-based index of each window's last cycle. Per channel (columns as
    :func:`history_feature_names`): the **drift**, the mean of the window (its last ``window`` cycles
    up to the end) minus the mean of the unit's first ``baseline_cycles`` cycles (fewer when the end
    comes sooner), and the **history slope**, the least-squares slope per cycle over cycles 0..end (0 for
    a single cycle). Only cycles up to each end are read, so a window's features never see its future.
    """
    series = np.asarray(values, dtype=np.float64)
    seen = np.asarray(ends, dtype=np.int64) + 1
    sums = _prefix_sums(series)
    timed_sums = _prefix_sums(series * np.arange(len(series), dtype=np.float64)[:, None])
    start = np.maximum(seen - window, 0)
    window_mean = (sums[seen] - sums[start]) / (seen - start)[:, None]
    early = np.minimum(seen, baseline_cycles)
    drift = window_mean - sums[early] / early[:, None]
    slope = _least_squares_slope(sums[seen], timed_sums[seen], seen)
    return np.concatenate([drift, slope], axis=1).astype(np.float32)


def _prefix_sums(series: FloatArray) -> FloatArray:
    """``[cycles + 1, F]``: row ``k`` holds the sum of the first ``k`` rows of ``series``."""
    return np.concatenate([np.zeros((1, series.shape[1])), np.cumsum(series, axis=0)])


def _least_squares_slope(total: FloatArray, timed_total: FloatArray, count: IntArray) -> FloatArray:
    """Slope of ``y`` on ``t = 0..count-1`` from the sums of ``y`` and ``t * y`` over those ``count`` points."""
    n = count.astype(np.float64)[:, None]
    sum_t = n * (n - 1) / 2
    spread = n * n * (n * n - 1) / 12  # n * sum(t^2) - sum(t)^2 for t = 0..n-1
    return (n * timed_total - sum_t * total) / np.maximum(spread, 1e-12)


# ---------------------------------------------------------------------------------------------- training

class FleetWindows(NamedTuple):
    """Sliding windows over a fleet: ``x[N, T, F]``, ``mask[N, T]``, each window's asset and end (UTC)."""

    x: Float32Array
    mask: Float32Array
    assets: npt.NDArray[np.object_]
    ends: npt.NDArray[np.datetime64]


class WindowLabels(NamedTuple):
    """Labels of windows: failure within the horizon, capped RUL in hours, and whether it is usable."""

    y_fail: Float32Array
    y_rul_h: Float32Array
    keep: npt.NDArray[np.bool_]


class TrainingWindows(NamedTuple):
    """What :func:`training_windows` returns (unpacks as ``X, mask, y_fail, y_rul_h, groups``)."""

    x: Float32Array
    mask: Float32Array
    y_fail: Float32Array
    y_rul_h: Float32Array
    groups: npt.NDArray[np.object_]


def fleet_windows(fleet: SimulatedFleet, window_h: float = 48.0, stride_h: float = 6.0, step_h: float = 1.0
                  ) -> FleetWindows:
    """Every full window of every asset of a simulated fleet, ends every ``stride_h`` hours.

    Built from one step grid per asset over the whole period (so a window equals
    :func:`window_tensor` at its end), then sliced and filled window by window.
    """
    window_steps = int(round(window_h / step_h))
    stride_steps = max(1, int(round(stride_h / step_h)))
    step_ns = int(round(step_h * _HOUR_NS))
    total_steps = int((fleet.end.value - fleet.start.value) // step_ns)
    readings = fleet.readings
    xs, masks, assets, ends = [], [], [], []
    codes = pd.Categorical(readings["asset"]).codes
    categories = list(pd.Categorical(readings["asset"]).categories)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(categories) + 1))
    end_ns = fleet.start.value + total_steps * step_ns
    for i, asset in enumerate(categories):
        rows = readings.iloc[order[bounds[i]:bounds[i + 1]]]
        grid, present = _grid_for(rows, _asset_scales(fleet, asset), end_ns, total_steps, step_ns)
        window_end_steps = np.arange(window_steps - 1, total_steps, stride_steps)
        if len(window_end_steps) == 0:
            continue
        index = window_end_steps[:, None] - np.arange(window_steps - 1, -1, -1)[None, :]
        xs.append(fill_missing(grid[0][index]).astype(np.float32))
        masks.append(present[0][index].astype(np.float32))
        assets.append(np.full(len(window_end_steps), asset, dtype=object))
        ends.append((fleet.start.value + (window_end_steps + 1) * step_ns).astype("datetime64[ns]"))
    if not xs:
        return FleetWindows(np.zeros((0, window_steps, len(STEP_FEATURES)), np.float32),
                            np.zeros((0, window_steps), np.float32), np.zeros(0, object),
                            np.zeros(0, "datetime64[ns]"))
    return FleetWindows(np.concatenate(xs), np.concatenate(masks), np.concatenate(assets), np.concatenate(ends))


def _asset_scales(fleet: SimulatedFleet, asset: Any) -> dict[Hashable, SensorScale]:
    """The asset's sensors keyed by sensor id (sensor ids repeat across assets)."""
    return {s.sensor_id: SensorScale(CHANNELS.index(s.quantity), s.min_value, s.max_value, None)
            for s in fleet.registry.sensors_of(str(asset)) if s.quantity in CHANNELS}


def _grid_for(rows: pd.DataFrame, scales: dict[Hashable, SensorScale], end_ns: int, n_steps: int, step_ns: int
              ) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    keys = list(scales)
    before_end = end_ns - _times_ns(rows["timestamp"])
    step = np.where(before_end >= 0, n_steps - 1 - before_end // step_ns, -1)
    grid, present = _step_grid(_sensor_codes(rows, "sensor", keys), step, rows["value"].to_numpy(np.float64),
                               [scales[k] for k in keys], np.zeros(len(keys), np.int64), 1, n_steps)
    return grid, present


def label_windows(events: pd.DataFrame, assets: npt.ArrayLike, ends: npt.ArrayLike, period_end: pd.Timestamp,
                  horizon_h: float = 72.0, rul_cap_h: float = RUL_CAP_H) -> WindowLabels:
    """Labels of windows ending at ``ends`` (UTC) on ``assets``, from failure/repair/preventive events.

    - ``y_fail``: 1 when the asset's next failure comes within ``horizon_h`` after the end and no
      preventive maintenance comes before it (maintenance restores health: the failure is averted).
    - ``y_rul_h``: hours to that next failure, capped at ``rul_cap_h``; the cap when maintenance
      comes first.
    - ``keep`` is False for windows that end while the asset is failed (at or after a failure,
      before its repair: nothing to predict), and for windows whose label the simulated period
      cannot tell (no event after the end and fewer than ``rul_cap_h`` hours left in the period).
    """
    asset_of = np.asarray(assets, dtype=object)
    end_ns = np.asarray(ends, dtype="datetime64[ns]").view(np.int64)
    y_fail = np.zeros(len(end_ns), np.float32)
    y_rul = np.full(len(end_ns), rul_cap_h, np.float32)
    keep = np.ones(len(end_ns), bool)
    times = _times_ns(events["time"]) if len(events) else np.zeros(0, np.int64)
    for asset in pd.unique(asset_of):
        selected = np.flatnonzero(asset_of == asset)
        mine = (events["asset"].astype(object) == asset).to_numpy()
        failures = np.sort(times[mine & (events["kind"] == "failure").to_numpy()])
        repairs = np.sort(times[mine & (events["kind"] == "repair").to_numpy()])
        preventive = np.sort(times[mine & (events["kind"] == "preventive").to_numpy()])
        fail, rul, usable = _asset_labels(end_ns[selected], failures, repairs, preventive, period_end.value,
                                          horizon_h, rul_cap_h)
        y_fail[selected], y_rul[selected], keep[selected] = fail, rul, usable
    return WindowLabels(y_fail, y_rul, keep)


def _next_after(times: IntArray, at: IntArray) -> npt.NDArray[np.float64]:
    index = np.searchsorted(times, at, side="right")
    padded = np.append(times.astype(np.float64), np.inf)
    return padded[index]


def _asset_labels(ends: IntArray, failures: IntArray, repairs: IntArray, preventive: IntArray, period_end: int,
                  horizon_h: float, rul_cap_h: float) -> tuple[Float32Array, Float32Array, npt.NDArray[np.bool_]]:
    next_failure = _next_after(failures, ends)
    next_preventive = _next_after(preventive, ends)
    previous = np.searchsorted(failures, ends, side="right") - 1
    last_failure = np.where(previous >= 0, failures[np.maximum(previous, 0)] if len(failures) else 0, -np.inf)
    repaired_after = _next_after(repairs, np.where(np.isfinite(last_failure), last_failure, 0).astype(np.int64))
    down = np.isfinite(last_failure) & (ends < repaired_after)
    failure_first = next_failure < next_preventive
    hours_to_failure = (next_failure - ends) / _HOUR_NS
    y_fail = failure_first & (hours_to_failure <= horizon_h)
    y_rul = np.where(failure_first, np.minimum(hours_to_failure, rul_cap_h), rul_cap_h)
    known = np.isfinite(np.minimum(next_failure, next_preventive)) | ((period_end - ends) / _HOUR_NS >= rul_cap_h)
    return y_fail.astype(np.float32), y_rul.astype(np.float32), ~down & known


def training_windows(fleet: SimulatedFleet, horizon_h: float = 72.0, window_h: float = 48.0,
                     stride_h: float = 6.0, step_h: float = 1.0, rul_cap_h: float = RUL_CAP_H) -> TrainingWindows:
    """Labelled windows of a **simulated** fleet: ``(X[N, T, F], mask[N, T], y_fail[N], y_rul_h[N], groups[N])``.

    Windows of ``window_h`` hours end every ``stride_h`` hours (:func:`fleet_windows`); labels
    and exclusions as :func:`label_windows` (failure within ``horizon_h``; RUL capped at
    ``rul_cap_h`` = 14 days by default); windows with no reading at all are left out too.
    ``groups`` is each window's asset id, for splits by asset.
    """
    windows = fleet_windows(fleet, window_h, stride_h, step_h)
    labels = label_windows(fleet.events, windows.assets, windows.ends, fleet.end, horizon_h, rul_cap_h)
    keep = labels.keep & (windows.mask.sum(axis=1) > 0)
    return TrainingWindows(windows.x[keep], windows.mask[keep], labels.y_fail[keep], labels.y_rul_h[keep],
                           windows.assets[keep])
