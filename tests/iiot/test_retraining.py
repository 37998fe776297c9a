"""Retraining in process on SQLite: failure records label a tenant's stored windows, a candidate is
trained with the model code, judged against the live model on the held-out later period, recorded
and promoted for that tenant alone; too few labels is a 422-style error naming the counts.

The windows here come from a fake builder over a simulated reading (it rises as a failure nears),
so a few epochs learn it; the live model, sealed as the shipped default, answers one P(failure) for
every window (its average precision is the base rate).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sqlalchemy import insert

from model_runtime.versions import live_version
from services.iiot import retraining
from services.iiot.db import MaintenanceRecord, Sensor, readings
from services.iiot.retraining import NotEnoughLabels, RetrainIn
from services.iiot.scoring import IIOT_MODEL_NAME, IIOT_MODELS
from shared.db import session_scope
from tests.conftest import SQLITE, Stack
from tests.iiot.test_alerts_lifecycle import START, new_asset

pytestmark = pytest.mark.stack_variants(SQLITE)  # retraining reads through the same SQL as scoring
CHANNELS = ("temperature", "vibration", "pressure", "current", "speed")
HOURS = 40 * 24
FAILURES = {"a": (200, 450, 700, 900), "b": (300, 600, 880)}


def seal_untrained_model(models_dir: Path) -> None:
    from model_runtime.artifacts import save_artifact
    from services.iiot.model import SensorWindowConfig, SensorWindowNet, save_risk_model

    directory = models_dir / "iiot" / "cloud" / "v1"
    net = SensorWindowNet(SensorWindowConfig.for_tier("edge", CHANNELS, window=12))
    answer_one_probability(net)
    save_risk_model(net, directory, onnx=False)
    save_artifact(directory, name="iiot", version="v1", framework="torch", data="constant P(failure) (tests)")


def answer_one_probability(net: torch.nn.Module) -> None:
    """Zero the failure head's last weights: one P(failure) for every window (held-out AP = the base rate)."""
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith("failure_head.") and name.endswith(".weight") and parameter.shape[0] == 1:
                parameter.zero_()


def rising_builder(frame: pd.DataFrame, sensors: Sequence[Sensor], end: datetime) -> tuple[np.ndarray, np.ndarray]:
    """The window's last 12 hourly values on every channel (the simulated reading rises before a failure)."""
    values = frame.sort_values("ts").value.to_numpy(np.float32)[-12:]
    window = np.zeros((12, len(CHANNELS)), np.float32)
    window[12 - len(values):] = values[:, None] / 100.0
    mask = np.zeros(12, np.float32)
    mask[12 - len(values):] = 1.0
    return window, mask


def store_history(tenant_id: str, record_failures: bool = True) -> None:
    """Two assets, 40 days of an hourly reading that climbs over the 72 h before each failure
    (:data:`FAILURES`, recorded as maintenance unless ``record_failures`` is False)."""
    rng = np.random.default_rng(0)
    with session_scope() as session:
        for name, failures in FAILURES.items():
            sensor = new_asset(session, tenant_id, f"pump-{name}")
            rows = []
            for hour in range(HOURS):
                ahead = min([f - hour for f in failures if f > hour], default=10_000)
                value = max(0.0, 72.0 - ahead) + float(rng.normal(0, 3))
                rows.append({"sensor_pk": sensor.id, "ts": START + timedelta(hours=hour), "value": value})
            session.execute(insert(readings), rows)
            sensor.last_ts = START + timedelta(hours=HOURS - 1)
            for failure in failures if record_failures else ():
                session.add(MaintenanceRecord(tenant_id=tenant_id, asset_pk=sensor.asset_pk, kind="failure",
                                              occurred_at=START + timedelta(hours=failure), failure_mode="bearing"))


@pytest.fixture
def with_model(migrated_stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from shared.config import get_settings

    models_dir = tmp_path / "models"
    seal_untrained_model(models_dir)
    monkeypatch.setenv("TESSERA_MODELS_DIR", str(models_dir))
    get_settings.cache_clear()
    yield tmp_path
    for name in list(IIOT_MODELS.runtime.loaded()):
        if name.startswith(IIOT_MODEL_NAME):
            IIOT_MODELS.runtime.unload_sync(name)
    IIOT_MODELS._served.clear()
    IIOT_MODELS._asked.clear()


def test_a_tenant_candidate_is_judged_recorded_and_promoted_for_that_tenant_alone(with_model: Path) -> None:
    tenant_id, bystander = f"plant-{uuid.uuid4().hex[:8]}", f"plant-{uuid.uuid4().hex[:8]}"
    store_history(tenant_id)
    options = RetrainIn(holdout_days=7, stride_hours=6.0, epochs=8)
    with session_scope() as session:
        assert retraining.label_counts(session, tenant_id, options) == retraining.LabelCounts(5, 2)
        outcome = retraining.retrain(session, tenant_id, options, builder=rising_builder,
                                     output_root=with_model / "trained")
    assert outcome["live_version"] == "v1"
    candidate, live = outcome["candidate_metrics"], outcome["live_metrics"]
    assert candidate["failures_ahead"] == live["failures_ahead"] > 0  # judged on the same held-out windows
    assert candidate["average_precision"] >= live["average_precision"], outcome
    assert outcome["promoted"] is True
    with session_scope() as session:
        own = live_version(session, IIOT_MODEL_NAME, tenant_id)
        assert own is not None and own.version == outcome["version"]
        assert own.metrics == {"candidate": candidate, "live_at_evaluation": live}
        listed = retraining.model_versions(session, tenant_id)
        assert [(v["version"], v["status"], v["default"]) for v in listed] == [
            (outcome["version"], "live", False), ("v1", "standby", True)]
        assert [(v["version"], v["status"]) for v in retraining.model_versions(session, bystander)] == [("v1", "live")]
    assert IIOT_MODELS.serve_sync(tenant_id) == f"{IIOT_MODEL_NAME}@{tenant_id}"
    assert IIOT_MODELS.serve_sync(bystander) == IIOT_MODEL_NAME


def test_too_few_failure_records_are_refused_with_the_counts(with_model: Path) -> None:
    tenant_id = f"plant-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        new_asset(session, tenant_id)
        counts = retraining.label_counts(session, tenant_id, RetrainIn())
        with pytest.raises(NotEnoughLabels) as refused:
            retraining.check_enough_labels(counts, RetrainIn())
    assert refused.value.status == 422
    assert refused.value.extensions["have"] == {"training_failures": 0, "holdout_failures": 0}
    assert "training failures: 0 of 3 needed" in str(refused.value)
