"""The persisted alert lifecycle on each database, in process: scoring opens, escalates and resolves
alerts by policy, one active alert per asset, compare-and-set transitions, one webhook job per
transition, maintenance resolving, tenant walls. The model and the windows are fakes here (the
end-to-end test runs the real ones)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from services.iiot import alerts, maintenance
from services.iiot.alerts import AlertPolicy, AlertSettings, ScorePoint
from services.iiot.db import Alert, Asset, Line, Plant, RiskScore, Sensor, TenantSettings, readings
from services.iiot.maintenance import MaintenanceIn
from services.iiot.scoring import AssetWindow, Prediction, score_tenant
from shared.db import session_scope
from shared.errors import Conflict, NotFound
from shared.jobs import Job
from tests.conftest import Stack

START = datetime(2026, 3, 1, tzinfo=UTC)
NOTIFY = "http://127.0.0.1:9/hooks"


def new_asset(session: Session, tenant_id: str, asset_id: str = "pump-1") -> Sensor:
    """A plant, line, asset and one temperature sensor of ``tenant_id``; returns the sensor."""
    plant = Plant(tenant_id=tenant_id, plant_id=f"plant-{asset_id}")
    session.add(plant)
    session.flush()
    line = Line(tenant_id=tenant_id, plant_pk=plant.id, line_id=f"line-{asset_id}")
    session.add(line)
    session.flush()
    asset = Asset(tenant_id=tenant_id, line_pk=line.id, asset_id=asset_id)
    session.add(asset)
    session.flush()
    sensor = Sensor(tenant_id=tenant_id, asset_pk=asset.id, sensor_id="temp", quantity="temperature", unit="degC")
    session.add(sensor)
    session.flush()
    return sensor


def add_reading(session: Session, sensor: Sensor, hour: int, value: float = 50.0) -> None:
    at = START + timedelta(hours=hour)
    session.execute(insert(readings).values(sensor_pk=sensor.id, ts=at, value=value))
    sensor.last_ts = at
    session.flush()


def fake_builder(frame: pd.DataFrame, sensors: Sequence[Sensor], end: datetime) -> tuple[np.ndarray, np.ndarray]:
    assert len(frame) >= 1 and (frame.ts <= end).all()
    return np.zeros((2, 5), np.float32), np.ones(2, np.float32)


class FakeModel:
    """Answers the next P(failure) of a script for each window."""

    def __init__(self) -> None:
        self.script: list[float] = []

    def __call__(self, tenant_id: str, windows: Sequence[AssetWindow]) -> tuple[list[Prediction | Exception], str]:
        return [Prediction(self.script.pop(0), 100.0, {"channels": [["temperature", 1.0]]}) for _ in windows], "fake-1"


@pytest.fixture
def tenant(migrated_stack: Stack) -> str:
    tenant_id = f"plant-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        settings = AlertSettings(policy=AlertPolicy(open_threshold=0.5, close_threshold=0.3, consecutive=2,
                                                    critical_threshold=0.8, rul_open_hours=None))
        session.add(TenantSettings(tenant_id=tenant_id, policy=settings.policy.model_dump(), notify_url=NOTIFY))
    return tenant_id


def score_with(session: Session, tenant_id: str, model: FakeModel, p: float) -> dict[str, object]:
    model.script.append(p)
    return score_tenant(session, tenant_id, predictor=model, window_builder=fake_builder).as_dict()


def webhook_keys(session: Session, tenant_id: str) -> list[str]:
    return sorted(session.scalars(select(Job.idempotency_key).where(Job.tenant_id == tenant_id,
                                                                    Job.idempotency_key.startswith("webhook:iiot:"))))


def test_scores_open_escalate_and_resolve_an_alert_with_hysteresis(tenant: str) -> None:
    model = FakeModel()
    with session_scope() as session:
        sensor = new_asset(session, tenant)
        assert score_with(session, tenant, model, 0.9)["without_readings"] == 1  # nothing to score yet
        model.script.clear()
        steps = [(0.6, {}), (0.4, {}), (0.7, {}), (0.7, {"opened": 1}), (0.95, {"escalated": 1}),
                 (0.2, {}), (0.45, {}), (0.1, {}), (0.1, {"resolved": 1})]
        for hour, (p, expected) in enumerate(steps):
            add_reading(session, sensor, hour)
            summary = score_with(session, tenant, model, p)
            assert (summary["scored"], summary["transitions"], summary["model_version"]) == (1, expected, "fake-1")
        again = score_tenant(session, tenant, predictor=model, window_builder=fake_builder)
        assert (again.scored, again.unchanged) == (0, 1)  # no new reading: no new score

        [alert] = session.scalars(select(Alert).where(Alert.tenant_id == tenant))
        assert (alert.state, alert.active_key, alert.severity, alert.resolved_by) == ("resolved", None, "critical",
                                                                                      "policy")
        assert (alert.opened_p, alert.peak_p, alert.last_p) == (0.7, 0.95, 0.1)
        assert session.scalar(select(RiskScore.drivers).where(RiskScore.tenant_id == tenant).limit(1)) == {
            "channels": [["temperature", 1.0]]}
        prefix = f"webhook:iiot:{tenant}:alert:{alert.id}:"
        assert webhook_keys(session, tenant) == [prefix + t for t in ("escalated", "opened", "resolved")]


def test_an_asset_is_scored_once_per_hour_of_readings_however_often_beat_runs(tenant: str) -> None:
    model = FakeModel()
    with session_scope() as session:
        sensor = new_asset(session, tenant)
        add_reading(session, sensor, 0)
        assert score_with(session, tenant, model, 0.1)["scored"] == 1
        for minutes in (10, 50):  # readings within the hour: the policy counts hourly scores
            at = START + timedelta(minutes=minutes)
            session.execute(insert(readings).values(sensor_pk=sensor.id, ts=at, value=50.0))
            sensor.last_ts = at
            session.flush()
            summary = score_tenant(session, tenant, predictor=model, window_builder=fake_builder)
            assert (summary.scored, summary.unchanged) == (0, 1)
        add_reading(session, sensor, 1)
        assert score_with(session, tenant, model, 0.1)["scored"] == 1


def test_an_asset_has_one_active_alert_and_transitions_happen_once(tenant: str) -> None:
    with session_scope() as session:
        asset_pk = new_asset(session, tenant).asset_pk
        first = alerts.open_alert(session, tenant, asset_pk, ScorePoint(START, 0.9), "critical")
        assert first is not None
    with session_scope() as session:
        assert alerts.open_alert(session, tenant, asset_pk, ScorePoint(START, 0.95), "critical") is None
        assert len(list(session.scalars(select(Alert).where(Alert.tenant_id == tenant)))) == 1

        acknowledged = alerts.acknowledge(session, tenant, first.id, by="planner", note="on it", notify_url=NOTIFY)
        assert (acknowledged.state, acknowledged.acknowledged_by, acknowledged.note) == ("acknowledged", "planner",
                                                                                        "on it")
        with pytest.raises(Conflict):
            alerts.acknowledge(session, tenant, first.id, by="planner", note=None, notify_url=NOTIFY)
        resolved = alerts.resolve_or_conflict(session, tenant, first.id, by="planner", note="fixed",
                                              notify_url=NOTIFY)
        assert (resolved.state, resolved.resolved_by, resolved.note) == ("resolved", "planner", "on it; fixed")
        with pytest.raises(Conflict):
            alerts.resolve_or_conflict(session, tenant, first.id, by="planner", note=None, notify_url=NOTIFY)
        assert alerts.resolve(session, tenant, first.id, by="policy", note=None, notify_url=NOTIFY) is None
        # resolved: the asset may have a new active alert
        assert alerts.open_alert(session, tenant, asset_pk, ScorePoint(START, 0.9), "critical") is not None
        prefix = f"webhook:iiot:{tenant}:alert:{first.id}:"
        assert [k for k in webhook_keys(session, tenant) if k.startswith(prefix)] == [
            prefix + "acknowledged", prefix + "resolved"]


def test_a_failure_record_resolves_the_active_alert_and_becomes_a_label(tenant: str) -> None:
    with session_scope() as session:
        asset_pk = new_asset(session, tenant, "fan-3").asset_pk
        alert = alerts.open_alert(session, tenant, asset_pk, ScorePoint(START, 0.9), "critical")
        assert alert is not None
        inspection = maintenance.record_maintenance(
            session, tenant, "fan-3", MaintenanceIn(kind="inspection", occurred_at=START), by="tech", notify_url=None)
        assert inspection.resolved_alert_id is None
        failure = maintenance.record_maintenance(
            session, tenant, "fan-3", MaintenanceIn(kind="failure", occurred_at=START + timedelta(hours=5),
                                                    failure_mode="bearing"), by="tech", notify_url=None)
        assert failure.resolved_alert_id == alert.id
        session.refresh(alert)
        assert (alert.state, alert.resolved_by) == ("resolved", "tech")
        assert alert.note == f"resolved by maintenance record {failure.id} (failure)"
        assert maintenance.failure_times(session, tenant) == {asset_pk: [START + timedelta(hours=5)]}
        assert [r.kind for r in maintenance.list_maintenance(session, tenant, "fan-3")] == ["failure", "inspection"]


def test_another_tenants_alerts_and_assets_are_not_found(tenant: str) -> None:
    with session_scope() as session:
        asset_pk = new_asset(session, tenant, "press-9").asset_pk
        alert = alerts.open_alert(session, tenant, asset_pk, ScorePoint(START, 0.9), "critical")
        assert alert is not None
        intruder = f"other-{uuid.uuid4().hex[:8]}"
        with pytest.raises(NotFound):
            alerts.get_alert(session, intruder, alert.id)
        with pytest.raises(NotFound):
            alerts.resolve(session, intruder, alert.id, by="x", note=None, notify_url=None)
        with pytest.raises(NotFound):
            maintenance.record_maintenance(session, intruder, "press-9",
                                           MaintenanceIn(kind="repair", occurred_at=START), by="x", notify_url=None)
        assert alerts.active_alert(session, tenant, asset_pk) is not None


def test_beat_fans_out_one_scoring_job_per_tenant_and_slot(tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.iiot import tasks
    from shared.queue import celery_app

    tasks.schedule_scoring()  # done at import; a test switching stacks rebuilt the Celery config since
    entry = celery_app.conf.beat_schedule[tasks.SCORE_ALL_ENTRY]
    assert (entry["task"], entry["options"]["queue"]) == (tasks.SCORE_ALL_TASK, "iiot")
    with session_scope() as session:
        new_asset(session, tenant, "mixer-2")
    monkeypatch.setattr(tasks.time, "time", lambda: 3_000_000.0)  # one slot of the scoring interval
    sent: list[str] = []
    monkeypatch.setattr("shared.jobs.enqueue", lambda _task, _queue, job_id, countdown=None: sent.append(job_id))
    assert tasks.score_all_tenants() >= 1
    tasks.score_all_tenants()  # beat sent the slot twice: still one job
    with session_scope() as session:
        keys = list(session.scalars(select(Job.idempotency_key).where(Job.tenant_id == tenant,
                                                                      Job.task_name == "iiot.score_tenant")))
    assert keys == [f"iiot-score:{tenant}:slot-{int(3_000_000 // 300)}"]


def test_a_policy_saved_before_rul_close_hours_keeps_closing_at_rul_open_hours(migrated_stack: Stack) -> None:
    tenant_id = f"plant-{uuid.uuid4().hex[:8]}"
    saved = AlertPolicy(rul_close_hours=None).model_dump()
    del saved["rul_close_hours"]  # a full dump from before the field existed
    with session_scope() as session:
        session.add(TenantSettings(tenant_id=tenant_id, policy=saved, notify_url=None))
    with session_scope() as session:
        policy = alerts.load_settings(session, tenant_id).policy
        assert (policy.rul_open_hours, policy.rul_close_hours, policy.rul_close_limit) == (216.0, None, 216.0)
        session.add(TenantSettings(tenant_id=f"{tenant_id}-x", policy={}, notify_url=None))
    with session_scope() as session:
        assert alerts.load_settings(session, f"{tenant_id}-x").policy == AlertPolicy()


def test_a_policy_saved_with_an_infinity_loads_as_the_null_the_tenant_was_shown(migrated_stack: Stack) -> None:
    if migrated_stack.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's json type refuses Infinity: only SQLite could have stored one")
    tenant_id = f"plant-{uuid.uuid4().hex[:8]}"
    saved = {**AlertPolicy().model_dump(), "rul_open_hours": float("inf"), "rul_critical_hours": float("inf")}
    with session_scope() as session:
        session.add(TenantSettings(tenant_id=tenant_id, policy=saved, notify_url=None))
    with session_scope() as session:
        policy = alerts.load_settings(session, tenant_id).policy
    assert (policy.rul_open_hours, policy.rul_critical_hours) == (None, None)


def test_two_scorers_racing_open_one_alert(tenant: str) -> None:
    """Both insert at once: the unique index makes one insert win and the other do nothing (no error)."""
    import threading

    with session_scope() as session:
        asset_pk = new_asset(session, tenant, "racer").asset_pk
    barrier = threading.Barrier(2)
    outcomes: list[bool] = []

    def open_once() -> None:
        with session_scope() as session:
            barrier.wait(timeout=10)
            outcomes.append(alerts.open_alert(session, tenant, asset_pk, ScorePoint(START, 0.9), "critical")
                            is not None)

    threads = [threading.Thread(target=open_once) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == [False, True]
    with session_scope() as session:
        assert len(list(session.scalars(select(Alert).where(Alert.asset_pk == asset_pk)))) == 1
