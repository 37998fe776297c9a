"""One migration history: up and down on both databases, and it matches the tables in code."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from services.cli import _alembic_config
from services.tables import load_all_tables
from shared.db import get_engine


def table_names() -> set[str]:
    return set(inspect(get_engine()).get_table_names()) - {"alembic_version"}


def test_upgrade_then_downgrade_to_base_and_back(stack) -> None:
    config = _alembic_config()
    command.upgrade(config, "head")
    assert {"platform_jobs", "platform_tenants", "platform_api_keys"} <= table_names()
    with get_engine().begin() as connection:  # rows that reference each other, as a live database has
        job_id = uuid.uuid4().hex
        connection.execute(text(
            "INSERT INTO platform_jobs (id, idempotency_key, task_name, queue, payload, status, attempts, "
            "max_attempts, progress, created_at, updated_at) VALUES (:id, :id, 't', 'q', '{}', 'pending', 0, 1, 0, "
            ":now, :now)"), {"id": job_id, "now": datetime.now(UTC)})
        connection.execute(text(
            "INSERT INTO platform_webhook_deliveries (job_id, tenant_id, source, event_type, subject_id, url, attempt, "
            "attempted_at) VALUES (:id, 'bank', 'fraud', 'fraud.decision', 'tx', 'https://bank.example/cb', 1, :now)"),
            {"id": job_id, "now": datetime.now(UTC)})
    command.downgrade(config, "base")
    assert not {t for t in table_names() if t.startswith(("platform_", "fraud_"))}
    command.upgrade(config, "head")
    assert "platform_jobs" in table_names()


def test_migrations_match_the_models(migrated_stack) -> None:
    with get_engine().connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), load_all_tables())
    diff = [d for d in diff if not (d[0] == "remove_table" and d[1].name.startswith("test_"))]  # test fixtures
    assert diff == [], f"models and migrations disagree; run alembic revision --autogenerate: {diff}"


WEBHOOKS_REVISION = "0005_webhook_deliveries"


def test_fraud_callback_log_and_unfinished_callbacks_move_to_platform_webhooks(stack) -> None:
    """Fraud's delivery log becomes the platform's (source fraud), an unfinished fraud callback job a
    webhook job carrying its event, one whose decision is gone fails; the downgrade moves them back."""
    config = _alembic_config()
    before = ScriptDirectory.from_config(config).get_revision(WEBHOOKS_REVISION).down_revision
    assert isinstance(before, str)
    command.upgrade(config, "head")
    command.downgrade(config, before)
    tenant, now = f"bank-{uuid.uuid4().hex[:8]}", datetime.now(UTC)
    pending_id, done_id, gone_id = (f"{tenant}-{name}" for name in ("pending", "done", "gone"))
    url = "https://bank.example/cb"
    with get_engine().begin() as connection:
        connection.execute(text(
            "INSERT INTO fraud_transactions (tenant_id, transaction_id, customer_id, terminal_id, tx_time_s, amount, "
            "currency, channel, score, decision, reasons, features, model_version, rules_version, received_at) "
            "VALUES (:t, 'tx-1', 'c', 't', 0, 10, 'EUR', 'ecommerce', 0.9, 'review', :reasons, '[]', 'm-1', 3, "
            ":now)"), {"t": tenant, "reasons": '[{"source": "rule", "code": "r-1", "description": "big"}]',
                       "now": now})
        for job_id, transaction_id, status in ((pending_id, "tx-1", "pending"), (done_id, "tx-1", "succeeded"),
                                               (gone_id, "tx-gone", "running")):
            connection.execute(text(
                "INSERT INTO platform_jobs (id, idempotency_key, task_name, tenant_id, queue, payload, status, "
                "attempts, max_attempts, progress, created_at, updated_at) VALUES (:id, :id, "
                "'fraud.deliver_callback', :t, 'fraud', :payload, :status, 1, 6, 0, :now, :now)"),
                {"id": job_id, "t": tenant, "status": status, "now": now, "payload": json.dumps(
                    {"tenant_id": tenant, "transaction_id": transaction_id, "url": url})})
        connection.execute(text(
            "INSERT INTO fraud_callback_deliveries (job_id, tenant_id, transaction_id, url, attempt, status_code, "
            "error, attempted_at) VALUES (:id, :t, 'tx-1', :url, 1, 503, 'busy', :now)"),
            {"id": done_id, "t": tenant, "url": url, "now": now})

    command.upgrade(config, WEBHOOKS_REVISION)
    with get_engine().connect() as connection:
        log = connection.execute(text("SELECT job_id, source, event_type, subject_id, attempt, status_code, "
                                      "latency_ms, error FROM platform_webhook_deliveries WHERE tenant_id = :t"),
                                 {"t": tenant}).all()
        jobs = {row[0]: row[1:] for row in connection.execute(text(
            "SELECT id, task_name, status, payload FROM platform_jobs WHERE tenant_id = :t"), {"t": tenant})}
    assert [tuple(row) for row in log] == [(done_id, "fraud", "fraud.decision", "tx-1", 1, 503, None, "busy")]
    task_name, status, payload = jobs[pending_id]
    assert (task_name, status) == ("shared.webhooks.deliver", "pending")
    assert _json(payload) == {
        "url": url, "source": "fraud", "event_type": "fraud.decision", "subject_id": "tx-1", "key": "tx-1",
        "timeout_s": 5.0,
        "data": {"transaction_id": "tx-1", "decision": "review", "score": 0.9, "model_version": "m-1",
                 "rules_version": 3, "reasons": [{"source": "rule", "code": "r-1", "description": "big"}]}}
    assert jobs[done_id][:2] == ("fraud.deliver_callback", "succeeded")  # history stays as it ran
    assert jobs[gone_id][1] == "failed"
    assert "fraud_callback_deliveries" not in table_names()

    command.downgrade(config, before)
    with get_engine().connect() as connection:
        log = connection.execute(text("SELECT job_id, transaction_id, attempt, status_code, error "
                                      "FROM fraud_callback_deliveries WHERE tenant_id = :t"), {"t": tenant}).all()
        pending = connection.execute(text("SELECT task_name, payload FROM platform_jobs WHERE id = :id"),
                                     {"id": pending_id}).one()
    assert [tuple(row) for row in log] == [(done_id, "tx-1", 1, 503, "busy")]
    assert pending[0] == "fraud.deliver_callback"
    assert _json(pending[1]) == {"tenant_id": tenant, "transaction_id": "tx-1", "url": url}
    assert "platform_webhook_deliveries" not in table_names()
    command.upgrade(config, "head")


def _json(value: object) -> object:
    """A JSON column as read through text(): parsed on PostgreSQL, a string on SQLite."""
    return json.loads(value) if isinstance(value, str) else value
