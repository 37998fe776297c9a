"""The feedback loop: a tenant's failure records label its stored readings; a candidate trained on them
is judged against the model scoring the tenant now and promoted for that tenant alone if not worse.

Models are per tenant, as fraud's are: the shipped cloud model (``models/iiot/cloud/<version>``) is
the shared default; a version trained here belongs to the tenant whose data trained it and, once
promoted (:mod:`model_runtime.versions`), scores that tenant alone (:data:`services.iiot.scoring.IIOT_MODELS`
serves it as ``iiot@<tenant>``). No tenant's retraining changes another tenant's scores.

Examples: windows of each asset's stored readings ending every ``stride_hours`` (built as scoring
builds them, :func:`services.iiot.features.window_tensor`), labelled 1 when a ``failure`` record of
the asset follows the window's end within the 72-hour horizon, with the hours to that failure
as RUL (capped at the model's ``rul_scale``). A window whose span holds a failure is left out (the
machine is broken or being repaired in it). The tenant's period is split by time: the last
``holdout_days`` before its newest reading are held out; training uses windows that end at least
the horizon before the held-out period starts (so no training label looks into it), its last fifth
(by time) choosing the epoch. The candidate is H3's network (:func:`services.iiot.training.fit`) on
the live model's channels and window; both are judged by average precision on the held-out windows
(the live model through the runtime, as it scores in service). Every version is recorded with both
models' metrics, promoted or rejected.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from model_runtime.artifacts import save_artifact
from model_runtime.versions import CANDIDATE, REJECTED, promote, record_version, tenant_model_listing
from services.iiot.db import Asset, MaintenanceRecord, Sensor
from services.iiot.maintenance import failure_times
from services.iiot.scoring import (
    IIOT_MODEL_NAME,
    IIOT_MODELS,
    WINDOW_HOURS,
    AssetWindow,
    DueAsset,
    WindowBuilder,
    build_windows,
    runtime_predictor,
    shipped_cloud_model,
)
from shared.config import get_settings
from shared.errors import UnprocessableContent
from shared.jobs import PublicJobError

logger = logging.getLogger("tessera.iiot.retraining")

HORIZON = timedelta(hours=72)
LABELS_NEEDED = {"training_failures": 3, "holdout_failures": 1}
"""A candidate needs failures to learn from and at least one held-out failure to be judged on."""


class RetrainIn(BaseModel):
    """Options of a retraining run."""

    model_config = ConfigDict(extra="forbid")

    holdout_days: StrictInt = Field(default=14, ge=1, le=365,
                                    description="the latest days of the tenant's readings held out for judging")
    stride_hours: StrictFloat = Field(default=6.0, ge=1, le=168, description="hours between training windows")
    epochs: StrictInt = Field(default=15, ge=1, le=200)
    min_improvement: StrictFloat = Field(default=0.0, ge=0, le=1,
                                         description="promote only when candidate AP - live AP >= this")


@dataclass(frozen=True)
class LabelCounts:
    """A tenant's failure records in the periods a candidate uses."""

    training_failures: int = 0
    holdout_failures: int = 0

    def shortfalls(self) -> dict[str, dict[str, int]]:
        """``{count: {"needed", "have"}}`` for each count below :data:`LABELS_NEEDED`."""
        have = dataclasses.asdict(self)
        return {name: {"needed": needed, "have": have[name]} for name, needed in LABELS_NEEDED.items()
                if have[name] < needed}


class NotEnoughLabels(UnprocessableContent, PublicJobError):
    """Too few failure records to train and judge a candidate (422 before a job; a job's error too)."""


@dataclass(frozen=True)
class Periods:
    """The tenant's time split: training windows end by ``training_until``; held-out ones after ``holdout_from``."""

    newest: datetime
    holdout_from: datetime
    training_until: datetime

    @classmethod
    def ending(cls, newest: datetime, holdout_days: int) -> Periods:
        holdout_from = newest - timedelta(days=holdout_days)
        return cls(newest, holdout_from, holdout_from - HORIZON)


def _newest_reading(session: Session, tenant_id: str) -> datetime | None:
    return session.scalar(select(func.max(Sensor.last_ts)).where(Sensor.tenant_id == tenant_id))


def label_counts(session: Session, tenant_id: str, options: RetrainIn) -> LabelCounts:
    """Failure records in the training and held-out periods of the tenant's readings."""
    newest = _newest_reading(session, tenant_id)
    if newest is None:
        return LabelCounts()
    periods = Periods.ending(newest, options.holdout_days)
    when = MaintenanceRecord.occurred_at
    failures = select(func.count()).where(MaintenanceRecord.tenant_id == tenant_id, MaintenanceRecord.kind == "failure")
    training = session.scalar(failures.where(when <= periods.training_until + HORIZON)) or 0
    holdout = session.scalar(failures.where(when > periods.holdout_from, when <= newest + HORIZON)) or 0
    return LabelCounts(int(training), int(holdout))


def check_enough_labels(counts: LabelCounts, options: RetrainIn) -> None:
    """Raise :class:`NotEnoughLabels` naming what is missing unless ``counts`` meet :data:`LABELS_NEEDED`."""
    shortfalls = counts.shortfalls()
    if shortfalls:
        missing = "; ".join(f"{name.replace('_', ' ')}: {n['have']} of {n['needed']} needed"
                            for name, n in shortfalls.items())
        raise NotEnoughLabels(f"not enough labels to retrain: {missing} (failure maintenance records; the last "
                              f"{options.holdout_days} days of readings are held out)",
                              needed=LABELS_NEEDED, have=dataclasses.asdict(counts))


@dataclass
class LabelledWindows:
    """Windows, their end times, 0/1 failure-within-horizon labels and RUL hours (capped)."""

    windows: list[AssetWindow]
    failure: npt.NDArray[np.float32]
    rul: npt.NDArray[np.float32]

    def ends(self) -> npt.NDArray[np.datetime64]:
        return np.array([np.datetime64(w.end.replace(tzinfo=None)) for w in self.windows])


def labelled_windows(session: Session, tenant_id: str, stride: timedelta, rul_cap_hours: float,
                     builder: WindowBuilder) -> LabelledWindows:
    """Every asset's windows every ``stride`` over its stored readings, labelled by its failure records."""
    labels = failure_times(session, tenant_id)
    span = timedelta(hours=WINDOW_HOURS)
    due: list[DueAsset] = []
    for asset_pk, asset_id in session.execute(select(Asset.id, Asset.asset_id).where(Asset.tenant_id == tenant_id)):
        sensors = tuple(session.scalars(select(Sensor).where(Sensor.asset_pk == asset_pk).order_by(Sensor.id)))
        last = [s.last_ts for s in sensors if s.last_ts is not None]
        first = _first_reading(session, [s.id for s in sensors])
        if not last or first is None:
            continue
        end = first + span
        while end <= max(last):
            if not any(end - span < failed <= end for failed in labels.get(asset_pk, [])):
                due.append(DueAsset(asset_pk, asset_id, end, sensors))
            end += stride
    windows = build_windows(session, due, builder, WINDOW_HOURS) if due else []
    failure, rul = [], []
    for window in windows:
        ahead = [(t - window.end).total_seconds() / 3600 for t in labels.get(window.asset_pk, []) if t > window.end]
        hours = min(ahead) if ahead else rul_cap_hours
        failure.append(1.0 if hours <= HORIZON.total_seconds() / 3600 else 0.0)
        rul.append(min(hours, rul_cap_hours))
    return LabelledWindows(windows, np.asarray(failure, np.float32), np.asarray(rul, np.float32))


def _first_reading(session: Session, sensor_pks: Sequence[int]) -> datetime | None:
    from services.iiot.db import readings

    if not sensor_pks:
        return None
    return session.scalar(select(func.min(readings.c.ts)).where(readings.c.sensor_pk.in_(list(sensor_pks))))


def retrain(session: Session, tenant_id: str, options: RetrainIn, *, builder: WindowBuilder | None = None,
            output_root: Path | None = None) -> dict[str, Any]:
    """Train a candidate on the tenant's labelled windows, judge it against the live model, record and
    promote it (for this tenant alone) when its held-out AP is at least the live model's plus ``min_improvement``.

    Returns the version, whether it was promoted, both models' held-out metrics and the live version
    it was judged against. Raises :class:`NotEnoughLabels` when the tenant's failure records do not
    meet :data:`LABELS_NEEDED`.
    """
    from services.iiot.model import read_config, save_risk_model
    from services.iiot.scoring import default_window_builder
    from services.iiot.training import Arrays, FitSettings, failure_validation_loss, fit, predict

    check_enough_labels(label_counts(session, tenant_id, options), options)
    newest = _newest_reading(session, tenant_id)
    assert newest is not None
    periods = Periods.ending(newest, options.holdout_days)
    live_name = IIOT_MODELS.model_for_sync(tenant_id)
    live_dir = _live_artifact(session, tenant_id)
    config = read_config(live_dir)
    data = labelled_windows(session, tenant_id, timedelta(hours=options.stride_hours), config.rul_scale,
                            builder or default_window_builder())
    ends = data.ends()
    training = np.flatnonzero(ends <= np.datetime64(periods.training_until.replace(tzinfo=None)))
    holdout = np.flatnonzero(ends > np.datetime64(periods.holdout_from.replace(tzinfo=None)))
    _check_classes(data.failure, training, holdout)
    arrays = Arrays(np.stack([w.window for w in data.windows]).astype(np.float32),
                    np.stack([w.mask for w in data.windows]).astype(np.float32), data.failure, data.rul)
    cut = int(len(training) * 0.8)
    result = fit(config, arrays.take(training[:cut]), arrays.take(training[cut:]),
                 FitSettings(epochs=options.epochs, patience=max(3, options.epochs // 3)), failure_validation_loss)
    candidate = _metrics(predict(result.net, arrays.take(holdout))["p_failure"], data.failure[holdout])
    live_answers, _ = runtime_predictor(tenant_id, [data.windows[i] for i in holdout])
    live_p = np.array([a.p_failure if not isinstance(a, Exception) else np.nan for a in live_answers])
    live = _metrics(live_p, data.failure[holdout])
    promoted = candidate["average_precision"] - live["average_precision"] >= options.min_improvement
    version = datetime.now(UTC).strftime("retrained-%Y%m%dT%H%M%S%f")
    directory = (output_root or get_settings().data_dir / "models" / "iiot") / tenant_id / version
    save_risk_model(result.net, directory)
    save_artifact(directory, name=IIOT_MODEL_NAME, version=version, framework="torch",
                  metrics={f"holdout_{k}": v for k, v in candidate.items()},
                  data=f"{len(training)} training windows of tenant {tenant_id}'s stored readings labelled by its "
                       f"failure records; the last {options.holdout_days} days held out; serves this tenant only",
                  rebuild_command="POST /iiot/v1/models/retrain", extra={"tenant_id": tenant_id})
    record_version(session, IIOT_MODEL_NAME, version, directory, tenant_id=tenant_id,
                   metrics={"candidate": candidate, "live_at_evaluation": live},
                   status=CANDIDATE if promoted else REJECTED)
    if promoted:
        promote(session, IIOT_MODEL_NAME, version)
    logger.info("iiot retrain %s of tenant %s: candidate AP %.4f vs live AP %.4f -> %s", version, tenant_id,
                candidate["average_precision"], live["average_precision"], "promoted" if promoted else "rejected")
    return {"version": version, "promoted": promoted, "candidate_metrics": candidate, "live_metrics": live,
            "live_version": IIOT_MODELS.runtime.version(live_name)}


def _live_artifact(session: Session, tenant_id: str) -> Path:
    from model_runtime.versions import live_artifact_dir

    found = live_artifact_dir(session, IIOT_MODEL_NAME, tenant_id) or shipped_cloud_model()
    if found is None:
        raise PublicJobError("no IIoT risk model to start from (train one: `tessera train iiot`)")
    return found


def _check_classes(failure: npt.NDArray[np.float32], training: npt.NDArray[np.int64],
                   holdout: npt.NDArray[np.int64]) -> None:
    for name, rows in (("training", training), ("held-out", holdout)):
        positives = int(failure[rows].sum())
        if positives == 0 or positives == len(rows):
            raise NotEnoughLabels(f"the {name} windows hold {positives} of {len(rows)} windows before a failure: "
                                  "both classes are needed (record failures, or store more readings)")


def _metrics(p: npt.NDArray[np.float64], y: npt.NDArray[np.float32]) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    finite = np.isfinite(p)
    p, y = np.where(finite, p, 0.0), y
    return {"average_precision": float(average_precision_score(y, p)), "roc_auc": float(roc_auc_score(y, p)),
            "windows": float(len(y)), "failures_ahead": float(y.sum())}


def model_versions(session: Session, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's own versions, newest first, then the shipped cloud model (live unless one of them is)."""
    return tenant_model_listing(session, IIOT_MODEL_NAME, tenant_id, shipped_cloud_model())
