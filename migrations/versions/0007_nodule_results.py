"""nodule vertical: result objects (SR, SEG, key images), risk with the findings, study dates

Revision ID: 0007_nodule_results
Revises: 0006_nodule
Create Date: 2026-12-01 20:50:00

``nodule_results`` indexes the DICOM objects made from each analysis (one SOP instance UID per
tenant); ``nodule_series_findings.risk`` keeps the risk computed at analysis time;
``nodule_studies.study_date`` orders a patient's studies for the prior comparison. The downgrade
drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007_nodule_results'
down_revision: str | None = '0006_nodule'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('nodule_results',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('source_series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodule_results'))
    )
    with op.batch_alter_table('nodule_results', schema=None) as batch_op:
        batch_op.create_index('ix_nodule_results_tenant_sop', ['tenant_id', 'sop_instance_uid'], unique=True)
        batch_op.create_index('ix_nodule_results_tenant_study', ['tenant_id', 'study_instance_uid'], unique=False)
    with op.batch_alter_table('nodule_series_findings', schema=None) as batch_op:
        batch_op.add_column(sa.Column('risk', JSON, nullable=True))
    with op.batch_alter_table('nodule_studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('study_date', sa.Date(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('nodule_studies', schema=None) as batch_op:
        batch_op.drop_column('study_date')
    with op.batch_alter_table('nodule_series_findings', schema=None) as batch_op:
        batch_op.drop_column('risk')
    with op.batch_alter_table('nodule_results', schema=None) as batch_op:
        batch_op.drop_index('ix_nodule_results_tenant_study')
        batch_op.drop_index('ix_nodule_results_tenant_sop')
    op.drop_table('nodule_results')
