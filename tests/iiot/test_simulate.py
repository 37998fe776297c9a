"""The simulated fleet: deterministic by seed, shaped like the registry says, failures and
maintenance consistent with the readings, and big files streamed with an exact row count."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.iiot import simulate
from services.iiot.simulate import (
    EXPECTED_RANGES,
    FAILURE_MODES,
    QUANTITY_UNITS,
    WIDE_SENSOR_COLUMNS,
    SimulatedFleet,
    fleet_events,
    main,
    simulate_fleet,
    write_readings,
)


@pytest.fixture(scope="module")
def fleet() -> SimulatedFleet:
    """Big enough for every failure mode to occur a few times."""
    return simulate_fleet(16, 120, seed=5)


@pytest.fixture(scope="module")
def small_fleet() -> SimulatedFleet:
    return simulate_fleet(6, 30, seed=8)


def test_same_seed_same_fleet_other_seed_differs() -> None:
    first, again = simulate_fleet(3, 6, seed=1), simulate_fleet(3, 6, seed=1)
    pd.testing.assert_frame_equal(first.readings, again.readings)
    pd.testing.assert_frame_equal(first.events, again.events)
    assert first.registry == again.registry
    other = simulate_fleet(3, 6, seed=2)
    assert not np.array_equal(other.readings.value.to_numpy()[:100], first.readings.value.to_numpy()[:100])


def test_readings_follow_the_registry(small_fleet: SimulatedFleet) -> None:
    fleet = small_fleet
    readings = fleet.readings
    assert list(readings.columns) == ["timestamp", "asset", "sensor", "value", "unit"]
    assert str(readings.timestamp.dt.tz) == "UTC"
    assert readings.timestamp.min() > fleet.start and readings.timestamp.max() < fleet.end
    sensors = fleet.registry.sensors_frame()
    rows = readings.astype({"asset": str, "sensor": str, "unit": str}).merge(
        sensors, on=["asset", "sensor"], how="left", suffixes=("", "_registry"), validate="many_to_one")
    assert rows.quantity.notna().all()                                   # every reading has its sensor
    assert (rows.unit == rows.quantity.map(QUANTITY_UNITS)).all()        # in the canonical unit
    assert rows.value.between(rows.min_value, rows.max_value).all()      # inside the expected range
    assert rows.groupby("asset").timestamp.apply(lambda t: t.is_monotonic_increasing).all()
    ordered = rows.sort_values(["asset", "sensor", "timestamp"], kind="stable")
    steps = ordered.groupby(["asset", "sensor"]).timestamp.diff().dt.total_seconds()
    assert ((steps.dropna() % ordered.sampling_interval_s[steps.notna()]) == 0).all()   # each on its grid
    assert len(readings.groupby(["asset", "sensor"], observed=True)) == len(sensors)
    assert {s.quantity for s in fleet.registry.sensors} == set(EXPECTED_RANGES)
    assert {s.sampling_interval_s for s in fleet.registry.sensors} <= {60.0, 120.0, 300.0, 600.0}


def test_dropouts_leave_gaps(small_fleet: SimulatedFleet) -> None:
    fleet = small_fleet
    rows = fleet.readings.astype({"asset": str, "sensor": str}).merge(fleet.registry.sensors_frame(),
                                                                       on=["asset", "sensor"])
    ordered = rows.sort_values(["asset", "sensor", "timestamp"], kind="stable")
    steps = ordered.groupby(["asset", "sensor"]).timestamp.diff().dt.total_seconds()
    gaps = int((steps > 2 * ordered.sampling_interval_s).sum())
    assert gaps >= len(fleet.registry.sensors)          # ~0.05 per sensor-day plus gateway outages


def test_registry_payload_is_the_flat_bulk_form(fleet: SimulatedFleet) -> None:
    payload = json.loads(json.dumps(fleet.registry_payload()))
    assert set(payload) == {"plants", "lines", "assets", "sensors"}
    plants = {p["plant_id"] for p in payload["plants"]}
    lines = {line["line_id"] for line in payload["lines"]}
    assert all(line["plant_id"] in plants for line in payload["lines"])
    assert all(asset["line_id"] in lines for asset in payload["assets"])
    assert {a["kind"] for a in payload["assets"]} <= {"pump", "motor", "compressor"}
    sensor = payload["sensors"][0]
    assert set(sensor) == {"asset_id", "sensor_id", "quantity", "unit", "min_value", "max_value",
                           "sampling_interval_s"}


def test_events_are_ordered_and_paired() -> None:
    events = fleet_events(40, 365, seed=3)
    assert events.time.is_monotonic_increasing
    assert set(events.kind) == {"failure", "repair", "preventive"}
    assert set(events.failure_mode.dropna()) == set(FAILURE_MODES)
    for _, rows in events.groupby("asset"):
        kinds = rows.kind.tolist()
        for i, kind in enumerate(kinds):
            if kind == "failure" and i + 1 < len(kinds):
                assert kinds[i + 1] == "repair"                      # a failure is followed by its repair
                assert rows.failure_mode.iloc[i + 1] == rows.failure_mode.iloc[i]
        failures = rows[rows.kind == "failure"]
        lead_days = (failures.time - failures.onset).dt.total_seconds() / 86_400
        assert lead_days.between(3, 28).all()
    cut_short = events[(events.kind == "preventive") & events.failure_mode.notna()]
    assert len(cut_short) > 0 and cut_short.onset.notna().all()      # maintenance averted some failures


def test_fleet_events_match_simulate_fleet(fleet: SimulatedFleet) -> None:
    pd.testing.assert_frame_equal(fleet_events(16, 120, seed=5), fleet.events)


def _sensor(fleet: SimulatedFleet, asset: str, sensor: str) -> pd.Series:
    rows = fleet.readings[(fleet.readings.asset == asset) & (fleet.readings.sensor == sensor)]
    return rows.set_index("timestamp").value


def test_assets_stand_still_between_failure_and_repair(fleet: SimulatedFleet) -> None:
    events = fleet.events
    checked = 0
    for _, failure in events[events.kind == "failure"].iterrows():
        repair = events[(events.asset == failure.asset) & (events.kind == "repair") & (events.time > failure.time)]
        if repair.empty:
            continue
        speed = _sensor(fleet, failure.asset, "speed")
        down = speed[(speed.index > failure.time) & (speed.index < repair.time.iloc[0])]
        assert (down < 5.0).all()
        checked += 1
    assert checked >= 5


def _hourly_spread(values: pd.Series) -> float:
    hourly = values.resample("1h").agg(["std", "mean"]).dropna()
    return float((hourly["std"] / hourly["mean"]).median())


@pytest.mark.parametrize(("mode", "sensor", "direction"), [
    ("bearing_wear", "vib_rms", 1), ("seal_leak", "pressure_discharge", -1), ("electrical", "current", 0),
])
def test_degradation_shows_before_failures(fleet: SimulatedFleet, mode: str, sensor: str, direction: int) -> None:
    """The last day before a failure differs from the day before its onset (level or spread)."""
    events = fleet.events
    failures = events[(events.kind == "failure") & (events.failure_mode == mode)]
    assert len(failures) >= 3
    shown = 0
    for _, failure in failures.iterrows():
        values = _sensor(fleet, failure.asset, sensor)
        speed = _sensor(fleet, failure.asset, "speed").reindex(values.index, method="nearest")
        running = values[speed > 100]
        late = running[(running.index >= failure.time - pd.Timedelta("1D")) & (running.index < failure.time)]
        early = running[(running.index >= failure.onset - pd.Timedelta("1D")) & (running.index < failure.onset)]
        if len(late) < 5 or len(early) < 5:
            continue
        if direction:
            shown += direction * (late.median() - early.median()) > 0.2 * early.median()
        else:       # spread within each hour, relative to its level (load changes from hour to hour)
            shown += _hourly_spread(late) > 1.5 * _hourly_spread(early)
    assert shown >= 0.8 * len(failures)


def test_write_readings_matches_simulate_fleet(tmp_path: Path) -> None:
    written = write_readings(tmp_path / "r.csv", rows_target=None, assets=3, days=4, seed=9)
    frame = pd.read_csv(written.path)
    fleet = simulate_fleet(3, 4, seed=9)
    assert written.rows == len(frame) == len(fleet.readings)
    expected = fleet.readings.assign(timestamp=fleet.readings.timestamp.dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    key = ["asset", "sensor", "timestamp"]
    got = frame.sort_values(key).reset_index(drop=True)
    want = expected.astype({"asset": str, "sensor": str, "unit": str}).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[list(want.columns)], want, check_dtype=False)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_write_readings_row_count_is_exact(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"readings.{fmt}"
    written = write_readings(path, rows_target=12_345, assets=4, seed=1)
    if fmt == "csv":
        frame = pd.read_csv(path)
    elif fmt == "jsonl":
        frame = pd.read_json(path, lines=True)
    else:
        frame = pd.read_parquet(path)
        assert str(frame.timestamp.dt.tz) == "UTC"
    assert written.rows == len(frame) == 12_345
    assert list(frame.columns) == ["timestamp", "asset", "sensor", "value", "unit"]
    assert frame.value.notna().all()


def test_wide_layout_has_one_column_per_sensor(tmp_path: Path) -> None:
    written = write_readings(tmp_path / "wide.csv", rows_target=2_000, layout="wide", assets=5, seed=2)
    frame = pd.read_csv(written.path)
    assert len(frame) == 2_000
    assert list(frame.columns) == ["timestamp", "asset", *WIDE_SENSOR_COLUMNS]
    kinds = {a.asset_id: a.kind for a in written.registry.assets}
    motors = frame[frame.asset.map(kinds) == "motor"]
    assert motors.pressure_discharge.isna().all()          # a motor has no pressure sensor: empty cells
    assert frame[list(WIDE_SENSOR_COLUMNS)].notna().sum(axis=1).min() >= 1


def _peak_bytes(path: Path, rows: int) -> int:
    tracemalloc.start()
    try:
        write_readings(path, rows_target=rows, assets=4, seed=4)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_write_readings_memory_is_flat_in_file_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulate, "BLOCK_DAYS", 2)        # both files span many chunks
    small = _peak_bytes(tmp_path / "small.parquet", 40_000)
    large = _peak_bytes(tmp_path / "large.parquet", 400_000)       # 10x the rows
    assert large < 2 * small


def test_cli_writes_readings_registry_and_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, registry, events = tmp_path / "r.parquet", tmp_path / "registry.json", tmp_path / "events.csv"
    assert main(["--assets", "3", "--days", "2", "--out", str(out), "--registry-out", str(registry),
                 "--events-out", str(events), "--seed", "4"]) == 0
    assert len(pd.read_parquet(out)) > 1000
    assert len(json.loads(registry.read_text())["sensors"]) == 15
    assert list(pd.read_csv(events).columns) == ["asset", "time", "kind", "failure_mode", "onset"]
    assert "simulated readings" in capsys.readouterr().out
