"""tenant scope for jobs and fraud models; request digests for idempotency conflicts

Revision ID: 0003_tenant_scope
Revises: 0002_fraud
Create Date: 2026-12-01 12:20:00

- ``platform_jobs.tenant_id``: a job is visible to the tenant that submitted it only.
- ``fraud_model_versions.tenant_id``: models are per tenant (the shipped model is the shared
  default); at most one live version per tenant. A version promoted before this revision was
  trained on one tenant's traffic yet served every tenant: it is retired, and each tenant goes
  back to the shipped default until it retrains.
- ``fraud_transactions.request_digest``: sha256 of the scored request, so that a resend of a used
  id with a different body is a 409 instead of a silent replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003_tenant_scope'
down_revision: str | None = '0002_fraud'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('platform_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_platform_jobs_tenant_id'), ['tenant_id'], unique=False)

    op.execute("UPDATE fraud_model_versions SET status = 'retired' WHERE status = 'live'")
    with op.batch_alter_table('fraud_model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.String(length=64), nullable=False, server_default=''))
        batch_op.create_index('ix_fraud_model_versions_tenant_created', ['tenant_id', 'created_at'], unique=False)
        batch_op.create_index('ix_fraud_model_versions_one_live', ['tenant_id'], unique=True,
                              sqlite_where=sa.text("status = 'live'"),
                              postgresql_where=sa.text("status = 'live'"))

    with op.batch_alter_table('fraud_transactions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_digest', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fraud_transactions', schema=None) as batch_op:
        batch_op.drop_column('request_digest')
    with op.batch_alter_table('fraud_model_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_fraud_model_versions_one_live')
        batch_op.drop_index('ix_fraud_model_versions_tenant_created')
        batch_op.drop_column('tenant_id')
    with op.batch_alter_table('platform_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_platform_jobs_tenant_id'))
        batch_op.drop_column('tenant_id')
