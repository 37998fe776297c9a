"""Database engine, sessions and the one declarative ``Base`` for every vertical's tables.

The same code runs on SQLite (embedded default) and PostgreSQL: the URL decides. SQLite gets WAL,
a busy timeout and foreign keys so several processes (API + worker) can share one file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, cast

from fastapi import Depends
from sqlalchemy import JSON, DateTime, MetaData, Select, TypeDecorator, create_engine, event, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

from shared import sqlite
from shared.config import Settings, get_settings

logger = logging.getLogger("tessera.db")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")
"""JSON column: JSONB on PostgreSQL, JSON text on SQLite."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite hands back naive ones otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """``value`` in UTC; ValueError for a naive one, or one whose UTC time is outside years 1-9999
        (``0001-01-01T00:00:00+14:00``: ``astimezone`` overflows). Callers refuse such input first."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"datetime {value.isoformat()} given to a UTC column is outside years 1-9999 "
                             "in UTC") from None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base for all tables; table names are prefixed by their vertical."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[dict[str, Any]]: JSONType,
        list[float]: JSONType,
        list[str]: JSONType,
    }


def utcnow() -> datetime:
    """Timezone-aware now in UTC (the only clock tables use)."""
    return datetime.now(UTC)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` with settings fit for its dialect (SQLite: :mod:`shared.sqlite`)."""
    if url.startswith("sqlite"):
        connect_args = {"check_same_thread": False, "timeout": sqlite.BUSY_TIMEOUT_S,
                        "factory": sqlite.GatedConnection}
        if "poolclass" not in kwargs:  # connections kept for every thread that may hold one at once
            kwargs.update(pool_size=sqlite.POOL_SIZE, max_overflow=sqlite.POOL_OVERFLOW)
        kwargs.setdefault("json_serializer", sqlite.json_without_nul)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", sqlite.connect_listener(engine.url.database, engine))
        event.listen(engine, "before_cursor_execute", sqlite.refuse_nul_parameters)
        return engine
    if "poolclass" not in kwargs:
        kwargs.update(pool_size=10, max_overflow=20)
    return create_engine(url, pool_pre_ping=True, **kwargs)


class DriverStatement:
    """A Core ``SELECT`` compiled once per dialect and run straight on a DBAPI cursor.

    For hot paths: no per-call cache-key, ORM or result processing. The fraud window reads cost
    0.56 ms of CPU through a Session and 0.1-0.2 ms this way on SQLite. Parameters go to the
    driver as given and rows come back as the driver's tuples: plain numbers and text only.
    """

    def __init__(self, statement: Select[*tuple[Any, ...]]) -> None:
        self.statement = statement
        self.columns = tuple(str(column.key) for column in statement.selected_columns)
        self._compiled: dict[tuple[str, str, str], SQLCompiler] = {}

    def bind(self, dialect: Dialect, params: dict[str, Any]) -> tuple[str, Any]:
        """The SQL text for ``dialect`` and its driver parameters (a list or a dict, as its paramstyle wants)."""
        key = (dialect.name, dialect.driver, dialect.paramstyle)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = cast(SQLCompiler, self.statement.compile(dialect=dialect))
        values = compiled.construct_params(params)
        if compiled.positiontup is not None:
            return compiled.string, [values[name] for name in compiled.positiontup]
        return compiled.string, values

    def execute(self, cursor: Any, dialect: Dialect, params: dict[str, Any]) -> Any:
        """Execute on ``cursor`` (of a connection of ``dialect``); returns the cursor."""
        return cursor.execute(*self.bind(dialect, params))

    def one(self, cursor: Any, dialect: Dialect, params: dict[str, Any]) -> dict[str, Any] | None:
        """The first row by column name (None when there is none)."""
        row = self.execute(cursor, dialect, params).fetchone()
        cursor.fetchall()  # finish the statement (an unfinished one holds SQLite's read snapshot)
        return None if row is None else dict(zip(self.columns, row, strict=True))


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the configured database)."""
    return _engine(url or configured_url())


_configured_url: tuple[Settings, str] | None = None


def configured_url() -> str:
    """``get_settings().sqlalchemy_url``, computed once per settings object.

    The SQLite default resolves its file's path (a few ``lstat`` calls), which every session of
    every request paid for before (~15 % of the embedded default's CPU at 400 requests/s).
    """
    global _configured_url
    settings = get_settings()
    if _configured_url is None or _configured_url[0] is not settings:
        _configured_url = (settings, settings.sqlalchemy_url)
    return _configured_url[1]


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    return make_engine(url)


def reset_engines() -> None:
    """Forget cached engines and session factories (after the database URL changes, e.g. in tests)."""
    global _configured_url
    _configured_url = None
    _engine.cache_clear()
    _session_factory.cache_clear()


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """The session factory bound to the engine for ``url`` (cached with the engine)."""
    return _session_factory(url or configured_url())


@lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session committed on success and rolled back on error (for tasks and scripts)."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request, committed by the route when it chooses."""
    session = session_factory()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


_AFTER_COMMIT_KEY = "tessera_after_commit"


@dataclass
class _PendingCallback:
    callback: Callable[[], Any]
    savepoint: SessionTransaction | None
    """The innermost savepoint open when it was registered (None: the outer transaction)."""


def after_commit(session: Session, callback: Callable[[], Any]) -> None:
    """Run ``callback`` once the OUTER transaction of ``session`` commits; never if it rolls back.

    Used to enqueue Celery work only after the rows the task will read are durable. SQLAlchemy
    fires ``after_commit`` when a savepoint (``begin_nested``) is released too: such a release only
    hands the savepoint's callbacks to the enclosing transaction, and a savepoint rolled back drops
    the callbacks registered inside it (those registered before it stay).
    """
    pending = _PendingCallback(callback, session.get_nested_transaction())
    session.info.setdefault(_AFTER_COMMIT_KEY, []).append(pending)


def _enclosing_savepoint(savepoint: SessionTransaction) -> SessionTransaction | None:
    parent = savepoint.parent
    while parent is not None and not parent.nested:
        parent = parent.parent
    return parent


def _registered_inside(pending: _PendingCallback, savepoint: SessionTransaction) -> bool:
    transaction = pending.savepoint
    while transaction is not None:
        if transaction is savepoint:
            return True
        transaction = transaction.parent
    return False


@event.listens_for(Session, "after_commit")
def _run_after_commit_callbacks(session: Session) -> None:
    released = session.get_nested_transaction()  # set while a savepoint is the one committing
    if released is not None:
        enclosing = _enclosing_savepoint(released)
        for pending in session.info.get(_AFTER_COMMIT_KEY, []):
            if pending.savepoint is released:
                pending.savepoint = enclosing
        return
    for pending in session.info.pop(_AFTER_COMMIT_KEY, []):
        try:
            pending.callback()
        except Exception:  # the commit stands; e.g. a lost publish is recovered by the job sweeper
            logger.exception("after-commit callback failed")


@event.listens_for(Session, "after_rollback")
def _drop_after_commit_callbacks(session: Session) -> None:
    rolled_back = session.get_nested_transaction()
    if rolled_back is None:
        session.info.pop(_AFTER_COMMIT_KEY, None)
        return
    session.info[_AFTER_COMMIT_KEY] = [pending for pending in session.info.get(_AFTER_COMMIT_KEY, [])
                                       if not _registered_inside(pending, rolled_back)]


@event.listens_for(Session, "after_transaction_end")
def _forget_callbacks_of_ended_transaction(session: Session, transaction: SessionTransaction) -> None:
    """A session closed without commit or rollback (``close()``) must not run them on a later commit."""
    if transaction.parent is None:
        session.info.pop(_AFTER_COMMIT_KEY, None)


def check_database(url: str | None = None) -> None:
    """Raise if the database cannot answer a trivial query (used by ``/readyz``)."""
    with get_engine(url).connect() as connection:
        connection.execute(text("SELECT 1"))
