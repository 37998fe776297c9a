"""Fixtures shared by every test: isolated settings and the two backend stacks.

Every integration test runs on both configurations a user can deploy:
- ``sqlite``: a SQLite file and the embedded SQLite-backed Celery broker (the default);
- ``postgres``: PostgreSQL + Redis on loopback (skipped, saying so, when either is absent).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import port_open

PG_ADMIN_URL = os.environ.get("TESSERA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("TESSERA_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_TEST_DB = int(os.environ.get("TESSERA_TEST_REDIS_DB", "13"))
"""The broker's Redis database; the fast state uses the one below it (two runs side by side need two)."""


@dataclass
class Stack:
    """One deployable configuration: URLs plus the env a child process needs to use them."""

    name: str
    database_url: str
    broker_url: str
    result_backend: str
    data_dir: Path
    redis_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {
            "TESSERA_ENVIRONMENT": "test",
            "TESSERA_DATA_DIR": str(self.data_dir),
            "TESSERA_DATABASE_URL": self.database_url,
            "TESSERA_BROKER_URL": self.broker_url,
            "TESSERA_RESULT_BACKEND": self.result_backend,
            "TESSERA_LOG_JSON": "false",
            "TESSERA_TASK_LEASE_S": "4",
            "TESSERA_JOB_SWEEP_INTERVAL_S": "1",
            "TESSERA_MODEL_RELOAD_POLL_S": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if self.redis_url:
            env["TESSERA_REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        return env


def apply_stack_in_process(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process's settings, engine and Celery app use ``stack``."""
    from shared.config import get_settings
    from shared.db import reset_engines
    from shared.kv import reset_redis_clients
    from shared.queue import reconfigure_celery_app

    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    reset_engines()
    reset_redis_clients()
    reconfigure_celery_app(get_settings())


def _postgres_available() -> str | None:
    if not port_open("127.0.0.1", 5432):
        return "PostgreSQL is not listening on 127.0.0.1:5432"
    if not port_open("127.0.0.1", 6379):
        return "Redis is not listening on 127.0.0.1:6379"
    return None


@pytest.fixture(scope="session")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    return sqlite_stack_at(tmp_path_factory.mktemp("sqlite-stack"))


def sqlite_stack_at(data_dir: Path) -> Stack:
    """The embedded configuration with every file under ``data_dir``."""
    return Stack(
        name="sqlite",
        database_url=f"sqlite:///{data_dir / 'tessera.db'}",
        broker_url=f"sqla+sqlite:///{data_dir / 'broker.db'}",
        result_backend=f"db+sqlite:///{data_dir / 'results.db'}",
        data_dir=data_dir,
    )


@pytest.fixture(scope="session")
def postgres_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = _postgres_available()
    if reason:
        pytest.skip(f"{reason}: PostgreSQL + Redis variants skipped (run `make services` to start them)")
    import psycopg
    import redis

    database = f"tessera_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    redis.Redis.from_url(f"{REDIS_TEST_URL}/{REDIS_TEST_DB}").flushdb()
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield Stack(
        name="postgres",
        database_url=f"{base}/{database}",
        broker_url=f"{REDIS_TEST_URL}/{REDIS_TEST_DB}",
        result_backend=f"{REDIS_TEST_URL}/{REDIS_TEST_DB}",
        redis_url=f"{REDIS_TEST_URL}/{REDIS_TEST_DB - 1}",
        data_dir=tmp_path_factory.mktemp("postgres-stack"),
    )
    from shared.db import reset_engines

    reset_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """Each test using this runs once per configuration, with this process pointed at it."""
    chosen: Stack = request.getfixturevalue(f"{request.param}_stack")
    apply_stack_in_process(chosen, monkeypatch)
    return chosen


@pytest.fixture
def migrated_stack(stack: Stack) -> Stack:
    """``stack`` with every migration applied."""
    from services.cli import db_upgrade

    db_upgrade()
    return stack


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's .env or writes into the repo's .tessera directory."""
    from shared.config import get_settings
    from shared.db import reset_engines

    monkeypatch.setenv("TESSERA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TESSERA_ENVIRONMENT", "test")
    monkeypatch.delenv("TESSERA_DATABASE_URL", raising=False)
    monkeypatch.delenv("TESSERA_BROKER_URL", raising=False)
    get_settings.cache_clear()
    reset_engines()
    yield
    get_settings.cache_clear()
    reset_engines()
