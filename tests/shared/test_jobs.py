"""Durable jobs through a real Celery worker process, on SQLite + embedded broker and PostgreSQL + Redis."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.db import session_scope
from shared.jobs import SUCCEEDED, Job, submit_job
from tests.conftest import Stack
from tests.shared.job_tasks import EFFECTS_DDL, record_effect
from tests.support import ManagedProcess, python_argv, wait_until


def start_worker(stack: Stack, name: str) -> ManagedProcess:
    argv = python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "default",
                       "--concurrency", "1", "--include", "tests.shared.job_tasks", "-B",
                       "--schedule", str(stack.data_dir / f"beat-{name}"), "--hostname", f"{name}@%h",
                       "--without-gossip", "--without-mingle", "--loglevel", "INFO")
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


def submit(key: str, **payload: object) -> str:
    with session_scope() as session:
        job = submit_job(session, record_effect, key=key, payload=dict(payload))
        return job.id


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


def wait_succeeded(job_id: str, timeout_s: float = 60) -> Job:
    wait_until(lambda: job_state(job_id).status == SUCCEEDED, timeout_s, f"job {job_id} to succeed")
    return job_state(job_id)


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
