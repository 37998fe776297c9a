"""The API's time text and its conversion to UTC (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.times import as_utc, is_iso_datetime_text


@pytest.mark.parametrize(("value", "with_offset", "any_offset"), [
    ("2026-11-23T10:15:00Z", True, True), ("2026-11-23 10:15:00.123456+01:00", True, True),
    ("2026-11-23T10:15", False, True), ("2026-11-23", False, False), ("1700000000", False, False),
    (1700000000, False, False), ("2026-11-23T10:15:00Z\n", False, False), (None, False, False),
])
def test_time_text_is_an_iso_date_and_time(value: object, with_offset: bool, any_offset: bool) -> None:
    assert is_iso_datetime_text(value, offset_required=True) is with_offset
    assert is_iso_datetime_text(value) is any_offset


def test_a_time_is_converted_to_utc_unless_its_offset_leaves_the_calendar() -> None:
    assert as_utc(datetime(2026, 1, 1, 12)) == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert as_utc(datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))) == datetime(2026, 1, 1, 10,
                                                                                            tzinfo=UTC)
    assert as_utc(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))) is None
    assert as_utc(datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-14)))) is None
