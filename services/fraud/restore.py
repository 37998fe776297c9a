"""Rebuild the Redis window state from the database (``tessera restore-state fraud``).

For a Redis that lost its data (restarted without persistence, failed over to an empty replica):
every stored transaction of each tenant's last ``RETENTION_S`` of event time goes back into its
card and terminal windows, and labelled frauds into the terminal fraud windows. Members are
transaction ids, so running it twice, or while traffic flows, counts nothing twice. Not restored:
answers under the transaction id (a resend is then recognised by its window entry and answered
from the database) and card history older than the retention.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.fraud.db import Transaction
from services.fraud.redis_state import (
    CUSTOMER_IDLE_EXPIRY_S,
    RETENTION_S,
    customer_key,
    terminal_fraud_key,
    terminal_key,
    window_member,
)
from services.fraud.window_store import window_store
from shared.db import session_factory
from shared.kv import sync_redis
from shared.window_state import WindowBackend

logger = logging.getLogger("tessera.fraud.restore")

BATCH_ROWS = 5000


def restore_window_state(session: Session, client: redis.Redis, tenant_id: str | None = None) -> int:
    """Re-add stored transactions to the Redis windows; returns how many were written.

    Back-test namespaces (ids with ``~``) are skipped: back-tests keep their state in the database.
    """
    newest = select(Transaction.tenant_id, func.max(Transaction.tx_time_s)).group_by(Transaction.tenant_id)
    if tenant_id is not None:
        newest = newest.where(Transaction.tenant_id == tenant_id)
    written = 0
    for tenant, latest in session.execute(newest).all():
        if "~" in tenant:
            continue
        written += _restore_tenant(session, client, tenant, float(latest) - RETENTION_S)
    return written


def _restore_tenant(session: Session, client: redis.Redis, tenant_id: str, since_s: float) -> int:
    rows = session.execute(
        select(Transaction.transaction_id, Transaction.customer_id, Transaction.terminal_id,
               Transaction.tx_time_s, Transaction.amount, Transaction.is_fraud)
        .where(Transaction.tenant_id == tenant_id, Transaction.tx_time_s > since_s)
        .execution_options(yield_per=BATCH_ROWS)
    )
    written = 0
    pipe = client.pipeline(transaction=False)
    for transaction_id, customer_id, terminal_id, tx_time_s, amount, is_fraud in rows:
        customer = customer_key(tenant_id, customer_id)
        terminal = terminal_key(tenant_id, terminal_id)
        pipe.zadd(customer, {window_member(transaction_id, amount, terminal_id): tx_time_s})
        pipe.expire(customer, CUSTOMER_IDLE_EXPIRY_S)
        pipe.zadd(terminal, {transaction_id: tx_time_s})
        pipe.expire(terminal, RETENTION_S)
        if is_fraud:
            pipe.zadd(terminal_fraud_key(tenant_id, terminal_id), {transaction_id: tx_time_s})
            pipe.expire(terminal_fraud_key(tenant_id, terminal_id), RETENTION_S)
        written += 1
        if written % BATCH_ROWS == 0:
            pipe.execute()
    pipe.execute()
    logger.info("restored %d transactions of tenant %s", written, tenant_id)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``tessera restore-state fraud [--tenant ID]``."""
    parser = argparse.ArgumentParser(prog="tessera restore-state fraud", description=__doc__.splitlines()[0])
    parser.add_argument("--tenant", help="only this tenant (default: all)")
    args = parser.parse_args(argv)
    if window_store().backend is not WindowBackend.REDIS:
        parser.error("TESSERA_REDIS_URL is not set: the window state lives in the database already")
    with session_factory()() as session:
        written = restore_window_state(session, sync_redis(), args.tenant)
    print(f"restored {written} transactions into the Redis window state")
    return 0
