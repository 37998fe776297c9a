"""cs vertical: calls, participants, utterances, escalations, knowledge articles, tenant settings

Revision ID: 0008_cs
Revises: 0007_nodule_results
Create Date: 2026-12-01 23:19:27

``cs_calls`` holds each call from the start of its stream (one call id per tenant) with what the
supervisor's live list shows; ``cs_participants``, ``cs_utterances`` (redacted transcripts,
emotion) and ``cs_escalations`` hang off it (deleted with it); ``cs_articles`` is the knowledge
base (deletions kept as ``deleted_at``); ``cs_tenant_settings`` a tenant's escalation and
retrieval overrides. New tables only: the downgrade drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0008_cs'
down_revision: str | None = '0007_nodule_results'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('cs_articles',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('article_id', sa.String(length=64), nullable=False),
    sa.Column('title', sa.String(length=300), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('reply', sa.Text(), nullable=True),
    sa.Column('tags', JSON, nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('tenant_id', 'article_id', name=op.f('pk_cs_articles'))
    )
    with op.batch_alter_table('cs_articles', schema=None) as batch_op:
        batch_op.create_index('ix_cs_articles_tenant_updated', ['tenant_id', 'updated_at'], unique=False)

    op.create_table('cs_calls',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('call_id', sa.String(length=128), nullable=False),
    sa.Column('protocol', sa.String(length=16), nullable=False),
    sa.Column('stream_id', sa.String(length=128), nullable=True),
    sa.Column('language', sa.String(length=16), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('end_reason', sa.String(length=32), nullable=True),
    sa.Column('end_detail', sa.String(length=200), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('utterance_count', sa.Integer(), nullable=False),
    sa.Column('last_utterance_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('current_emotion', sa.String(length=32), nullable=True),
    sa.Column('sentiment_trend', sa.Float(), nullable=True),
    sa.Column('escalation_count', sa.Integer(), nullable=False),
    sa.Column('last_escalation_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('details', JSON, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cs_calls'))
    )
    with op.batch_alter_table('cs_calls', schema=None) as batch_op:
        batch_op.create_index('ix_cs_calls_tenant_call', ['tenant_id', 'call_id'], unique=True)
        batch_op.create_index('ix_cs_calls_tenant_status', ['tenant_id', 'status', 'started_at'], unique=False)

    op.create_table('cs_tenant_settings',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('escalation', JSON, nullable=False),
    sa.Column('retrieval', JSON, nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_cs_tenant_settings'))
    )
    op.create_table('cs_escalations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('call_pk', sa.Integer(), nullable=False),
    sa.Column('rule', sa.String(length=32), nullable=False),
    sa.Column('utterance_seq', sa.Integer(), nullable=True),
    sa.Column('at_ms', sa.Integer(), nullable=False),
    sa.Column('evidence', JSON, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['call_pk'], ['cs_calls.id'], name=op.f('fk_cs_escalations_call_pk_cs_calls'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cs_escalations'))
    )
    with op.batch_alter_table('cs_escalations', schema=None) as batch_op:
        batch_op.create_index('ix_cs_escalations_call', ['call_pk', 'at_ms'], unique=False)
        batch_op.create_index('ix_cs_escalations_tenant_created', ['tenant_id', 'created_at'], unique=False)

    op.create_table('cs_participants',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('call_pk', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('track', sa.String(length=32), nullable=False),
    sa.Column('external_id', sa.String(length=128), nullable=True),
    sa.Column('joined_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['call_pk'], ['cs_calls.id'], name=op.f('fk_cs_participants_call_pk_cs_calls'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cs_participants'))
    )
    with op.batch_alter_table('cs_participants', schema=None) as batch_op:
        batch_op.create_index('ix_cs_participants_call_track', ['call_pk', 'track'], unique=True)

    op.create_table('cs_utterances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('call_pk', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('speaker', sa.String(length=16), nullable=False),
    sa.Column('track', sa.String(length=32), nullable=True),
    sa.Column('start_ms', sa.Integer(), nullable=False),
    sa.Column('end_ms', sa.Integer(), nullable=False),
    sa.Column('transcript', sa.Text(), nullable=True),
    sa.Column('redactions', JSON, nullable=False),
    sa.Column('emotion', sa.String(length=32), nullable=True),
    sa.Column('emotion_probabilities', JSON, nullable=False),
    sa.Column('valence', sa.Float(), nullable=True),
    sa.Column('sentiment_trend', sa.Float(), nullable=True),
    sa.Column('suggested_article_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['call_pk'], ['cs_calls.id'], name=op.f('fk_cs_utterances_call_pk_cs_calls'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cs_utterances'))
    )
    with op.batch_alter_table('cs_utterances', schema=None) as batch_op:
        batch_op.create_index('ix_cs_utterances_call_seq', ['call_pk', 'seq'], unique=True)
        batch_op.create_index('ix_cs_utterances_tenant_created', ['tenant_id', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('cs_utterances', schema=None) as batch_op:
        batch_op.drop_index('ix_cs_utterances_tenant_created')
        batch_op.drop_index('ix_cs_utterances_call_seq')

    op.drop_table('cs_utterances')
    with op.batch_alter_table('cs_participants', schema=None) as batch_op:
        batch_op.drop_index('ix_cs_participants_call_track')

    op.drop_table('cs_participants')
    with op.batch_alter_table('cs_escalations', schema=None) as batch_op:
        batch_op.drop_index('ix_cs_escalations_tenant_created')
        batch_op.drop_index('ix_cs_escalations_call')

    op.drop_table('cs_escalations')
    op.drop_table('cs_tenant_settings')
    with op.batch_alter_table('cs_calls', schema=None) as batch_op:
        batch_op.drop_index('ix_cs_calls_tenant_status')
        batch_op.drop_index('ix_cs_calls_tenant_call')

    op.drop_table('cs_calls')
    with op.batch_alter_table('cs_articles', schema=None) as batch_op:
        batch_op.drop_index('ix_cs_articles_tenant_updated')

    op.drop_table('cs_articles')
