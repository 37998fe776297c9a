"""The feedback loop: train a candidate on labelled traffic, compare it with the live model, promote.

Training data are the stored transactions themselves: each row keeps the exact features it was
scored with and, once known, its label. Only transactions older than the label delay are used (a
younger one may still get its chargeback), and one of those with no label is taken as genuine.
The candidate is trained on the older part and judged on the latest ``holdout_days``; the live
model is judged on the same days by the scores it actually gave. The candidate becomes live
only if its Average Precision beats the live model's by ``min_improvement``; every version's
metrics are kept either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from model_runtime.artifacts import save_artifact
from services.fraud.db import ModelVersion, Transaction
from services.fraud.features import FEATURE_NAMES, SECONDS_PER_DAY
from services.fraud.serving import live_artifact_dir
from services.fraud.state import LABEL_DELAY_S
from services.fraud.training import MODEL_NAME, holdout_metrics, train_candidate, write_payload
from shared.config import get_settings
from shared.db import utcnow

logger = logging.getLogger("tessera.fraud.retraining")

MIN_FRAUDS_TO_TRAIN = 20
PROMOTION_METRIC = "average_precision"


class NotEnoughLabels(ValueError):
    """Too few labelled frauds to train and evaluate a candidate."""


@dataclass(frozen=True)
class RetrainOutcome:
    """What one retraining run decided, with both models' holdout metrics."""

    version: str
    promoted: bool
    candidate: dict[str, float]
    live: dict[str, float]
    live_version: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "promoted": self.promoted, "candidate_metrics": self.candidate,
                "live_metrics": self.live, "live_version": self.live_version}


def tenant_scope(tenant_id: str) -> ColumnElement[bool]:
    """A tenant's own traffic and its back-test namespaces."""
    return (Transaction.tenant_id == tenant_id) | Transaction.tenant_id.startswith(f"{tenant_id}~backtest-")


def labelled_frame(session: Session, tenant_id: str) -> pd.DataFrame:
    """The tenant's stored transactions old enough to be labelled, as a training frame."""
    scope = tenant_scope(tenant_id)
    newest = session.scalar(select(Transaction.tx_time_s).where(scope)
                            .order_by(Transaction.tx_time_s.desc()).limit(1))
    if newest is None:
        return pd.DataFrame()
    rows = session.execute(
        select(Transaction.features, Transaction.is_fraud, Transaction.tx_time_s, Transaction.customer_id,
               Transaction.score, Transaction.model_version)
        .where(scope, Transaction.tx_time_s <= newest - LABEL_DELAY_S)  # younger rows may lack their label
    ).all()
    kept = [r for r in rows if len(r.features) == len(FEATURE_NAMES)]  # rows of older feature sets drop out
    features = np.asarray([r.features for r in kept], dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
    frame = pd.DataFrame(features, columns=list(FEATURE_NAMES))
    frame["TX_FRAUD"] = [int(bool(r.is_fraud)) for r in kept]
    times = np.asarray([r.tx_time_s for r in kept], dtype=np.float64)
    frame["TX_DATETIME"] = pd.to_datetime(times, unit="s")
    frame["TX_TIME_DAYS"] = (times // SECONDS_PER_DAY).astype(int)
    frame["CUSTOMER_ID"] = [r.customer_id for r in kept]
    frame["LIVE_SCORE"] = [r.score for r in kept]
    return frame.sort_values("TX_DATETIME").reset_index(drop=True)


def _live_version(session: Session) -> str | None:
    live = session.scalar(select(ModelVersion).where(ModelVersion.status == "live"))
    if live is not None:
        return live.version
    shipped = live_artifact_dir()
    return shipped.name if shipped else None


def retrain(session: Session, tenant_id: str, *, holdout_days: int = 7, min_improvement: float = 0.0,
            output_root: Path | None = None) -> RetrainOutcome:
    """Train, evaluate against the live model, record the version, and promote if it is better."""
    frame = labelled_frame(session, tenant_id)
    if frame.empty or int(frame.TX_FRAUD.sum()) < MIN_FRAUDS_TO_TRAIN:
        raise NotEnoughLabels(f"need at least {MIN_FRAUDS_TO_TRAIN} labelled frauds, have "
                              f"{0 if frame.empty else int(frame.TX_FRAUD.sum())}")
    model, candidate_metrics = train_candidate(frame, None, holdout_days=holdout_days)
    holdout = frame[frame.TX_TIME_DAYS.max() - holdout_days < frame.TX_TIME_DAYS]
    live_metrics = holdout_metrics(holdout.LIVE_SCORE.to_numpy(np.float64), holdout)
    promoted = candidate_metrics[PROMOTION_METRIC] > live_metrics[PROMOTION_METRIC] + min_improvement
    version = datetime.now(UTC).strftime("retrained-%Y%m%dT%H%M%S%f")
    directory = (output_root or get_settings().data_dir / "models" / "fraud") / version
    write_payload(model, directory)
    save_artifact(directory, name=MODEL_NAME, version=version, framework="lightgbm",
                  metrics={f"holdout_{k}": v for k, v in candidate_metrics.items()},
                  data=f"{len(frame)} stored transactions of {tenant_id}, labels from analysts/chargebacks, "
                       f"last {holdout_days} days held out",
                  rebuild_command="POST /fraud/v1/models/retrain",
                  extra={"model_features": list(model.model_features)})
    live_version = _live_version(session)
    _record(session, version, directory, candidate_metrics, live_metrics, promoted)
    logger.info("fraud retrain %s: candidate AP %.4f vs live AP %.4f -> %s", version,
                candidate_metrics[PROMOTION_METRIC], live_metrics[PROMOTION_METRIC],
                "promoted" if promoted else "rejected")
    return RetrainOutcome(version, promoted, candidate_metrics, live_metrics, live_version)


def _record(session: Session, version: str, directory: Path, candidate: dict[str, float],
            live: dict[str, float], promoted: bool) -> None:
    if promoted:
        session.execute(update(ModelVersion).where(ModelVersion.status == "live").values(status="retired"))
    session.add(ModelVersion(version=version, status="live" if promoted else "rejected",
                             artifact_dir=str(directory.resolve()),
                             metrics={"candidate": candidate, "live_at_evaluation": live},
                             promoted_at=utcnow() if promoted else None))
