"""iiot vertical: asset registry, readings, ingestions, quarantine, risk scores, alerts, maintenance


Revision ID: 0010_iiot
Revises: 0009_cs_integrations
Create Date: 2026-12-02 02:56:47

``iiot_plants`` → ``iiot_lines`` → ``iiot_assets`` → ``iiot_sensors`` is the asset registry;
``iiot_readings`` holds sensor values (no primary key: bulk-written; indexed ``(sensor_pk, ts)``,
BRIN on PostgreSQL); ``iiot_ingests`` each ingestion with its checkpoint, ``iiot_quarantine`` the
refused rows; ``iiot_risk_scores``, ``iiot_alerts`` (one active alert per asset and kind),
``iiot_maintenance`` and ``iiot_tenant_settings`` serve prediction and alerting. New tables only.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0010_iiot'
down_revision: str | None = '0009_cs_integrations'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('iiot_ingests',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=True),
    sa.Column('file_format', sa.String(length=16), nullable=True),
    sa.Column('layout', sa.String(length=8), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('rows_read', sa.BigInteger(), nullable=False),
    sa.Column('rows_kept', sa.BigInteger(), nullable=False),
    sa.Column('rows_quarantined', sa.BigInteger(), nullable=False),
    sa.Column('rows_done', sa.BigInteger(), nullable=False),
    sa.Column('gaps', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_ingests'))
    )
    with op.batch_alter_table('iiot_ingests', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_ingests_tenant_created', ['tenant_id', 'created_at'], unique=False)
        batch_op.create_index('ix_iiot_ingests_tenant_digest', ['tenant_id', 'digest'], unique=True)

    op.create_table('iiot_plants',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('plant_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_plants'))
    )
    with op.batch_alter_table('iiot_plants', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_plants_tenant_plant', ['tenant_id', 'plant_id'], unique=True)

    op.create_table('iiot_readings',
    sa.Column('sensor_pk', sa.Integer(), nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('ingest_pk', sa.Integer(), nullable=True)
    )
    with op.batch_alter_table('iiot_readings', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_readings_sensor_ts', ['sensor_pk', 'ts'], unique=False,
                              postgresql_using='brin', postgresql_with={'pages_per_range': 16})
    op.create_table('iiot_tenant_settings',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('policy', JSON, nullable=False),
    sa.Column('notify_url', sa.String(length=2000), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_iiot_tenant_settings'))
    )
    op.create_table('iiot_lines',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('plant_pk', sa.Integer(), nullable=False),
    sa.Column('line_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['plant_pk'], ['iiot_plants.id'], name=op.f('fk_iiot_lines_plant_pk_iiot_plants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_lines'))
    )
    with op.batch_alter_table('iiot_lines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_iiot_lines_plant_pk'), ['plant_pk'], unique=False)
        batch_op.create_index('ix_iiot_lines_tenant_line', ['tenant_id', 'line_id'], unique=True)

    op.create_table('iiot_quarantine',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('ingest_pk', sa.Integer(), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('row_number', sa.BigInteger(), nullable=True),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.String(length=500), nullable=True),
    sa.Column('raw', sa.Text(), nullable=True),
    sa.Column('asset_id', sa.String(length=64), nullable=True),
    sa.Column('sensor_id', sa.String(length=64), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ingest_pk'], ['iiot_ingests.id'], name=op.f('fk_iiot_quarantine_ingest_pk_iiot_ingests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_quarantine'))
    )
    with op.batch_alter_table('iiot_quarantine', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_quarantine_tenant_ingest', ['tenant_id', 'ingest_pk', 'row_number'], unique=False)
        batch_op.create_index('ix_iiot_quarantine_tenant_reason', ['tenant_id', 'reason', 'received_at'], unique=False)

    op.create_table('iiot_assets',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('line_pk', sa.Integer(), nullable=False),
    sa.Column('asset_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('kind', sa.String(length=64), nullable=True),
    sa.Column('details', JSON, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['line_pk'], ['iiot_lines.id'], name=op.f('fk_iiot_assets_line_pk_iiot_lines'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_assets'))
    )
    with op.batch_alter_table('iiot_assets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_iiot_assets_line_pk'), ['line_pk'], unique=False)
        batch_op.create_index('ix_iiot_assets_tenant_asset', ['tenant_id', 'asset_id'], unique=True)

    op.create_table('iiot_alerts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('asset_pk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('active_key', sa.String(length=100), nullable=True),
    sa.Column('severity', sa.String(length=16), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('opened_p', sa.Float(), nullable=False),
    sa.Column('peak_p', sa.Float(), nullable=False),
    sa.Column('last_p', sa.Float(), nullable=False),
    sa.Column('rul_hours', sa.Float(), nullable=True),
    sa.Column('acknowledged_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('acknowledged_by', sa.String(length=100), nullable=True),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('resolved_by', sa.String(length=100), nullable=True),
    sa.Column('note', sa.String(length=1000), nullable=True),
    sa.ForeignKeyConstraint(['asset_pk'], ['iiot_assets.id'], name=op.f('fk_iiot_alerts_asset_pk_iiot_assets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_alerts'))
    )
    with op.batch_alter_table('iiot_alerts', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_alerts_asset', ['asset_pk', 'opened_at'], unique=False)
        batch_op.create_index('ix_iiot_alerts_tenant_active', ['tenant_id', 'active_key'], unique=True)
        batch_op.create_index('ix_iiot_alerts_tenant_state', ['tenant_id', 'state', 'opened_at'], unique=False)

    op.create_table('iiot_maintenance',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('asset_pk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('failure_mode', sa.String(length=64), nullable=True),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('note', sa.String(length=1000), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['asset_pk'], ['iiot_assets.id'], name=op.f('fk_iiot_maintenance_asset_pk_iiot_assets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_maintenance'))
    )
    with op.batch_alter_table('iiot_maintenance', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_maintenance_asset_time', ['asset_pk', 'occurred_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_iiot_maintenance_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('iiot_risk_scores',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('asset_pk', sa.Integer(), nullable=False),
    sa.Column('window_end', sa.DateTime(timezone=True), nullable=False),
    sa.Column('p_failure', sa.Float(), nullable=False),
    sa.Column('rul_hours', sa.Float(), nullable=True),
    sa.Column('tier', sa.String(length=8), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.Column('drivers', JSON, nullable=False),
    sa.Column('scored_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['asset_pk'], ['iiot_assets.id'], name=op.f('fk_iiot_risk_scores_asset_pk_iiot_assets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_risk_scores'))
    )
    with op.batch_alter_table('iiot_risk_scores', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_risk_scores_asset_time', ['asset_pk', 'window_end'], unique=False)
        batch_op.create_index('ix_iiot_risk_scores_tenant_time', ['tenant_id', 'window_end'], unique=False)

    op.create_table('iiot_sensors',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('asset_pk', sa.Integer(), nullable=False),
    sa.Column('sensor_id', sa.String(length=64), nullable=False),
    sa.Column('quantity', sa.String(length=32), nullable=True),
    sa.Column('unit', sa.String(length=32), nullable=False),
    sa.Column('min_value', sa.Float(), nullable=True),
    sa.Column('max_value', sa.Float(), nullable=True),
    sa.Column('sampling_interval_s', sa.Float(), nullable=True),
    sa.Column('last_ts', sa.DateTime(timezone=True), nullable=True),
    sa.Column('reading_count', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['asset_pk'], ['iiot_assets.id'], name=op.f('fk_iiot_sensors_asset_pk_iiot_assets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_iiot_sensors'))
    )
    with op.batch_alter_table('iiot_sensors', schema=None) as batch_op:
        batch_op.create_index('ix_iiot_sensors_asset_sensor', ['asset_pk', 'sensor_id'], unique=True)
        batch_op.create_index(batch_op.f('ix_iiot_sensors_tenant_id'), ['tenant_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('iiot_sensors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_iiot_sensors_tenant_id'))
        batch_op.drop_index('ix_iiot_sensors_asset_sensor')

    op.drop_table('iiot_sensors')
    with op.batch_alter_table('iiot_risk_scores', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_risk_scores_tenant_time')
        batch_op.drop_index('ix_iiot_risk_scores_asset_time')

    op.drop_table('iiot_risk_scores')
    with op.batch_alter_table('iiot_maintenance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_iiot_maintenance_tenant_id'))
        batch_op.drop_index('ix_iiot_maintenance_asset_time')

    op.drop_table('iiot_maintenance')
    with op.batch_alter_table('iiot_alerts', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_alerts_tenant_state')
        batch_op.drop_index('ix_iiot_alerts_tenant_active')
        batch_op.drop_index('ix_iiot_alerts_asset')

    op.drop_table('iiot_alerts')
    with op.batch_alter_table('iiot_assets', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_assets_tenant_asset')
        batch_op.drop_index(batch_op.f('ix_iiot_assets_line_pk'))

    op.drop_table('iiot_assets')
    with op.batch_alter_table('iiot_quarantine', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_quarantine_tenant_reason')
        batch_op.drop_index('ix_iiot_quarantine_tenant_ingest')

    op.drop_table('iiot_quarantine')
    with op.batch_alter_table('iiot_lines', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_lines_tenant_line')
        batch_op.drop_index(batch_op.f('ix_iiot_lines_plant_pk'))

    op.drop_table('iiot_lines')
    op.drop_table('iiot_tenant_settings')
    with op.batch_alter_table('iiot_readings', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_readings_sensor_ts')

    op.drop_table('iiot_readings')
    with op.batch_alter_table('iiot_plants', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_plants_tenant_plant')

    op.drop_table('iiot_plants')
    with op.batch_alter_table('iiot_ingests', schema=None) as batch_op:
        batch_op.drop_index('ix_iiot_ingests_tenant_digest')
        batch_op.drop_index('ix_iiot_ingests_tenant_created')

    op.drop_table('iiot_ingests')
