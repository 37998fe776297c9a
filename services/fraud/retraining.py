"""The feedback loop: train a candidate on a tenant's labelled traffic, compare it with the tenant's
live model, promote.

Models are per tenant. The shipped model (``models/fraud/<version>``) is the shared default; a
version trained here belongs to the tenant whose traffic trained it and, once promoted, scores
that tenant alone (:func:`services.fraud.serving.model_name_for`): no tenant's retraining
changes another tenant's scores.

Training data are the tenant's stored transactions (and its back-tests'): each row keeps the
exact features it was scored with and, once known, its label. Only transactions older than the
label delay are used (a younger one may still get its chargeback), and one of those with no label
is taken as genuine; rows dated outside the accepted window (before 2000-01-01, or more than a
day ahead) are left out. The candidate is trained on the older part and judged on the latest
``holdout_days``; the tenant's live model (its own live version, else the default) is judged on
the same days by the scores it actually gave. The candidate becomes live only if
``candidate AP - live AP >= min_improvement`` (``min_improvement >= 0``: a candidate with a
lower Average Precision than the live model's is never promoted); every version's metrics are
kept either way.

Failures: too few labels is :class:`NotEnoughLabels` (a 422 problem, raised by the API before a
job is queued and again inside the job); anything else is :class:`RetrainingFailed`, which names
the failing step and the error's type but never its text, since a library's message can quote
the data (a customer id, an amount, a timestamp).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from model_runtime.artifacts import save_artifact
from model_runtime.versions import CANDIDATE, REJECTED, live_version, promote, record_version, tenant_model_listing
from services.fraud.db import Transaction
from services.fraud.features import FEATURE_NAMES, SECONDS_PER_DAY
from services.fraud.periods import CandidatePeriods
from services.fraud.schemas import EARLIEST_TIMESTAMP, MAX_FUTURE_SKEW
from services.fraud.serving import BACKTEST_NAMESPACE_MARK, FRAUD_MODEL_NAME, default_artifact_dir
from services.fraud.state import LABEL_DELAY_S
from shared.config import get_settings
from shared.errors import UnprocessableContent
from shared.jobs import PublicJobError

logger = logging.getLogger("tessera.fraud.retraining")

TRAINING_WINDOW_START_S = EARLIEST_TIMESTAMP.timestamp()
"""The webhook's earliest event time: older rows are left out of training (pandas' datetimes end in 1677)."""
MIN_TRAINING_FRAUDS = 20
PROMOTION_METRIC = "average_precision"
LABELS_NEEDED = {"training_frauds": MIN_TRAINING_FRAUDS, "training_legitimate": 1,
                 "calibration_frauds": 1, "calibration_legitimate": 1}
"""The least a retrain needs in each period of :class:`~services.fraud.training.CandidatePeriods`.

Calibration needs both classes (a logistic fit), and so does the held-out AUC; a booster trained
on fewer than 20 frauds is not worth comparing. Unlabelled transactions count as legitimate."""
PERIODS_TEXT = ("training days: labelled days older than the newest labelled day minus {holdout_days} "
                "held-out days and a 7-day label delay; calibration days: the first half of the held-out "
                "days; a labelled day is one older than the tenant's newest transaction by 7 days")


@dataclass(frozen=True)
class LabelCounts:
    """A tenant's labelled transactions in the periods a candidate uses."""

    training_frauds: int = 0
    training_legitimate: int = 0
    calibration_frauds: int = 0
    calibration_legitimate: int = 0

    def shortfalls(self) -> dict[str, dict[str, int]]:
        """``{count: {"needed", "have"}}`` for each count below :data:`LABELS_NEEDED`."""
        have = dataclasses.asdict(self)
        return {name: {"needed": needed, "have": have[name]}
                for name, needed in LABELS_NEEDED.items() if have[name] < needed}


class NotEnoughLabels(UnprocessableContent, PublicJobError):
    """Too few labelled transactions to train and evaluate a candidate (422; a job's error says so)."""

    @classmethod
    def for_counts(cls, counts: LabelCounts, holdout_days: int) -> NotEnoughLabels:
        """The error naming what is missing, with every count needed and had."""
        missing = "; ".join(f"{name.replace('_', ' ')}: {numbers['have']} of {numbers['needed']} needed"
                            for name, numbers in counts.shortfalls().items())
        return cls(f"not enough labelled transactions to retrain: {missing} "
                   f"({PERIODS_TEXT.format(holdout_days=holdout_days)})",
                   needed=LABELS_NEEDED, have=dataclasses.asdict(counts), holdout_days=holdout_days)


class RetrainingFailed(PublicJobError):
    """Retraining failed; the message names where and the error's type, never the error's text."""

    @classmethod
    def withholding_text_of(cls, exc: BaseException) -> RetrainingFailed:
        """Log ``exc``'s type and stack (file, line, source: no values) and return the safe error."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
        logger.error("fraud retrain failed: %s at %s (its message is withheld: it may quote customer data)\n%s",
                     type(exc).__name__, where, "".join(traceback.format_list(frames)).rstrip())
        return cls(f"retraining failed: {type(exc).__name__} at {where} (the error text is withheld since it "
                   "may quote customer data; the worker log has the stack)")


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
    """A tenant's own traffic and its back-test namespaces, dated inside the accepted window."""
    namespaces = f"{tenant_id}{BACKTEST_NAMESPACE_MARK}"
    latest = time.time() + MAX_FUTURE_SKEW.total_seconds()
    return (((Transaction.tenant_id == tenant_id) | Transaction.tenant_id.startswith(namespaces, autoescape=True))
            & Transaction.tx_time_s.between(TRAINING_WINDOW_START_S, latest))


def _labelled_until(session: Session, scope: ColumnElement[bool]) -> float | None:
    """Rows up to this time are old enough to carry their label (None: the tenant has no rows)."""
    newest = session.scalar(select(func.max(Transaction.tx_time_s)).where(scope))
    return None if newest is None else newest - LABEL_DELAY_S  # younger rows may lack their label


def labelled_frame(session: Session, tenant_id: str) -> pd.DataFrame:
    """The tenant's stored transactions old enough to be labelled, as a training frame."""
    scope = tenant_scope(tenant_id)
    until = _labelled_until(session, scope)
    if until is None:
        return pd.DataFrame()
    rows = session.execute(
        select(Transaction.features, Transaction.is_fraud, Transaction.tx_time_s, Transaction.customer_id,
               Transaction.score, Transaction.model_version)
        .where(scope, Transaction.tx_time_s <= until)
    ).all()
    kept = [r for r in rows if len(r.features) == len(FEATURE_NAMES)]  # rows of older feature sets drop out
    if not kept:
        return pd.DataFrame()
    features = np.asarray([r.features for r in kept], dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
    frame = pd.DataFrame(features, columns=list(FEATURE_NAMES))
    frame["TX_FRAUD"] = [int(bool(r.is_fraud)) for r in kept]
    times = np.asarray([r.tx_time_s for r in kept], dtype=np.float64)
    frame["TX_DATETIME"] = pd.to_datetime(times, unit="s")
    frame["TX_TIME_DAYS"] = (times // SECONDS_PER_DAY).astype(int)
    frame["CUSTOMER_ID"] = [r.customer_id for r in kept]
    frame["LIVE_SCORE"] = [r.score for r in kept]
    return frame.sort_values("TX_DATETIME").reset_index(drop=True)


def frame_label_counts(frame: pd.DataFrame, holdout_days: int) -> LabelCounts:
    """What :func:`labelled_frame` holds in each period of a candidate."""
    if frame.empty:
        return LabelCounts()
    days = frame.TX_TIME_DAYS.to_numpy()
    fraud = frame.TX_FRAUD.to_numpy() == 1
    periods = CandidatePeriods(int(days.max()), holdout_days)
    training = days <= periods.last_training_day
    calibration = (days >= periods.first_holdout_day) & (days <= periods.last_calibration_day)
    return LabelCounts(int((training & fraud).sum()), int((training & ~fraud).sum()),
                       int((calibration & fraud).sum()), int((calibration & ~fraud).sum()))


def stored_label_counts(session: Session, tenant_id: str, holdout_days: int) -> LabelCounts:
    """:func:`frame_label_counts` of the tenant's stored rows, counted by the database (no rows loaded).

    Rows of an older feature set, which training leaves out, are counted here: the job checks
    again on what it loaded.
    """
    scope = tenant_scope(tenant_id)
    until = _labelled_until(session, scope)
    last = None if until is None else session.scalar(
        select(func.max(Transaction.tx_time_s)).where(scope, Transaction.tx_time_s <= until))
    if until is None or last is None:
        return LabelCounts()
    periods = CandidatePeriods(int(last // SECONDS_PER_DAY), holdout_days)
    when, fraud = Transaction.tx_time_s, Transaction.is_fraud.is_(True)
    training = when < (periods.last_training_day + 1) * SECONDS_PER_DAY
    calibration = ((when >= periods.first_holdout_day * SECONDS_PER_DAY)
                   & (when < (periods.last_calibration_day + 1) * SECONDS_PER_DAY))

    def count(condition: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    counted = session.execute(select(count(training & fraud), count(training & ~fraud),
                                     count(calibration & fraud), count(calibration & ~fraud))
                              .where(scope, when <= until)).one()
    return LabelCounts(*(int(n) for n in counted))


def check_enough_labels(counts: LabelCounts, holdout_days: int) -> None:
    """Raise :class:`NotEnoughLabels` unless ``counts`` meet :data:`LABELS_NEEDED`."""
    if counts.shortfalls():
        raise NotEnoughLabels.for_counts(counts, holdout_days)


def _live_version(session: Session, tenant_id: str) -> str | None:
    """The version scoring the tenant now: its own live one, else the shared default."""
    own = live_version(session, FRAUD_MODEL_NAME, tenant_id)
    if own is not None:
        return own.version
    shipped = default_artifact_dir()
    return shipped.name if shipped else None


def retrain(session: Session, tenant_id: str, *, holdout_days: int = 7, min_improvement: float = 0.0,
            output_root: Path | None = None) -> RetrainOutcome:
    """Train, evaluate against the tenant's live model, record the version, promote it if not worse.

    Raises
    ------
    NotEnoughLabels
        The tenant's labelled history lacks what :data:`LABELS_NEEDED` asks.
    RetrainingFailed
        Anything else went wrong (its message carries no data).
    """
    if min_improvement < 0:
        raise ValueError("min_improvement must be at least 0")
    try:
        return _retrain(session, tenant_id, holdout_days, min_improvement, output_root)
    except (NotEnoughLabels, RetrainingFailed):
        raise
    except Exception as exc:
        raise RetrainingFailed.withholding_text_of(exc) from None


def _retrain(session: Session, tenant_id: str, holdout_days: int, min_improvement: float,
             output_root: Path | None) -> RetrainOutcome:
    # imported here: training pulls torch and LightGBM, which the API importing this module never needs
    from services.fraud.training import MODEL_NAME, holdout_metrics, train_candidate, write_payload

    frame = labelled_frame(session, tenant_id)
    check_enough_labels(frame_label_counts(frame, holdout_days), holdout_days)
    model, candidate_metrics = train_candidate(frame, None, holdout_days=holdout_days)
    first_holdout_day = CandidatePeriods(int(frame.TX_TIME_DAYS.max()), holdout_days).first_holdout_day
    holdout = frame[first_holdout_day <= frame.TX_TIME_DAYS]
    live_metrics = holdout_metrics(holdout.LIVE_SCORE.to_numpy(np.float64), holdout)
    promoted = candidate_metrics[PROMOTION_METRIC] - live_metrics[PROMOTION_METRIC] >= min_improvement
    version = datetime.now(UTC).strftime("retrained-%Y%m%dT%H%M%S%f")
    directory = (output_root or get_settings().data_dir / "models" / "fraud") / tenant_id / version
    write_payload(model, directory)
    save_artifact(directory, name=MODEL_NAME, version=version, framework="lightgbm",
                  metrics={f"holdout_{k}": v for k, v in candidate_metrics.items()},
                  data=f"{len(frame)} stored transactions of tenant {tenant_id}, labels from "
                       f"analysts/chargebacks, last {holdout_days} days held out; serves this tenant only",
                  rebuild_command="POST /fraud/v1/models/retrain",
                  extra={"model_features": list(model.model_features), "tenant_id": tenant_id})
    live_version = _live_version(session, tenant_id)
    _record(session, tenant_id, version, directory, candidate_metrics, live_metrics, promoted)
    logger.info("fraud retrain %s of tenant %s: candidate AP %.4f vs live AP %.4f -> %s", version, tenant_id,
                candidate_metrics[PROMOTION_METRIC], live_metrics[PROMOTION_METRIC],
                "promoted" if promoted else "rejected")
    return RetrainOutcome(version, promoted, candidate_metrics, live_metrics, live_version)


def _record(session: Session, tenant_id: str, version: str, directory: Path, candidate: dict[str, float],
            live: dict[str, float], promoted: bool) -> None:
    record_version(session, FRAUD_MODEL_NAME, version, directory, tenant_id=tenant_id,
                   metrics={"candidate": candidate, "live_at_evaluation": live},
                   status=CANDIDATE if promoted else REJECTED)
    if promoted:  # retires the tenant's previous live version only: at most one live a tenant
        promote(session, FRAUD_MODEL_NAME, version)


def model_versions(session: Session, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's own versions, newest first, then the shared default (live unless one of them is)."""
    return tenant_model_listing(session, FRAUD_MODEL_NAME, tenant_id, default_artifact_dir())
