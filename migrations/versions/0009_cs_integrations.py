"""cs vertical: a tenant's stream credentials (Twilio account SID and auth token, AudioHook client secret)

Revision ID: 0009_cs_integrations
Revises: 0008_cs
Create Date: 2026-12-01 23:45:00

``cs_integrations`` holds one row per tenant that configured a stream integration; every column
but the key may be null (that integration is not configured). A new table only: the downgrade
drops it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009_cs_integrations'
down_revision: str | None = '0008_cs'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('cs_integrations',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('twilio_account_sid', sa.String(length=64), nullable=True),
    sa.Column('twilio_auth_token', sa.String(length=128), nullable=True),
    sa.Column('audiohook_client_secret', sa.String(length=256), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_cs_integrations'))
    )


def downgrade() -> None:
    op.drop_table('cs_integrations')
