"""Fixtures shared by every test: isolated settings and the backend stacks.

A stack is one deployable configuration, chosen along two axes that tests parametrize separately:

- the **database**: ``sqlite`` (a file; the default) or ``postgresql`` (on loopback);
- the **state store** for fast per-tenant state (the fraud windows and stored answers):
  ``database`` (SQL tables of that database, ``TESSERA_REDIS_URL`` unset) or ``redis``
  (``TESSERA_REDIS_URL`` set; rows written behind). The broker follows it: the embedded SQLite
  broker without Redis, Redis with it.

A :class:`Variant` names one pair (test ids ``<database>-<state store>``). Which tests run which:

- :data:`DEPLOYMENTS` (``sqlite-database``, ``postgresql-redis``), the default for every test
  using ``stack`` or ``fraud_server``: the embedded default and the scaled-out deployment run every
  code path once (each database, each state store), at the cost of two servers per module.
- :data:`STATE_STORES` adds ``postgresql-database`` (PostgreSQL without Redis) for the modules whose
  subject is the window state (``pytestmark = pytest.mark.stack_variants(*STATE_STORES)``): the
  webhook API (concurrent duplicates: on PostgreSQL the losing INSERT ends in an IntegrityError,
  not behind SQLite's write gate), the request-time features against the pandas reference, and the
  SQL window store itself. The SQL state's statements are compiled for psycopg only there.
  Elsewhere a third server per module would add time (a server start is the dominant cost)
  without a code path of its own.
- ``sqlite-redis`` is not run: Redis beside an embedded SQLite file is no documented deployment,
  and each half is covered by the variants above.

A variant whose server is not listening is skipped, saying so; with ``CI=true`` it fails the run
instead (:func:`require_listening`), so a green CI run means every variant ran. Skips for data
absent beside a clean clone (``../shared/datasets``) stay skips.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pytest

from tests.support import port_open

PG_ADMIN_URL = os.environ.get("TESSERA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("TESSERA_TEST_REDIS", "redis://127.0.0.1:6379")
XDIST_WORKER_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
"""Which of ``pytest -n`` workers this process is (0 without xdist)."""
REDIS_TEST_DB = int(os.environ.get("TESSERA_TEST_REDIS_DB", "13")) - 2 * XDIST_WORKER_INDEX
"""The broker's Redis database; the fast state uses the one below it. Each xdist worker has its
own pair (13/12, 11/10, ...): one worker's FLUSHDB or Celery worker must not touch another's."""


@dataclass(frozen=True)
class Variant:
    """One (database, state store) pair a stack fixture builds; ``str()`` is its test id."""

    database: Literal["sqlite", "postgresql"]
    state_store: Literal["database", "redis"]
    fixture: str
    """The session fixture that builds this variant's :class:`Stack`."""

    def __str__(self) -> str:
        return f"{self.database}-{self.state_store}"


SQLITE = Variant("sqlite", "database", "sqlite_stack")
POSTGRESQL = Variant("postgresql", "database", "postgres_without_redis_stack")
POSTGRESQL_REDIS = Variant("postgresql", "redis", "postgres_stack")
DEPLOYMENTS = (SQLITE, POSTGRESQL_REDIS)
"""The default: the embedded deployment and the scaled-out one (each database, each state store once)."""
STATE_STORES = (SQLITE, POSTGRESQL, POSTGRESQL_REDIS)
"""Each state store on each database it is deployed with: for tests whose subject is the window state."""


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
            # servers of other verticals skip cs's speech models (decoder processes, ~10 s of CPU);
            # the cs stream tests turn them on
            "TESSERA_CS_STREAM_MODELS": "false",
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


def running_in_ci() -> bool:
    """True when ``CI`` says so (GitHub Actions, GitLab and most others set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_listening(server: str, url: str, default_port: int) -> None:
    """Skip the calling test, saying why, unless ``server`` accepts connections at ``url``'s address.

    Under CI the same message fails the test: a variant that did not run must not pass the gate.
    """
    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or default_port
    if port_open(host, port):
        return
    message = f"{server} is not listening on {host}:{port}: its test variants cannot run " \
              "(run `make services` to start it)"
    if running_in_ci():
        pytest.fail(f"{message}; CI=true: a skipped variant fails the run", pytrace=False)
    pytest.skip(message)


def variant_stack(request: pytest.FixtureRequest, variant: Variant) -> Stack:
    """The session's :class:`Stack` for ``variant`` (built on first use; skipped when its servers are absent)."""
    chosen: Stack = request.getfixturevalue(variant.fixture)
    return chosen


@pytest.fixture(scope="session")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """``sqlite-database``: the embedded default (a SQLite file holding the state too, the SQLite broker)."""
    return sqlite_stack_at(tmp_path_factory.mktemp("sqlite-stack"))


def sqlite_stack_at(data_dir: Path) -> Stack:
    """The embedded configuration with every file under ``data_dir``."""
    return Stack(
        name=str(SQLITE),
        database_url=f"sqlite:///{data_dir / 'tessera.db'}",
        broker_url=f"sqla+sqlite:///{data_dir / 'broker.db'}",
        result_backend=f"db+sqlite:///{data_dir / 'results.db'}",
        data_dir=data_dir,
    )


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for this run (dropped afterwards); yields its SQLAlchemy URL."""
    require_listening("PostgreSQL", PG_ADMIN_URL, 5432)
    import psycopg

    database = f"tessera_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{database}"
    finally:
        from shared.db import reset_engines

        reset_engines()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``postgresql-redis``: PostgreSQL, with Redis as the state store, broker and result backend."""
    require_listening("Redis", REDIS_TEST_URL, 6379)
    import redis

    with fresh_postgres_database() as database_url:
        redis.Redis.from_url(f"{REDIS_TEST_URL}/{REDIS_TEST_DB}").flushdb()
        yield Stack(
            name=str(POSTGRESQL_REDIS),
            database_url=database_url,
            broker_url=f"{REDIS_TEST_URL}/{REDIS_TEST_DB}",
            result_backend=f"{REDIS_TEST_URL}/{REDIS_TEST_DB}",
            redis_url=f"{REDIS_TEST_URL}/{REDIS_TEST_DB - 1}",
            data_dir=tmp_path_factory.mktemp("postgresql-redis-stack"),
        )


@pytest.fixture(scope="session")
def postgres_without_redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``postgresql-database``: PostgreSQL holding the state too (no Redis), the embedded broker."""
    with fresh_postgres_database() as database_url:
        embedded = sqlite_stack_at(tmp_path_factory.mktemp("postgresql-database-stack"))
        yield replace(embedded, name=str(POSTGRESQL), database_url=database_url)


@pytest.fixture(scope="module")
def stack_variant(request: pytest.FixtureRequest) -> Variant:
    """The variant this module's tests run on now; :func:`pytest_generate_tests` supplies each in turn."""
    variant: Variant = request.param
    return variant


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stack_variants(*variants): the Variants that tests using "
                            "stack_variant (stack, fraud_server) run on; DEPLOYMENTS when absent")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that depends on ``stack_variant`` once per variant its ``stack_variants`` mark names."""
    if "stack_variant" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("stack_variants")
    variants = marker.args if marker else DEPLOYMENTS
    metafunc.parametrize("stack_variant", variants, ids=str, indirect=True, scope="module")


@pytest.fixture
def stack(request: pytest.FixtureRequest, stack_variant: Variant, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """Each test using this runs once per variant, with this process pointed at it."""
    chosen = variant_stack(request, stack_variant)
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
    # `tessera up` in a test starts the DICOM listener too: on an ephemeral port, so two test runs (or a
    # developer's `make run`) never fight over 11112; tests that talk DICOM choose their own port
    monkeypatch.setenv("TESSERA_NODULE_DICOM_PORT", "0")
    # The fraud model in a child process of each API process (the product's default) costs each app and
    # server start a second interpreter (~3-5 s of CPU): the suite runs it in-process, the same scoring
    # code; tests/fraud/test_model_process.py, tests/model_runtime/test_process_model.py and the
    # `tessera up` signal tests run the child process itself.
    monkeypatch.setenv("TESSERA_FRAUD_MODEL_PROCESS", "false")
    for name in ("TESSERA_DATABASE_URL", "TESSERA_BROKER_URL", "TESSERA_RESULT_BACKEND", "TESSERA_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)  # a variant without Redis must not inherit the developer's
    get_settings.cache_clear()
    reset_engines()
    yield
    get_settings.cache_clear()
    reset_engines()
