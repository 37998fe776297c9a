"""A **simulated** industrial fleet with ground truth: sensor readings, failures and maintenance.

Nothing here is real plant data. The simulator exists so the IIoT vertical can be trained,
tested and benchmarked end to end with known failure times; it is deterministic by seed.

The fleet is a tree: plants → lines (4 per plant) → assets (5 per line: pumps, motors,
compressors) → sensors (5 per asset, see :data:`KIND_SENSORS`) in canonical units
(:data:`QUANTITY_UNITS`) with an expected range (:data:`EXPECTED_RANGES`) and a sampling
interval of 1, 2, 5 or 10 minutes. What drives the readings:

- **Operating regimes**: each line runs on a schedule (``continuous``, ``two_shift`` with low
  load at night, ``weekdays`` stopped at weekends) and switches between load levels (about 0.55,
  0.8, 1.0 of nominal, held for hours); each asset's load is its line's times its own factor.
  Load shifts every baseline: speed, current, pressure and vibration follow it, temperature
  follows it with a thermal lag (first-order, ~2 h) on top of a daily and seasonal ambient.
- **Failure modes** (:data:`FAILURE_MODES`), each with a degradation path from a random onset to
  the failure, lasting ``3``-``28`` days (log-normal, median 11 days), so most failures are
  visible well over 72 h ahead and a few are not (short paths, or a line stopped for the weekend):
  ``bearing_wear`` vibration rises roughly exponentially (and gets noisier), bearing temperature
  creeps up; ``overheating`` (cooling fault) temperature drifts up (severity ~u^1.1) and hunts;
  ``seal_leak`` pressure decays linearly, fluctuates, and current rises as the machine works harder;
  ``electrical`` current gets noisy with growing spikes, winding temperature rises.
  Besides the level, each fault makes its signal noisier within the hour, a signature that does
  not depend on the load or the asset's own baseline.
  Each episode has its own strength (x0.7-1.3).
- **Maintenance**: preventive maintenance every ~90 days (a few hours stopped) restores health,
  cutting short any degradation in progress (the ``preventive`` event then names the mode it cut);
  a failure stops the asset until its repair (6-48 h later). Each maintenance cycle gets its own
  baseline (new parts: vibration x0.85-1.15, temperature +-1.5 degC) and recalibrates the sensors.
- **Sensor effects**: Gaussian noise, slow drift (a daily random walk of the temperature offset or
  the other sensors' gain, reset by maintenance),
  rare current spikes even when healthy, dropouts (per-sensor gaps of minutes to hours and
  whole-asset gateway outages; no rows are written in a gap).

The fleet is generated in 7-day blocks with one random stream per (asset, block) and per-asset
plans (events, gaps, drift) drawn up front, so :func:`simulate_fleet` and the streaming
:func:`write_readings` produce the same rows for the same seed and a big file is written with
memory that does not grow with its size.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

QUANTITY_UNITS: dict[str, str] = {"temperature": "degC", "vibration": "mm/s", "pressure": "bar",
                                  "current": "A", "speed": "rpm"}
"""The canonical unit of each quantity the simulator writes."""
EXPECTED_RANGES: dict[str, tuple[float, float]] = {"temperature": (-20.0, 150.0), "vibration": (0.0, 25.0),
                                                   "pressure": (0.0, 16.0), "current": (0.0, 200.0),
                                                   "speed": (0.0, 3600.0)}
"""Each quantity's expected range (the registry's min_value/max_value): simulated values stay inside."""
FAILURE_MODES = ("bearing_wear", "overheating", "seal_leak", "electrical")
EVENT_KINDS = ("failure", "repair", "preventive")
SAMPLING_INTERVALS_S = (60, 120, 300, 600)
_INTERVAL_WEIGHTS = (0.05, 0.15, 0.4, 0.4)   # ~350 readings per sensor-day: a 50-asset year is ~32 M rows
KIND_SENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    "pump": (("temp_bearing", "temperature"), ("vib_rms", "vibration"), ("pressure_discharge", "pressure"),
             ("current", "current"), ("speed", "speed")),
    "motor": (("temp_winding", "temperature"), ("temp_bearing", "temperature"), ("vib_rms", "vibration"),
              ("current", "current"), ("speed", "speed")),
    "compressor": (("temp_discharge", "temperature"), ("vib_rms", "vibration"), ("pressure_discharge", "pressure"),
                   ("current", "current"), ("speed", "speed")),
}
"""(sensor_id, quantity) of each asset kind: a motor has two temperatures and no pressure."""
KIND_MODES: dict[str, tuple[str, ...]] = {"pump": FAILURE_MODES,
                                          "motor": ("bearing_wear", "overheating", "electrical"),
                                          "compressor": FAILURE_MODES}
WIDE_SENSOR_COLUMNS = ("temp_bearing", "temp_winding", "temp_discharge", "vib_rms", "pressure_discharge",
                       "current", "speed")
"""The sensor columns of a wide file (an asset without that sensor leaves its cell empty)."""
LINES_PER_PLANT = 4
ASSETS_PER_LINE = 5
BLOCK_DAYS = 28
DEFAULT_START = "2026-01-01T00:00:00Z"
_DAY_S = 86_400.0
_HOUR_S = 3_600.0
# Temperature rise at full load and sensitivity to each failure mode, by the sensor's location.
_TEMPERATURE_ROLES: dict[str, dict[str, float]] = {
    "temp_bearing": {"rise": 28.0, "bearing_wear": 12.0, "overheating": 25.0, "seal_leak": 0.0, "electrical": 3.0},
    "temp_winding": {"rise": 45.0, "bearing_wear": 3.0, "overheating": 30.0, "seal_leak": 0.0, "electrical": 10.0},
    "temp_discharge": {"rise": 55.0, "bearing_wear": 2.0, "overheating": 35.0, "seal_leak": 6.0, "electrical": 0.0},
}


# ---------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True, slots=True)
class PlantSpec:
    """A simulated plant."""

    plant_id: str
    name: str
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class LineSpec:
    """A simulated line and its operating schedule (``continuous``, ``two_shift``, ``weekdays``)."""

    line_id: str
    plant_id: str
    name: str
    schedule: str


@dataclass(frozen=True, slots=True)
class AssetSpec:
    """A simulated asset (``kind``: pump, motor or compressor)."""

    asset_id: str
    line_id: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """A simulated sensor: canonical unit, expected range and sampling interval."""

    asset_id: str
    sensor_id: str
    quantity: str
    unit: str
    min_value: float
    max_value: float
    sampling_interval_s: float


@dataclass(frozen=True)
class FleetRegistry:
    """The simulated asset registry: plants → lines → assets → sensors."""

    plants: tuple[PlantSpec, ...]
    lines: tuple[LineSpec, ...]
    assets: tuple[AssetSpec, ...]
    sensors: tuple[SensorSpec, ...]

    def sensors_of(self, asset_id: str) -> tuple[SensorSpec, ...]:
        """The sensors of one asset, in registry order."""
        return tuple(sensor for sensor in self.sensors if sensor.asset_id == asset_id)

    def sensors_frame(self) -> pd.DataFrame:
        """One row per sensor: asset, sensor, quantity, unit, min_value, max_value, sampling_interval_s."""
        return pd.DataFrame([{"asset": s.asset_id, "sensor": s.sensor_id, "quantity": s.quantity, "unit": s.unit,
                              "min_value": s.min_value, "max_value": s.max_value,
                              "sampling_interval_s": s.sampling_interval_s} for s in self.sensors])

    def payload(self) -> dict[str, list[dict[str, Any]]]:
        """The registry as the JSON a bulk upsert takes (see :meth:`SimulatedFleet.registry_payload`)."""
        return {
            "plants": [{"plant_id": p.plant_id, "name": p.name, "timezone": p.timezone} for p in self.plants],
            "lines": [{"line_id": x.line_id, "plant_id": x.plant_id, "name": x.name} for x in self.lines],
            "assets": [{"asset_id": a.asset_id, "line_id": a.line_id, "kind": a.kind, "name": a.name}
                       for a in self.assets],
            "sensors": [{"asset_id": s.asset_id, "sensor_id": s.sensor_id, "quantity": s.quantity, "unit": s.unit,
                         "min_value": s.min_value, "max_value": s.max_value,
                         "sampling_interval_s": s.sampling_interval_s} for s in self.sensors],
        }


def _build_registry(assets: int, seed: int, uniform_interval: bool) -> FleetRegistry:
    rng = np.random.default_rng([seed, 0])
    n_lines = math.ceil(assets / ASSETS_PER_LINE)
    n_plants = math.ceil(n_lines / LINES_PER_PLANT)
    plants = tuple(PlantSpec(f"plant-{p + 1:02d}", f"Simulated plant {p + 1}") for p in range(n_plants))
    schedules = rng.choice(["continuous", "two_shift", "weekdays"], size=n_lines, p=[0.4, 0.35, 0.25])
    lines = tuple(LineSpec(f"plant-{i // LINES_PER_PLANT + 1:02d}-line-{i % LINES_PER_PLANT + 1}",
                           f"plant-{i // LINES_PER_PLANT + 1:02d}", f"Simulated line {i + 1}", str(schedules[i]))
                  for i in range(n_lines))
    kinds = rng.choice(list(KIND_SENSORS), size=assets, p=[0.45, 0.35, 0.20])
    asset_specs = tuple(AssetSpec(f"asset-{a + 1:04d}", lines[a // ASSETS_PER_LINE].line_id, str(kinds[a]),
                                  f"Simulated {kinds[a]} {a + 1}") for a in range(assets))
    sensors: list[SensorSpec] = []
    for asset in asset_specs:
        asset_interval = float(rng.choice(SAMPLING_INTERVALS_S, p=_INTERVAL_WEIGHTS))
        for sensor_id, quantity in KIND_SENSORS[asset.kind]:
            interval = asset_interval if uniform_interval else float(rng.choice(SAMPLING_INTERVALS_S,
                                                                                p=_INTERVAL_WEIGHTS))
            low, high = EXPECTED_RANGES[quantity]
            sensors.append(SensorSpec(asset.asset_id, sensor_id, quantity, QUANTITY_UNITS[quantity], low, high,
                                      interval))
    return FleetRegistry(plants, lines, asset_specs, tuple(sensors))


# ---------------------------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class _Episode:
    onset_s: float
    stop_s: float          # the failure, or the preventive maintenance that cut it short
    duration_s: float      # planned onset → failure
    mode: str
    strength: float
    failed: bool


@dataclass
class _AssetPlan:
    """Everything about one asset that spans blocks: events, load, gaps, drift, cycle baselines."""

    asset: AssetSpec
    sensors: tuple[SensorSpec, ...]
    episodes: list[_Episode]
    events: list[dict[str, Any]]
    downtimes: FloatArray                        # (n, 2) seconds, merged
    resets_s: FloatArray                         # maintenance times (new cycle after each)
    cycle_vibration: FloatArray                  # per cycle, len(resets)+1
    cycle_temperature: FloatArray
    load_h: FloatArray                           # hourly load incl. downtime, 0..~1.1
    thermal_h: FloatArray                        # lagged load for temperature
    nominal: dict[str, float]                    # v0, p0, i0, s0, ambient offset
    phases_s: FloatArray                         # per sensor: first sample's offset
    gaps: list[FloatArray]                       # per sensor: (n, 2) merged gap intervals
    drift_daily: FloatArray                      # (n_sensors, days+2): degC offset, or relative gain error
    episode_onsets: FloatArray = field(init=False)
    episode_table: FloatArray = field(init=False)  # (n, 4): stop_s, duration_s, strength, mode index

    def __post_init__(self) -> None:
        self.episode_onsets = np.array([e.onset_s for e in self.episodes], dtype=np.float64)
        self.episode_table = np.array([[e.stop_s, e.duration_s, e.strength, FAILURE_MODES.index(e.mode)]
                                       for e in self.episodes], dtype=np.float64).reshape(-1, 4)


@dataclass(frozen=True)
class FleetConfig:
    """The knobs of a simulated fleet (defaults give ~6 failures per asset-year)."""

    assets: int = 20
    days: float = 30.0
    seed: int = 0
    start: str = DEFAULT_START
    mean_healthy_days: float = 40.0
    preventive_interval_days: float = 90.0
    gap_rate_per_sensor_day: float = 0.05
    outage_rate_per_asset_day: float = 0.02
    uniform_interval: bool = False


def _merge_intervals(intervals: FloatArray) -> FloatArray:
    if len(intervals) == 0:
        return np.zeros((0, 2))
    ordered = intervals[np.argsort(intervals[:, 0])]
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return np.asarray(merged, dtype=np.float64)


def _in_intervals(times: FloatArray, intervals: FloatArray) -> npt.NDArray[np.bool_]:
    """Whether each time falls in one of the merged ``[start, end)`` intervals."""
    if len(intervals) == 0:
        return np.zeros(len(times), dtype=bool)
    index = np.searchsorted(intervals[:, 0], times, side="right") - 1
    return (index >= 0) & (times < intervals[np.maximum(index, 0), 1])


def _line_load(line_index: int, schedule: str, hours: int, start: pd.Timestamp, seed: int) -> FloatArray:
    """Hourly load of a line: regimes held for hours, shaped by the line's schedule."""
    rng = np.random.default_rng([seed, 1, line_index])
    durations = np.maximum(1, rng.exponential(6.0, size=hours // 2 + 8).round().astype(np.int64))
    levels = rng.choice([0.55, 0.8, 1.0], size=len(durations), p=[0.3, 0.45, 0.25])
    load = np.repeat(levels, durations)[:hours].astype(np.float64)
    clock = start + pd.to_timedelta(np.arange(hours), unit="h")
    hour, weekday = np.asarray(clock.hour), np.asarray(clock.day_of_week)
    night = (hour >= 22) | (hour < 6)
    if schedule == "two_shift":
        load = np.where(night, np.minimum(load, 0.5), load)
    elif schedule == "weekdays":
        load = np.where(night, np.minimum(load, 0.55), load)
        load = np.where(weekday >= 5, 0.0, load)
    return load * rng.normal(1.0, 0.03, size=hours)


def _minute(seconds: float) -> float:
    """Event times fall on whole minutes, the latent grid's resolution, so a reading is either
    before or after an event, never in a minute that straddles it."""
    return float(round(seconds / _GRID_S) * _GRID_S)


def _draw_events(plan_rng: np.random.Generator, asset: AssetSpec, config: FleetConfig,
                 horizon_s: float) -> tuple[list[_Episode], list[tuple[float, float]], list[float]]:
    """Degradation episodes, downtimes and maintenance times of one asset up to the horizon."""
    pm_every = config.preventive_interval_days * _DAY_S
    episodes: list[_Episode] = []
    downtimes: list[tuple[float, float]] = []
    resets: list[float] = []
    now = 0.0
    next_pm = _minute(plan_rng.uniform(0.1, 1.0) * pm_every)
    while now < horizon_s:
        onset = _minute(now + 12 * _HOUR_S + plan_rng.exponential(config.mean_healthy_days * _DAY_S))
        duration = _minute(float(np.clip(plan_rng.lognormal(math.log(11.0), 0.42), 3.0, 28.0)) * _DAY_S)
        mode = str(plan_rng.choice(KIND_MODES[asset.kind]))
        strength = plan_rng.uniform(0.7, 1.3)
        if next_pm < onset + duration:
            if next_pm > onset:
                episodes.append(_Episode(onset, next_pm, duration, mode, strength, failed=False))
            stop = _minute(next_pm + plan_rng.uniform(2.0, 6.0) * _HOUR_S)
            downtimes.append((next_pm, stop))
            resets.append(next_pm)
            now = stop
            next_pm = _minute(next_pm + pm_every * plan_rng.uniform(0.9, 1.1))
        else:
            failure = onset + duration
            episodes.append(_Episode(onset, failure, duration, mode, strength, failed=True))
            repaired = _minute(failure + plan_rng.uniform(6.0, 48.0) * _HOUR_S)
            downtimes.append((failure, repaired))
            resets.append(failure)
            now = repaired
            next_pm = _minute(now + pm_every * plan_rng.uniform(0.9, 1.1))
    return episodes, downtimes, resets


def _event_rows(asset: AssetSpec, episodes: list[_Episode], downtimes: list[tuple[float, float]],
                resets: list[float], horizon_s: float) -> list[dict[str, Any]]:
    """The asset's events (times in seconds from the start) that happen before the horizon."""
    by_reset = {e.stop_s: e for e in episodes}
    rows: list[dict[str, Any]] = []
    for reset, (_, back) in zip(resets, downtimes, strict=True):
        episode = by_reset.get(reset)
        if episode is not None and episode.failed:
            rows.append({"asset": asset.asset_id, "time_s": reset, "kind": "failure", "failure_mode": episode.mode,
                         "onset_s": episode.onset_s})
            rows.append({"asset": asset.asset_id, "time_s": back, "kind": "repair", "failure_mode": episode.mode,
                         "onset_s": episode.onset_s})
        else:
            rows.append({"asset": asset.asset_id, "time_s": reset, "kind": "preventive",
                         "failure_mode": episode.mode if episode else None,
                         "onset_s": episode.onset_s if episode else math.nan})
    return [row for row in rows if row["time_s"] < horizon_s]


def _hourly_load(line_load: FloatArray, factor: float, downtimes: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The asset's hourly load (zero while down) and its thermally lagged version."""
    load = np.clip(line_load * factor, 0.0, 1.15)
    hours = np.arange(len(load), dtype=np.float64) * _HOUR_S
    load = np.where(_in_intervals(hours, downtimes) | _in_intervals(hours + _HOUR_S - 1, downtimes), 0.0, load)
    return load, _first_order_lag(load, time_constant=2.0)


def _first_order_lag(series: FloatArray, time_constant: float) -> FloatArray:
    """``y[n] = a y[n-1] + (1 - a) x[n]`` with ``a = exp(-1 / time_constant)`` (a thermal lag, in steps)."""
    lag = math.exp(-1.0 / time_constant)
    out = np.empty_like(series)
    level = float(series[0]) if len(series) else 0.0
    for i, value in enumerate(series.tolist()):
        level = lag * level + (1.0 - lag) * value
        out[i] = level
    return out


def _sensor_gaps(rng: np.random.Generator, n_sensors: int, config: FleetConfig, horizon_s: float) -> list[FloatArray]:
    days = horizon_s / _DAY_S
    n_outages = rng.poisson(config.outage_rate_per_asset_day * days)
    outage_starts = rng.uniform(0, horizon_s, n_outages)
    outages = np.column_stack([outage_starts, outage_starts + rng.uniform(1, 8, n_outages) * _HOUR_S])
    gaps = []
    for _ in range(n_sensors):
        n_gaps = rng.poisson(config.gap_rate_per_sensor_day * days)
        starts = rng.uniform(0, horizon_s, n_gaps)
        lengths = np.clip(rng.lognormal(math.log(1800.0), 1.0, n_gaps), 300.0, 12 * _HOUR_S)
        gaps.append(_merge_intervals(np.vstack([np.column_stack([starts, starts + lengths]), outages])))
    return gaps


def _sensor_drift(rng: np.random.Generator, sensors: tuple[SensorSpec, ...], resets_s: FloatArray,
                  days: int) -> FloatArray:
    """Daily random-walk drift per sensor, reset by maintenance (recalibration): an offset of 0.15 degC
    per sqrt(day) for temperatures, a gain error of 0.4 % per sqrt(day) for the others (so a stopped
    machine still reads ~0)."""
    steps = rng.normal(0.0, 1.0, size=(len(sensors), days + 2))
    steps *= np.array([0.15 if s.quantity == "temperature" else 0.004 for s in sensors])[:, None]
    walk = np.cumsum(steps, axis=1)
    reset_days = np.unique(np.ceil(resets_s / _DAY_S).astype(np.int64))
    cycle = np.searchsorted(reset_days, np.arange(days + 2), side="right")
    cycle_start = np.concatenate([[0], reset_days])[cycle]
    return walk - walk[:, np.minimum(cycle_start, days + 1)]


def _phases(rng: np.random.Generator, sensors: tuple[SensorSpec, ...], shared: bool) -> FloatArray:
    """Each sensor's first-sample offset in whole seconds (one for all when they share a grid)."""
    phases = np.array([float(rng.integers(0, int(s.sampling_interval_s))) for s in sensors])
    return np.full(len(sensors), phases[0]) if shared else phases


def _asset_plan(index: int, asset: AssetSpec, sensors: tuple[SensorSpec, ...], line_load: FloatArray,
                config: FleetConfig, horizon_s: float) -> _AssetPlan:
    rng = np.random.default_rng([config.seed, 2, index])
    episodes, downtime_list, reset_list = _draw_events(rng, asset, config, horizon_s)
    downtimes = _merge_intervals(np.asarray(downtime_list, dtype=np.float64).reshape(-1, 2))
    resets = np.asarray(reset_list, dtype=np.float64)
    nominal = {"v0": rng.uniform(1.2, 2.8), "p0": rng.uniform(7.0, 10.0) if asset.kind == "compressor"
               else rng.uniform(4.0, 8.0), "i0": rng.uniform(20.0, 80.0),
               "s0": 2960.0 if rng.random() < 0.3 else 1480.0, "ambient": rng.normal(0.0, 2.0)}
    load, thermal = _hourly_load(line_load, rng.uniform(0.85, 1.1), downtimes)
    days = int(math.ceil(horizon_s / _DAY_S))
    return _AssetPlan(
        asset=asset, sensors=sensors, episodes=episodes,
        events=_event_rows(asset, episodes, downtime_list, reset_list, horizon_s),
        downtimes=downtimes, resets_s=resets,
        cycle_vibration=rng.uniform(0.85, 1.15, len(resets) + 1),
        cycle_temperature=rng.uniform(-1.5, 1.5, len(resets) + 1),
        load_h=load, thermal_h=thermal, nominal=nominal,
        phases_s=_phases(rng, sensors, config.uniform_interval),
        gaps=_sensor_gaps(rng, len(sensors), config, horizon_s),
        drift_daily=_sensor_drift(rng, sensors, resets, days),
    )


# ---------------------------------------------------------------------------------------------- signals

_SHAPES: dict[str, Callable[[FloatArray], FloatArray]] = {
    "bearing_wear": lambda u: np.expm1(2.0 * u) / math.expm1(2.0),   # roughly exponential
    "overheating": lambda u: u ** 1.1,
    "seal_leak": lambda u: u,
    "electrical": lambda u: u,
}


_GRID_S = 60.0   # latent state (load, health, drift) is evaluated on a one-minute grid per block


@dataclass(frozen=True)
class _Latent:
    """One asset's latent state over one block on the one-minute grid (index = minute - first)."""

    first_minute: int
    load: FloatArray
    on: FloatArray
    thermal: FloatArray
    ambient: FloatArray
    severity: dict[str, FloatArray]
    cycle_vibration: FloatArray
    cycle_temperature: FloatArray
    drift: FloatArray                 # (n_sensors, minutes)

    def index(self, times: FloatArray) -> IntArray:
        """The grid index of each sample time (seconds from the start)."""
        return (times // _GRID_S).astype(np.int64) - self.first_minute


def _severities(plan: _AssetPlan, times: FloatArray) -> dict[str, FloatArray]:
    """Per failure mode, the degradation severity at each time (0 healthy → ~1 at failure)."""
    out = {mode: np.zeros(len(times)) for mode in FAILURE_MODES}
    if not plan.episodes:
        return out
    index = np.searchsorted(plan.episode_onsets, times, side="right") - 1
    onset = plan.episode_onsets[np.maximum(index, 0)]
    stop, duration, strength, mode_index = plan.episode_table[np.maximum(index, 0)].T
    active = (index >= 0) & (times >= onset) & (times < stop)
    if not active.any():
        return out
    progress = np.clip((times - onset) / duration, 0.0, 1.0)
    for m, mode in enumerate(FAILURE_MODES):
        selected = active & (mode_index == m)
        if selected.any():
            out[mode] = np.where(selected, _SHAPES[mode](progress) * strength, 0.0)
    return out


def _ambient(plan: _AssetPlan, times: FloatArray, start: pd.Timestamp) -> FloatArray:
    day_of_year = start.day_of_year + times / _DAY_S
    hour_of_day = (start.hour + times / _HOUR_S) % 24.0
    return (18.0 + plan.nominal["ambient"] + 6.0 * np.sin(2 * np.pi * (day_of_year - 110.0) / 365.0)
            + 3.0 * np.sin(2 * np.pi * (hour_of_day - 9.0) / 24.0))


def _block_latent(plan: _AssetPlan, t0: float, t1: float, start: pd.Timestamp) -> _Latent:
    first = int(t0 // _GRID_S)
    minutes = np.arange(first, int(math.ceil(t1 / _GRID_S)) + 1, dtype=np.float64) * _GRID_S
    hours = minutes / _HOUR_S
    hour_grid = np.arange(len(plan.load_h), dtype=np.float64)
    load = np.interp(hours, hour_grid, plan.load_h)
    running = (load > 0.05) & ~_in_intervals(minutes, plan.downtimes)
    cycle = np.searchsorted(plan.resets_s, minutes, side="right")
    day_grid = np.arange(plan.drift_daily.shape[1], dtype=np.float64)
    return _Latent(
        first_minute=first, load=np.where(running, load, 0.0), on=running.astype(np.float64),
        thermal=np.interp(hours, hour_grid, plan.thermal_h), ambient=_ambient(plan, minutes, start),
        severity=_severities(plan, minutes), cycle_vibration=plan.cycle_vibration[cycle],
        cycle_temperature=plan.cycle_temperature[cycle],
        drift=np.stack([np.interp(minutes / _DAY_S, day_grid, row) for row in plan.drift_daily]),
    )


def _sensor_values(plan: _AssetPlan, latent: _Latent, k: int, times: FloatArray,
                   rng: np.random.Generator) -> FloatArray:
    """The simulated values of sensor ``k`` of the asset at ``times`` (seconds from the start)."""
    sensor = plan.sensors[k]
    at = latent.index(times)
    load, on = latent.load[at], latent.on[at]
    sev = {mode: latent.severity[mode][at] for mode in FAILURE_MODES}
    noise = rng.standard_normal(len(times))
    n = plan.nominal
    if sensor.quantity == "temperature":
        role = _TEMPERATURE_ROLES[sensor.sensor_id]
        heat = sum(role[mode] * sev[mode] for mode in FAILURE_MODES)
        value = (latent.ambient[at] + role["rise"] * latent.thermal[at] + latent.cycle_temperature[at]
                 + heat * (0.4 + 0.6 * on) + (0.35 + 3.0 * sev["overheating"]) * noise)
    elif sensor.quantity == "vibration":
        wear = 1.0 + 3.0 * sev["bearing_wear"] + 0.3 * sev["seal_leak"] + 0.2 * sev["electrical"]
        level = n["v0"] * latent.cycle_vibration[at] * (0.35 + 0.65 * load) * wear
        value = on * level * (1.0 + 0.08 * (1.0 + 6.0 * sev["bearing_wear"]) * noise) + 0.05 + 0.01 * np.abs(noise)
    elif sensor.quantity == "pressure":
        level = n["p0"] * (0.3 + 0.7 * load) * (1.0 - 0.45 * sev["seal_leak"])
        value = on * level * (1.0 + 0.02 * (1.0 + 8.0 * sev["seal_leak"]) * noise) + 0.05 * (1.0 + noise) ** 2
    elif sensor.quantity == "current":
        effort = 1.0 + 0.06 * sev["seal_leak"] + 0.05 * sev["overheating"]
        spiking = rng.random(len(times)) < on * (0.002 + 0.1 * sev["electrical"])
        spikes = np.where(spiking, rng.uniform(0.2, 0.8, len(times)), 0.0)
        level = n["i0"] * (0.3 + 0.7 * load) * effort * (1.0 + spikes)
        value = on * level * (1.0 + 0.025 * (1.0 + 6.0 * sev["electrical"]) * noise) + 0.3 + 0.05 * np.abs(noise)
    else:
        level = n["s0"] * (0.6 + 0.4 * load)
        value = on * level * (1.0 + 0.003 * (1.0 + 3.0 * sev["electrical"]) * noise) + 0.5 * np.abs(noise)
    if sensor.quantity == "temperature":
        return value + latent.drift[k, at]
    return value * (1.0 + latent.drift[k, at])


def _sample_times(phase_s: float, interval_s: float, t0: float, t1: float) -> FloatArray:
    first = math.ceil((t0 - phase_s) / interval_s)
    last = math.ceil((t1 - phase_s) / interval_s)
    return phase_s + interval_s * np.arange(first, last, dtype=np.float64)


@dataclass(frozen=True)
class _Block:
    """Readings of one asset over one block: seconds from the start, sensor index, value."""

    times_s: FloatArray
    sensor_index: npt.NDArray[np.int8]     # index into the asset's sensors (a byte per reading)
    values: FloatArray


def _asset_block(plan: _AssetPlan, asset_index: int, block: int, config: FleetConfig, horizon_s: float,
                 start: pd.Timestamp) -> _Block:
    rng = np.random.default_rng([config.seed, 3, asset_index, block])
    t0 = block * BLOCK_DAYS * _DAY_S
    t1 = min(horizon_s, t0 + BLOCK_DAYS * _DAY_S)
    latent = _block_latent(plan, t0, t1, start)
    parts_t, parts_s, parts_v = [], [], []
    for k, sensor in enumerate(plan.sensors):
        times = _sample_times(float(plan.phases_s[k]), sensor.sampling_interval_s, t0, t1)
        values = _sensor_values(plan, latent, k, times, rng)
        keep = ~_in_intervals(times, plan.gaps[k])
        low, high = EXPECTED_RANGES[sensor.quantity]
        digits = 1 if sensor.quantity == "speed" else 3
        parts_t.append(times[keep])
        parts_s.append(np.full(int(keep.sum()), k, dtype=np.int8))
        parts_v.append(np.round(np.clip(values[keep], low, high), digits).astype(np.float64))
    times_all = np.concatenate(parts_t)
    order = np.argsort(times_all, kind="stable")
    return _Block(times_all[order], np.concatenate(parts_s)[order], np.concatenate(parts_v)[order])


class _FleetModel:
    """The deterministic latent state of a fleet: registry, line loads and per-asset plans."""

    def __init__(self, config: FleetConfig) -> None:
        if config.assets < 1 or config.days <= 0:
            raise ValueError("a fleet needs at least one asset and a positive number of days")
        self.config = config
        self.start = pd.Timestamp(config.start).tz_convert("UTC") if pd.Timestamp(config.start).tzinfo \
            else pd.Timestamp(config.start).tz_localize("UTC")
        self.horizon_s = float(config.days) * _DAY_S
        self.registry = _build_registry(config.assets, config.seed, config.uniform_interval)
        hours = int(math.ceil(self.horizon_s / _HOUR_S)) + 2
        line_index = {line.line_id: i for i, line in enumerate(self.registry.lines)}
        loads = [_line_load(i, line.schedule, hours, self.start, config.seed)
                 for i, line in enumerate(self.registry.lines)]
        sensors_by_asset: dict[str, list[SensorSpec]] = {}
        for sensor in self.registry.sensors:
            sensors_by_asset.setdefault(sensor.asset_id, []).append(sensor)
        self.plans = [_asset_plan(i, asset, tuple(sensors_by_asset[asset.asset_id]),
                                  loads[line_index[asset.line_id]], config, self.horizon_s)
                      for i, asset in enumerate(self.registry.assets)]

    @property
    def n_blocks(self) -> int:
        """How many 7-day blocks cover the horizon."""
        return int(math.ceil(self.horizon_s / (BLOCK_DAYS * _DAY_S)))

    def block(self, asset_index: int, block: int) -> _Block:
        """One asset's readings over one block."""
        return _asset_block(self.plans[asset_index], asset_index, block, self.config, self.horizon_s, self.start)

    def events_frame(self) -> pd.DataFrame:
        """Every event, time-sorted: asset, time (UTC), kind, failure_mode, onset (UTC, ground truth)."""
        rows = [row for plan in self.plans for row in plan.events]
        frame = pd.DataFrame(rows, columns=["asset", "time_s", "kind", "failure_mode", "onset_s"])
        frame.insert(1, "time", self.start + pd.to_timedelta(frame.pop("time_s").astype(float), unit="s"))
        onset = frame.pop("onset_s").astype(float)
        frame["onset"] = self.start + pd.to_timedelta(onset, unit="s")
        frame["failure_mode"] = frame["failure_mode"].astype(object).where(frame["failure_mode"].notna(), None)
        for column in ("time", "onset"):          # nanoseconds, like the readings' timestamps
            frame[column] = frame[column].astype("datetime64[ns, UTC]")
        return frame.sort_values(["time", "asset"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- public API

@dataclass(frozen=True)
class SimulatedFleet:
    """A **simulated** fleet: its registry, readings (long format) and maintenance/failure events.

    ``readings``: one row per reading, columns ``timestamp`` (datetime64[ns, UTC]), ``asset``,
    ``sensor``, ``unit`` (categoricals) and ``value`` (float64, in the canonical unit), sorted by
    asset then time. ``events``: ``asset``, ``time`` (UTC), ``kind`` (failure, repair,
    preventive), ``failure_mode`` (the failed mode; for a preventive event the degradation it cut
    short, else None) and ``onset`` (ground truth: when that degradation began, NaT otherwise).
    ``start``/``end``: the simulated period ``[start, end)``.
    """

    registry: FleetRegistry
    readings: pd.DataFrame
    events: pd.DataFrame
    start: pd.Timestamp
    end: pd.Timestamp
    seed: int

    def failures_with_onsets(self, asset: str) -> list[tuple[datetime, datetime]]:
        """``(failure time, degradation onset)`` of each failure of ``asset``, by time (ground truth)."""
        own = self.events[(self.events["asset"] == asset) & (self.events["kind"] == "failure")].sort_values("time")
        return list(zip(own["time"].dt.to_pydatetime(), own["onset"].dt.to_pydatetime(), strict=True))

    def registry_payload(self) -> dict[str, list[dict[str, Any]]]:
        """The registry as one JSON document for a bulk upsert.

        ``{"plants": [{plant_id, name, timezone}], "lines": [{line_id, plant_id, name}],
        "assets": [{asset_id, line_id, kind, name}], "sensors": [{asset_id, sensor_id, quantity,
        unit, min_value, max_value, sampling_interval_s}]}``: each level names its parent by id.
        """
        return self.registry.payload()


def simulate_fleet(assets: int = 20, days: float = 30.0, seed: int = 0, *, start: str = DEFAULT_START,
                   mean_healthy_days: float = 40.0, preventive_interval_days: float = 90.0,
                   uniform_interval: bool = False) -> SimulatedFleet:
    """Simulate ``assets`` assets for ``days`` days (deterministic by ``seed``; see the module doc).

    ``mean_healthy_days``: mean healthy time before a degradation begins (after each reset);
    ``preventive_interval_days``: the preventive-maintenance period; ``uniform_interval``: every
    sensor of an asset samples on the same grid (what a wide file needs).
    """
    model = _FleetModel(FleetConfig(assets=assets, days=days, seed=seed, start=start,
                                    mean_healthy_days=mean_healthy_days,
                                    preventive_interval_days=preventive_interval_days,
                                    uniform_interval=uniform_interval))
    pairs = [(a, b) for a in range(len(model.plans)) for b in range(model.n_blocks)]
    readings = _long_frame(model, [model.block(a, b) for a, b in pairs], [a for a, _ in pairs])
    return SimulatedFleet(model.registry, readings, model.events_frame(), model.start,
                          model.start + pd.Timedelta(seconds=model.horizon_s), seed)


def fleet_events(assets: int = 20, days: float = 30.0, seed: int = 0, *, start: str = DEFAULT_START,
                 mean_healthy_days: float = 40.0, preventive_interval_days: float = 90.0) -> pd.DataFrame:
    """The events :func:`simulate_fleet` with the same arguments has, without generating readings (fast)."""
    return _FleetModel(FleetConfig(assets=assets, days=days, seed=seed, start=start,
                                   mean_healthy_days=mean_healthy_days,
                                   preventive_interval_days=preventive_interval_days)).events_frame()


def _long_frame(model: _FleetModel, blocks: list[_Block], asset_indices: list[int]) -> pd.DataFrame:
    """Blocks as a long frame with categorical asset/sensor/unit built from codes (no per-row strings)."""
    sensor_names = sorted({s.sensor_id for s in model.registry.sensors})
    unit_names = sorted(set(QUANTITY_UNITS.values()))
    sensor_table = [np.array([sensor_names.index(s.sensor_id) for s in p.sensors], dtype=np.int16)
                    for p in model.plans]
    unit_table = [np.array([unit_names.index(s.unit) for s in p.sensors], dtype=np.int16) for p in model.plans]
    lengths = [len(b.times_s) for b in blocks]

    def joined(parts: list[Any], dtype: Any) -> Any:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

    seconds = joined([b.times_s for b in blocks], np.int64)
    stamp = model.start.value + seconds * 1_000_000_000
    return pd.DataFrame({
        "timestamp": pd.Series(stamp.view("M8[ns]")).dt.tz_localize("UTC"),
        "asset": pd.Categorical.from_codes(np.repeat(np.asarray(asset_indices, dtype=np.int32), lengths),
                                           categories=[p.asset.asset_id for p in model.plans]),
        "sensor": pd.Categorical.from_codes(
            joined([sensor_table[a][b.sensor_index] for a, b in zip(asset_indices, blocks, strict=True)], np.int16),
            categories=sensor_names),
        "value": joined([b.values for b in blocks], np.float64),
        "unit": pd.Categorical.from_codes(
            joined([unit_table[a][b.sensor_index] for a, b in zip(asset_indices, blocks, strict=True)], np.int16),
            categories=unit_names),
    })


# ---------------------------------------------------------------------------------------------- big files

FileFormat = Literal["csv", "parquet", "jsonl"]
Layout = Literal["long", "wide"]


@dataclass(frozen=True)
class WrittenReadings:
    """What :func:`write_readings` wrote: the file, its rows, the simulated days and the fleet's truth."""

    path: Path
    rows: int
    days: float
    registry: FleetRegistry
    events: pd.DataFrame


def _format_of(path: Path, fmt: str | None) -> FileFormat:
    chosen = fmt or {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix, "")
    if chosen not in ("csv", "parquet", "jsonl"):
        raise ValueError(f"unknown readings format {chosen or path.suffix!r}: csv, parquet or jsonl")
    return chosen  # type: ignore[return-value]


def _iso_utc(model: _FleetModel, seconds: FloatArray) -> npt.NDArray[np.str_]:
    stamp = (model.start.value // 1_000_000_000 + seconds.astype(np.int64)).view("M8[s]")
    return np.datetime_as_string(stamp, unit="s", timezone="UTC")


def _chunk_frame(model: _FleetModel, asset_index: int, block: _Block, layout: Layout,
                 timestamps: Literal["iso", "datetime"]) -> pd.DataFrame:
    """One asset-block as file rows: long (timestamp, asset, sensor, value, unit) or wide."""
    plan = model.plans[asset_index]
    stamp: Any = (_iso_utc(model, block.times_s) if timestamps == "iso"
                  else pd.Series((model.start.value // 1_000_000_000 + block.times_s.astype(np.int64)).view("M8[s]"))
                  .dt.tz_localize("UTC"))
    if layout == "long":
        sensor_ids = np.array([s.sensor_id for s in plan.sensors], dtype=object)
        units = np.array([s.unit for s in plan.sensors], dtype=object)
        return pd.DataFrame({"timestamp": stamp, "asset": plan.asset.asset_id,
                             "sensor": sensor_ids[block.sensor_index], "value": block.values,
                             "unit": units[block.sensor_index]})
    unique_times, row = np.unique(block.times_s, return_inverse=True)
    cells = np.full((len(unique_times), len(WIDE_SENSOR_COLUMNS)), np.nan)
    column_of = np.array([WIDE_SENSOR_COLUMNS.index(s.sensor_id) for s in plan.sensors])
    cells[row, column_of[block.sensor_index]] = block.values
    first = np.searchsorted(block.times_s, unique_times)
    frame = pd.DataFrame(cells, columns=list(WIDE_SENSOR_COLUMNS))
    frame.insert(0, "asset", plan.asset.asset_id)
    frame.insert(0, "timestamp", stamp[first] if timestamps == "iso" else stamp.iloc[first].to_numpy())
    return frame


def _file_chunks(model: _FleetModel, layout: Layout, timestamps: Literal["iso", "datetime"],
                 rows_target: int | None) -> Iterator[pd.DataFrame]:
    """Chunks of one asset-block each, block by block (time-ordered within an asset), cut at ``rows_target``."""
    remaining = rows_target
    for block_index in range(model.n_blocks):
        for asset_index in range(len(model.plans)):
            frame = _chunk_frame(model, asset_index, model.block(asset_index, block_index), layout, timestamps)
            if remaining is not None:
                frame = frame.iloc[:remaining]
                remaining -= len(frame)
            if len(frame):
                yield frame
            if remaining == 0:
                return


def _rows_per_day(registry: FleetRegistry, layout: Layout) -> float:
    if layout == "long":
        return sum(_DAY_S / s.sampling_interval_s for s in registry.sensors)
    intervals = {s.asset_id: s.sampling_interval_s for s in registry.sensors}
    return sum(_DAY_S / interval for interval in intervals.values())


def _write_chunks(path: Path, fmt: FileFormat, chunks: Iterator[pd.DataFrame]) -> int:
    rows = 0
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer: pq.ParquetWriter | None = None
        try:
            for frame in chunks:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(path, table.schema)
                writer.write_table(table.cast(writer.schema))
                rows += len(frame)
        finally:
            if writer is not None:
                writer.close()
        return rows
    if fmt == "csv":
        return _write_csv(path, chunks)
    with path.open("w", encoding="utf-8", newline="") as handle:
        for frame in chunks:
            handle.write(frame.to_json(orient="records", lines=True))   # ends with a newline
            rows += len(frame)
    return rows


def _write_csv(path: Path, chunks: Iterator[pd.DataFrame]) -> int:
    """Plain CSV through Arrow's writer (several times pandas' speed): unquoted, NaN as an empty cell."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    rows = 0
    with path.open("wb") as handle:
        for frame in chunks:
            if rows == 0:
                handle.write((",".join(frame.columns) + "\n").encode())
            pa_csv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), handle, write_options=options)
            rows += len(frame)
    return rows


def write_readings(path: str | Path, fmt: FileFormat | None = None, rows_target: int | None = 1_000_000, *,
                   layout: Layout = "long", seed: int = 0, assets: int = 50, days: float | None = None,
                   start: str = DEFAULT_START) -> WrittenReadings:
    """Stream **simulated** readings of a fleet to ``path`` chunk by chunk (memory flat in file size).

    ``fmt``: ``csv``, ``parquet`` or ``jsonl`` (from the suffix when None). ``rows_target``: the exact
    number of data rows to write (the simulated period is sized to reach it); None writes all of
    ``days``. ``layout``: ``long`` (timestamp, asset, sensor, value, unit) or ``wide`` (timestamp,
    asset, one column per sensor id in :data:`WIDE_SENSOR_COLUMNS`, canonical units; every sensor
    of an asset samples on one grid; an empty cell means no reading). Timestamps are ISO 8601 UTC
    (``...Z``) in CSV/JSON Lines, ``timestamp[s, UTC]`` in Parquet. Each chunk is one asset over
    one 28-day block, so a file is ordered by block, then asset, then time.
    """
    target = Path(path)
    file_format = _format_of(target, fmt)
    if rows_target is None and days is None:
        raise ValueError("write_readings needs rows_target or days")
    uniform = layout == "wide"
    if days is None:
        assert rows_target is not None
        per_day = _rows_per_day(_build_registry(assets, seed, uniform), layout)
        days = max(1.0, math.ceil(rows_target / per_day * 1.15 + 1.0))
    model = _FleetModel(FleetConfig(assets=assets, days=days, seed=seed, start=start, uniform_interval=uniform))
    timestamps: Literal["iso", "datetime"] = "datetime" if file_format == "parquet" else "iso"
    rows = _write_chunks(target, file_format, _file_chunks(model, layout, timestamps, rows_target))
    if rows_target is not None and rows != rows_target:
        raise RuntimeError(f"simulated {rows} rows, fewer than the {rows_target} asked for")
    return WrittenReadings(target, rows, float(days), model.registry, model.events_frame())


def main(argv: list[str] | None = None) -> int:
    """``tessera simulate iiot``: write a **simulated** fleet's readings, registry and events."""
    parser = argparse.ArgumentParser(prog="tessera simulate iiot", description=main.__doc__)
    parser.add_argument("--assets", type=int, default=20)
    parser.add_argument("--days", type=float, default=None, help="simulated days (default 30 unless --rows)")
    parser.add_argument("--rows", type=int, default=None, help="write exactly this many rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="readings file (.csv, .parquet, .jsonl)")
    parser.add_argument("--format", choices=("csv", "parquet", "jsonl"), default=None)
    parser.add_argument("--layout", choices=("long", "wide"), default="long")
    parser.add_argument("--registry-out", type=Path, default=None, help="registry JSON (bulk upsert payload)")
    parser.add_argument("--events-out", type=Path, default=None, help="failure/maintenance events CSV")
    args = parser.parse_args(argv)
    days = args.days if args.days is not None or args.rows is not None else 30.0
    written = write_readings(args.out, args.format, args.rows, layout=args.layout, seed=args.seed,
                             assets=args.assets, days=days)
    if args.registry_out:
        args.registry_out.write_text(json.dumps(written.registry.payload(), indent=1))
    if args.events_out:
        written.events.to_csv(args.events_out, index=False)
    failures = int((written.events.kind == "failure").sum())
    print(f"{written.rows} simulated readings of {args.assets} assets over {written.days:g} days "
          f"({failures} failures) -> {written.path}")
    return 0
