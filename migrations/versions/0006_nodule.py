"""nodule vertical: stored DICOM instances, series and studies with their analysis state, clinical data, findings

Revision ID: 0006_nodule
Revises: 0005_webhook_deliveries
Create Date: 2026-12-01 19:48:06

``nodule_instances`` indexes every stored DICOM file (one SOP instance UID per tenant);
``nodule_series`` and ``nodule_studies`` hold the receiving/analysis state and per-series errors;
``nodule_clinical_data`` what was posted for a study; ``nodule_series_findings`` the detector's
nodules per analysed series. New tables only: the downgrade drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006_nodule'
down_revision: str | None = '0005_webhook_deliveries'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('nodule_clinical_data',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('pack_years', sa.Float(), nullable=True),
    sa.Column('current_smoker', sa.Boolean(), nullable=True),
    sa.Column('family_history_lung_cancer', sa.Boolean(), nullable=True),
    sa.Column('emphysema', sa.Boolean(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'study_instance_uid', name=op.f('pk_nodule_clinical_data'))
    )
    op.create_table('nodule_instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodule_instances'))
    )
    with op.batch_alter_table('nodule_instances', schema=None) as batch_op:
        batch_op.create_index('ix_nodule_instances_tenant_series', ['tenant_id', 'series_instance_uid'], unique=False)
        batch_op.create_index('ix_nodule_instances_tenant_sop', ['tenant_id', 'sop_instance_uid'], unique=True)

    op.create_table('nodule_series',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('last_instance_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('analysed_count', sa.Integer(), nullable=True),
    sa.Column('error_code', sa.String(length=32), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'series_instance_uid', name=op.f('pk_nodule_series'))
    )
    with op.batch_alter_table('nodule_series', schema=None) as batch_op:
        batch_op.create_index('ix_nodule_series_state_last', ['state', 'last_instance_at'], unique=False)
        batch_op.create_index('ix_nodule_series_tenant_study', ['tenant_id', 'study_instance_uid'], unique=False)

    op.create_table('nodule_series_findings',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('stack_label', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('nodules', JSON, nullable=False),
    sa.Column('labels_path', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodule_series_findings'))
    )
    with op.batch_alter_table('nodule_series_findings', schema=None) as batch_op:
        batch_op.create_index('ix_nodule_findings_tenant_study', ['tenant_id', 'study_instance_uid'], unique=False)

    op.create_table('nodule_studies',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('patient_age_years', sa.Float(), nullable=True),
    sa.Column('patient_sex', sa.String(length=1), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'study_instance_uid', name=op.f('pk_nodule_studies'))
    )
    with op.batch_alter_table('nodule_studies', schema=None) as batch_op:
        batch_op.create_index('ix_nodule_studies_tenant_created', ['tenant_id', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('nodule_studies', schema=None) as batch_op:
        batch_op.drop_index('ix_nodule_studies_tenant_created')

    op.drop_table('nodule_studies')
    with op.batch_alter_table('nodule_series_findings', schema=None) as batch_op:
        batch_op.drop_index('ix_nodule_findings_tenant_study')

    op.drop_table('nodule_series_findings')
    with op.batch_alter_table('nodule_series', schema=None) as batch_op:
        batch_op.drop_index('ix_nodule_series_tenant_study')
        batch_op.drop_index('ix_nodule_series_state_last')

    op.drop_table('nodule_series')
    with op.batch_alter_table('nodule_instances', schema=None) as batch_op:
        batch_op.drop_index('ix_nodule_instances_tenant_sop')
        batch_op.drop_index('ix_nodule_instances_tenant_series')

    op.drop_table('nodule_instances')
    op.drop_table('nodule_clinical_data')
