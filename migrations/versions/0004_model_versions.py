"""model versions of every vertical in one registry: fraud_model_versions -> model_versions

Revision ID: 0004_model_versions
Revises: 0003_tenant_scope
Create Date: 2026-12-08 10:00:00

``model_versions`` (``model_runtime.versions``) keys a version by model family and label, scoped
to a tenant or shared, with at most one live version per (model, scope). Fraud's rows move over
as model ``fraud``, status and dates kept; their artifact digest is unknown (NULL) and their card
empty. The downgrade moves fraud's rows back and drops the versions of any other model.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004_model_versions'
down_revision: str | None = '0003_tenant_scope'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
LIVE = sa.text("status = 'live'")
COMMON_COLUMNS = "version, tenant_id, status, artifact_dir, metrics, created_at, promoted_at"


def upgrade() -> None:
    op.create_table('model_versions',
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), server_default='', nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('artifact_dir', sa.String(length=500), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('metrics', JSON, nullable=False),
    sa.Column('card', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('model', 'version', name=op.f('pk_model_versions'))
    )
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index('ix_model_versions_scope_created', ['model', 'tenant_id', 'created_at'], unique=False)
        batch_op.create_index('ix_model_versions_one_live', ['model', 'tenant_id'], unique=True,
                              sqlite_where=LIVE, postgresql_where=LIVE)

    op.execute(f"INSERT INTO model_versions (model, {COMMON_COLUMNS}) "
               f"SELECT 'fraud', {COMMON_COLUMNS} FROM fraud_model_versions")
    with op.batch_alter_table('fraud_model_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_fraud_model_versions_one_live')
        batch_op.drop_index('ix_fraud_model_versions_tenant_created')
    op.drop_table('fraud_model_versions')


def downgrade() -> None:
    op.create_table('fraud_model_versions',
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('artifact_dir', sa.String(length=500), nullable=False),
    sa.Column('metrics', JSON, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('tenant_id', sa.String(length=64), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_fraud_model_versions'))
    )
    with op.batch_alter_table('fraud_model_versions', schema=None) as batch_op:
        batch_op.create_index('ix_fraud_model_versions_tenant_created', ['tenant_id', 'created_at'], unique=False)
        batch_op.create_index('ix_fraud_model_versions_one_live', ['tenant_id'], unique=True,
                              sqlite_where=LIVE, postgresql_where=LIVE)

    op.execute(f"INSERT INTO fraud_model_versions ({COMMON_COLUMNS}) "
               f"SELECT {COMMON_COLUMNS} FROM model_versions WHERE model = 'fraud'")
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_model_versions_one_live')
        batch_op.drop_index('ix_model_versions_scope_created')
    op.drop_table('model_versions')
