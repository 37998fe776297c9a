"""The real public data sets the failure-risk model is evaluated on, read from ``../shared/datasets``.

- **NASA C-MAPSS FD001** (:func:`load_cmapss`): 100 turbofan engines run to failure (train), 100
  engines cut off before failure (test) and the true remaining cycles after each test engine's
  last cycle (``RUL_FD001.txt``). One operating condition, one fault mode. NASA public data; cite
  Saxena et al., PHM08. The official test set is the **last cycle of each test engine**
  (:func:`cmapss_last_windows`); training windows end at every cycle of a training engine
  (:func:`cmapss_windows`), with RUL capped at :data:`RUL_CAP` cycles as is standard; a test-like
  validation cuts held-out training engines off at random cycles (:func:`cmapss_cut_windows`).
  Every window set also carries each window's history features (drift from the engine's early level
  and slope over its whole history up to the window's end: :func:`~services.iiot.features.history_features`),
  built the same way for training, cut-off and test windows.
- **AI4I 2020** (:func:`load_ai4i`): 10,000 synthetic milling processes, ``Machine failure`` as the
  label (3.39 %). CC BY 4.0, S. Matzka (AI4I 2020). The five failure-mode flags (TWF, HDF, PWF,
  OSF, RNF) nearly define the label and the ids say nothing, so neither is ever an input:
  :func:`ai4i_features` builds the inputs from ``Type`` (categorical, one-hot) and the five process
  variables, plus the standard physical combinations (power, temperature difference, overstrain).

Where the data sets are: ``datasets_dir`` from the settings when the platform has that setting,
else ``<repo>/../shared/datasets``. A missing file raises :class:`DatasetError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from services.iiot.features import history_features

CMAPSS_FOLDER = "cmapss"
AI4I_FOLDER = "ai4i2020"
AI4I_FILE = "ai4i2020.csv"
CMAPSS_SETTINGS = ("setting1", "setting2", "setting3")
CMAPSS_SENSORS_ALL = tuple(f"s{i}" for i in range(1, 22))
CMAPSS_COLUMNS = ("unit", "cycle", *CMAPSS_SETTINGS, *CMAPSS_SENSORS_ALL)
CMAPSS_SENSORS = ("s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21")
"""The 14 FD001 sensors that vary (the others are constant or near-constant; most papers keep these)."""
RUL_CAP = 125
"""Remaining cycles above this count as this many (the usual piecewise-linear target for C-MAPSS)."""
CMAPSS_WINDOW = 30
"""Cycles per window (the usual choice; every FD001 test engine has at least 31)."""
AI4I_LEAKING_COLUMNS = ("TWF", "HDF", "PWF", "OSF", "RNF")
AI4I_ID_COLUMNS = ("UDI", "Product ID")
AI4I_LABEL = "Machine failure"
AI4I_RAW_INPUTS = ("Air temperature [K]", "Process temperature [K]", "Rotational speed [rpm]", "Torque [Nm]",
                   "Tool wear [min]")
AI4I_TYPES = ("L", "M", "H")
AI4I_FEATURES = ("type_l", "type_m", "type_h", "air_temperature_k", "process_temperature_k", "speed_rpm",
                 "torque_nm", "tool_wear_min", "power_w", "temperature_difference_k", "strain_min_nm",
                 "strain_ratio", "heat_ratio", "power_ratio")
"""Input columns of :func:`ai4i_features`: the product quality type as a categorical (one 0/1 column
per L/M/H), the five process variables, then the physical combinations computed from them: mechanical
power = torque x angular speed (W), process - air temperature (K), and tool wear x torque (the
"overstrain", min Nm); then the same physics against the limits the data set's documentation states
(:data:`AI4I_STRAIN_LIMITS`, :data:`AI4I_HEAT_LIMITS`, :data:`AI4I_POWER_BAND`), each 1.0 at its
limit: overstrain / the type's limit (> 1 over it), max(temperature difference / 8.6 K, speed /
1380 rpm) (< 1 when both are under their heat-dissipation limits) and min(power / 3500 W, 9000 W /
power) (< 1 outside the power band). Domain knowledge of the inputs only: no failure-mode flag is read."""
AI4I_STRAIN_LIMITS = {"L": 11000.0, "M": 12000.0, "H": 13000.0}
AI4I_HEAT_LIMITS = (8.6, 1380.0)
AI4I_POWER_BAND = (3500.0, 9000.0)
"""Failure physics as documented with the data set (Matzka 2020; UCI): the overstrain limit per product
type (min Nm), heat dissipation (temperature difference K and speed rpm, failing when both are under)
and the power band (W, failing outside)."""


class DatasetError(ValueError):
    """A data set that is missing or malformed; the message names the file and why."""


def datasets_dir() -> Path:
    """The shared data-set folder: the settings' ``datasets_dir`` if the platform has one, else
    ``<repo>/../shared/datasets`` (which may not exist)."""
    from shared.config import get_settings

    configured = getattr(get_settings(), "datasets_dir", None)
    return Path(configured) if configured else Path(__file__).resolve().parents[3] / "shared" / "datasets"


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path} is missing (the shared data sets live in ../shared/datasets)")
    return path


# --- C-MAPSS ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CmapssData:
    """One C-MAPSS subset: per-cycle rows of the training and test engines, and the test truth."""

    train: pd.DataFrame
    """Columns :data:`CMAPSS_COLUMNS`; every engine runs to failure."""
    test: pd.DataFrame
    """Same columns; every engine stops before failure."""
    test_rul: npt.NDArray[np.float64]
    """True remaining cycles after the last cycle of test engine 1, 2, ... (uncapped)."""


def _read_cmapss_table(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(_existing(path), sep=r"\s+", header=None)
    if frame.shape[1] != len(CMAPSS_COLUMNS):
        raise DatasetError(f"{path}: expected {len(CMAPSS_COLUMNS)} columns, found {frame.shape[1]}")
    frame.columns = list(CMAPSS_COLUMNS)
    return frame.astype({"unit": int, "cycle": int}).sort_values(["unit", "cycle"], ignore_index=True)


def load_cmapss(root: Path | None = None, subset: str = "FD001") -> CmapssData:
    """Read ``train_<subset>.txt``, ``test_<subset>.txt`` and ``RUL_<subset>.txt``."""
    folder = (root or datasets_dir()) / CMAPSS_FOLDER
    train = _read_cmapss_table(folder / f"train_{subset}.txt")
    test = _read_cmapss_table(folder / f"test_{subset}.txt")
    truth = np.loadtxt(_existing(folder / f"RUL_{subset}.txt"), dtype=np.float64).reshape(-1)
    if truth.size != test["unit"].nunique():
        raise DatasetError(f"RUL_{subset}.txt has {truth.size} lines for {test['unit'].nunique()} test engines")
    return CmapssData(train=train, test=test, test_rul=truth)


def cmapss_rul(frame: pd.DataFrame, cap: float | None = RUL_CAP) -> npt.NDArray[np.float64]:
    """Remaining cycles of each row of run-to-failure engines (last cycle - cycle), capped at ``cap``."""
    last = frame.groupby("unit")["cycle"].transform("max")
    rul = (last - frame["cycle"]).to_numpy(np.float64)
    return np.minimum(rul, cap) if cap is not None else rul


@dataclass(frozen=True)
class SensorScaler:
    """Per-channel standardisation fitted on training rows, per operating condition.

    Conditions are the operational settings rounded (FD001 has one; FD002/FD004 six), so a sensor
    is compared with its own condition's level, the operating-condition normalisation of the
    C-MAPSS literature.
    """

    channels: tuple[str, ...]
    conditions: dict[tuple[float, ...], tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]

    @staticmethod
    def condition_keys(frame: pd.DataFrame) -> list[tuple[float, ...]]:
        """The operating condition of each row (settings rounded to one decimal place)."""
        rounded = frame[list(CMAPSS_SETTINGS)].round(1).to_numpy()
        return [tuple(float(v) for v in row) for row in rounded]

    @classmethod
    def fit(cls, frame: pd.DataFrame, channels: tuple[str, ...]) -> SensorScaler:
        """Mean and standard deviation of each channel in each condition of ``frame``."""
        keys = cls.condition_keys(frame)
        values = frame[list(channels)].to_numpy(np.float64)
        stats = {}
        for key in set(keys):
            rows = values[[k == key for k in keys]]
            stats[key] = (rows.mean(0), np.maximum(rows.std(0), 1e-6))
        return cls(channels, stats)

    def transform(self, frame: pd.DataFrame) -> npt.NDArray[np.float32]:
        """``(rows, channels)`` standardised values; a condition unseen in training uses the nearest one."""
        values = frame[list(self.channels)].to_numpy(np.float64)
        keys = self.condition_keys(frame)
        out = np.empty_like(values)
        for key in set(keys):
            rows = np.array([k == key for k in keys])
            mean, std = self.conditions[self._nearest(key)]
            out[rows] = (values[rows] - mean) / std
        return out.astype(np.float32)

    def _nearest(self, key: tuple[float, ...]) -> tuple[float, ...]:
        if key in self.conditions:
            return key
        return min(self.conditions, key=lambda known: float(np.sum((np.asarray(known) - np.asarray(key)) ** 2)))


def _unit_windows(values: npt.NDArray[np.float32], ends: npt.NDArray[np.int64], window: int,
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Windows of ``values`` (cycles, F) ending at each index in ``ends``; right-aligned, masked at the front."""
    steps, channels = values.shape
    x = np.zeros((len(ends), window, channels), np.float32)
    mask = np.zeros((len(ends), window), np.float32)
    for row, end in enumerate(ends):
        start = max(0, end + 1 - window)
        length = end + 1 - start
        x[row, window - length:] = values[start:end + 1]
        mask[row, window - length:] = 1.0
    return x, mask


@dataclass(frozen=True)
class WindowSet:
    """Model inputs and targets: ``x`` (N, T, F) float32, ``mask`` (N, T), ``rul`` (N,), ``units`` (N,), and
    ``history`` (N, 2F) float32: each window's :func:`~services.iiot.features.history_features` (the engine's
    cycles up to the window's end; the drift over the window's own length)."""

    x: npt.NDArray[np.float32]
    mask: npt.NDArray[np.float32]
    rul: npt.NDArray[np.float64]
    units: npt.NDArray[np.int64]
    history: npt.NDArray[np.float32]


def _unit_window_set(values: npt.NDArray[np.float32], ends: npt.NDArray[np.int64], window: int,
                     rul: npt.NDArray[np.float64], unit: int) -> WindowSet:
    """One engine's windows ending at ``ends``, with their history features, targets and unit."""
    x, mask = _unit_windows(values, ends, window)
    return WindowSet(x, mask, rul, np.full(len(ends), unit, np.int64), history_features(values, ends, window))


def cmapss_windows(frame: pd.DataFrame, scaler: SensorScaler, *, window: int = CMAPSS_WINDOW,
                   cap: float | None = RUL_CAP, min_length: int = 1) -> WindowSet:
    """A window ending at every cycle (from ``min_length`` cycles of history on) of run-to-failure engines."""
    parts = []
    values = scaler.transform(frame)
    rul = cmapss_rul(frame, cap)
    for unit, rows in frame.groupby("unit").indices.items():
        ends = np.arange(min_length - 1, len(rows), dtype=np.int64)
        parts.append(_unit_window_set(values[rows], ends, window, rul[rows][ends], unit))
    return _concatenate(parts)


def cmapss_last_windows(frame: pd.DataFrame, scaler: SensorScaler, truth: npt.NDArray[np.float64], *,
                        window: int = CMAPSS_WINDOW) -> WindowSet:
    """The official test set: one window ending at each test engine's last cycle, with its true RUL."""
    parts = []
    values = scaler.transform(frame)
    for position, (unit, rows) in enumerate(sorted(frame.groupby("unit").indices.items())):
        ends = np.array([len(rows) - 1], np.int64)
        parts.append(_unit_window_set(values[rows], ends, window, truth[position:position + 1], unit))
    return _concatenate(parts)


def cmapss_cut_windows(frame: pd.DataFrame, scaler: SensorScaler, *, cuts: int = 10, seed: int = 0,
                       window: int = CMAPSS_WINDOW, min_length: int = CMAPSS_WINDOW + 1) -> WindowSet:
    """Validation built as the official test set is: each run-to-failure engine of ``frame`` cut off at
    ``cuts`` random cycles (seeded, uniform over the cycles with at least ``min_length`` cycles seen and
    at least one left) and one window ending at each cut, with the true **uncapped** RUL at it."""
    parts = []
    values = scaler.transform(frame)
    rng = np.random.default_rng(seed)
    for unit, rows in sorted(frame.groupby("unit").indices.items()):
        first = min(min_length, len(rows) - 1) - 1
        ends = np.sort(rng.integers(first, len(rows) - 1, size=cuts)).astype(np.int64)
        parts.append(_unit_window_set(values[rows], ends, window, (len(rows) - 1 - ends).astype(np.float64), unit))
    return _concatenate(parts)


def _concatenate(parts: list[WindowSet]) -> WindowSet:
    return WindowSet(np.concatenate([p.x for p in parts]), np.concatenate([p.mask for p in parts]),
                     np.concatenate([p.rul for p in parts]), np.concatenate([p.units for p in parts]),
                     np.concatenate([p.history for p in parts]))


# --- AI4I 2020 --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ai4iData:
    """AI4I 2020 inputs (:data:`AI4I_FEATURES`, float32 (N, 11)) and the machine-failure label (N,)."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    feature_names: tuple[str, ...] = AI4I_FEATURES


def load_ai4i(root: Path | None = None) -> Ai4iData:
    """Read ``ai4i2020.csv`` (UTF-8 with BOM) into model inputs; the mode flags and ids are dropped."""
    path = _existing((root or datasets_dir()) / AI4I_FOLDER / AI4I_FILE)
    frame = pd.read_csv(path, encoding="utf-8-sig")
    missing = sorted({AI4I_LABEL, "Type", *AI4I_RAW_INPUTS} - set(frame.columns))
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return Ai4iData(ai4i_features(frame.drop(columns=[*AI4I_LEAKING_COLUMNS, *AI4I_ID_COLUMNS], errors="ignore")),
                    frame[AI4I_LABEL].to_numpy(np.int64))


def ai4i_features(frame: pd.DataFrame) -> npt.NDArray[np.float32]:
    """The :data:`AI4I_FEATURES` columns of raw AI4I rows (the mode flags are never read)."""
    quality = frame["Type"].map({kind: i for i, kind in enumerate(AI4I_TYPES)})
    if quality.isna().any():
        raise DatasetError(f"unknown Type value(s): {sorted(set(frame['Type'][quality.isna()]))}")
    one_hot = np.eye(len(AI4I_TYPES))[quality.to_numpy(np.int64)]
    air, process, speed, torque, wear = (frame[name].to_numpy(np.float64) for name in AI4I_RAW_INPUTS)
    power = torque * speed * 2.0 * np.pi / 60.0
    strain, difference = wear * torque, process - air
    strain_limit = frame["Type"].map(AI4I_STRAIN_LIMITS).to_numpy(np.float64)
    (heat_difference, heat_speed), (low, high) = AI4I_HEAT_LIMITS, AI4I_POWER_BAND
    ratios = [strain / strain_limit, np.maximum(difference / heat_difference, speed / heat_speed),
              np.minimum(power / low, high / np.maximum(power, 1e-9))]
    columns = [*one_hot.T, air, process, speed, torque, wear, power, difference, strain, *ratios]
    return np.column_stack(columns).astype(np.float32)
