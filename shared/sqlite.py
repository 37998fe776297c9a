"""SQLite for the embedded default: WAL, writers queued in-process, checkpoints off the request path.

Every connection :func:`shared.db.make_engine` opens to a SQLite file gets WAL,
``synchronous=NORMAL``, a 30 s busy timeout and foreign keys, plus what was measured to matter
under concurrent requests (issue 14; ``bench/fraud_sqlite_wrk.py`` drives the webhook with wrk):

- **Writers queue on a lock instead of SQLite's busy handler.** SQLite lets one connection write
  at a time; the others get SQLITE_BUSY and its busy handler *sleeps* 1, 2, 5, 10, 15, 20, 25 …
  100 ms between retries, waking long after the lock was freed (8 threads taking turns: one
  waited 430 ms, the run took twice the time the lock was held). A :class:`WriteGate` per
  database file and process, taken at a connection's first write statement (where SQLite takes
  its own write lock) and released when its transaction ends, hands the lock straight to the
  next writer (longest wait 32 ms, the run as long as the lock was held). Writers in other
  processes (the Celery worker) still meet SQLite's busy handler; they write rarely.
- **No commit checkpoints.** With ``wal_autocheckpoint`` (1000 pages) the commit that took the
  WAL past it copied the WAL into the database and fsynced both files before returning (an
  fsync costs 3-16 ms on this box's disk; every ~0.7 s at 400 decisions/s), while the writers
  behind it waited. Commits now only append to the WAL, and a :class:`WalCheckpointer` thread
  per database file and process copies it in the background (see its docstring for how the
  WAL is kept from growing).

- **NUL refused as PostgreSQL refuses it.** PostgreSQL's ``text`` and ``jsonb`` cannot hold U+0000;
  SQLite's can. So that a request holding one gets the same answer on both (a 422, see
  :func:`shared.errors.holds_nul_text`), a statement binding a string with a NUL, or a JSON document
  holding one, raises :class:`NulCharacter` here (:func:`refuse_nul_parameters`, :func:`json_without_nul`).
  The driver's own cursor, which bulk paths use directly, is not checked: they clean their text first.

Durability is unchanged: a transaction is committed (in the WAL) before ``commit()`` returns; with
``synchronous=NORMAL`` in WAL mode a committed transaction survives a crash of the process, and
the last ones before a power loss or OS crash may roll back (the WAL is fsynced at checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DataError, DontWrapMixin

logger = logging.getLogger("tessera.db.sqlite")

BUSY_TIMEOUT_S = 30.0
POOL_SIZE = 16
"""Connections kept open: SQLAlchemy's default of 5 (+10 opened and closed per use) made a
backlogged API open a connection (schema parse, pragmas) for every request past the fifth."""
POOL_OVERFLOW = 48
CHECKPOINT_INTERVAL_S = 1.0
"""Each checkpoint fsyncs twice (3-16 ms each here); at 400/s every 1 s gave a lower webhook p99
than every 0.1 s in two alternating pairs (15.7 / 22.6 against 20.8 / 52.4 ms)."""
RESTART_FRAMES = 8192
"""WAL size (frames of 4 KiB pages, 32 MiB) past which the checkpointer makes it start over."""
RESTART_WAIT_S = 0.1
"""How long a RESTART checkpoint waits for readers on old frames before trying again later."""

_WRITE_VERBS = ("INSERT", "UPDATE", "DELETE", "REPLACE")
"""The statements before which Python's sqlite3 opens a transaction (and SQLite takes its write lock)."""


class WriteGate:
    """One process's queue for the write lock of one database file.

    A connection holds it from its first write statement until its transaction ends. A thread
    that already holds it through another connection does not wait on itself: its second
    connection meets SQLite's busy handler, as it would without the gate.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def acquire(self) -> bool:
        """Wait for the gate (at most the busy timeout); False when not taken."""
        if self._owner == threading.get_ident():
            return False
        if not self._lock.acquire(timeout=BUSY_TIMEOUT_S):
            return False  # SQLite's busy timeout decides from here
        self._owner = threading.get_ident()
        return True

    def release(self) -> None:
        """Let the next writer in."""
        self._owner = None
        self._lock.release()


_gates: dict[str, WriteGate] = {}
_gates_lock = threading.Lock()


def write_gate(database: str) -> WriteGate | None:
    """The process's gate for a database file (None for in-memory databases: nothing is shared)."""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    path = os.path.realpath(database)
    with _gates_lock:
        return _gates.setdefault(path, WriteGate())


def _is_write(sql: str) -> bool:
    return sql.lstrip()[:7].upper().startswith(_WRITE_VERBS)


class GatedConnection(sqlite3.Connection):
    """A sqlite3 connection that passes its database file's :class:`WriteGate` before writing."""

    def __init__(self, database: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self._gate = write_gate(str(database))
        self._holds_gate = False

    def cursor(self, factory: Any = None) -> Any:  # type: ignore[override]
        """A :class:`GatedCursor` unless another factory is asked for."""
        return super().cursor(factory or GatedCursor)

    def before_statement(self, sql: str) -> None:
        """Take the gate before the first write of a transaction."""
        if self._gate is not None and not self._holds_gate and _is_write(sql):
            self._holds_gate = self._gate.acquire()

    def after_statement(self) -> None:
        """Release the gate when no transaction is left open (e.g. a failed first write)."""
        if self._holds_gate and not self.in_transaction:
            self._release_gate()

    def commit(self) -> None:
        """Commit, then let the next writer in."""
        try:
            super().commit()
        finally:
            self.after_statement()

    def rollback(self) -> None:
        """Roll back, then let the next writer in."""
        try:
            super().rollback()
        finally:
            self.after_statement()

    def close(self) -> None:
        """Close (ending any transaction) and release the gate."""
        try:
            super().close()
        finally:
            if self._holds_gate:
                self._release_gate()

    def _release_gate(self) -> None:
        self._holds_gate = False
        if self._gate is not None:
            self._gate.release()


class GatedCursor(sqlite3.Cursor):
    """Cursor of a :class:`GatedConnection`: write statements pass the gate first."""

    connection: GatedConnection

    def execute(self, sql: str, parameters: Any = (), /) -> GatedCursor:  # type: ignore[override]
        """Execute ``sql`` (after the gate, for a write)."""
        self.connection.before_statement(sql)
        try:
            return super().execute(sql, parameters)  # type: ignore[return-value]
        finally:
            self.connection.after_statement()

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> GatedCursor:  # type: ignore[override]
        """Execute ``sql`` for each parameter set (after the gate, for a write)."""
        self.connection.before_statement(sql)
        try:
            return super().executemany(sql, seq_of_parameters)  # type: ignore[return-value]
        finally:
            self.connection.after_statement()


def configure_connection(dbapi_connection: sqlite3.Connection) -> None:
    """Per-connection settings: WAL, NORMAL sync, busy timeout, foreign keys; no checkpoint in commits."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={int(BUSY_TIMEOUT_S * 1000)}",
                   "foreign_keys=ON", "wal_autocheckpoint=0"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


class WalCheckpointer:
    """A daemon thread that checkpoints one database file's WAL for this process.

    Every ``interval_s`` a PASSIVE checkpoint copies the committed frames into the database (it
    fsyncs the WAL, then the database) while readers and writers carry on. The WAL only starts
    again from its beginning when a writer begins right after a checkpoint that copied every
    frame with no reader still on old frames, which a steady stream of commits rarely leaves
    room for; so once it holds more than :data:`RESTART_FRAMES` frames, one RESTART checkpoint
    runs with this process's :class:`WriteGate` held (its writers wait on the gate for what is
    left to copy and two fsyncs, ~10-20 ms here), and the next writer starts the WAL over.
    """

    def __init__(self, path: str, interval_s: float | None = None, *,
                 registry_key: tuple[int, str] | None = None) -> None:
        self.path, self.interval_s = path, interval_s or CHECKPOINT_INTERVAL_S
        # The engines using this file (ensure_checkpointer); registered, the thread retires once
        # they are all gone.
        self.owners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._registry_key = registry_key
        self._gate = write_gate(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sqlite-checkpoint:{os.path.basename(path)}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = sqlite3.connect(self.path, timeout=RESTART_WAIT_S, isolation_level=None,
                                     check_same_thread=False)
        try:
            while not self._stop.wait(self.interval_s):
                if self._registry_key is not None and _retired(self, self._registry_key):
                    return
                self.run_once(connection)
        finally:
            connection.close()

    def run_once(self, connection: sqlite3.Connection) -> tuple[int, int, int] | None:
        """A passive checkpoint, then a gated restart if the WAL has grown past its bound."""
        result = checkpoint(connection, "PASSIVE")
        if result is None or result[1] <= RESTART_FRAMES or self._gate is None:
            return result
        if not self._gate.acquire():
            return result
        try:
            return checkpoint(connection, "RESTART")
        finally:
            self._gate.release()

    def stop(self) -> None:
        """Stop after the checkpoint in progress."""
        self._stop.set()


def checkpoint(connection: sqlite3.Connection, mode: str) -> tuple[int, int, int] | None:
    """``PRAGMA wal_checkpoint(mode)``: (busy, frames in the WAL, frames copied); None on error."""
    try:
        # fetchall, not fetchone: a statement left unfinished holds a read mark, and with it
        # the WAL could never start over
        [(busy, frames, copied)] = connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        return int(busy), int(frames), int(copied)
    except sqlite3.Error as exc:  # e.g. the file went away with its test; try again next time
        logger.debug("wal checkpoint of %s failed: %r", connection, exc)
        return None


_checkpointers: dict[tuple[int, str], WalCheckpointer] = {}
_checkpointers_lock = threading.Lock()


def ensure_checkpointer(path: str, owner: object) -> None:
    """Run this process's checkpointer for ``path`` for as long as ``owner`` (an engine) lives.

    The thread notices on its own, at its next tick, that every engine on its file is gone. A
    finalizer on the engine must not do it: engines are freed by the cyclic garbage collector,
    which can run inside this function's critical section, on this thread, where taking the lock
    again would deadlock.
    """
    key = (os.getpid(), os.path.realpath(path))  # a forked child (Celery pool) starts its own
    with _checkpointers_lock:
        checkpointer = _checkpointers.get(key)
        if checkpointer is None:
            checkpointer = _checkpointers[key] = WalCheckpointer(key[1], registry_key=key)
        checkpointer.owners.add(owner)


def _retired(checkpointer: WalCheckpointer, key: tuple[int, str]) -> bool:
    """True, and the checkpointer forgotten, once no engine uses its file any more."""
    with _checkpointers_lock:
        if checkpointer.owners:
            return False
        if _checkpointers.get(key) is checkpointer:
            del _checkpointers[key]
        return True


def connect_listener(database: str | None, owner: object) -> Callable[[Any, Any], None]:
    """The engine's ``connect`` listener: configure each connection; checkpoint a file database."""
    owner_ref = weakref.ref(owner)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        configure_connection(dbapi_connection)
        engine = owner_ref()
        if database and getattr(dbapi_connection, "_gate", None) is not None and engine is not None:
            ensure_checkpointer(database, engine)

    return on_connect


NUL_MESSAGE = "a string literal cannot contain NUL (0x00) characters"


class NulCharacter(DataError, ValueError, DontWrapMixin):
    """A statement would store U+0000 in a text or JSON value, which PostgreSQL cannot hold.

    The ``DataError`` PostgreSQL's refusal arrives as, naming ``NUL (0x00)`` as PostgreSQL does, so the
    platform's one mapping of it (:func:`shared.errors.holds_nul_text`: a 422) and the write-behind streams'
    quarantine treat both databases alike; SQLAlchemy lets it through unwrapped (``DontWrapMixin``).
    """

    def __init__(self) -> None:
        super().__init__(None, None, ValueError(NUL_MESSAGE))
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
"""``\\u0000`` in JSON text, preceded by an even run of backslashes (so the escape is a NUL, not a
backslash followed by the letters ``u0000``)."""


def json_without_nul(value: Any) -> str:
    """SQLAlchemy's JSON serializer for SQLite: ``json.dumps``, refusing a document holding U+0000."""
    text = json.dumps(value)
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise NulCharacter()
    return text


def refuse_nul_parameters(_conn: Any, _cursor: Any, _statement: str, parameters: Any, _context: Any,
                          _executemany: bool) -> None:
    """The engine's ``before_cursor_execute`` listener: :class:`NulCharacter` for a bound string with U+0000."""
    if _holds_nul(parameters):
        raise NulCharacter()


def _holds_nul(value: Any) -> bool:
    """Whether a statement's parameters (one row or many; tuples, lists or dicts) hold a string with U+0000."""
    if isinstance(value, str):
        return "\x00" in value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    for item in items:
        if type(item) is str:  # the common case first: a row's plain values, no call per value
            if "\x00" in item:
                return True
        elif isinstance(item, dict | list | tuple) and _holds_nul(item):
            return True
    return False
