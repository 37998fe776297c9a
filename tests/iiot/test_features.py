"""Window tensors and window features against slow reference implementations, and training-window
labels around failures and maintenance."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from services.iiot.features import (
    CHANNELS,
    HISTORY_BASELINE_CYCLES,
    RUL_CAP_H,
    STEP_FEATURES,
    SensorScale,
    batch_window_features,
    batch_window_tensors,
    feature_names,
    fill_missing,
    fleet_windows,
    history_feature_names,
    history_features,
    label_windows,
    sensor_scales,
    training_windows,
    window_features,
    window_tensor,
)
from services.iiot.simulate import SimulatedFleet, simulate_fleet

END = pd.Timestamp("2026-03-01T12:00:00Z")
SENSORS: list[dict[str, Any]] = [
    {"sensor_id": "t1", "quantity": "temperature", "min_value": 0.0, "max_value": 100.0},
    {"sensor_id": "t2", "quantity": "temperature", "min_value": -20.0, "max_value": 150.0},
    {"sensor_id": "v", "quantity": "vibration", "min_value": 0.0, "max_value": 20.0},
    {"sensor_id": "c", "quantity": "current", "min_value": None, "max_value": None},   # default range
    {"sensor_id": "h", "quantity": "humidity", "min_value": 0.0, "max_value": 100.0},  # not a channel
]


@pytest.fixture(scope="module")
def fleet() -> SimulatedFleet:
    return simulate_fleet(6, 40, seed=21)


def _random_readings(rng: np.random.Generator, n: int = 400, hours: float = 12.0) -> pd.DataFrame:
    seconds = rng.uniform(-hours * 3600 - 1800, 600, n).round()
    seconds[:3] = [0.0, -hours * 3600, -3600.0]           # exactly at the end, the open start, a step edge
    frame = pd.DataFrame({"timestamp": END + pd.to_timedelta(seconds, unit="s"),
                          "sensor": rng.choice(["t1", "t2", "v", "c", "h", "unknown"], n),
                          "value": rng.normal(40.0, 10.0, n)})
    quiet = (frame.timestamp > END - pd.Timedelta("7h")) & (frame.timestamp <= END - pd.Timedelta("3h"))
    return frame[~quiet | (frame.sensor == "unknown")]     # two steps with no known sensor: masked


def _reference_window(readings: pd.DataFrame, hours: int, step_h: float) -> tuple[np.ndarray, np.ndarray]:
    """Step by step, channel by channel, with pandas: the definition in the module doc."""
    scales = {s["sensor_id"]: s for s in SENSORS if s["quantity"] in CHANNELS}
    ranges = {"current": (0.0, 200.0)}
    n_steps = int(hours / step_h)
    raw = np.full((n_steps, 2 * len(CHANNELS)), np.nan)
    mask = np.zeros(n_steps)
    for i in range(n_steps):
        lo = END - pd.Timedelta(hours=(n_steps - i) * step_h)
        hi = END - pd.Timedelta(hours=(n_steps - i - 1) * step_h)
        rows = readings[(readings.timestamp > lo) & (readings.timestamp <= hi) & readings.sensor.isin(scales)]
        mask[i] = float(len(rows) > 0)
        for c, channel in enumerate(CHANNELS):
            means, stds = [], []
            for sensor_id, spec in scales.items():
                if spec["quantity"] != channel:
                    continue
                low, high = ranges.get(channel, (spec["min_value"], spec["max_value"]))
                values = (rows[rows.sensor == sensor_id].value.to_numpy() - low) / (high - low)
                if len(values):
                    means.append(values.mean())
                    stds.append(values.std())
            if means:
                raw[i, c], raw[i, len(CHANNELS) + c] = np.mean(means), np.mean(stds)
    for f in range(raw.shape[1]):                       # carry forward, first value back, else 0
        column = pd.Series(raw[:, f]).ffill().bfill().fillna(0.0)
        raw[:, f] = column.to_numpy()
    return raw, mask


@pytest.mark.parametrize(("hours", "step_h"), [(12, 1.0), (12, 0.5), (24, 2.0)])
def test_window_tensor_matches_the_reference(hours: int, step_h: float) -> None:
    readings = _random_readings(np.random.default_rng(hours), hours=hours)
    x, mask = window_tensor(readings, SENSORS, END, hours=hours, step_h=step_h)
    want_x, want_mask = _reference_window(readings, hours, step_h)
    assert x.dtype == np.float32 and x.shape == (int(hours / step_h), len(STEP_FEATURES))
    np.testing.assert_allclose(x, want_x, atol=1e-5)
    np.testing.assert_array_equal(mask, want_mask)
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert (x[:, CHANNELS.index("pressure")] == 0).all()              # no pressure sensor: zeros


def test_window_tensor_reads_store_columns_and_naive_times() -> None:
    readings = _random_readings(np.random.default_rng(3))
    pk = {"t1": 1, "t2": 2, "v": 3, "c": 4, "h": 5, "unknown": 99}
    stored = pd.DataFrame({"sensor_pk": readings.sensor.map(pk), "ts": readings.timestamp.dt.tz_localize(None),
                           "value": readings.value})
    rows = [{**s, "id": pk[s["sensor_id"]]} for s in SENSORS]
    x, mask = window_tensor(stored, rows, END.tz_localize(None), hours=12)
    want_x, want_mask = window_tensor(readings, SENSORS, END, hours=12)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(mask, want_mask)


def test_batch_window_tensors_equal_one_window_per_asset(fleet: SimulatedFleet) -> None:
    scales = {(s.asset_id, s.sensor_id): SensorScale(CHANNELS.index(s.quantity), s.min_value, s.max_value,
                                                      s.asset_id) for s in fleet.registry.sensors}
    readings = fleet.readings.assign(key=list(zip(fleet.readings.asset.astype(str), fleet.readings.sensor.astype(str),
                                                  strict=True)))
    end = fleet.start + pd.Timedelta("20D")
    owners, x, mask = batch_window_tensors(readings.drop(columns="sensor").rename(columns={"key": "sensor"}),
                                           scales, end)
    assert owners == [a.asset_id for a in fleet.registry.assets]
    for i, asset in enumerate(owners):
        one_x, one_mask = window_tensor(fleet.readings[fleet.readings.asset == asset],
                                        fleet.registry.sensors_of(str(asset)), end)
        np.testing.assert_array_equal(x[i], one_x)
        np.testing.assert_array_equal(mask[i], one_mask)


def test_fill_missing_carries_forward_then_back() -> None:
    nan = np.nan
    x = np.array([[[nan, nan], [1.0, nan], [nan, nan], [3.0, nan]]])
    np.testing.assert_array_equal(fill_missing(x)[0], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])


def _reference_features(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    t, f = x.shape
    seen = np.flatnonzero(mask > 0)
    out = []
    for j in range(f):
        series = x[:, j]
        values = series[seen]
        slope = np.polyfit(seen.astype(float), values, 1)[0] if len(seen) > 1 else 0.0
        n_recent = len(seen) - int(np.floor(0.75 * len(seen)))
        recent, earlier = values[len(values) - n_recent:], values[:len(values) - n_recent]
        delta = (recent.mean() if len(recent) else 0.0) - (earlier.mean() if len(earlier) else 0.0)
        spectrum = np.abs(np.fft.rfft(series - values.mean())) ** 2 / t
        bins = spectrum[1:]
        edges = np.linspace(0, len(bins), 4).round().astype(int)
        bands = [bins[edges[i]:edges[i + 1]].sum() for i in range(3)]
        out += [values.mean(), values.std(), values.min(), values.max(), values[-1], slope, delta, *bands]
    return np.array(out)


def test_batch_window_features_match_the_reference() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 24, 3)) + np.linspace(0, 2, 24)[None, :, None]
    mask = (rng.random((7, 24)) > 0.25).astype(np.float32)
    mask[:, 0] = 1.0
    mask[3, -5:] = 0.0                                       # trailing gap: "last" is the last seen step
    features = batch_window_features(x, mask)
    assert features.shape == (7, 3 * 10) and features.dtype == np.float32
    for i in range(7):
        np.testing.assert_allclose(features[i], _reference_features(x[i], mask[i]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(window_features(x[2], mask[2]), features[2])
    assert len(feature_names()) == len(STEP_FEATURES) * 10
    assert not batch_window_features(x, np.zeros_like(mask)).any()        # nothing seen: zeros


def _events(rows: list[tuple[str, float, str]]) -> pd.DataFrame:
    start = pd.Timestamp("2026-01-01T00:00:00Z")
    return pd.DataFrame({"asset": [r[0] for r in rows], "time": [start + pd.Timedelta(hours=r[1]) for r in rows],
                         "kind": [r[2] for r in rows], "failure_mode": "bearing_wear"})


def test_labels_around_failures_and_maintenance() -> None:
    start = pd.Timestamp("2026-01-01T00:00:00Z")
    events = _events([("a", 100.0, "failure"), ("a", 110.0, "repair"), ("a", 300.0, "preventive"),
                      ("a", 350.0, "failure"), ("b", 1000.0, "failure")])
    cases = {  # (asset, end hour): (y_fail, rul, keep)
        ("a", 27.0): (0.0, 73.0, True), ("a", 28.0): (1.0, 72.0, True), ("a", 99.0): (1.0, 1.0, True),
        ("a", 100.0): (None, None, False), ("a", 105.0): (None, None, False),     # failed, not yet repaired
        ("a", 110.0): (0.0, RUL_CAP_H, True),                                    # repaired; maintenance next
        ("a", 250.0): (0.0, RUL_CAP_H, True),                                    # maintenance comes first
        ("a", 290.0): (0.0, RUL_CAP_H, True),
        ("a", 300.0): (1.0, 50.0, True), ("a", 340.0): (1.0, 10.0, True),
        ("a", 360.0): (None, None, False),                                       # no repair in the period
        ("b", 10.0): (0.0, RUL_CAP_H, True), ("b", 900.0): (0.0, 100.0, True),
        ("c", 100.0): (0.0, RUL_CAP_H, True),                                    # no events, period long enough
        ("c", 1000.0): (None, None, False),                                      # under the cap left: unknown
    }
    assets = [a for a, _ in cases]
    ends = np.array([(start + pd.Timedelta(hours=h)).tz_localize(None).to_datetime64() for _, h in cases])
    labels = label_windows(events, assets, ends, period_end=start + pd.Timedelta(hours=1200))
    for i, (y, rul, keep) in enumerate(cases.values()):
        assert bool(labels.keep[i]) == keep, list(cases)[i]
        if keep:
            assert labels.y_fail[i] == y and labels.y_rul_h[i] == pytest.approx(rul), list(cases)[i]


def test_fleet_windows_equal_window_tensor_at_their_end(fleet: SimulatedFleet) -> None:
    windows = fleet_windows(fleet, window_h=24, stride_h=12)
    assert windows.x.shape[1:] == (24, len(STEP_FEATURES)) and windows.x.dtype == np.float32
    for i in (0, len(windows.x) // 2, len(windows.x) - 1):
        asset, end = windows.assets[i], pd.Timestamp(windows.ends[i], tz="UTC")
        x, mask = window_tensor(fleet.readings[fleet.readings.asset == asset], fleet.registry.sensors_of(asset),
                                end, hours=24)
        np.testing.assert_array_equal(windows.x[i], x)
        np.testing.assert_array_equal(windows.mask[i], mask)


def test_training_windows_labels_follow_the_events(fleet: SimulatedFleet) -> None:
    x, mask, y_fail, y_rul, groups = training_windows(fleet, horizon_h=72, window_h=48, stride_h=6)
    assert x.shape[0] == mask.shape[0] == y_fail.shape[0] == y_rul.shape[0] == groups.shape[0] > 100
    assert set(groups) == {a.asset_id for a in fleet.registry.assets}
    assert 0 < y_fail.mean() < 0.5
    assert (y_rul <= RUL_CAP_H).all() and (y_rul > 0).all()
    assert ((y_rul <= 72) == (y_fail == 1)).all()            # no maintenance within 72 h of a failure here
    assert (mask.sum(axis=1) > 0).all()
    windows = fleet_windows(fleet, 48, 6)
    labels = label_windows(fleet.events, windows.assets, windows.ends, fleet.end)
    assert labels.keep.sum() >= len(y_fail) and (~labels.keep).sum() > 0  # failed periods left out


def test_sensor_scales_skip_unknown_quantities_and_default_ranges() -> None:
    scales = sensor_scales(SENSORS, owner=None)
    assert set(scales) == {"t1", "t2", "v", "c"}
    assert (scales["c"].low, scales["c"].high) == (0.0, 200.0)
    assert scales["t2"].channel == CHANNELS.index("temperature")


def _engine(cycles: int = 40) -> np.ndarray:
    """One hand-made engine: channel 0 rises 0.5 a cycle from 3, channel 1 stays at 7."""
    t = np.arange(cycles, dtype=np.float64)
    return np.column_stack([3.0 + 0.5 * t, np.full(cycles, 7.0)])


def test_history_slope_of_a_linear_sensor_is_its_rate_and_a_constant_one_has_no_drift() -> None:
    ends = np.array([1, 5, 19, 39])
    features = history_features(_engine(), ends, window=10)
    assert features.shape == (4, 4) and features.dtype == np.float32
    assert history_feature_names(["rising", "flat"]) == ["rising.drift", "flat.drift", "rising.history_slope",
                                                         "flat.history_slope"]
    np.testing.assert_allclose(features[:, 2], 0.5, rtol=1e-6)  # the rising sensor's slope: its rate
    np.testing.assert_allclose(features[:, [1, 3]], 0.0, atol=1e-6)  # the flat sensor: no drift, no slope
    # drift at cycle 39: the mean of cycles 30..39 minus the mean of the first 20 cycles, 0.5 * (34.5 - 9.5)
    assert features[3, 0] == pytest.approx(0.5 * (34.5 - 9.5))
    assert features[0, 0] == pytest.approx(0.0)  # two cycles seen: the window is the early level itself
    assert history_features(_engine(), np.array([0]), window=10)[0, 2] == 0.0  # one cycle: no slope


def test_history_features_read_only_the_cycles_up_to_each_end() -> None:
    engine = _engine()
    noise = np.random.default_rng(0).normal(size=engine.shape) * 100.0
    for end in (4, HISTORY_BASELINE_CYCLES - 3, 25):  # before the early level's 20 cycles are seen, and after
        later_changed = np.where(np.arange(len(engine))[:, None] > end, noise, engine)
        np.testing.assert_array_equal(history_features(engine, np.array([end]), window=8),
                                      history_features(later_changed, np.array([end]), window=8))
