"""``shared.db.UTCDateTime`` at the edges of Python's datetime range, on a real SQLite file: a time whose
UTC equivalent leaves years 1-9999 is a ValueError naming it (as a naive one is), not an OverflowError
from ``astimezone`` deep in the bind; times at the edges that stay inside are stored and read back in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, insert, select
from sqlalchemy.exc import StatementError

from shared.db import UTCDateTime, make_engine

TABLE = Table("utc_edges", MetaData(), Column("id", Integer, primary_key=True), Column("at", UTCDateTime()))
PLUS_14, MINUS_14 = timezone(timedelta(hours=14)), timezone(timedelta(hours=-14))


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'utc.db'}")
    TABLE.create(engine)
    return engine


@pytest.mark.parametrize("moment", [datetime(1, 1, 1, tzinfo=PLUS_14),
                                    datetime(9999, 12, 31, 23, 59, 59, tzinfo=MINUS_14)])
def test_a_time_outside_years_1_to_9999_in_utc_is_a_value_error_naming_it(engine: Engine, moment: datetime) -> None:
    with engine.begin() as connection, pytest.raises(StatementError) as raised:
        connection.execute(insert(TABLE).values(at=moment))
    assert isinstance(raised.value.orig, ValueError)
    assert str(raised.value.orig) == (f"datetime {moment.isoformat()} given to a UTC column is outside years 1-9999 "
                                      "in UTC")


def test_times_at_the_edges_inside_the_range_round_trip_in_utc(engine: Engine) -> None:
    edges = [datetime(1, 1, 1, 14, tzinfo=PLUS_14), datetime(9999, 12, 31, 9, 59, 59, tzinfo=MINUS_14)]
    with engine.begin() as connection:
        connection.execute(insert(TABLE), [{"at": moment} for moment in edges])
    with engine.connect() as connection:
        stored = list(connection.scalars(select(TABLE.c.at).order_by(TABLE.c.id)))
    assert stored == [datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)]
    assert all(moment.tzinfo is UTC for moment in stored)


def test_a_naive_time_is_still_refused(engine: Engine) -> None:
    with engine.begin() as connection, pytest.raises(StatementError, match="naive datetime given to a UTC column"):
        connection.execute(insert(TABLE).values(at=datetime(2026, 1, 1)))
