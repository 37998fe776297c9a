"""fraud: covering indexes for the window-state reads

Revision ID: 0011_fraud_covering_windows
Revises: 0010_iiot
Create Date: 2026-12-03 04:40:00

The customer and terminal window reads (``services.fraud.state``) aggregate a card's or a
terminal's rows over the last 30 (37) days. The old indexes held only ``tx_time_s``, so every row in
a window cost a visit to the table (~5 wide rows a page, scattered): on the embedded SQLite default
the API process's CPU a request grew ~35 % over 40,000 transactions (issue 14). The new indexes add
the columns those reads need (``amount`` and ``terminal_id`` for a card, ``is_fraud`` for a terminal),
so the reads never touch the table. They replace the old ones (same leading columns).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0011_fraud_covering_windows'
down_revision: str | None = '0010_iiot'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('fraud_transactions', schema=None) as batch_op:
        batch_op.create_index('ix_fraud_tx_customer_window',
                              ['tenant_id', 'customer_id', 'tx_time_s', 'amount', 'terminal_id'], unique=False)
        batch_op.create_index('ix_fraud_tx_terminal_window',
                              ['tenant_id', 'terminal_id', 'tx_time_s', 'is_fraud'], unique=False)
        batch_op.drop_index('ix_fraud_tx_customer_time')
        batch_op.drop_index('ix_fraud_tx_terminal_time')


def downgrade() -> None:
    with op.batch_alter_table('fraud_transactions', schema=None) as batch_op:
        batch_op.create_index('ix_fraud_tx_customer_time', ['tenant_id', 'customer_id', 'tx_time_s'], unique=False)
        batch_op.create_index('ix_fraud_tx_terminal_time', ['tenant_id', 'terminal_id', 'tx_time_s'], unique=False)
        batch_op.drop_index('ix_fraud_tx_terminal_window')
        batch_op.drop_index('ix_fraud_tx_customer_window')
