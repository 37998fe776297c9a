"""The alert lifecycle end to end: the IIoT app under a real uvicorn, a real Celery worker on the
``iiot`` queue, readings stored, a scoring job through the shared runtime (a small risk model sealed
here, served as the shipped cloud model), an alert opened, its signed webhook received by a local
HTTP receiver and verified, acknowledged and resolved over the API, each transition notified once;
tenant walls; settings validated.

The receiver listens on 127.0.0.1, which the server and worker allow-list
(``TESSERA_CALLBACK_ALLOWED_HOSTS``), as an operator would for an internal receiver.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import select

from shared.db import session_scope
from shared.jobs import SUCCEEDED, Job
from shared.security import SIGNATURE_HEADER, Tenant, verify_signature
from shared.webhooks import IDEMPOTENCY_HEADER
from tests.conftest import Stack, apply_stack_in_process, sqlite_stack_at
from tests.iiot.test_alerts_lifecycle import START, add_reading, new_asset
from tests.iiot.test_retraining import FAILURES, answer_one_probability, store_history
from tests.nodule.conftest import new_key
from tests.scaffold import migrate
from tests.shared.test_webhooks import Receiver, receiver  # noqa: F401 - the receiver fixture, reused
from tests.support import ManagedProcess, free_port, python_argv, wait_until

LOOPBACK_ALLOWED = {"TESSERA_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "TESSERA_LOG_LEVEL": "WARNING"}
OPENS_ON_ANY_SCORE = {"open_threshold": 1e-9, "close_threshold": 0.0, "consecutive": 1, "critical_threshold": 1.0}
"""Every score opens (and none closes) an alert: the untrained model's answer does not matter here."""


def seal_small_model(models_dir: Path) -> None:
    """A small untrained risk model on the window features, sealed as ``<models_dir>/iiot/cloud/v1``; it
    answers one P(failure) for every window (so a retrained candidate has something to beat)."""
    from model_runtime.artifacts import save_artifact
    from services.iiot.features import STEP_FEATURES
    from services.iiot.model import SensorWindowConfig, SensorWindowNet, save_risk_model

    directory = models_dir / "iiot" / "cloud" / "v1"
    net = SensorWindowNet(SensorWindowConfig.for_tier("edge", STEP_FEATURES))
    answer_one_probability(net)
    save_risk_model(net, directory, onnx=False)
    save_artifact(directory, name="iiot", version="v1", framework="torch", data="untrained (tests)")


@dataclass
class IiotDeployment:
    stack: Stack
    base_url: str

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"X-API-Key": key}, timeout=30)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IiotDeployment]:
    """The IIoT app and an ``iiot`` worker on a fresh migrated SQLite stack with a sealed small model."""
    root = tmp_path_factory.mktemp("iiot-alerts")
    stack = sqlite_stack_at(root)
    seal_small_model(root / "models")
    stack.extra_env.update({**LOOPBACK_ALLOWED, "TESSERA_MODELS_DIR": str(root / "models")})
    migrate(stack.database_url)
    port = free_port()
    server = ManagedProcess(python_argv("-m", "uvicorn", "services.iiot.api:app", "--host", "127.0.0.1",
                                        "--port", str(port)), stack.env, "iiot-api")
    worker = ManagedProcess(python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "iiot",
                                        "--concurrency", "1", "--without-gossip", "--without-mingle",
                                        "--loglevel", "INFO", "--hostname", f"iiot-{uuid.uuid4().hex[:6]}@%h"),
                            stack.env, "iiot-worker")
    try:
        server.wait_for_output(r"Uvicorn running on", timeout_s=120)
        worker.wait_for_output(r"ready\.", timeout_s=120)
        yield IiotDeployment(stack, f"http://127.0.0.1:{port}/v1")
    finally:
        for process in (server, worker):
            process.stop()
            if "Traceback" in process.output:
                print(f"--- {process.name} log with errors ---\n{process.output[-6000:]}")


@pytest.fixture
def here(deployment: IiotDeployment, monkeypatch: pytest.MonkeyPatch) -> IiotDeployment:
    """This process pointed at the deployment's database (to store registry rows and readings)."""
    apply_stack_in_process(deployment.stack, monkeypatch)
    return deployment


def events_received(webhooks: Receiver, secret: str) -> list[dict[str, object]]:
    """Every webhook body received, each signature verified with the tenant's secret."""
    bodies = []
    for request in webhooks.on("/alerts"):
        verify_signature(request.headers[SIGNATURE_HEADER], request.body, [secret], tolerance_s=300)
        bodies.append({**orjson.loads(request.body), "idempotency_key": request.headers[IDEMPOTENCY_HEADER]})
    return bodies


def job_status(job_id: str) -> str:
    with session_scope() as session:
        return session.scalars(select(Job.status).where(Job.id == job_id)).one()


def test_readings_to_alert_to_signed_webhooks_to_acknowledge_and_resolve(here: IiotDeployment,
                                                                         receiver: Receiver) -> None:  # noqa: F811
    tenant_id, key = new_key(here.stack.database_url, scopes=("iiot",))
    intruder_tenant, intruder_key = new_key(here.stack.database_url, scopes=("iiot",))
    with session_scope() as session:
        sensor = new_asset(session, tenant_id, "pump-7")
        for hour in range(48):
            add_reading(session, sensor, hour, 60.0 + hour * 0.2)
        secret = session.get(Tenant, tenant_id).webhook_secret  # type: ignore[union-attr]

    with here.client(key) as client, here.client(intruder_key) as intruder:
        settings = {"policy": OPENS_ON_ANY_SCORE, "notify_url": f"{receiver.url}/alerts"}
        assert client.put("/settings", json=settings).status_code == 200
        job_id = client.post("/scoring:run").json()["job_id"]
        wait_until(lambda: job_status(job_id) == SUCCEEDED, 90, "the scoring job to succeed")

        [alert] = client.get("/alerts", params={"state": "open"}).json()
        assert (alert["asset_id"], alert["severity"], alert["resolved_by"]) == ("pump-7", "warning", None)
        risk = client.get("/assets/pump-7/risk").json()
        assert risk["model_version"] == "v1" and risk["tier"] == "cloud" and 0 < risk["p_failure"] < 1
        assert risk["active_alert"]["id"] == alert["id"] and risk["drivers"]["channels"]

        # tenant walls: the other tenant sees nothing and can change nothing
        assert intruder.get("/alerts").json() == []
        for response in (intruder.get(f"/alerts/{alert['id']}"), intruder.post(f"/alerts/{alert['id']}:resolve"),
                         intruder.get("/assets/pump-7/risk"), intruder.get("/assets/pump-7/maintenance")):
            assert response.status_code == 404, response.text
        assert intruder_tenant != tenant_id

        acknowledged = client.post(f"/alerts/{alert['id']}:acknowledge", json={"note": "crew sent"})
        assert acknowledged.status_code == 200 and acknowledged.json()["state"] == "acknowledged"
        assert acknowledged.json()["acknowledged_by"].startswith("test (")
        assert client.post(f"/alerts/{alert['id']}:acknowledge").status_code == 409
        resolved = client.post(f"/alerts/{alert['id']}:resolve")
        assert resolved.status_code == 200 and resolved.json()["state"] == "resolved"
        assert client.post(f"/alerts/{alert['id']}:resolve").status_code == 409

        wait_until(lambda: len(receiver.on("/alerts")) >= 3, 60, "three alert webhooks")
        events = events_received(receiver, secret)
        # each transition once; deliveries are separate jobs, so their order is not guaranteed
        by_event = {e["event"]: e for e in events}
        assert len(events) == 3 and set(by_event) == {f"iiot.alert.{t}" for t in ("opened", "acknowledged", "resolved")}
        for transition in ("opened", "acknowledged", "resolved"):
            event = by_event[f"iiot.alert.{transition}"]
            assert event["idempotency_key"] == f"{tenant_id}:alert:{alert['id']}:{transition}"
            assert event["transition"] == transition and event["alert"]["id"] == alert["id"]  # type: ignore[index]
        assert by_event["iiot.alert.resolved"]["alert"]["state"] == "resolved"  # type: ignore[index]

        again = client.post("/scoring:run").json()["job_id"]  # no new reading: nothing scored, nothing opened
        wait_until(lambda: job_status(again) == SUCCEEDED, 60, "the second scoring job")
        assert client.get("/alerts", params={"state": "active"}).json() == []
        assert len(receiver.on("/alerts")) == 3

        # a new reading scores again and opens a new alert; a failure record resolves it and is a label
        with session_scope() as session:
            add_reading(session, session.merge(sensor), 48, 75.0)
        reopened = client.post("/scoring:run").json()["job_id"]
        wait_until(lambda: job_status(reopened) == SUCCEEDED, 60, "the third scoring job")
        [second] = client.get("/alerts", params={"state": "active", "asset": "pump-7"}).json()
        assert second["id"] != alert["id"]
        record = client.post("/assets/pump-7/maintenance", json={
            "kind": "failure", "occurred_at": "2026-03-03T01:00:00Z", "failure_mode": "bearing"})
        assert record.status_code == 201 and record.json()["resolved_alert_id"] == second["id"]
        closed = client.get(f"/alerts/{second['id']}").json()
        note = f"resolved by maintenance record {record.json()['id']} (failure)"
        assert (closed["state"], closed["note"]) == ("resolved", note)
        assert [r["kind"] for r in client.get("/assets/pump-7/maintenance").json()] == ["failure"]
        wait_until(lambda: len(receiver.on("/alerts")) >= 5, 60, "the second alert's webhooks")
        assert sorted(e["event"] for e in events_received(receiver, secret)[3:]) == [  # type: ignore[type-var]
            "iiot.alert.opened", "iiot.alert.resolved"]


def test_settings_are_validated_strictly_and_urls_vetted(here: IiotDeployment) -> None:
    _tenant, key = new_key(here.stack.database_url, scopes=("iiot",))
    with here.client(key) as client:
        assert client.get("/settings").json()["policy"]["consecutive"] == 4  # defaults
        for bad in ({"policy": {"open_threshold": "0.5"}}, {"policy": {"open_threshold": 0.2, "close_threshold": 0.4}},
                    {"policy": {"consecutive": 0}}, {"policy": {"rul_close_hours": 100.0}},
                    {"notify_url": "ftp://example.com/x"}, {"surprise": True}):
            assert client.put("/settings", json=bad).status_code == 422, bad
        refused = client.put("/settings", json={"notify_url": "http://10.1.2.3/hooks"})
        assert refused.status_code == 422 and refused.json()["reason"] == "private"
        assert client.get("/alerts/999999").status_code == 404
        assert client.post("/alerts/999999:acknowledge").status_code == 404
        failure = {"kind": "failure", "occurred_at": "2026-03-01T00:00:00Z"}
        assert client.post("/assets/nope/maintenance", json=failure).status_code == 404
        retrain = client.post("/models/retrain", json={})
        assert retrain.status_code == 422 and retrain.json()["have"] == {"training_failures": 0, "holdout_failures": 0}
        assert client.post("/models/retrain", json={"epochs": "5"}).status_code == 422
        listed = client.get("/models").json()
        assert [(m["version"], m["status"], m["default"]) for m in listed] == [("v1", "live", True)]


def test_alerts_are_listed_newest_first_a_page_at_a_time(here: IiotDeployment) -> None:
    from services.iiot.alerts import ScorePoint, open_alert, resolve

    tenant_id, key = new_key(here.stack.database_url, scopes=("iiot",))
    with session_scope() as session:
        opened = []
        for name in ("m-1", "m-2", "m-3"):
            alert = open_alert(session, tenant_id, new_asset(session, tenant_id, name).asset_pk,
                               ScorePoint(START, 0.7), "warning")
            assert alert is not None
            opened.append(alert.id)
        resolve(session, tenant_id, opened[0], by="test", note=None, notify_url=None)
    with here.client(key) as client:
        first = client.get("/alerts", params={"limit": 2})
        assert [a["id"] for a in first.json()] == [opened[2], opened[1]]
        next_url = first.links["next"]["url"]
        rest = client.get(next_url)
        assert [a["id"] for a in rest.json()] == [opened[0]] and "next" not in rest.links
        assert [a["asset_id"] for a in client.get("/alerts", params={"state": "active"}).json()] == ["m-3", "m-2"]
        assert [a["id"] for a in client.get("/alerts", params={"state": "resolved", "asset": "m-1"}).json()] == [
            opened[0]]
        assert client.get("/alerts", params={"state": "closed"}).status_code == 422


@pytest.mark.slow  # trains a small model in the worker (~10-20 s of CPU)
def test_failure_records_retrain_a_model_that_scores_its_tenant_alone(here: IiotDeployment) -> None:
    """Failures recorded over the API label the stored readings; the retrain job in the worker trains,
    judges and promotes a version for this tenant; its scores use it, a bystander's keep the default."""
    tenant_id, key = new_key(here.stack.database_url, scopes=("iiot",))
    bystander_id, bystander_key = new_key(here.stack.database_url, scopes=("iiot",))
    store_history(tenant_id, record_failures=False)
    with session_scope() as session:
        add_reading(session, new_asset(session, bystander_id, "pump-z"), 0)
    with here.client(key) as client, here.client(bystander_key) as bystander:
        for name, failures in FAILURES.items():
            for hour in failures:
                occurred = (START + timedelta(hours=hour)).isoformat()
                response = client.post(f"/assets/pump-{name}/maintenance",
                                       json={"kind": "failure", "occurred_at": occurred, "failure_mode": "seal"})
                assert response.status_code == 201, response.text
        job_id = client.post("/models/retrain", json={"holdout_days": 7, "stride_hours": 6.0, "epochs": 8}).json()[
            "job_id"]
        wait_until(lambda: job_status(job_id) in (SUCCEEDED, "failed"), 300, "the retrain job")
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.status == SUCCEEDED, job.error if job else None
            result = job.result or {}
        assert result["promoted"] is True and result["live_version"] == "v1", result
        listed = [(m["version"], m["status"], m["default"]) for m in client.get("/models").json()]
        assert listed == [(result["version"], "live", False), ("v1", "standby", True)]
        assert [(m["version"], m["status"]) for m in bystander.get("/models").json()] == [("v1", "live")]

        for who in (client, bystander):
            scored = who.post("/scoring:run").json()["job_id"]
            wait_until(lambda: job_status(scored) == SUCCEEDED, 90, "a scoring job")  # noqa: B023
        assert client.get("/assets/pump-a/risk").json()["model_version"] == result["version"]
        assert bystander.get("/assets/pump-z/risk").json()["model_version"] == "v1"
