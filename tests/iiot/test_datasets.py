"""The real public data sets beside the repo (``../shared/datasets``): C-MAPSS FD001 and AI4I 2020 read
as documented, the official C-MAPSS test set is the last cycle of each test engine, RUL is capped,
and the AI4I inputs never include the failure-mode flags. Skipped, saying so, when the data are absent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from services.iiot import datasets
from services.iiot.features import history_features

ROOT = datasets.datasets_dir()


def require(folder: str) -> None:
    if not (ROOT / folder).is_dir():
        pytest.skip(f"the shared data set is absent: {ROOT / folder} (see ../shared/datasets/{folder}/README.md)")


def test_cmapss_fd001_reads_as_documented() -> None:
    require(datasets.CMAPSS_FOLDER)
    data = datasets.load_cmapss()
    assert data.train.shape == (20631, 26) and data.test.shape == (13096, 26)
    assert data.train["unit"].nunique() == 100 and data.test["unit"].nunique() == 100
    assert data.test_rul.shape == (100,) and (data.test_rul.min(), data.test_rul.max()) == (7, 145)
    rul = datasets.cmapss_rul(data.train)
    assert rul.max() == datasets.RUL_CAP and rul.min() == 0


def test_cmapss_windows_end_at_every_cycle_and_the_test_set_at_the_last() -> None:
    require(datasets.CMAPSS_FOLDER)
    data = datasets.load_cmapss()
    train = data.train[data.train["unit"] <= 3]
    scaler = datasets.SensorScaler.fit(train, datasets.CMAPSS_SENSORS)
    windows = datasets.cmapss_windows(train, scaler)
    assert windows.x.shape == (len(train), datasets.CMAPSS_WINDOW, len(datasets.CMAPSS_SENSORS))
    first = windows.units == 1
    assert windows.mask[first][0].sum() == 1 and windows.mask[first][-1].sum() == datasets.CMAPSS_WINDOW
    assert windows.rul[first][-1] == 0 and windows.rul[first][0] == datasets.RUL_CAP
    test = datasets.cmapss_last_windows(data.test, scaler, data.test_rul)
    assert test.x.shape[0] == 100 and (test.mask.sum(axis=1) == datasets.CMAPSS_WINDOW).all()
    last_of_unit_1 = data.test[data.test["unit"] == 1].iloc[-1]
    expected = scaler.transform(last_of_unit_1.to_frame().T)[0]
    np.testing.assert_allclose(test.x[0, -1], expected, rtol=1e-5)
    assert test.rul[0] == data.test_rul[0]



def test_cmapss_cut_windows_end_before_failure_with_the_uncapped_truth() -> None:
    require(datasets.CMAPSS_FOLDER)
    train = datasets.load_cmapss().train
    train = train[train["unit"] <= 4]
    scaler = datasets.SensorScaler.fit(train, datasets.CMAPSS_SENSORS)
    cut = datasets.cmapss_cut_windows(train, scaler, cuts=6, seed=3)
    assert cut.x.shape == (24, datasets.CMAPSS_WINDOW, len(datasets.CMAPSS_SENSORS)) and (cut.rul >= 1).all()
    assert cut.rul.max() > datasets.RUL_CAP  # the truth at a cut is not capped, as RUL_FD001's is not
    assert (cut.mask.sum(axis=1) == datasets.CMAPSS_WINDOW).all()  # at least a window of history
    every = datasets.cmapss_windows(train, scaler, cap=None)
    row = int(np.flatnonzero((every.units == cut.units[0]) & (every.rul == cut.rul[0]))[0])
    np.testing.assert_array_equal(cut.x[0], every.x[row])
    again = datasets.cmapss_cut_windows(train, scaler, cuts=6, seed=3)
    np.testing.assert_array_equal(again.rul, cut.rul)

def _hand_made_engines(cycles: tuple[int, ...] = (50, 70)) -> pd.DataFrame:
    """Engines in C-MAPSS columns: s2 rises 0.5 a unit cycle (plus the engine's number), s3 is noise."""
    rng = np.random.default_rng(1)
    rows = [{"unit": unit, "cycle": cycle, "setting1": 0.0, "setting2": 0.0, "setting3": 100.0,
             "s2": 0.5 * cycle + unit, "s3": rng.normal()}
            for unit, count in enumerate(cycles, start=1) for cycle in range(1, count + 1)]
    return pd.DataFrame(rows)


def test_every_window_set_carries_the_history_up_to_its_window_end() -> None:
    frame = _hand_made_engines()
    scaler = datasets.SensorScaler.fit(frame, ("s2", "s3"))
    scaled = {unit: scaler.transform(frame[frame["unit"] == unit]) for unit in (1, 2)}
    every = datasets.cmapss_windows(frame, scaler, window=12, cap=None)
    cut = datasets.cmapss_cut_windows(frame, scaler, cuts=4, seed=0, window=12)
    last = datasets.cmapss_last_windows(frame, scaler, np.array([5.0, 9.0]), window=12)
    for windows, ends in ((every, [np.arange(50), np.arange(70)]), (last, [[49], [69]]),
                          (cut, [49 - cut.rul[:4], 69 - cut.rul[4:]])):
        assert windows.history.shape == (len(windows.rul), 4)
        for unit, unit_ends in zip((1, 2), ends, strict=True):
            expected = history_features(scaled[unit], np.asarray(unit_ends, np.int64), window=12)
            np.testing.assert_array_equal(windows.history[windows.units == unit], expected)
    slope = last.history[:, 2] * scaler.conditions[(0.0, 0.0, 100.0)][1][0]  # back in s2's unit
    np.testing.assert_allclose(slope, 0.5, rtol=1e-4)
    later_changed = frame.assign(s3=np.where(frame["cycle"] > 30, 50.0, frame["s3"]))
    changed = datasets.cmapss_windows(later_changed, scaler, window=12, cap=None)
    early = (every.units == 1) & (np.arange(len(every.rul)) < 30)  # windows ending at engine 1's cycles 1-30
    np.testing.assert_array_equal(changed.history[early], every.history[early])
    assert not np.array_equal(changed.history[~early], every.history[~early])


def test_sensor_scaler_standardises_per_operating_condition() -> None:
    frame = pd.DataFrame({"setting1": [0.0] * 4 + [10.0] * 4, "setting2": 0.0, "setting3": 100.0,
                          "s2": [1.0, 2.0, 3.0, 4.0, 101.0, 102.0, 103.0, 104.0]})
    scaled = datasets.SensorScaler.fit(frame, ("s2",)).transform(frame)
    np.testing.assert_allclose(scaled[:4, 0], scaled[4:, 0], atol=1e-6)


def test_ai4i_inputs_leave_out_the_failure_mode_flags_and_ids() -> None:
    require(datasets.AI4I_FOLDER)
    data = datasets.load_ai4i()
    assert data.x.shape == (10000, len(datasets.AI4I_FEATURES)) and int(data.y.sum()) == 339
    raw = pd.read_csv(ROOT / datasets.AI4I_FOLDER / datasets.AI4I_FILE, encoding="utf-8-sig")
    for flag in datasets.AI4I_LEAKING_COLUMNS:  # no input column equals a mode flag
        assert not any(np.array_equal(data.x[:, j], raw[flag].to_numpy(np.float32)) for j in range(data.x.shape[1]))
    row = raw.iloc[0]
    power = row["Torque [Nm]"] * row["Rotational speed [rpm]"] * 2 * np.pi / 60
    assert data.x[0, datasets.AI4I_FEATURES.index("power_w")] == pytest.approx(power, rel=1e-5)


def test_ai4i_limit_ratios_cross_one_where_the_documented_physics_fails() -> None:
    frame = pd.DataFrame({"Type": ["L", "H", "M", "M"], "Air temperature [K]": [300.0, 300.0, 300.0, 300.0],
                          "Process temperature [K]": [310.0, 310.0, 308.0, 310.0],
                          "Rotational speed [rpm]": [1500.0, 1500.0, 1300.0, 1500.0],
                          "Torque [Nm]": [50.0, 50.0, 40.0, 20.0], "Tool wear [min]": [230.0, 230.0, 0.0, 0.0]})
    x = datasets.ai4i_features(frame)
    strain, heat, power = (x[:, datasets.AI4I_FEATURES.index(name)] for name in
                           ("strain_ratio", "heat_ratio", "power_ratio"))
    assert strain[0] > 1 > strain[1]  # 11,500 min Nm: over L's 11,000 limit, under H's 13,000
    assert heat[2] < 1 < heat[0]  # 8 K and 1300 rpm: both under the heat-dissipation limits
    assert power[3] < 1 < power[0]  # 20 Nm x 1500 rpm = 3,142 W, under the 3,500 W band


def test_a_missing_file_is_named() -> None:
    with pytest.raises(datasets.DatasetError, match="train_FD009.txt is missing"):
        datasets.load_cmapss(subset="FD009")
