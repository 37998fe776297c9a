"""The fraud models in the shared runtime: which artifact serves which tenant, and how a batch is scored.

Items are :class:`ScoringItem` (a transaction and its window state); the runtime batches concurrent
requests and calls :func:`score_batch` in its model thread, which builds features for the batch.
The shipped model is the shared default; a tenant's promoted retrained version scores that tenant
alone (:func:`model_name_for`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from model_runtime.artifacts import list_versions
from model_runtime.runtime import LoadContext, ModelSpec
from model_runtime.versions import LiveModels
from services.fraud.features import WindowAggregates, feature_matrix, sequence_tensor
from services.fraud.model import FraudScorer
from shared.config import get_settings

FRAUD_MODEL_NAME = "fraud"
TOP_CONTRIBUTIONS = 3

@dataclass(frozen=True, slots=True)
class ScoringItem:
    """One transaction as the request side hands it to the runtime: raw window state, no features yet.

    Features are built in the model thread for the whole batch at once (one vectorised formula:
    ~30 us a row in a batch against ~0.9 ms for a lone row).
    """

    amount: float
    tx_datetime: datetime
    """Event time as naive UTC (weekend, night and hour features)."""
    tx_time_s: float
    terminal_id: str
    aggregates: WindowAggregates
    explain_from: float
    """Contributions are computed when the score reaches this (the tenant's review threshold)."""


@dataclass(frozen=True, slots=True)
class ScoredItem:
    """The runtime's answer for one transaction."""

    score: float
    contributions: tuple[tuple[str, float], ...]
    """Top contributions (feature, margin units); empty when the score is below ``explain_from``."""
    features: np.ndarray
    """(F,) float32, in FEATURE_NAMES order (rules test them; the decision record keeps them)."""


def shipped_versions(models_dir: Path | None = None) -> list[Path]:
    """Sealed fraud artifacts under ``models/fraud``, oldest first."""
    root = models_dir or get_settings().models_dir
    return [root / FRAUD_MODEL_NAME / version for version in list_versions(root, FRAUD_MODEL_NAME)]


def _load(context: LoadContext) -> FraudScorer:
    assert context.artifact_dir is not None
    return FraudScorer(context.artifact_dir, verify=False)  # the runtime verified sha256 already


def _prepare(item: ScoringItem) -> ScoringItem:
    if not isinstance(item, ScoringItem):
        raise TypeError(f"expected a ScoringItem, got {type(item).__name__}")
    if not math.isfinite(item.amount) or not math.isfinite(item.tx_time_s):
        raise ValueError("amount and time must be finite")
    return item


def score_batch(scorer: FraudScorer, items: list[ScoringItem]) -> list[ScoredItem]:
    """Features, calibrated scores, and the top contributions of the items that need explaining.

    Reasons are path attributions (they sum to the margin; exact TreeSHAP cost ~10-18 ms a row on
    the shipped booster, 100x the score) and are computed only for rows scoring at or above their
    tenant's review threshold: the decisions an analyst or the bank will look at. Scores and
    reasons come from one pass of each model (:meth:`FraudScorer.score_with_reasons`).
    """
    features = feature_matrix([item.amount for item in items], [item.tx_datetime for item in items],
                              [item.aggregates for item in items])
    sequences = sequence_tensor([item.amount for item in items], [item.tx_time_s for item in items],
                                [item.terminal_id for item in items],
                                [item.aggregates.card_history for item in items])
    explain_from = np.fromiter((item.explain_from for item in items), dtype=np.float64, count=len(items))
    scores, top = scorer.score_with_reasons(features, sequences, k=TOP_CONTRIBUTIONS, explain_from=explain_from)
    reasons = [tuple(pairs) for pairs in top]
    return [ScoredItem(score=float(score), contributions=reason, features=row)
            for score, reason, row in zip(scores, reasons, features, strict=True)]


def fraud_model_spec(artifact_dir: Path) -> ModelSpec:
    """How the runtime serves one fraud artifact (batched, warmed up at load)."""
    first_card_use = WindowAggregates(1, 1, 1, 1, 1, 1, 1, 1, 1, None, 0, 0, 0, 0, 0, 0, 0, 0, None)
    warmup = ScoringItem(amount=1.0, tx_datetime=datetime(2024, 1, 1), tx_time_s=1_704_067_200.0,
                         terminal_id="warmup", aggregates=first_card_use, explain_from=0.0)
    # A batch costs ~0.5 ms of CPU at one row (bench/fraud.py): handing it to a worker thread and
    # back (thread wake-ups, GIL switches) cost more than it overlapped. So it runs in a child
    # process (fraud_model_process; the loop only pickles the batch and reads the answer), or, when
    # that is off and in workers, on the loop itself.
    return ModelSpec(name=FRAUD_MODEL_NAME, version="", loader=_load, run_batch=score_batch,
                     prepare=_prepare, artifact_dir=artifact_dir, max_batch_size=64, max_wait_ms=1.0,
                     max_queue=512, timeout_s=2.0, run_inline=True, uses_torch=False,
                     run_in_process=get_settings().fraud_model_process, warmup_items=[warmup])


def default_artifact_dir() -> Path | None:
    """The shared default model: the newest shipped artifact (``models/fraud/<version>``)."""
    shipped = shipped_versions()
    return shipped[-1] if shipped else None


# --------------------------------------------------------------------------- models per tenant
#
# The default serves as runtime model "fraud". A tenant whose retrained version was promoted is
# served by that version alone, as runtime model "fraud@<tenant>"; scoring asks
# model_name_for(tenant) which one to use (a dict lookup: no database read per request). The
# versions and their promotion live in the platform's registry (model_runtime.versions).

BACKTEST_NAMESPACE_MARK = "~backtest-"
"""Back-test rows are stored under ``<tenant>~backtest-<job>`` (``~`` never occurs in a tenant id)."""
UNLOAD_GRACE_S = 2.0
"""A tenant model is unloaded this long after requests stop being routed to it (its timeout_s)."""


def _tenant_spec(name: str, artifact_dir: Path) -> ModelSpec:
    return dataclasses.replace(fraud_model_spec(artifact_dir), name=name)


FRAUD_MODELS = LiveModels(FRAUD_MODEL_NAME, _tenant_spec, default_artifact_dir, unload_grace_s=UNLOAD_GRACE_S)
"""The default and every tenant's live fraud version this process serves."""


def backtest_namespace(tenant_id: str, job_id: str) -> str:
    """The tenant id under which a back-test job's rows are scored and stored."""
    return f"{tenant_id}{BACKTEST_NAMESPACE_MARK}{job_id[:12]}"


def model_name_for(tenant_id: str) -> str:
    """The runtime model that scores ``tenant_id``: its own live version, else the default.

    A back-test namespace scores with its tenant's model.
    """
    name = FRAUD_MODELS.own_name(tenant_id)
    if name is None and BACKTEST_NAMESPACE_MARK in tenant_id:
        name = FRAUD_MODELS.own_name(tenant_id.split(BACKTEST_NAMESPACE_MARK, 1)[0])
    return name or FRAUD_MODEL_NAME


async def load_fraud_models() -> None:
    """Serve the default and every tenant's live version (API start-up); see :meth:`LiveModels.refresh`."""
    await FRAUD_MODELS.refresh()


async def unload_fraud_models() -> None:
    """Stop serving the default and every tenant model (API shutdown)."""
    await FRAUD_MODELS.unload_all()


async def watch_live_model() -> None:
    """Load, hot-swap and unload tenant models as other processes promote versions."""
    await FRAUD_MODELS.watch()


def serve_tenant_model_sync(tenant_id: str) -> str:
    """In a worker process: serve the default and ``tenant_id``'s current live version; its model name.

    Called before each back-test, so a long-lived worker never scores with a version that was
    replaced since it last ran.
    """
    return FRAUD_MODELS.serve_sync(tenant_id)
