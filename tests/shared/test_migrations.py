"""One migration history: up and down on both databases, and it matches the tables in code."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
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
            "INSERT INTO fraud_callback_deliveries (job_id, tenant_id, transaction_id, url, attempt, attempted_at) "
            "VALUES (:id, 'bank', 'tx', 'https://bank.example/cb', 1, :now)"), {"id": job_id, "now": datetime.now(UTC)})
    command.downgrade(config, "base")
    assert not {t for t in table_names() if t.startswith(("platform_", "fraud_"))}
    command.upgrade(config, "head")
    assert "platform_jobs" in table_names()


def test_migrations_match_the_models(migrated_stack) -> None:
    with get_engine().connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), load_all_tables())
    diff = [d for d in diff if not (d[0] == "remove_table" and d[1].name.startswith("test_"))]  # test fixtures
    assert diff == [], f"models and migrations disagree; run alembic revision --autogenerate: {diff}"
