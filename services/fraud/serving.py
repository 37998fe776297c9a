"""The fraud model in the shared runtime: which artifact is live, and how a batch is scored.

Items are ``(features (F,), sequence (K, S))`` pairs prepared on the request side; the runtime
batches concurrent requests and calls :func:`score_batch` in its model thread.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from model_runtime.artifacts import list_versions, load_manifest
from model_runtime.runtime import LoadContext, ModelSpec, get_runtime
from services.fraud.features import FEATURE_NAMES, SEQUENCE_CHANNELS, SEQUENCE_STEPS
from services.fraud.model import FraudScorer
from shared.config import get_settings
from shared.db import session_factory

FRAUD_MODEL_NAME = "fraud"
TOP_CONTRIBUTIONS = 3

ScoringItem = tuple[np.ndarray, np.ndarray, float]
"""(features (F,), sequence (K, S), explain_from): contributions are computed for scores >= explain_from."""


def shipped_versions(models_dir: Path | None = None) -> list[Path]:
    """Sealed fraud artifacts under ``models/fraud``, oldest first."""
    root = models_dir or get_settings().models_dir
    return [root / FRAUD_MODEL_NAME / version for version in list_versions(root, FRAUD_MODEL_NAME)]


def _load(context: LoadContext) -> FraudScorer:
    assert context.artifact_dir is not None
    return FraudScorer(context.artifact_dir, verify=False)  # the runtime verified sha256 already


def _prepare(item: ScoringItem) -> ScoringItem:
    features, sequence, _explain_from = item
    if features.shape != (len(FEATURE_NAMES),) or sequence.shape != (SEQUENCE_STEPS, len(SEQUENCE_CHANNELS)):
        raise ValueError(f"bad scoring input shapes {features.shape}, {sequence.shape}")
    if not np.isfinite(features[~np.isnan(features)]).all():
        raise ValueError("features must be finite")
    return item


def score_batch(scorer: FraudScorer, items: list[ScoringItem]) -> list[tuple[float, tuple[tuple[str, float], ...]]]:
    """Calibrated scores, and the top contributions of the items that need explaining.

    Reasons are path attributions (they sum to the margin; exact TreeSHAP cost ~10-18 ms a row on
    the shipped booster, 100x the score) and are computed only for rows scoring at or above their
    tenant's review threshold: the decisions an analyst or the bank will look at. Returns
    ``(score, ((feature, value), ...))`` per item, in order; the tuple is empty when not explained.
    """
    features = np.stack([item[0] for item in items])
    sequences = np.stack([item[1] for item in items])
    explain_from = np.fromiter((item[2] for item in items), dtype=np.float64, count=len(items))
    scores = scorer.predict_batch(features, sequences)
    explained = np.flatnonzero(scores >= explain_from)
    reasons: list[tuple[tuple[str, float], ...]] = [()] * len(items)
    if explained.size:
        top = scorer.top_contributions(features[explained], k=TOP_CONTRIBUTIONS, sequences=sequences[explained],
                                       method="path")
        for position, pairs in zip(explained, top, strict=True):
            reasons[position] = tuple(pairs)
    return [(float(score), reason) for score, reason in zip(scores, reasons, strict=True)]


def fraud_model_spec(artifact_dir: Path) -> ModelSpec:
    """How the runtime serves one fraud artifact (batched, warmed up at load)."""
    warmup = (np.zeros(len(FEATURE_NAMES), dtype=np.float32),
              np.zeros((SEQUENCE_STEPS, len(SEQUENCE_CHANNELS)), dtype=np.float32), 0.0)
    return ModelSpec(name=FRAUD_MODEL_NAME, version="", loader=_load, run_batch=score_batch,
                     prepare=_prepare, artifact_dir=artifact_dir, max_batch_size=64, max_wait_ms=1.0,
                     max_queue=512, timeout_s=2.0, warmup_items=[warmup])


logger = logging.getLogger("tessera.fraud.serving")


def live_artifact_dir() -> Path | None:
    """The artifact to serve: the promoted live version if any, else the newest shipped one."""
    from services.fraud.db import ModelVersion  # imported late: serving must not need the DB to load

    try:
        with session_factory()() as session:
            live = session.scalar(select(ModelVersion).where(ModelVersion.status == "live"))
    except SQLAlchemyError:  # database not migrated yet: fall back to what ships
        live = None
    if live is not None and Path(live.artifact_dir).is_dir():
        return Path(live.artifact_dir)
    shipped = shipped_versions()
    return shipped[-1] if shipped else None


def _digest(artifact: Path) -> str:
    return load_manifest(artifact, verify=False).digest


async def watch_live_model() -> None:
    """Hot-swap the served model when another process promotes a new version."""
    runtime = get_runtime()
    while True:
        await asyncio.sleep(get_settings().model_reload_poll_s)
        try:
            artifact = await asyncio.to_thread(live_artifact_dir)
            loaded = runtime.loaded().get(FRAUD_MODEL_NAME)
            if artifact is None or (loaded and loaded.get("digest") == _digest(artifact)):
                continue
            logger.info("swapping fraud model to %s", artifact)
            await runtime.swap(FRAUD_MODEL_NAME, fraud_model_spec(artifact))
        except Exception:  # keep serving the current version; try again next poll
            logger.exception("fraud model hot swap failed")
