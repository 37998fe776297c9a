"""The embedded default's SQLite engine: writers queue in-process, commits never checkpoint, pooled connections."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from shared import sqlite
from shared.config import get_settings
from shared.db import configured_url, make_engine, reset_engines, session_factory
from tests.support import wait_until


def _engine_with_table(path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (i INTEGER, pad BLOB)")
    return engine


def test_concurrent_writers_take_turns_instead_of_sleeping_in_sqlites_busy_handler(tmp_path: Path) -> None:
    """8 threads x 15 transactions, each holding the write lock 2 ms: every writer waits on the gate,
    none meets SQLite's lock.

    Before, a waiting writer slept in SQLite's busy handler (1, 2, 5 ... 100 ms between tries):
    the run took ~2x the time the lock was held and one writer waited 430 ms. With the busy handler
    off (``busy_timeout=0``), a writer that met SQLite's lock would fail at once with "database is
    locked"; so all 120 commits prove the lock was handed on by the gate, without timing anyone.
    """
    engine = _engine_with_table(tmp_path / "w.db")
    event.listen(engine, "connect", lambda dbapi_connection, _: dbapi_connection.execute("PRAGMA busy_timeout=0"))
    engine.dispose()  # every connection from here on is opened with the listener above
    hold_s, threads, each = 0.002, 8, 15
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(each):
                with engine.begin() as connection:
                    connection.exec_driver_sql("INSERT INTO t (i) VALUES (1)")
                    time.sleep(hold_s)  # holds the write lock while the others queue
        except BaseException as exc:  # noqa: BLE001 - reported below, with the thread's message
            failures.append(exc)

    workers = [threading.Thread(target=writer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == [], f"a writer met SQLite's lock instead of the gate: {failures[0]!r}"
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == threads * each


def test_a_failed_write_and_a_rollback_release_the_gate(tmp_path: Path) -> None:
    engine = _engine_with_table(tmp_path / "g.db")
    with engine.connect() as connection:
        with pytest.raises(Exception, match="no such table"):
            connection.exec_driver_sql("INSERT INTO missing VALUES (1)")
        connection.rollback()
        connection.exec_driver_sql("INSERT INTO t (i) VALUES (1)")
        connection.rollback()
    gate = sqlite.write_gate(str(tmp_path / "g.db"))
    assert gate is not None and gate.acquire()  # nobody holds it
    gate.release()


def _wal_and_db_sizes(path: Path) -> tuple[int, int]:
    wal = Path(f"{path}-wal")
    return (wal.stat().st_size if wal.exists() else 0), path.stat().st_size


def test_a_commit_never_checkpoints_and_the_background_checkpointer_bounds_the_wal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the commit that took the WAL past 1000 pages copied it into the database and fsynced
    both files (10-40 ms here) while the writers behind it waited."""
    monkeypatch.setattr(sqlite, "CHECKPOINT_INTERVAL_S", 3600.0)  # only the explicit runs below
    monkeypatch.setattr(sqlite, "RESTART_FRAMES", 2000)
    path = tmp_path / "c.db"
    engine = _engine_with_table(path)
    pad = os.urandom(3000)  # about one page a row
    for _ in range(30):
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t (i, pad) VALUES (?, ?)", [(i, pad) for i in range(100)])
    wal_bytes, db_bytes = _wal_and_db_sizes(path)
    assert wal_bytes > 2500 * 4096, "the rows should be in the WAL"
    assert db_bytes < 100 * 4096, "no commit may copy the WAL into the database"
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0

    checkpointer = sqlite.WalCheckpointer.__new__(sqlite.WalCheckpointer)  # its loop, run by hand
    checkpointer.path, checkpointer._gate = str(path), sqlite.write_gate(str(path))
    raw = sqlite3.connect(path, isolation_level=None)
    busy, frames, copied = checkpointer.run_once(raw) or (1, 0, 0)
    assert busy == 0 and frames == copied > 2500, "a RESTART checkpoint copies every frame"
    assert _wal_and_db_sizes(path)[1] > 2500 * 4096
    with engine.begin() as connection:  # the next writer starts the WAL over
        connection.exec_driver_sql("INSERT INTO t (i) VALUES (1)")
    assert sqlite.checkpoint(raw, "PASSIVE") == (0, 1, 1)
    raw.close()


def test_engines_run_one_checkpointer_thread_per_database_file(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    first, second = _engine_with_table(path), make_engine(f"sqlite:///{path}")
    with second.connect() as connection:
        connection.exec_driver_sql("SELECT 1")
    names = [t.name for t in threading.enumerate() if t.name == "sqlite-checkpoint:k.db"]
    assert len(names) == 1
    del first, second


def test_engines_freed_by_the_garbage_collector_never_deadlock_the_checkpointer_registry(tmp_path: Path) -> None:
    """Before, an engine's finalizer took the registry's lock, and the cyclic collector can run it
    inside ``ensure_checkpointer``'s critical section on the same thread: a wait forever (seen as a
    300 s test timeout). It also ran while the dying engine still counted as an owner, so no
    checkpointer thread ever stopped (this test's last step failed on that)."""
    threshold = gc.get_threshold()
    finished = threading.Event()

    def churn() -> None:
        for _ in range(40):
            engine = make_engine(f"sqlite:///{tmp_path / 'gc-churn.db'}")
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            del engine
        finished.set()

    gc.set_threshold(1)  # a collection at nearly every allocation, critical sections included
    try:
        threading.Thread(target=churn, daemon=True).start()
        assert finished.wait(timeout=120), "a thread creating engines deadlocked"
    finally:
        gc.set_threshold(*threshold)
    gc.collect()
    # A file name no other test uses: another test's engine on a "g.db", left in a cycle when an
    # in-process app's start-up ran gc.freeze(), is never collected and keeps its own thread.
    wait_until(lambda: not any(t.name == "sqlite-checkpoint:gc-churn.db" for t in threading.enumerate()), 30,
               "the checkpointer to retire at its next tick once its engines are gone")


def test_busy_threads_reuse_pooled_connections(tmp_path: Path) -> None:
    """Before, SQLAlchemy's default pool kept 5 connections and opened (schema read, pragmas) and
    closed one per use for every concurrent session past the fifth."""
    engine = _engine_with_table(tmp_path / "p.db")
    connects = []
    event.listen(engine, "connect", lambda *_: connects.append(1))
    all_in, all_out = threading.Barrier(12), threading.Barrier(12)

    def reader() -> None:
        for _ in range(20):
            with engine.connect() as connection:
                all_in.wait(timeout=10)  # 12 sessions at once
                connection.exec_driver_sql("SELECT count(*) FROM t").scalar()
            all_out.wait(timeout=10)  # every connection handed back before the next round

    workers = [threading.Thread(target=reader) for _ in range(12)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(connects) <= 12


def test_the_configured_url_is_computed_once_per_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolving the SQLite file's path (lstat of every component) cost every session of every request."""
    monkeypatch.setenv("TESSERA_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TESSERA_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    reset_engines()
    resolved: list[Path] = []
    real_resolve = Path.resolve

    def counting_resolve(self: Path, *args: bool) -> Path:
        resolved.append(self)
        return real_resolve(self, *args)

    monkeypatch.setattr(Path, "resolve", counting_resolve)
    try:
        for _ in range(5):
            session_factory()
        assert configured_url() == f"sqlite:///{real_resolve(tmp_path) / 'tessera.db'}"
        assert len(resolved) <= 1
    finally:
        get_settings.cache_clear()
        reset_engines()


def test_nul_in_text_or_json_is_refused_as_postgresql_refuses_it(tmp_path: Path) -> None:
    """PostgreSQL's text and jsonb cannot hold U+0000: SQLite is made to refuse it too, through Core, the ORM's
    executemany and the JSON serializer alike, while a backslash followed by the letters u0000 is stored."""
    from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, insert, select

    engine = make_engine(f"sqlite:///{tmp_path / 'nul.db'}")
    table = Table("docs", MetaData(), Column("id", Integer, primary_key=True), Column("name", String),
                  Column("doc", JSON))
    table.metadata.create_all(engine)
    refused: list[dict[str, Any]] = [{"name": "a\x00b"}, {"doc": {"k": "v\x00"}}, {"doc": {"key\x00": 1}},
                                     {"doc": ["\\\x00"]}]
    for values in refused:
        with pytest.raises(sqlite.NulCharacter, match=r"NUL \(0x00\)"), engine.begin() as connection:
            connection.execute(insert(table).values(**values))
    with pytest.raises(sqlite.NulCharacter), engine.begin() as connection:
        connection.execute(insert(table), [{"name": "fine"}, {"name": "not\x00fine"}])
    kept = [{"name": "back\\u0000slash", "doc": {"k": "\\u0000", "j": "\\\\\\u0000"}}]
    with engine.begin() as connection:
        connection.execute(insert(table), kept)
        rows = connection.execute(select(table.c.name, table.c.doc)).all()
    assert [(row.name, row.doc) for row in rows] == [(kept[0]["name"], kept[0]["doc"])]
    assert issubclass(sqlite.NulCharacter, ValueError)  # write-behind streams quarantine it
