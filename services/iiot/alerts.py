"""Failure-risk alerts: a pure policy with hysteresis, and the persisted lifecycle on ``iiot_alerts``.

The policy (:class:`AlertPolicy`) judges the newest scores of one asset:

- a score is *high* when ``p_failure >= open_threshold`` (or, when ``rul_open_hours`` is set, its
  remaining useful life is at most that); *low* when ``p_failure < close_threshold`` and its RUL
  is above ``rul_close_hours`` (at least ``rul_open_hours``: hysteresis on RUL as on P);
- an alert opens after ``consecutive`` high scores in a row and closes after ``consecutive`` low
  ones; scores in between keep the current state (hysteresis: one noisy score neither opens nor
  closes an alert);
- it is ``critical`` when a score reaches ``critical_threshold`` (or ``rul_critical_hours``), else
  ``warning``; a warning alert that meets that is escalated once (never de-escalated).

:func:`replay` runs the policy over a score series offline (the benchmark measures alert lead time
and false alerts per asset-month with it). The persisted lifecycle applies the same decisions to
stored scores: an asset has at most one active alert of a kind, held by the unique index on
``(tenant_id, active_key)`` (an ``INSERT ... ON CONFLICT DO NOTHING`` loses a race quietly), each
transition is a compare-and-set ``UPDATE`` so two callers cannot both make it, and each
transition that happened queues one signed webhook to the tenant's ``notify_url``
(:func:`shared.webhooks.enqueue_webhook`, keyed by the alert and the transition).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from services.iiot.db import ACKNOWLEDGED, OPEN, RESOLVED, Alert, Asset, RiskScore, TenantSettings
from shared.db import utcnow
from shared.errors import Conflict, NotFound, UnprocessableContent
from shared.outbound import OutboundPolicy, OutboundRefused, UnresolvableHost
from shared.webhooks import enqueue_webhook

FAILURE_RISK = "failure_risk"
WARNING, CRITICAL = "warning", "critical"
POLICY_ACTOR = "policy"
WEBHOOK_SOURCE = "iiot"
Transition = Literal["opened", "escalated", "acknowledged", "resolved"]
EVENT_TYPES: dict[str, str] = {t: f"iiot.alert.{t}" for t in ("opened", "escalated", "acknowledged", "resolved")}


# --------------------------------------------------------------------------- the pure policy

@dataclass(frozen=True, slots=True)
class ScorePoint:
    """One score of one asset: when (the window's end), P(failure within the horizon), RUL in hours."""

    at: datetime
    p_failure: float
    rul_hours: float | None = None


class AlertPolicy(BaseModel):
    """A tenant's alert thresholds and hysteresis (see the module's docstring); strict types, finite
    numbers (FastAPI reads a body with Python's json, which takes NaN and Infinity)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # defaults: chosen for the shipped cloud model (models/iiot/cloud/v2) by replaying its hourly scores
    # over four validation fleets (simulated, seeds 2000-2003, 157 failures): most failures alerted >= 72 h
    # ahead with <= 0.5 false alerts per asset-month. RUL <= 216 h opens most alerts early enough; closing
    # only above 288 h keeps an asset whose RUL hovers near 216 h from opening an alert every shift. The
    # v2 manifest's alert_policy (seed 2000 only: open 0.1 / close 0.06 / 6) is what training chose.
    # At another scoring interval `consecutive` spans other time.
    open_threshold: StrictFloat = Field(default=0.2, gt=0, le=1,
                                        description="a score is high at or above this P(failure within 72 h)")
    close_threshold: StrictFloat = Field(default=0.12, ge=0, le=1,
                                         description="a score is low below this; at most open_threshold")
    consecutive: StrictInt = Field(default=4, ge=1, le=100,
                                   description="high scores in a row that open an alert, low ones that close it")
    critical_threshold: StrictFloat = Field(default=0.8, gt=0, le=1,
                                            description="an alert is critical from this P(failure); at least "
                                                        "open_threshold")
    rul_open_hours: StrictFloat | None = Field(default=216.0, ge=0,
                                               description="a score is also high when its remaining useful life "
                                                           "is at most this many hours (null: RUL opens nothing)")
    rul_close_hours: StrictFloat | None = Field(default=288.0, ge=0,
                                                description="with rul_open_hours set, a score is low only when its "
                                                            "remaining useful life is above this many hours; at "
                                                            "least rul_open_hours (null: rul_open_hours; ignored "
                                                            "when rul_open_hours is null)")
    rul_critical_hours: StrictFloat | None = Field(default=None, ge=0,
                                                   description="an alert is also critical from this RUL down")

    @model_validator(mode="after")
    def _ordered(self) -> AlertPolicy:
        if self.close_threshold > self.open_threshold:
            raise ValueError("close_threshold must not exceed open_threshold (hysteresis)")
        if self.critical_threshold < self.open_threshold:
            raise ValueError("critical_threshold must be at least open_threshold")
        if None not in (self.rul_open_hours, self.rul_close_hours) and \
                cast(float, self.rul_close_hours) < cast(float, self.rul_open_hours):
            raise ValueError("rul_close_hours must be at least rul_open_hours (hysteresis)")
        return self

    def is_high(self, point: ScorePoint) -> bool:
        """The score counts towards opening an alert."""
        return point.p_failure >= self.open_threshold or self._rul_at_most(point, self.rul_open_hours)

    def is_low(self, point: ScorePoint) -> bool:
        """The score counts towards closing an alert."""
        return point.p_failure < self.close_threshold and not self._rul_at_most(point, self.rul_close_limit)

    @property
    def rul_close_limit(self) -> float | None:
        """The RUL a score must exceed to count towards closing (None: RUL plays no part)."""
        if self.rul_open_hours is None:
            return None
        return self.rul_open_hours if self.rul_close_hours is None else self.rul_close_hours

    def severity_of(self, point: ScorePoint) -> str:
        """``critical`` or ``warning`` for a score that opens or keeps an alert."""
        critical = point.p_failure >= self.critical_threshold or self._rul_at_most(point, self.rul_critical_hours)
        return CRITICAL if critical else WARNING

    def decide(self, recent: Sequence[ScorePoint], active_severity: str | None) -> str | None:
        """What the newest scores (oldest first, none from before the last resolution) call for.

        ``active_severity`` is the active alert's, or None without one. Returns ``"open"``,
        ``"escalate"``, ``"close"`` or None (nothing changes).
        """
        if not recent:
            return None
        run = list(recent)[-self.consecutive:]
        full = len(run) == self.consecutive
        if active_severity is None:
            return "open" if full and all(self.is_high(p) for p in run) else None
        if full and all(self.is_low(p) for p in run):
            return "close"
        if active_severity == WARNING and self.severity_of(recent[-1]) == CRITICAL:
            return "escalate"
        return None

    @staticmethod
    def _rul_at_most(point: ScorePoint, hours: float | None) -> bool:
        return hours is not None and point.rul_hours is not None and point.rul_hours <= hours


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One transition found by :func:`replay`."""

    at: datetime
    transition: Transition
    p_failure: float
    severity: str


def replay(scores: Iterable[ScorePoint], policy: AlertPolicy | None = None,
           resets: Iterable[datetime] = ()) -> list[AlertEvent]:
    """The alert transitions ``policy`` makes over one asset's scores (in time order), offline.

    ``resets``: times of maintenance (a repair after a failure) that resolve an active alert, as a
    failure or repair record does in service; the scores after one start a fresh run.
    """
    policy = policy or AlertPolicy()
    pending_resets = sorted(resets)
    recent: deque[ScorePoint] = deque(maxlen=policy.consecutive)
    severity: str | None = None
    events: list[AlertEvent] = []
    for point in scores:
        while pending_resets and pending_resets[0] <= point.at:
            reset_at = pending_resets.pop(0)
            if severity is not None:
                events.append(AlertEvent(reset_at, "resolved", recent[-1].p_failure if recent else 0.0, severity))
            severity = None
            recent.clear()
        recent.append(point)
        decision = policy.decide(recent, severity)
        if decision == "open":
            severity = policy.severity_of(point)
            events.append(AlertEvent(point.at, "opened", point.p_failure, severity))
        elif decision == "escalate":
            severity = CRITICAL
            events.append(AlertEvent(point.at, "escalated", point.p_failure, severity))
        elif decision == "close":
            events.append(AlertEvent(point.at, "resolved", point.p_failure, severity or WARNING))
            severity = None
            recent.clear()
    return events


# --------------------------------------------------------------------------- tenant settings

class AlertSettings(BaseModel):
    """A tenant's alert policy and where its alert notifications go."""

    model_config = ConfigDict(extra="forbid")

    policy: AlertPolicy = Field(default_factory=AlertPolicy)
    notify_url: str | None = Field(
        default=None, max_length=2000, pattern=r"^https?://",
        description="where alert transitions (opened, escalated, acknowledged, resolved) are POSTed, signed "
                    "with the tenant's webhook secret; every address its host resolves to must be public "
                    "(not loopback, private, link-local...) unless the operator allow-lists it; https in production")


def load_settings(session: Session, tenant_id: str) -> AlertSettings:
    """The tenant's alert settings (defaults when never set)."""
    row = session.get(TenantSettings, tenant_id)
    if row is None:
        return AlertSettings()
    stored = dict(row.policy or {})
    if stored:  # saved before rul_close_hours existed: RUL closed at rul_open_hours, as it still does for it
        stored.setdefault("rul_close_hours", None)
    # saved before the policy refused non-finite numbers: the API showed the tenant an Infinity as null
    stored = {name: None if isinstance(value, float) and not math.isfinite(value) else value
              for name, value in stored.items()}
    return AlertSettings(policy=AlertPolicy.model_validate(stored), notify_url=row.notify_url)


def save_settings(session: Session, tenant_id: str, new: AlertSettings) -> AlertSettings:
    """Store the tenant's alert settings; a ``notify_url`` must pass the outbound policy (422 naming why)."""
    if new.notify_url is not None:
        check_notify_url(new.notify_url)
    row = session.get(TenantSettings, tenant_id) or TenantSettings(tenant_id=tenant_id)
    row.policy, row.notify_url, row.updated_at = new.policy.model_dump(), new.notify_url, utcnow()
    session.add(row)
    session.flush()
    return new


def check_notify_url(url: str) -> None:
    """422 naming the reason unless ``url`` and every address its host resolves to may be notified."""
    try:
        OutboundPolicy.from_settings().vet(url)
    except (OutboundRefused, UnresolvableHost) as exc:
        reason = exc.reason if isinstance(exc, OutboundRefused) else "unresolvable"
        raise UnprocessableContent(f"notify_url refused: {exc}", reason=reason) from None


# --------------------------------------------------------------------------- the persisted lifecycle

class AlertOut(BaseModel):
    """An alert as the API answers it and as its webhooks carry it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    asset_id: str
    kind: str
    state: Literal["open", "acknowledged", "resolved"]
    severity: Literal["warning", "critical"]
    opened_at: datetime
    opened_p: float
    peak_p: float
    last_p: float
    rul_hours: float | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    resolved_at: datetime | None
    resolved_by: str | None = Field(description="the API key's name, or `policy` when the risk fell")
    note: str | None


class AlertNotFound(NotFound):
    """No alert with this id for this tenant (404, also for another tenant's alert)."""


class InvalidTransition(Conflict):
    """The alert is not in a state this transition starts from (409)."""


def active_key(asset_pk: int, kind: str = FAILURE_RISK) -> str:
    """The de-duplication key an active alert of ``kind`` on the asset holds."""
    return f"{asset_pk}:{kind}"


def alert_out(session: Session, alert: Alert, asset_id: str | None = None) -> AlertOut:
    """The alert's public form (its asset's own id instead of the surrogate key; read unless given)."""
    if asset_id is None:
        asset_id = session.scalar(select(Asset.asset_id).where(Asset.id == alert.asset_pk))
    return AlertOut.model_validate({**{c: getattr(alert, c) for c in AlertOut.model_fields if c != "asset_id"},
                                    "asset_id": asset_id})


def get_alert(session: Session, tenant_id: str, alert_id: int) -> Alert:
    """The tenant's alert ``alert_id``, or :class:`AlertNotFound`."""
    alert = session.get(Alert, alert_id, populate_existing=True)
    if alert is None or alert.tenant_id != tenant_id:
        raise AlertNotFound(f"alert {alert_id} does not exist")
    return alert


def active_alert(session: Session, tenant_id: str, asset_pk: int, kind: str = FAILURE_RISK) -> Alert | None:
    """The asset's active (open or acknowledged) alert of ``kind``, if any."""
    return session.scalar(select(Alert).where(Alert.tenant_id == tenant_id,
                                              Alert.active_key == active_key(asset_pk, kind))
                          .execution_options(populate_existing=True))


@dataclass
class AssetAlertState:
    """What the policy judges for one asset: its newest scores (oldest first) and its active alert."""

    recent: list[ScorePoint]
    active: Alert | None


def alert_states(session: Session, tenant_id: str, asset_pks: Sequence[int], policy: AlertPolicy,
                 kind: str = FAILURE_RISK) -> dict[int, AssetAlertState]:
    """Each asset's newest ``policy.consecutive`` cloud scores scored after its last resolution, and its
    active alert: three queries for any number of assets (a scoring run judges a whole tenant)."""
    pks = list(asset_pks)
    last_resolved = dict(session.execute(
        select(Alert.asset_pk, func.max(Alert.resolved_at)).where(
            Alert.tenant_id == tenant_id, Alert.asset_pk.in_(pks), Alert.kind == kind,
            Alert.resolved_at.is_not(None)).group_by(Alert.asset_pk)).all())
    rank = func.row_number().over(partition_by=RiskScore.asset_pk,
                                  order_by=(RiskScore.window_end.desc(), RiskScore.id.desc())).label("rank")
    ranked = select(RiskScore.asset_pk, RiskScore.window_end, RiskScore.p_failure, RiskScore.rul_hours,
                    RiskScore.scored_at, rank).where(
        RiskScore.tenant_id == tenant_id, RiskScore.asset_pk.in_(pks), RiskScore.tier == "cloud").subquery()
    states = {pk: AssetAlertState([], None) for pk in pks}
    for row in session.execute(select(ranked).where(ranked.c.rank <= policy.consecutive)
                               .order_by(ranked.c.asset_pk, ranked.c.rank.desc())):
        resolved_at = last_resolved.get(row.asset_pk)
        if resolved_at is None or row.scored_at > resolved_at:  # a resolution starts a fresh run
            states[row.asset_pk].recent.append(ScorePoint(row.window_end, row.p_failure, row.rul_hours))
    for alert in session.scalars(select(Alert).where(Alert.tenant_id == tenant_id,
                                                     Alert.active_key.in_([active_key(pk, kind) for pk in pks]))
                                 .execution_options(populate_existing=True)):
        states[alert.asset_pk].active = alert
    return states


def apply_policy(session: Session, tenant_id: str, asset_pk: int, policy: AlertPolicy, notify_url: str | None,
                 state: AssetAlertState | None = None) -> list[Transition]:
    """Judge the asset's newest scores and make the transitions they call for (one asset, one kind).

    ``state``: from :func:`alert_states` (read here when not given). The active alert's last and
    peak P(failure) and RUL follow the newest score. Returns the transitions made (each notified once).
    """
    state = state or alert_states(session, tenant_id, [asset_pk], policy)[asset_pk]
    recent, alert = state.recent, state.active
    if not recent:
        return []
    newest = recent[-1]
    decision = policy.decide(recent, alert.severity if alert else None)
    if alert is None:
        if decision != "open":
            return []
        opened = open_alert(session, tenant_id, asset_pk, newest, policy.severity_of(newest))
        if opened is None:  # another scorer opened it meanwhile: it follows this score next time
            return []
        notify(session, opened, "opened", notify_url)
        return ["opened"]
    alert.last_p, alert.rul_hours = newest.p_failure, newest.rul_hours
    alert.peak_p = max(alert.peak_p, newest.p_failure)
    if decision == "close":
        closed = resolve(session, tenant_id, alert.id, by=POLICY_ACTOR,
                         note=_close_note(policy),
                         notify_url=notify_url)
        return ["resolved"] if closed else []
    if decision == "escalate" and _escalate(session, alert):
        notify(session, alert, "escalated", notify_url)
        return ["escalated"]
    return []


def _close_note(policy: AlertPolicy) -> str:
    rul = policy.rul_close_limit
    above = "" if rul is None else f" with RUL above {rul:g} h"
    return f"risk below {policy.close_threshold}{above} on {policy.consecutive} scores in a row"


def open_alert(session: Session, tenant_id: str, asset_pk: int, score: ScorePoint, severity: str,
               kind: str = FAILURE_RISK) -> Alert | None:
    """Insert the asset's active alert unless one exists (the unique index decides a race); None if one did."""
    values = {"tenant_id": tenant_id, "asset_pk": asset_pk, "kind": kind, "state": OPEN,
              "active_key": active_key(asset_pk, kind), "severity": severity, "opened_at": utcnow(),
              "opened_p": score.p_failure, "peak_p": score.p_failure, "last_p": score.p_failure,
              "rul_hours": score.rul_hours}
    dialect = {"postgresql": postgresql, "sqlite": sqlite_dialect}[session.get_bind().dialect.name]
    statement = dialect.insert(Alert).values(**values).on_conflict_do_nothing(
        index_elements=["tenant_id", "active_key"]).returning(Alert.id)
    inserted = session.scalar(statement)
    return None if inserted is None else session.get(Alert, inserted)


def _escalate(session: Session, alert: Alert) -> bool:
    done = execute_update_rowcount(session, update(Alert).where(
        Alert.id == alert.id, Alert.severity == WARNING, Alert.active_key.is_not(None)).values(severity=CRITICAL))
    session.refresh(alert)
    return done == 1


def acknowledge(session: Session, tenant_id: str, alert_id: int, *, by: str, note: str | None,
                notify_url: str | None) -> Alert:
    """Mark an open alert acknowledged by ``by``; 409 unless it is open."""
    alert = get_alert(session, tenant_id, alert_id)
    values: dict[str, Any] = {"state": ACKNOWLEDGED, "acknowledged_at": utcnow(), "acknowledged_by": by[:100]}
    if note is not None:
        values["note"] = _noted(alert, note)
    if not _transition(session, alert, Alert.state == OPEN, values):
        raise InvalidTransition(f"alert {alert_id} is {alert.state}: only an open alert can be acknowledged",
                                state=alert.state)
    notify(session, alert, "acknowledged", notify_url)
    return alert


def resolve(session: Session, tenant_id: str, alert_id: int, *, by: str, note: str | None,
            notify_url: str | None) -> Alert | None:
    """Resolve an active alert (open or acknowledged); None when it is already resolved."""
    alert = get_alert(session, tenant_id, alert_id)
    values: dict[str, Any] = {"state": RESOLVED, "active_key": None, "resolved_at": utcnow(), "resolved_by": by[:100]}
    if note is not None:
        values["note"] = _noted(alert, note)
    if not _transition(session, alert, Alert.active_key.is_not(None), values):
        return None
    notify(session, alert, "resolved", notify_url)
    return alert


def resolve_or_conflict(session: Session, tenant_id: str, alert_id: int, *, by: str, note: str | None,
                        notify_url: str | None) -> Alert:
    """:func:`resolve` over the API: 409 for an alert already resolved."""
    alert = resolve(session, tenant_id, alert_id, by=by, note=note, notify_url=notify_url)
    if alert is None:
        raise InvalidTransition(f"alert {alert_id} is resolved already", state=RESOLVED)
    return alert


def _noted(alert: Alert, note: str) -> str:
    """The alert's note with ``note`` added (an acknowledgement's note survives the resolution's)."""
    return (f"{alert.note}; {note}" if alert.note else note)[-1000:]


def _transition(session: Session, alert: Alert, precondition: ColumnElement[bool], values: dict[str, Any]) -> bool:
    """Compare-and-set: apply ``values`` if the alert still meets ``precondition``; refreshes it either way."""
    done = execute_update_rowcount(session, update(Alert).where(Alert.id == alert.id, precondition).values(**values))
    session.refresh(alert)
    return done == 1


def execute_update_rowcount(session: Session, statement: Any) -> int:
    """Run an UPDATE; the number of rows it changed (compare-and-set)."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def notify(session: Session, alert: Alert, transition: Transition, notify_url: str | None) -> None:
    """Queue the signed webhook of ``transition`` (in this transaction; once per alert and transition)."""
    if not notify_url:
        return
    data = {"transition": transition, "alert": alert_out(session, alert).model_dump(mode="json")}
    enqueue_webhook(session, tenant_id=alert.tenant_id, url=notify_url, source=WEBHOOK_SOURCE,
                    event_type=EVENT_TYPES[transition], data=data, key=f"alert:{alert.id}:{transition}",
                    subject_id=f"alert:{alert.id}")
