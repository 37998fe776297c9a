"""The model-version registry on both databases: record, promote, one live version per tenant,
tenants kept apart; the watcher hot-swaps in an API-like process and in a real Celery worker; and
the migration that moved fraud's versions into it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError

from model_runtime.artifacts import ArtifactError, save_artifact
from model_runtime.runtime import ModelRuntime
from model_runtime.versions import (
    CANDIDATE,
    LIVE,
    REJECTED,
    RETIRED,
    SHARED,
    LiveModels,
    ModelVersion,
    VersionNotFound,
    live_artifact_dir,
    live_version,
    promote,
    record_version,
    recorded_versions,
    retire_live,
    tenant_runtime_name,
)
from services.cli import _alembic_config
from shared.config import get_settings
from shared.db import get_engine, session_scope
from shared.jobs import FAILED, SUCCEEDED, Job, submit_job
from tests.conftest import Stack
from tests.model_runtime.versioned_echo import (
    DEFAULT_ARTIFACT_ENV,
    ECHO_MODEL,
    echo_answer,
    echo_artifact,
    echo_spec,
)
from tests.support import ManagedProcess, python_argv, wait_until


def new_tenant() -> str:
    return f"bank-{uuid.uuid4().hex[:8]}"


def new_version(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def recorded(artifacts: Path, tenant_id: str, label: str, *, promoted: bool = False, model: str = ECHO_MODEL) -> str:
    """Record (and optionally promote) a fresh echo artifact in ``tenant_id``'s scope; its version."""
    version = new_version(label)
    directory = echo_artifact(artifacts, version)
    with session_scope() as session:
        record_version(session, model, version, directory, tenant_id=tenant_id, metrics={"ap": 0.5})
        if promoted:
            promote(session, model, version)
    return version


def statuses(model: str, tenant_id: str) -> dict[str, str]:
    with session_scope() as session:
        return {row.version: row.status for row in recorded_versions(session, model, tenant_id)}


# --------------------------------------------------------------------------- the registry

def test_a_recorded_version_keeps_its_digest_card_and_metrics(migrated_stack: Stack, tmp_path: Path) -> None:
    tenant_id, version = new_tenant(), new_version("v")
    directory = echo_artifact(tmp_path, version)
    with session_scope() as session:
        row = record_version(session, ECHO_MODEL, version, directory, tenant_id=tenant_id)
        assert (row.status, row.tenant_id, row.metrics) == (CANDIDATE, tenant_id, {"accuracy": 1.0})
        assert row.sha256 is not None and len(row.sha256) == 64
        assert "rebuild" in row.card.lower() and row.artifact_dir == str(directory.resolve())
        assert live_version(session, ECHO_MODEL, tenant_id) is None, "recorded is not live"


def test_promotion_keeps_one_live_version_per_tenant_and_rolls_back(migrated_stack: Stack, tmp_path: Path) -> None:
    tenant_id = new_tenant()
    first = recorded(tmp_path, tenant_id, "first", promoted=True)
    second = recorded(tmp_path, tenant_id, "second", promoted=True)
    assert statuses(ECHO_MODEL, tenant_id) == {second: LIVE, first: RETIRED}
    with session_scope() as session:
        assert [row.version for row in recorded_versions(session, ECHO_MODEL, tenant_id)] == [second, first]
        assert live_artifact_dir(session, ECHO_MODEL, tenant_id) == (tmp_path / second).resolve()
        promote(session, ECHO_MODEL, first)  # a rollback
    assert statuses(ECHO_MODEL, tenant_id) == {first: LIVE, second: RETIRED}
    with session_scope() as session:
        assert retire_live(session, ECHO_MODEL, tenant_id) == first
        assert live_artifact_dir(session, ECHO_MODEL, tenant_id) is None
        assert retire_live(session, ECHO_MODEL, tenant_id) is None


def test_tenants_and_model_families_are_scoped_apart(migrated_stack: Stack, tmp_path: Path) -> None:
    bank_a, bank_b = new_tenant(), new_tenant()
    own = recorded(tmp_path, bank_a, "a", promoted=True)
    other_family = recorded(tmp_path, bank_a, "other", promoted=True, model="echo-2")
    rejected = new_version("rejected")
    with session_scope() as session:
        record_version(session, ECHO_MODEL, rejected, echo_artifact(tmp_path, rejected), tenant_id=bank_b,
                       status=REJECTED)
        assert live_artifact_dir(session, ECHO_MODEL, bank_b) is None
    assert statuses(ECHO_MODEL, bank_a) == {own: LIVE}, "another family's live version retires nothing here"
    assert statuses("echo-2", bank_a) == {other_family: LIVE}
    assert statuses(ECHO_MODEL, bank_b) == {rejected: REJECTED}


def test_a_tenant_without_its_own_version_gets_the_shared_one(migrated_stack: Stack, tmp_path: Path) -> None:
    model = f"echo-shared-{uuid.uuid4().hex[:6]}"
    tenant_id = new_tenant()
    shared = recorded(tmp_path, SHARED, "shared", promoted=True, model=model)
    with session_scope() as session:
        assert live_artifact_dir(session, model, tenant_id) == (tmp_path / shared).resolve()
    own = recorded(tmp_path, tenant_id, "own", promoted=True, model=model)
    with session_scope() as session:
        assert live_artifact_dir(session, model, tenant_id) == (tmp_path / own).resolve()
        assert live_artifact_dir(session, model, new_tenant()) == (tmp_path / shared).resolve()
    assert statuses(model, SHARED) == {shared: LIVE}, "a tenant's promotion leaves the shared scope alone"


def test_the_database_refuses_a_second_live_version_in_a_scope(migrated_stack: Stack, tmp_path: Path) -> None:
    tenant_id = new_tenant()
    recorded(tmp_path, tenant_id, "live", promoted=True)
    racing = recorded(tmp_path, tenant_id, "racing")
    with pytest.raises(IntegrityError), session_scope() as session:  # a promotion that skipped retiring
        session.execute(update(ModelVersion).where(ModelVersion.model == ECHO_MODEL, ModelVersion.version == racing)
                        .values(status=LIVE))


def test_only_a_sealed_artifact_of_that_version_is_recorded(migrated_stack: Stack, tmp_path: Path) -> None:
    version = new_version("v")
    directory = echo_artifact(tmp_path, version)
    with session_scope() as session:
        with pytest.raises(ArtifactError, match="holds version"):
            record_version(session, ECHO_MODEL, "another-label", directory)
        (directory / "word.txt").write_text("tampered")
        with pytest.raises(ArtifactError, match="sha256"):
            record_version(session, ECHO_MODEL, version, directory)
        with pytest.raises(ValueError, match="candidate or rejected"):
            record_version(session, ECHO_MODEL, version, directory, status=LIVE)
        with pytest.raises(VersionNotFound):
            promote(session, ECHO_MODEL, "never-recorded")


# --------------------------------------------------------------------------- serving in one process

@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_MODEL_RELOAD_POLL_S", "0.05")
    get_settings.cache_clear()


def served_word(watcher: LiveModels, runtime: ModelRuntime, tenant_id: str) -> str:
    return str(runtime.predict_many_sync(watcher.name_for(tenant_id), ["probe"])[0])


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Let the watcher's task run until ``condition`` holds (fails naming ``what``)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_a_watching_process_swaps_promoted_versions_in(migrated_stack: Stack, fast_polls: None, tmp_path: Path,
                                                       runtime: ModelRuntime) -> None:
    bank_a, bank_b = new_tenant(), new_tenant()
    default = echo_artifact(tmp_path, "default")
    watcher = LiveModels(ECHO_MODEL, echo_spec, lambda: default, unload_grace_s=0.0, runtime=runtime)

    async def scenario() -> None:
        await watcher.refresh()
        assert served_word(watcher, runtime, bank_a) == "default"
        watching = asyncio.create_task(watcher.watch())
        try:
            first = recorded(tmp_path, bank_a, "first", promoted=True)
            await until(lambda: served_word(watcher, runtime, bank_a) == first, "bank A's first version")
            assert served_word(watcher, runtime, bank_b) == "default", "bank B keeps the default"
            second = recorded(tmp_path, bank_a, "second", promoted=True)
            await until(lambda: served_word(watcher, runtime, bank_a) == second, "the hot swap to bank A's second")
            with session_scope() as session:
                retire_live(session, ECHO_MODEL, bank_a)
            await until(lambda: tenant_runtime_name(ECHO_MODEL, bank_a) not in runtime.loaded(),
                        "bank A's model unloaded")
            assert served_word(watcher, runtime, bank_a) == "default"
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await watcher.unload_all()

    asyncio.run(scenario())
    assert runtime.loaded() == {}


def test_an_artifact_that_is_not_the_one_recorded_is_not_served(
        migrated_stack: Stack, tmp_path: Path, runtime: ModelRuntime, caplog: pytest.LogCaptureFixture) -> None:
    tenant_id = new_tenant()
    version = recorded(tmp_path, tenant_id, "swapped-on-disk", promoted=True)
    replaced = tmp_path / version
    shutil.rmtree(replaced)  # another artifact under the same path and label: sealed, but not what was evaluated
    replaced.mkdir()
    (replaced / "word.txt").write_text("unevaluated")
    save_artifact(replaced, name=ECHO_MODEL, version=version, framework="text")
    default = echo_artifact(tmp_path, "default")
    watcher = LiveModels(ECHO_MODEL, echo_spec, lambda: default, runtime=runtime)
    with caplog.at_level(logging.ERROR, logger="tessera.model_runtime.versions"):
        asyncio.run(watcher.refresh())
        asyncio.run(watcher.refresh())
    assert served_word(watcher, runtime, tenant_id) == "default"
    reports = [r.getMessage() for r in caplog.records if version in r.getMessage()]
    assert len(reports) == 1, "reported once, not every poll"
    assert "is not the one recorded (sha256 differs)" in reports[0]


def test_a_worker_process_follows_promotions_at_task_start(migrated_stack: Stack, tmp_path: Path,
                                                           runtime: ModelRuntime) -> None:
    """The in-process half of the worker hook: served tenants are re-read once a poll interval passed."""
    tenant_id = new_tenant()
    first = recorded(tmp_path, tenant_id, "first", promoted=True)
    default = echo_artifact(tmp_path, "default")
    worker = LiveModels(ECHO_MODEL, echo_spec, lambda: default, runtime=runtime)
    assert worker.model_for_sync(tenant_id) == tenant_runtime_name(ECHO_MODEL, tenant_id)
    assert served_word(worker, runtime, tenant_id) == first
    second = recorded(tmp_path, tenant_id, "second", promoted=True)
    assert served_word(worker, runtime, tenant_id) == first, "no database read between task starts"
    worker.refresh_sync()
    assert served_word(worker, runtime, tenant_id) == second
    with session_scope() as session:
        retire_live(session, ECHO_MODEL, tenant_id)
    assert worker.serve_sync(tenant_id) == ECHO_MODEL, "serve_sync reads the registry now"
    assert tenant_runtime_name(ECHO_MODEL, tenant_id) not in runtime.loaded()


# --------------------------------------------------------------------------- a real Celery worker

@pytest.fixture
def echo_worker(migrated_stack: Stack, tmp_path: Path) -> Iterator[ManagedProcess]:
    """A prefork worker (one pool process) that serves the echo family, default artifact included."""
    default = echo_artifact(tmp_path / "worker", "default")
    argv = python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "default",
                       "--concurrency", "1", "--pool", "prefork", "--without-gossip", "--without-mingle",
                       "--include", "tests.model_runtime.versioned_echo", "--loglevel", "INFO",
                       "--hostname", f"echo-{uuid.uuid4().hex[:6]}@%h")
    worker = ManagedProcess(argv, {**migrated_stack.env, DEFAULT_ARTIFACT_ENV: str(default)}, "echo-worker")
    worker.wait_for_output(r"ready\.", timeout_s=60)
    yield worker
    worker.stop()


def ask(worker: ManagedProcess, tenant_id: str) -> dict[str, Any]:
    """Run the scoring task on ``worker`` and wait for its answer."""
    with session_scope() as session:
        job_id = submit_job(session, echo_answer, key=f"echo-{uuid.uuid4().hex}", payload={"tenant_id": tenant_id},
                            tenant_id=tenant_id).id

    def finished() -> Job | None:
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
        return job if job.status in (SUCCEEDED, FAILED) else None

    wait_until(lambda: finished() is not None, 60, f"the worker to answer\n{worker.output[-3000:]}", interval_s=0.1)
    job = finished()
    assert job is not None and job.status == SUCCEEDED and job.result is not None, job.error if job else None
    return job.result


def test_a_running_celery_worker_swaps_in_a_promoted_version(
        migrated_stack: Stack, echo_worker: ManagedProcess, tmp_path: Path) -> None:
    tenant_id, other = new_tenant(), new_tenant()
    first = recorded(tmp_path, tenant_id, "first", promoted=True)
    before = ask(echo_worker, tenant_id)
    assert before["word"] == first
    assert ask(echo_worker, other)["word"] == "default"

    second = recorded(tmp_path, tenant_id, "second", promoted=True)
    wait_until(lambda: ask(echo_worker, tenant_id)["word"] == second, 30,
               f"the worker to serve {second}\n{echo_worker.output[-3000:]}", interval_s=0.3)
    assert ask(echo_worker, tenant_id)["pid"] == before["pid"], "the same pool process, never restarted"
    assert ask(echo_worker, other)["word"] == "default"

    with session_scope() as session:
        retire_live(session, ECHO_MODEL, tenant_id)
    wait_until(lambda: ask(echo_worker, tenant_id)["word"] == "default", 30, "the worker to fall back to the default",
               interval_s=0.3)
    assert "reload failed" not in echo_worker.output and "Traceback" not in echo_worker.output


# --------------------------------------------------------------------------- the migration

FRAUD_ROW = ("INSERT INTO fraud_model_versions (version, tenant_id, status, artifact_dir, metrics, created_at, "
             "promoted_at) VALUES (:version, :tenant, :status, '/models/x', '{\"candidate\": {\"ap\": 0.9}}', "
             ":now, :promoted)")


def test_fraud_versions_move_into_the_registry_and_back(stack: Stack) -> None:
    config = _alembic_config()
    command.upgrade(config, "head")
    command.downgrade(config, "0003_tenant_scope")
    tenant_id, now = new_tenant(), datetime.now(UTC)
    live, rejected = new_version("live"), new_version("rejected")
    with get_engine().begin() as connection:
        connection.execute(text(FRAUD_ROW), {"version": live, "tenant": tenant_id, "status": "live",
                                             "now": now, "promoted": now})
        connection.execute(text(FRAUD_ROW), {"version": rejected, "tenant": tenant_id, "status": "rejected",
                                             "now": now, "promoted": None})
    command.upgrade(config, "head")
    with session_scope() as session:
        moved = {row.version: row for row in recorded_versions(session, "fraud", tenant_id)}
        assert {v: (r.status, r.metrics, r.sha256, r.card) for v, r in moved.items()} == {
            live: (LIVE, {"candidate": {"ap": 0.9}}, None, ""),
            rejected: (REJECTED, {"candidate": {"ap": 0.9}}, None, "")}
        assert moved[live].promoted_at is not None and moved[rejected].promoted_at is None
        assert live_artifact_dir(session, "fraud", tenant_id) == Path("/models/x")
    command.downgrade(config, "0003_tenant_scope")
    with get_engine().connect() as connection:
        back = connection.execute(text("SELECT version, status FROM fraud_model_versions WHERE tenant_id = :t"),
                                  {"t": tenant_id}).all()
    assert sorted(tuple(row) for row in back) == sorted([(live, "live"), (rejected, "rejected")])
    with get_engine().begin() as connection:  # leave no live version pointing nowhere to later tests
        connection.execute(text("DELETE FROM fraud_model_versions WHERE tenant_id = :t"), {"t": tenant_id})
    command.upgrade(config, "head")
