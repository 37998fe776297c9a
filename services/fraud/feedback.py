"""The analysts' side: stored decisions, labels and chargebacks, the review queue, tenant settings."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.fraud.db import Case, Transaction
from services.fraud.schemas import CaseOut, Decision, DecisionOut, LabelIn, Reason, TenantSettingsIn
from services.fraud.scoring import tenant_settings
from services.fraud.state import stored_decision
from services.fraud.window_store import window_store
from shared.db import utcnow
from shared.errors import NotFound, NotReady, UnprocessableContent
from shared.outbound import OutboundPolicy, OutboundRefused, UnresolvableHost
from shared.security import ensure_tenant

RECORDING_WAIT_S = 10.0


def epoch() -> datetime:
    """The Unix epoch (a creation time for things that were never created)."""
    return datetime.fromtimestamp(0, UTC)


def _transaction(session: Session, tenant_id: str, transaction_id: str) -> Transaction:
    row = session.get(Transaction, (tenant_id, transaction_id))
    if row is None:
        raise NotFound(f"transaction '{transaction_id}' was never scored for this tenant")
    return row


def decision_of(session: Session, tenant_id: str, transaction_id: str) -> DecisionOut:
    """The stored decision of a transaction (from the window-state store while its row is still
    being written behind)."""
    row = session.get(Transaction, (tenant_id, transaction_id))
    if row is not None:
        return stored_decision(row)
    answer = window_store().unrecorded_answer(tenant_id, transaction_id)
    if answer is None:
        raise NotFound(f"transaction '{transaction_id}' was never scored for this tenant")
    return answer


def _wait_until_recorded(session: Session, tenant_id: str, transaction_id: str) -> None:
    """With write-behind, a decision answered a moment ago may not be a row yet: wait for the recorder."""
    if window_store().unrecorded_answer(tenant_id, transaction_id) is None:
        return
    deadline = time.monotonic() + RECORDING_WAIT_S
    while time.monotonic() < deadline:
        if session.get(Transaction, (tenant_id, transaction_id), populate_existing=True) is not None:
            return
        session.rollback()  # end the read transaction so the next look sees new commits
        time.sleep(0.02)
    raise NotReady("the decision is still being recorded; retry shortly", headers={"Retry-After": "1"})


def record_label(session: Session, tenant_id: str, transaction_id: str, label: LabelIn) -> DecisionOut:
    """Label a transaction (analyst verdict or chargeback) and close its open case.

    A chargeback overrides an analyst's earlier 'legitimate'; the latest label wins otherwise.
    The label also enters the window-state store's terminal risk windows (before the commit: a
    retried label is harmless, a lost one is not).
    """
    _wait_until_recorded(session, tenant_id, transaction_id)
    row = _transaction(session, tenant_id, transaction_id)
    window_store().record_label(tenant_id, row.terminal_id, transaction_id, row.tx_time_s, label.is_fraud)
    row.is_fraud = label.is_fraud
    row.label_source = label.source
    row.labelled_at = utcnow()
    for case in session.scalars(select(Case).where(Case.tenant_id == tenant_id,
                                                   Case.transaction_id == transaction_id)):
        case.status = "confirmed_fraud" if label.is_fraud else "legitimate"
        case.resolved_at = utcnow()
        case.analyst = label.analyst
        case.note = label.note
    return stored_decision(row)


def list_cases(session: Session, tenant_id: str, status: str, limit: int,
               after: CasePosition | None = None) -> list[CaseOut]:
    """Cases in ``status``, highest score first (ties by case id), starting after ``after``."""
    query = (select(Case, Transaction)
             .join(Transaction, (Transaction.tenant_id == Case.tenant_id)
                   & (Transaction.transaction_id == Case.transaction_id))
             .where(Case.tenant_id == tenant_id, Case.status == status))
    if after is not None:
        query = query.where((Transaction.score < after.score)
                            | ((Transaction.score == after.score) & (Case.id > after.case_id)))
    rows = session.execute(query.order_by(Transaction.score.desc(), Case.id).limit(limit)).all()
    return [
        CaseOut(id=case.id, transaction_id=case.transaction_id, status=case.status,
                decision=Decision(tx.decision), score=tx.score, amount=tx.amount, customer_id=tx.customer_id,
                created_at=case.created_at, reasons=[Reason.model_validate(r) for r in tx.reasons])
        for case, tx in rows
    ]


@dataclass(frozen=True, slots=True)
class CasePosition:
    """Where a page of the review queue ended: the opaque ``cursor`` of the next page."""

    score: float
    case_id: int

    def encode(self) -> str:
        """The cursor a client passes back to get the next page."""
        return base64.urlsafe_b64encode(orjson.dumps([self.score, self.case_id])).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> CasePosition:
        """The position a cursor names; a cursor this API did not issue is a 422."""
        try:
            score, case_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if isinstance(score, bool) or not isinstance(score, int | float) or type(case_id) is not int:
                raise ValueError
            return cls(float(score), case_id)
        except (ValueError, TypeError, orjson.JSONDecodeError):
            raise UnprocessableContent("cursor: not a cursor this API issued (take it from the Link header)",
                                       errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor",
                                                "type": "value_error"}]) from None


def get_tenant_settings(session: Session, tenant_id: str) -> TenantSettingsIn:
    """The tenant's fraud settings."""
    return tenant_settings(session, tenant_id)


def set_tenant_settings(session: Session, tenant_id: str, new: TenantSettingsIn) -> TenantSettingsIn:
    """Store the tenant's fraud settings (thresholds must be ordered; the callback URL must reach
    public addresses only, :mod:`shared.outbound`)."""
    if new.review_threshold > new.decline_threshold:
        raise UnprocessableContent("review_threshold must not exceed decline_threshold")
    if new.callback_url is not None:
        check_callback_url(new.callback_url)
    tenant = ensure_tenant(session, tenant_id)
    tenant.settings = {**(tenant.settings or {}), "fraud": new.model_dump()}
    return new


def check_callback_url(url: str) -> None:
    """422 naming the reason unless ``url`` and every address its host resolves to may be called back."""
    try:
        OutboundPolicy.from_settings().vet(url)
    except OutboundRefused as exc:
        raise UnprocessableContent(f"callback_url refused: {exc}", reason=exc.reason) from None
    except UnresolvableHost as exc:
        raise UnprocessableContent(f"callback_url refused: {exc}", reason="unresolvable") from None
