"""Durable jobs through a real Celery worker process, on SQLite + embedded broker and PostgreSQL + Redis."""

from __future__ import annotations

import logging
import re
import signal
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from services.cli import db_upgrade
from shared import jobs
from shared.db import after_commit, get_engine, session_factory, session_scope, utcnow
from shared.errors import NotFound
from shared.jobs import FAILED, SUCCEEDED, Job, get_job, submit_job, sweep_stalled_jobs
from shared.queue import SWEEP_TASK
from tests.conftest import Stack, apply_stack_in_process, sqlite_stack_at
from tests.shared.job_tasks import EFFECTS_DDL, fail_with_private_text, fail_with_public_text, record_effect
from tests.support import ManagedProcess, python_argv, wait_until


def start_worker(stack: Stack, name: str, loglevel: str = "INFO") -> ManagedProcess:
    argv = python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "default",
                       "--concurrency", "1", "--include", "tests.shared.job_tasks", "-B",
                       "--schedule", str(stack.data_dir / f"beat-{name}"), "--hostname", f"{name}@%h",
                       "--without-gossip", "--without-mingle", "--loglevel", loglevel)
    worker = ManagedProcess(argv, stack.env, name)
    worker.wait_for_output(r"ready\.", timeout_s=60)
    return worker


@pytest.fixture
def effects_table(migrated_stack: Stack) -> Stack:
    with session_scope() as session:
        session.execute(text(EFFECTS_DDL))
    return migrated_stack


@pytest.fixture
def worker(effects_table: Stack) -> Iterator[ManagedProcess]:
    process = start_worker(effects_table, f"w-{uuid.uuid4().hex[:6]}")
    yield process
    process.stop()


@pytest.fixture
def quiet_worker(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagedProcess]:
    """A worker whose database holds no other test's jobs. On SQLite a test's open transaction holds
    the one write lock, and a sweep re-sending another test's stale job would wait on it (the busy
    timeout, 30 s) in the worker's only process, ahead of everything queued after it."""
    if stack.database_url.startswith("sqlite"):
        stack = sqlite_stack_at(tmp_path)
        apply_stack_in_process(stack, monkeypatch)
    db_upgrade()
    with session_scope() as session:
        session.execute(text(EFFECTS_DDL))
    process = start_worker(stack, f"quiet-{uuid.uuid4().hex[:6]}")
    yield process
    process.stop()


def submit(key: str, **payload: object) -> str:
    with session_scope() as session:
        return submit_in(session, key, **payload)


def submit_in(session: Session, key: str, **payload: object) -> str:
    return submit_job(session, record_effect, key=key, payload=dict(payload), tenant_id=None).id


def job_state(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def effect_count(key: str) -> int:
    with session_scope() as session:
        return int(session.execute(text("SELECT count(*) FROM test_job_effects WHERE job_key = :k"),
                                   {"k": key}).scalar_one())


def wait_status(job_id: str, status: str, timeout_s: float = 60) -> Job:
    wait_until(lambda: job_state(job_id).status == status, timeout_s, f"job {job_id} to be {status}")
    return job_state(job_id)


def wait_succeeded(job_id: str, timeout_s: float = 60) -> Job:
    return wait_status(job_id, SUCCEEDED, timeout_s)


def test_job_runs_once_and_resubmission_is_idempotent(worker: ManagedProcess) -> None:
    key = f"once-{uuid.uuid4().hex}"
    job_id = submit(key)
    assert submit(key) == job_id
    done = wait_succeeded(job_id)
    assert done.result and done.result["attempt"] == 1
    assert effect_count(key) == 1


def test_transient_failure_is_retried_with_backoff(worker: ManagedProcess) -> None:
    key = f"retry-{uuid.uuid4().hex}"
    job_id = submit(key, fail_times=1)
    done = wait_succeeded(job_id)
    assert done.attempts == 2
    assert effect_count(key) == 1


@pytest.mark.parametrize("what_dies", ["pool process", "whole worker"])
def test_worker_killed_mid_task_redelivers_and_applies_once(effects_table: Stack, tmp_path: Path,
                                                            what_dies: str) -> None:
    key = f"crash-{uuid.uuid4().hex}"
    gate, started = tmp_path / "gate", tmp_path / "started"
    first = start_worker(effects_table, f"first-{uuid.uuid4().hex[:6]}")
    second: ManagedProcess | None = None
    try:
        job_id = submit(key, block_until_exists=str(gate), started_marker=str(started))
        wait_until(started.exists, 60, "the task to start on the first worker")
        child_pid = int(started.read_text())
        started.unlink()
        if what_dies == "pool process":
            import os

            os.kill(child_pid, signal.SIGKILL)  # Celery requeues: task_reject_on_worker_lost
        else:
            first.kill_group(signal.SIGKILL)  # nothing of the first worker survives
            second = start_worker(effects_table, f"second-{uuid.uuid4().hex[:6]}")
        wait_until(started.exists, 90, "the task to be delivered again")
        assert job_state(job_id).attempts == 2
        gate.write_text("go")
        done = wait_succeeded(job_id)
        assert effect_count(key) == 1, "the effect must be applied exactly once"
        assert done.result and done.result["pid"] != child_pid
    finally:
        gate.write_text("go")
        first.stop()
        if second:
            second.stop()


# --- publishing after the outer commit only --------------------------------------------------------

def test_after_commit_waits_for_the_outer_commit_and_honours_savepoints(stack: Stack) -> None:
    ran: list[str] = []
    with session_scope() as session:
        session.execute(text("SELECT 1"))
        after_commit(session, lambda: ran.append("outer"))
        with session.begin_nested():
            after_commit(session, lambda: ran.append("released savepoint"))
        assert ran == [], "releasing a savepoint is not the commit"
        with pytest.raises(ZeroDivisionError), session.begin_nested():
            after_commit(session, lambda: ran.append("rolled-back savepoint"))
            raise ZeroDivisionError
        assert ran == []
    assert ran == ["outer", "released savepoint"]

    abandoned = session_factory()()
    abandoned.execute(text("SELECT 1"))
    after_commit(abandoned, lambda: ran.append("closed without commit"))
    abandoned.close()
    abandoned.execute(text("SELECT 1"))
    abandoned.commit()
    abandoned.close()
    assert ran == ["outer", "released savepoint"]


@pytest.fixture
def publishes(migrated_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Each job message published here: (job id, was its row visible to another connection then)."""
    seen: list[tuple[str, bool]] = []

    def record(task_name: str, queue: str, job_id: str, countdown: float | None = None) -> None:
        with get_engine().connect() as other_connection:
            committed = other_connection.execute(select(Job.id).where(Job.id == job_id)).first() is not None
        seen.append((job_id, committed))

    monkeypatch.setattr(jobs, "enqueue", record)
    return seen


def test_no_message_is_published_for_an_uncommitted_row(publishes: list[tuple[str, bool]]) -> None:
    with session_scope() as session:
        first = submit_in(session, f"first-{uuid.uuid4().hex}")
        second = submit_in(session, f"second-{uuid.uuid4().hex}")
        third = submit_in(session, f"third-{uuid.uuid4().hex}")
        assert publishes == [], "nothing is published before the transaction commits"
    assert sorted(publishes) == sorted([(first, True), (second, True), (third, True)])

    publishes.clear()
    rolled_back: list[str] = []
    with pytest.raises(RuntimeError), session_scope() as session:
        rolled_back.append(submit_in(session, f"rolled-back-{uuid.uuid4().hex}"))
        rolled_back.append(submit_in(session, f"rolled-back-{uuid.uuid4().hex}"))
        raise RuntimeError("the caller's transaction fails")
    assert publishes == [], "a rolled-back job is never published"
    with session_scope() as session:
        assert session.scalars(select(Job.id).where(Job.id.in_(rolled_back))).all() == [], \
            "a rolled-back job leaves no row (that the sweeper would run later)"


def test_jobs_of_one_transaction_run_promptly_on_a_real_worker(quiet_worker: ManagedProcess) -> None:
    """Before the fix the first job's message left when the second's savepoint was released: the
    worker found no row ("skipped: missing") and the job waited ~30 s for the sweeper."""
    worker = quiet_worker
    keys = [f"batch-{index}-{uuid.uuid4().hex}" for index in range(3)]
    probe = f"probe-{uuid.uuid4().hex}"  # no such job: the worker logs it as missing
    with session_scope() as session:
        job_ids = [submit_in(session, key) for key in keys]
        jobs.enqueue(record_effect.name, "default", probe)  # behind any message published too early
        worker.wait_for_output(rf"job {probe} skipped: missing", timeout_s=30)
    for job_id in job_ids:
        wait_succeeded(job_id, timeout_s=15)
    assert [line for line in worker.lines if "skipped: missing" in line and probe not in line] == []
    assert all(effect_count(key) == 1 for key in keys)


# --- tenant scope ----------------------------------------------------------------------------------

def test_a_job_is_visible_to_its_tenant_only(migrated_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "enqueue", lambda *args, **kwargs: None)
    with session_scope() as session:
        job_id = submit_job(session, record_effect, key=f"tenant-{uuid.uuid4().hex}", payload={},
                            tenant_id="bank-a").id
    with session_scope() as session:
        assert get_job(session, job_id, tenant_id="bank-a").tenant_id == "bank-a"
        with pytest.raises(NotFound):
            get_job(session, job_id, tenant_id="bank-b")
        with pytest.raises(NotFound):
            get_job(session, job_id, tenant_id=None)


# --- failures: a failed task, and no private text in the job's error --------------------------------

def submit_task(task: object, **payload: object) -> str:
    with session_scope() as session:
        return submit_job(session, task, key=f"fail-{uuid.uuid4().hex}", payload=dict(payload),  # type: ignore[arg-type]
                          tenant_id=None).id


def task_lines(worker: ManagedProcess, job_task_name: str, what: str) -> list[str]:
    return [line for line in worker.lines if f"Task {job_task_name}[" in line and what in line]


def test_a_failed_job_is_a_failed_task_without_private_text(worker: ManagedProcess) -> None:
    job_id = submit_task(fail_with_private_text, customer_id="c-42")
    failed = wait_status(job_id, FAILED, timeout_s=30)
    assert failed.error == f"internal error (ValueError); see the worker log for job {job_id}"
    wait_until(lambda: bool(task_lines(worker, fail_with_private_text.name, "raised expected: JobFailed")), 15,
               f"the worker to log the task as failed:\n{worker.output[-3000:]}")
    assert not task_lines(worker, fail_with_private_text.name, "succeeded")
    assert "c-42" in worker.output, "the worker log keeps the traceback for operators"
    wait_succeeded(submit(f"after-{uuid.uuid4().hex}"))  # the worker took what was queued after the failure
    assert len(task_lines(worker, fail_with_private_text.name, "received")) == 1, "acked: not delivered again"
    assert job_state(job_id).attempts == 1


def test_a_public_job_error_keeps_its_message(worker: ManagedProcess) -> None:
    job_id = submit_task(fail_with_public_text, needed=50)
    failed = wait_status(job_id, FAILED, timeout_s=30)
    assert failed.error == "PublicJobError: needs at least 50 labels"


# --- a quiet idle system ---------------------------------------------------------------------------

def test_an_idle_worker_with_beat_is_quiet_at_info(effects_table: Stack) -> None:
    """The worker logs at DEBUG to see beat's sweeps happen; each line about them must be at DEBUG."""
    worker = start_worker(effects_table, f"idle-{uuid.uuid4().hex[:6]}", loglevel="DEBUG")
    try:
        swept = re.compile(rf"Task {re.escape(SWEEP_TASK)}\[.*\] succeeded")
        wait_until(lambda: len([line for line in worker.lines if swept.search(line)]) >= 3, 60,
                   "three sweeps (the test stack sweeps every second)")
    finally:
        worker.stop()
    records = [line for line in worker.lines if line.startswith("[")]  # records, not the banner
    noisy = [line for line in records if "sweep" in line.lower() and not re.match(r"\[[^\]]*: DEBUG/", line)]
    assert noisy == [], "\n".join(noisy)


def test_the_sweeper_logs_only_what_it_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # A database of its own: the session's shared stacks hold other tests' unfinished jobs.
    apply_stack_in_process(sqlite_stack_at(tmp_path), monkeypatch)
    db_upgrade()
    republished: list[str] = []
    monkeypatch.setattr(jobs, "enqueue", lambda task_name, queue, job_id, countdown=None: republished.append(job_id))
    caplog.set_level(logging.DEBUG, logger="tessera.jobs")
    caplog.clear()  # the migration's own INFO lines are not the sweeper's
    sweep_stalled_jobs()
    assert [record for record in caplog.records if record.levelno >= logging.INFO] == []
    assert any("nothing stalled" in record.getMessage() for record in caplog.records)

    caplog.clear()
    job_id = submit(f"stalled-{uuid.uuid4().hex}")
    with session_scope() as session:  # its message was lost long ago
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - timedelta(minutes=5)))
    republished.clear()
    assert sweep_stalled_jobs() == 1
    assert republished == [job_id]
    assert [record.levelname for record in caplog.records] == ["WARNING"]
