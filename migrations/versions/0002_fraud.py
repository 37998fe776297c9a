"""fraud tables

Revision ID: 0002_fraud
Revises: 0001_platform
Create Date: 2026-11-23 20:36:08.454213
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002_fraud'
down_revision: str | None = '0001_platform'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('fraud_cases',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('transaction_id', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('analyst', sa.String(length=100), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fraud_cases'))
    )
    with op.batch_alter_table('fraud_cases', schema=None) as batch_op:
        batch_op.create_index('ix_fraud_cases_tenant_status', ['tenant_id', 'status'], unique=False)

    op.create_table('fraud_model_versions',
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('artifact_dir', sa.String(length=500), nullable=False),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_fraud_model_versions'))
    )
    op.create_table('fraud_rule_sets',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('rules', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('change', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fraud_rule_sets'))
    )
    with op.batch_alter_table('fraud_rule_sets', schema=None) as batch_op:
        batch_op.create_index('ix_fraud_rule_sets_tenant_version', ['tenant_id', 'version'], unique=True)

    op.create_table('fraud_transactions',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('transaction_id', sa.String(length=128), nullable=False),
    sa.Column('customer_id', sa.String(length=128), nullable=False),
    sa.Column('terminal_id', sa.String(length=128), nullable=False),
    sa.Column('tx_time_s', sa.Float(), nullable=False),
    sa.Column('amount', sa.Float(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('channel', sa.String(length=20), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('decision', sa.String(length=10), nullable=False),
    sa.Column('reasons', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('features', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('rules_version', sa.Integer(), nullable=False),
    sa.Column('is_fraud', sa.Boolean(), nullable=True),
    sa.Column('label_source', sa.String(length=20), nullable=True),
    sa.Column('labelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'transaction_id', name=op.f('pk_fraud_transactions'))
    )
    with op.batch_alter_table('fraud_transactions', schema=None) as batch_op:
        batch_op.create_index('ix_fraud_tx_customer_time', ['tenant_id', 'customer_id', 'tx_time_s'], unique=False)
        batch_op.create_index('ix_fraud_tx_terminal_time', ['tenant_id', 'terminal_id', 'tx_time_s'], unique=False)
        batch_op.create_index('ix_fraud_tx_time', ['tenant_id', 'tx_time_s'], unique=False)

    op.create_table('fraud_callback_deliveries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('transaction_id', sa.String(length=128), nullable=False),
    sa.Column('url', sa.String(length=500), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempted_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['platform_jobs.id'], name=op.f('fk_fraud_callback_deliveries_job_id_platform_jobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fraud_callback_deliveries'))
    )
    with op.batch_alter_table('fraud_callback_deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fraud_callback_deliveries_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('fraud_callback_deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fraud_callback_deliveries_job_id'))

    op.drop_table('fraud_callback_deliveries')
    with op.batch_alter_table('fraud_transactions', schema=None) as batch_op:
        batch_op.drop_index('ix_fraud_tx_time')
        batch_op.drop_index('ix_fraud_tx_terminal_time')
        batch_op.drop_index('ix_fraud_tx_customer_time')

    op.drop_table('fraud_transactions')
    with op.batch_alter_table('fraud_rule_sets', schema=None) as batch_op:
        batch_op.drop_index('ix_fraud_rule_sets_tenant_version')

    op.drop_table('fraud_rule_sets')
    op.drop_table('fraud_model_versions')
    with op.batch_alter_table('fraud_cases', schema=None) as batch_op:
        batch_op.drop_index('ix_fraud_cases_tenant_status')

    op.drop_table('fraud_cases')
