"""Scheduled scoring: each asset of a tenant, its newest window through the risk model, then its alerts.

One run (:func:`score_tenant`, a durable job per tenant and beat slot, :mod:`services.iiot.tasks`):

1. the assets with readings newer than their last cloud score (an asset whose data did not move is
   not scored again, so a repeated run adds nothing and the alert policy counts fresh evidence only);
2. their windows (the last ``WINDOW_HOURS`` before each asset's newest reading), read in one query
   for the tenant and built by :func:`services.iiot.features.window_tensor`;
3. one batched prediction through the shared runtime (:class:`model_runtime.ModelRuntime`, the
   tenant's own live version if one was promoted, else the shipped cloud model; see
   :data:`IIOT_MODELS`), never torch or ONNX Runtime directly;
4. a :class:`~services.iiot.db.RiskScore` per asset (tier ``cloud``, the model's version) and the
   tenant's alert policy on the asset's newest scores (:func:`services.iiot.alerts.apply_policy`).

A window the model refuses (no reading at all, say) fails that asset alone; the run reports it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from model_runtime.runtime import ModelSpec
from model_runtime.versions import LiveModels
from services.iiot.alerts import alert_states, apply_policy, load_settings
from services.iiot.db import Asset, RiskScore, Sensor
from services.iiot.store import read_readings
from shared.jobs import PublicJobError

logger = logging.getLogger("tessera.iiot.scoring")

IIOT_MODEL_NAME = "iiot"
"""The risk model family in the runtime and in the version registry."""
WINDOW_HOURS = 48.0
STEP_HOURS = 1.0
SCORE_EVERY = timedelta(hours=STEP_HOURS)
"""An asset is scored again once its readings reach one window step past its last score: the alert
policy counts consecutive *hourly* scores (its thresholds were chosen on hourly scores), however
often beat runs (``TESSERA_IIOT_SCORING_INTERVAL_S`` only sets how soon new readings are seen)."""
INCLUSIVE = timedelta(microseconds=1)
"""Added to a half-open read's end so the window's newest reading is in it."""


@dataclass(frozen=True)
class AssetWindow:
    """One asset's model input: ``window`` ``(T, F)`` float32 and ``mask`` ``(T,)`` ending at ``end``."""

    asset_pk: int
    asset_id: str
    end: datetime
    window: npt.NDArray[np.float32]
    mask: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one window."""

    p_failure: float
    rul_hours: float | None
    drivers: dict[str, Any] = field(default_factory=dict)


class Predictor(Protocol):
    """Scores a tenant's windows: one prediction (or the exception that failed it) per window, and the version."""

    def __call__(self, tenant_id: str, windows: Sequence[AssetWindow]) -> tuple[list[Prediction | Exception], str]:
        ...


WindowBuilder = Callable[[pd.DataFrame, Sequence[Sensor], datetime], tuple[npt.NDArray[np.float32],
                                                                           npt.NDArray[np.float32]]]
"""``(readings[sensor_pk, ts, value], the asset's sensors, end) -> (window, mask)``."""


@dataclass
class ScoringSummary:
    """What one run did (the job's result)."""

    assets: int = 0
    scored: int = 0
    unchanged: int = 0
    without_readings: int = 0
    failed: int = 0
    transitions: dict[str, int] = field(default_factory=dict)
    model_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DueAsset:
    asset_pk: int
    asset_id: str
    end: datetime
    sensors: tuple[Sensor, ...]


def score_tenant(session: Session, tenant_id: str, *, predictor: Predictor | None = None,
                 window_builder: WindowBuilder | None = None, hours: float = WINDOW_HOURS) -> ScoringSummary:
    """Score every asset of ``tenant_id`` whose readings moved since its last score; apply the alert policy."""
    summary = ScoringSummary()
    due = _assets_due(session, tenant_id, summary)
    if not due:
        return summary
    windows = build_windows(session, due, window_builder, hours)
    predictions, summary.model_version = (predictor or runtime_predictor)(tenant_id, windows)
    settings = load_settings(session, tenant_id)
    scored = []
    for window, prediction in zip(windows, predictions, strict=True):
        if isinstance(prediction, Exception):
            summary.failed += 1
            logger.warning("iiot scoring: asset %s of tenant %s not scored: %s", window.asset_id, tenant_id,
                           type(prediction).__name__)
            continue
        session.add(RiskScore(tenant_id=tenant_id, asset_pk=window.asset_pk, window_end=window.end,
                              p_failure=prediction.p_failure, rul_hours=prediction.rul_hours, tier="cloud",
                              model_version=summary.model_version, drivers=prediction.drivers))
        scored.append(window.asset_pk)
    session.flush()
    summary.scored = len(scored)
    states = alert_states(session, tenant_id, scored, settings.policy)
    for asset_pk in scored:
        for transition in apply_policy(session, tenant_id, asset_pk, settings.policy, settings.notify_url,
                                       states[asset_pk]):
            summary.transitions[transition] = summary.transitions.get(transition, 0) + 1
    return summary


def _assets_due(session: Session, tenant_id: str, summary: ScoringSummary) -> list[DueAsset]:
    """The tenant's assets whose newest reading is at least :data:`SCORE_EVERY` newer than their
    newest cloud score (or that were never scored)."""
    last_scored = dict(session.execute(
        select(RiskScore.asset_pk, func.max(RiskScore.window_end))
        .where(RiskScore.tenant_id == tenant_id, RiskScore.tier == "cloud").group_by(RiskScore.asset_pk)).all())
    sensors_of: dict[int, list[Sensor]] = {}
    for sensor in session.scalars(select(Sensor).where(Sensor.tenant_id == tenant_id).order_by(Sensor.id)):
        sensors_of.setdefault(sensor.asset_pk, []).append(sensor)
    due = []
    for asset_pk, asset_id in session.execute(select(Asset.id, Asset.asset_id).where(Asset.tenant_id == tenant_id)
                                              .order_by(Asset.id)):
        summary.assets += 1
        sensors = sensors_of.get(asset_pk, [])
        ends = [s.last_ts for s in sensors if s.last_ts is not None]
        if not ends:
            summary.without_readings += 1
        elif asset_pk in last_scored and max(ends) < last_scored[asset_pk] + SCORE_EVERY:
            summary.unchanged += 1
        else:
            due.append(DueAsset(asset_pk, asset_id, max(ends), tuple(sensors)))
    return due


def build_windows(session: Session, due: Sequence[DueAsset], builder: WindowBuilder | None,
                  hours: float) -> list[AssetWindow]:
    """Every due window (an asset may have several ends), from one read of the span they cover.

    ``builder`` None: :func:`services.iiot.features.batch_window_tensors`, one vectorised call for
    the windows that end at the same time (assets fed on one clock: often all of them).
    """
    span = timedelta(hours=hours)
    frame = read_readings(session, sorted({s.id for asset in due for s in asset.sensors}),
                          min(a.end for a in due) - span, max(a.end for a in due) + INCLUSIVE)
    if builder is None:
        return _batched_windows(frame, due, hours)
    asset_of_sensor = {s.id: asset.asset_pk for asset in due for s in asset.sensors}
    history = {asset_pk: rows.sort_values("ts", kind="stable").reset_index(drop=True)  # sliced per window below
               for asset_pk, rows in frame.groupby(frame.sensor_pk.map(asset_of_sensor), sort=False)}
    empty = frame.iloc[0:0]
    windows = []
    for asset in due:
        own = history.get(asset.asset_pk, empty)
        first, last = own.ts.searchsorted([pd.Timestamp(asset.end - span), pd.Timestamp(asset.end)], side="right")
        window, mask = builder(own.iloc[first:last], asset.sensors, asset.end)
        windows.append(AssetWindow(asset.asset_pk, asset.asset_id, asset.end, window, mask))
    return windows


def _batched_windows(frame: pd.DataFrame, due: Sequence[DueAsset], hours: float) -> list[AssetWindow]:
    """:func:`build_windows` through the feature code's batch form, grouped by window end."""
    from services.iiot.features import STEP_FEATURES, batch_window_tensors, sensor_scales

    steps = int(round(hours / STEP_HOURS))
    by_end: dict[datetime, list[int]] = {}
    for index, asset in enumerate(due):
        by_end.setdefault(asset.end, []).append(index)
    windows: list[AssetWindow | None] = [None] * len(due)
    for end, indices in by_end.items():
        scales = sensor_scales([s for i in indices for s in due[i].sensors], key="id", owner="asset_pk")
        owners, x, mask = batch_window_tensors(frame, scales, end, hours, STEP_HOURS)
        row_of = {owner: row for row, owner in enumerate(owners)}
        for i in indices:
            row = row_of.get(due[i].asset_pk)  # None: no sensor of a quantity the model reads
            window = x[row] if row is not None else np.zeros((steps, len(STEP_FEATURES)), np.float32)
            window_mask = mask[row] if row is not None else np.zeros(steps, np.float32)
            windows[i] = AssetWindow(due[i].asset_pk, due[i].asset_id, end, window, window_mask)
    return [w for w in windows if w is not None]


def default_window_builder() -> WindowBuilder:
    """One asset's window by :func:`services.iiot.features.window_tensor` (retraining's windows)."""
    from services.iiot.features import window_tensor

    def build(frame: pd.DataFrame, sensors: Sequence[Sensor], end: datetime) -> tuple[
            npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        return window_tensor(frame, sensors, end, hours=WINDOW_HOURS, step_h=STEP_HOURS)

    return build


# --------------------------------------------------------------------------- the model in the runtime

def shipped_cloud_model() -> Path | None:
    """The newest shipped cloud artifact (``models/iiot/cloud/<version>``), the default every tenant gets."""
    from services.iiot.model import default_risk_dir

    try:
        return default_risk_dir("cloud")
    except FileNotFoundError:
        return None


def _spec_for(name: str, artifact_dir: Path) -> ModelSpec:
    from services.iiot.model import risk_model_spec

    return risk_model_spec(artifact_dir, name=name)


IIOT_MODELS = LiveModels(IIOT_MODEL_NAME, _spec_for, shipped_cloud_model)
"""The shipped cloud model and each tenant's promoted version, as this process serves them."""


def runtime_predictor(tenant_id: str, windows: Sequence[AssetWindow]) -> tuple[list[Prediction | Exception], str]:
    """Score ``windows`` with the model serving ``tenant_id`` (its own live version, else the shipped one)."""
    from services.iiot.model import RiskRequest

    name = IIOT_MODELS.model_for_sync(tenant_id)
    runtime = IIOT_MODELS.runtime
    if name not in runtime.loaded():
        raise PublicJobError("no IIoT risk model is available to score with (train one: `tessera train iiot`)")
    answers = runtime.predict_many_sync(name, [RiskRequest(w.window, w.mask) for w in windows],
                                        return_exceptions=True)
    return [answer if isinstance(answer, Exception) else _prediction(answer) for answer in answers], \
        runtime.version(name)


def _prediction(result: Any) -> Prediction:
    drivers = {"channels": [list(pair) for pair in result.drivers.channels],
               "time_steps": [list(pair) for pair in result.drivers.time_steps]}
    return Prediction(float(result.p_failure), float(result.rul_hours), drivers)
