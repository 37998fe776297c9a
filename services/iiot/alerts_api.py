"""Alerts, maintenance, alert settings, latest risk, scoring runs and model versions of the IIoT vertical.

Routes parse, call the domain (:mod:`services.iiot.alerts`, :mod:`services.iiot.maintenance`,
:mod:`services.iiot.scoring`, :mod:`services.iiot.retraining`) and return schemas. Every query is
the caller's tenant's: another tenant's alert or asset answers 404 like an unknown one.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.iiot import alerts, maintenance, retraining
from services.iiot.alerts import AlertOut, AlertSettings
from services.iiot.db import ACKNOWLEDGED, OPEN, Alert, Asset, RiskScore
from services.iiot.maintenance import MaintenanceIn, MaintenanceOut
from services.iiot.tasks import retrain_job, submit_scoring
from shared.db import SessionDep
from shared.errors import NotFound, problem_responses
from shared.jobs import submit_job
from shared.paging import MAX_ROW_ID
from shared.security import ApiKey, Principal, require_scope

IiotPrincipal = Annotated[Principal, Depends(require_scope("iiot"))]
JSON_BODY = problem_responses(400, 422, notes={400: "The body is not JSON."})
NOT_FOUND = problem_responses(404, notes={404: "No such alert or asset for this tenant."})
CONFLICT = problem_responses(409, notes={409: "The alert is not in a state this transition starts from."})
NOT_ENOUGH_LABELS = "Also too few failure records to train and judge a candidate (the problem's needed and have)."
AlertId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="the alert's id")]
Cursor = Annotated[int | None, Query(ge=1, le=MAX_ROW_ID, description=(
    "where the previous page ended: take it from that page's `Link: <…>; rel=\"next\"` header"))]
AlertStateFilter = Literal["open", "acknowledged", "resolved", "active"]

router = APIRouter(prefix="/v1", responses=problem_responses(401, 403))


class AlertAction(BaseModel):
    """An acknowledgement or a resolution, with an optional note."""

    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(default=None, max_length=1000)


class RiskOut(BaseModel):
    """An asset's latest cloud score and its active alert."""

    asset_id: str
    window_end: datetime = Field(description="the newest reading the scored window holds")
    p_failure: float = Field(description="P(failure within 72 h)")
    rul_hours: float | None
    tier: str
    model_version: str | None
    drivers: dict[str, Any]
    scored_at: datetime
    active_alert: AlertOut | None


class JobAccepted(BaseModel):
    """A durable job accepted; its progress is at ``GET /iiot/v1/jobs/{job_id}``."""

    job_id: str


def actor(session: Session, principal: Principal) -> str:
    """Who acted, as recorded on an alert: the API key's name (and id)."""
    key = session.get(ApiKey, principal.key_id)
    return f"{key.name} ({principal.key_id})" if key is not None else principal.key_id


def notify_url(session: Session, tenant_id: str) -> str | None:
    """The tenant's alert notification URL, if set."""
    return alerts.load_settings(session, tenant_id).notify_url


@router.get("/alerts", tags=["alerts"], response_model=list[AlertOut])
def list_alerts(request: Request, response: Response, principal: IiotPrincipal, session: SessionDep,
                state: AlertStateFilter | None = None,
                asset: Annotated[str | None, Query(max_length=64, description="an asset's id")] = None,
                limit: Annotated[int, Query(ge=1, le=500)] = 100,
                cursor: Cursor = None) -> list[AlertOut]:
    """The tenant's alerts, newest first, a page at a time (``state=active``: open or acknowledged).

    A full page carries an RFC 8288 ``Link`` header to the next one (keyset paging by id).
    """
    query = select(Alert, Asset.asset_id).join(Asset, Asset.id == Alert.asset_pk).where(
        Alert.tenant_id == principal.tenant_id)
    if state == "active":
        query = query.where(Alert.state.in_((OPEN, ACKNOWLEDGED)))
    elif state is not None:
        query = query.where(Alert.state == state)
    if asset is not None:
        query = query.where(Asset.asset_id == asset)
    if cursor is not None:
        query = query.where(Alert.id < cursor)
    rows = session.execute(query.order_by(Alert.id.desc()).limit(limit)).all()
    page = [alerts.alert_out(session, alert, asset_id) for alert, asset_id in rows]
    if len(page) == limit:
        response.headers["Link"] = f'<{request.url.include_query_params(cursor=page[-1].id)}>; rel="next"'
    return page


@router.get("/alerts/{alert_id:int}", tags=["alerts"], response_model=AlertOut, responses=NOT_FOUND)
def get_alert(alert_id: AlertId, principal: IiotPrincipal, session: SessionDep) -> AlertOut:
    """One of the tenant's alerts."""
    return alerts.alert_out(session, alerts.get_alert(session, principal.tenant_id, alert_id))


@router.post("/alerts/{alert_id}:acknowledge", tags=["alerts"], response_model=AlertOut,
             responses={**JSON_BODY, **NOT_FOUND, **CONFLICT})
def acknowledge_alert(alert_id: AlertId, principal: IiotPrincipal, session: SessionDep,
                      action: AlertAction | None = None) -> AlertOut:
    """Acknowledge an open alert (recorded with the key's name); notifies ``acknowledged`` once."""
    note = action.note if action else None
    alert = alerts.acknowledge(session, principal.tenant_id, alert_id, by=actor(session, principal), note=note,
                               notify_url=notify_url(session, principal.tenant_id))
    session.commit()
    return alerts.alert_out(session, alert)


@router.post("/alerts/{alert_id}:resolve", tags=["alerts"], response_model=AlertOut,
             responses={**JSON_BODY, **NOT_FOUND, **CONFLICT})
def resolve_alert(alert_id: AlertId, principal: IiotPrincipal, session: SessionDep,
                  action: AlertAction | None = None) -> AlertOut:
    """Resolve an open or acknowledged alert (recorded with the key's name); notifies ``resolved`` once."""
    note = action.note if action else None
    alert = alerts.resolve_or_conflict(session, principal.tenant_id, alert_id, by=actor(session, principal),
                                       note=note, notify_url=notify_url(session, principal.tenant_id))
    session.commit()
    return alerts.alert_out(session, alert)


@router.get("/settings", tags=["alerts"], response_model=AlertSettings)
def get_alert_settings(principal: IiotPrincipal, session: SessionDep) -> AlertSettings:
    """The tenant's alert policy and notification URL (defaults when never set)."""
    return alerts.load_settings(session, principal.tenant_id)


@router.put("/settings", tags=["alerts"], response_model=AlertSettings, responses=problem_responses(400, 422, notes={
    400: "The body is not JSON.",
    422: "Also thresholds out of order (close above open, critical below open, rul_close_hours below "
         "rul_open_hours), or a notify_url refused (the "
         "problem's reason: a loopback, link-local or private address unless allow-listed, not https in "
         "production, unresolvable)."}))
def put_alert_settings(new: AlertSettings, principal: IiotPrincipal, session: SessionDep) -> AlertSettings:
    """Replace the tenant's alert policy and notification URL (the next scoring run uses them)."""
    saved = alerts.save_settings(session, principal.tenant_id, new)
    session.commit()
    return saved


@router.post("/assets/{asset_id}/maintenance", tags=["maintenance"], status_code=201,
             response_model=MaintenanceOut, responses={**JSON_BODY, **NOT_FOUND})
def post_maintenance(asset_id: str, record: MaintenanceIn, principal: IiotPrincipal,
                     session: SessionDep) -> MaintenanceOut:
    """Record work on an asset; a failure or repair resolves its active alert. Failures are retraining labels."""
    saved = maintenance.record_maintenance(session, principal.tenant_id, asset_id, record,
                                           by=actor(session, principal),
                                           notify_url=notify_url(session, principal.tenant_id))
    session.commit()
    return saved


@router.get("/assets/{asset_id}/maintenance", tags=["maintenance"], response_model=list[MaintenanceOut],
            responses=NOT_FOUND)
def get_maintenance(asset_id: str, request: Request, response: Response, principal: IiotPrincipal,
                    session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
                    cursor: Cursor = None) -> list[MaintenanceOut]:
    """The asset's maintenance records, newest first (keyset paging as for alerts)."""
    page = maintenance.list_maintenance(session, principal.tenant_id, asset_id, limit=limit, before_id=cursor)
    if len(page) == limit:
        response.headers["Link"] = f'<{request.url.include_query_params(cursor=page[-1].id)}>; rel="next"'
    return page


@router.get("/assets/{asset_id}/risk", tags=["risk"], response_model=RiskOut,
            responses=problem_responses(404, notes={404: "No such asset for this tenant, or it has no score yet."}))
def get_risk(asset_id: str, principal: IiotPrincipal, session: SessionDep) -> RiskOut:
    """The asset's latest cloud risk score (P(failure within 72 h), RUL, drivers) and its active alert."""
    asset_pk = maintenance.asset_pk_of(session, principal.tenant_id, asset_id)
    score = session.scalar(select(RiskScore).where(RiskScore.tenant_id == principal.tenant_id,
                                                   RiskScore.asset_pk == asset_pk, RiskScore.tier == "cloud")
                           .order_by(RiskScore.window_end.desc(), RiskScore.id.desc()).limit(1))
    if score is None:
        raise NotFound(f"asset {asset_id} has no risk score yet")
    active = alerts.active_alert(session, principal.tenant_id, asset_pk)
    return RiskOut(asset_id=asset_id, window_end=score.window_end, p_failure=score.p_failure,
                   rul_hours=score.rul_hours, tier=score.tier, model_version=score.model_version,
                   drivers=score.drivers, scored_at=score.scored_at,
                   active_alert=alerts.alert_out(session, active) if active else None)


@router.post("/scoring:run", tags=["risk"], status_code=202, response_model=JobAccepted)
def run_scoring(principal: IiotPrincipal, session: SessionDep) -> JobAccepted:
    """Score the tenant's assets now, as a durable job (beat does it every scoring interval anyway)."""
    job = submit_scoring(session, principal.tenant_id, f"api-{uuid.uuid4().hex}")
    session.commit()
    return JobAccepted(job_id=job.id)


@router.get("/models", tags=["models"])
def list_models(principal: IiotPrincipal, session: SessionDep) -> list[dict[str, object]]:
    """The caller's own risk model versions, newest first, then the shipped cloud model.

    Own versions carry their evaluation (``metrics.candidate`` and ``metrics.live_at_evaluation``);
    status ``live`` (it scores this tenant), ``rejected`` or ``retired``. The shipped model
    (``"default": true``) is ``live`` for a tenant without a live version of its own, else ``standby``.
    """
    return retraining.model_versions(session, principal.tenant_id)


@router.post("/models/retrain", tags=["models"], status_code=202, response_model=JobAccepted,
             responses=problem_responses(400, 422, notes={400: "The body is not JSON.", 422: NOT_ENOUGH_LABELS}))
def post_retrain(request: retraining.RetrainIn, principal: IiotPrincipal, session: SessionDep) -> JobAccepted:
    """Train a candidate on this tenant's stored readings and failure records, judge it against the model
    scoring this tenant now on the tenant's later held-out period, and promote it for this tenant alone
    when it is not worse."""
    retraining.check_enough_labels(retraining.label_counts(session, principal.tenant_id, request), request)
    job = submit_job(session, retrain_job, key=f"iiot-retrain:{uuid.uuid4().hex}",
                     payload=request.model_dump(), tenant_id=principal.tenant_id, max_attempts=2)
    session.commit()
    return JobAccepted(job_id=job.id)
