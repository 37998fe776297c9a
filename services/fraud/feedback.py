"""The analysts' side: stored decisions, labels and chargebacks, the review queue, tenant settings."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.fraud.db import Case, Transaction
from services.fraud.schemas import CaseOut, Decision, DecisionOut, LabelIn, Reason, TenantSettingsIn
from services.fraud.scoring import stored_decision, tenant_settings
from shared.db import utcnow
from shared.errors import NotFound, UnprocessableContent
from shared.security import ensure_tenant


def epoch() -> datetime:
    """The Unix epoch (a creation time for things that were never created)."""
    return datetime.fromtimestamp(0, UTC)


def _transaction(session: Session, tenant_id: str, transaction_id: str) -> Transaction:
    row = session.get(Transaction, (tenant_id, transaction_id))
    if row is None:
        raise NotFound(f"transaction '{transaction_id}' was never scored for this tenant")
    return row


def decision_of(session: Session, tenant_id: str, transaction_id: str) -> DecisionOut:
    """The stored decision of a transaction."""
    return stored_decision(_transaction(session, tenant_id, transaction_id))


def record_label(session: Session, tenant_id: str, transaction_id: str, label: LabelIn) -> DecisionOut:
    """Label a transaction (analyst verdict or chargeback) and close its open case.

    A chargeback overrides an analyst's earlier 'legitimate'; the latest label wins otherwise.
    """
    row = _transaction(session, tenant_id, transaction_id)
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


def list_cases(session: Session, tenant_id: str, status: str, limit: int) -> list[CaseOut]:
    """Cases in ``status``, highest score first."""
    rows = session.execute(
        select(Case, Transaction)
        .join(Transaction, (Transaction.tenant_id == Case.tenant_id)
              & (Transaction.transaction_id == Case.transaction_id))
        .where(Case.tenant_id == tenant_id, Case.status == status)
        .order_by(Transaction.score.desc()).limit(limit)
    ).all()
    return [
        CaseOut(id=case.id, transaction_id=case.transaction_id, status=case.status,
                decision=Decision(tx.decision), score=tx.score, amount=tx.amount, customer_id=tx.customer_id,
                created_at=case.created_at, reasons=[Reason.model_validate(r) for r in tx.reasons])
        for case, tx in rows
    ]


def get_tenant_settings(session: Session, tenant_id: str) -> TenantSettingsIn:
    """The tenant's fraud settings."""
    return tenant_settings(session, tenant_id)


def set_tenant_settings(session: Session, tenant_id: str, new: TenantSettingsIn) -> TenantSettingsIn:
    """Store the tenant's fraud settings (thresholds must be ordered)."""
    if new.review_threshold > new.decline_threshold:
        raise UnprocessableContent("review_threshold must not exceed decline_threshold")
    tenant = ensure_tenant(session, tenant_id)
    tenant.settings = {**(tenant.settings or {}), "fraud": new.model_dump()}
    return new
