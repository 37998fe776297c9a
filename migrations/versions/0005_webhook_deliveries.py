"""outbound webhooks of every vertical in one delivery log: fraud_callback_deliveries -> platform_webhook_deliveries

Revision ID: 0005_webhook_deliveries
Revises: 0004_model_versions
Create Date: 2026-12-08 12:00:00

``platform_webhook_deliveries`` (``shared.webhooks``) logs each attempt of any vertical's signed
webhook: its source and event type, what it is about (``subject_id``), status, latency and error.
Fraud's rows move over as source ``fraud``, event ``fraud.decision``, the transaction id as subject
(latency unknown: NULL). Fraud callback jobs not finished yet become platform webhook jobs carrying
their event (built from the stored decision, as the old task did at delivery); one whose decision is
gone fails, as the old task would have. The downgrade moves fraud's rows and unfinished jobs back;
other sources' rows are dropped and their unfinished jobs fail (the old code cannot send them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005_webhook_deliveries'
down_revision: str | None = '0004_model_versions'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
OLD_TASK = 'fraud.deliver_callback'
NEW_TASK = 'shared.webhooks.deliver'
UNFINISHED = ('pending', 'running')
LOG_COLUMNS = "job_id, tenant_id, url, attempt, status_code, error, attempted_at"

jobs = sa.table('platform_jobs', sa.column('id', sa.String), sa.column('task_name', sa.String),
                sa.column('tenant_id', sa.String), sa.column('payload', JSON), sa.column('status', sa.String),
                sa.column('error', sa.Text))
transactions = sa.table('fraud_transactions', sa.column('tenant_id', sa.String), sa.column('transaction_id', sa.String),
                        sa.column('decision', sa.String), sa.column('score', sa.Float), sa.column('reasons', JSON),
                        sa.column('model_version', sa.String), sa.column('rules_version', sa.Integer))


def upgrade() -> None:
    op.create_table('platform_webhook_deliveries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('subject_id', sa.String(length=200), nullable=True),
    sa.Column('url', sa.String(length=500), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempted_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['platform_jobs.id'], name=op.f('fk_platform_webhook_deliveries_job_id_platform_jobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_platform_webhook_deliveries'))
    )
    with op.batch_alter_table('platform_webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_platform_webhook_deliveries_job_id'), ['job_id'], unique=False)
        batch_op.create_index('ix_platform_webhook_deliveries_tenant', ['tenant_id', 'id'], unique=False)

    op.execute(f"INSERT INTO platform_webhook_deliveries ({LOG_COLUMNS}, source, event_type, subject_id) "
               f"SELECT {LOG_COLUMNS}, 'fraud', 'fraud.decision', transaction_id FROM fraud_callback_deliveries "
               f"ORDER BY id")
    _unfinished_callbacks_to_webhooks(op.get_bind())

    with op.batch_alter_table('fraud_callback_deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fraud_callback_deliveries_job_id'))
    op.drop_table('fraud_callback_deliveries')


def downgrade() -> None:
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

    op.execute(f"INSERT INTO fraud_callback_deliveries ({LOG_COLUMNS}, transaction_id) "
               f"SELECT {LOG_COLUMNS}, COALESCE(subject_id, '') FROM platform_webhook_deliveries "
               f"WHERE source = 'fraud' ORDER BY id")
    _unfinished_webhooks_to_callbacks(op.get_bind())

    with op.batch_alter_table('platform_webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_platform_webhook_deliveries_tenant')
        batch_op.drop_index(batch_op.f('ix_platform_webhook_deliveries_job_id'))
    op.drop_table('platform_webhook_deliveries')


def _unfinished(connection: sa.Connection, task_name: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(id, tenant, payload) of the jobs of ``task_name`` not finished yet."""
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.tenant_id, jobs.c.payload)
                              .where(jobs.c.task_name == task_name, jobs.c.status.in_(UNFINISHED)))
    return [(row.id, row.tenant_id, row.payload) for row in rows]


def _unfinished_callbacks_to_webhooks(connection: sa.Connection) -> None:
    """An old job names its transaction; a webhook job carries its event, built here as the old task did."""
    for job_id, job_tenant, payload in _unfinished(connection, OLD_TASK):
        tenant_id, transaction_id = job_tenant or payload['tenant_id'], payload['transaction_id']
        decision = connection.execute(sa.select(transactions).where(
            transactions.c.tenant_id == tenant_id, transactions.c.transaction_id == transaction_id)).first()
        if decision is None:
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(
                status='failed', error='PublicJobError: the decision of this callback no longer exists'))
            continue
        data = {'transaction_id': transaction_id, 'decision': decision.decision, 'score': decision.score,
                'reasons': decision.reasons, 'model_version': decision.model_version,
                'rules_version': decision.rules_version}
        connection.execute(jobs.update().where(jobs.c.id == job_id).values(
            task_name=NEW_TASK, tenant_id=tenant_id,
            payload={'url': payload['url'], 'source': 'fraud', 'event_type': 'fraud.decision',
                     'subject_id': transaction_id, 'key': transaction_id, 'data': data, 'timeout_s': 5.0}))


def _unfinished_webhooks_to_callbacks(connection: sa.Connection) -> None:
    for job_id, tenant_id, payload in _unfinished(connection, NEW_TASK):
        if payload.get('source') == 'fraud':
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(
                task_name=OLD_TASK, payload={'tenant_id': tenant_id, 'transaction_id': payload['subject_id'],
                                             'url': payload['url']}))
        else:
            connection.execute(jobs.update().where(jobs.c.id == job_id).values(
                status='failed', error='PublicJobError: not delivered: the database was downgraded'))
