"""Times as the public APIs take them: ISO 8601 text, converted to UTC without overflowing.

A request's time is text (pydantic's lax mode would also read a number, or a text of digits, as Unix
seconds: the contract is text), and its offset may move it past year 1 or 9999
(``0001-01-01T00:00:00+14:00``), where ``datetime.astimezone`` raises ``OverflowError``: each vertical
refuses such a time with its own window and wording, on top of these two checks.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

ISO_DATETIME_TEXT = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(?P<offset>[Zz]|[+-]\d{2}:?\d{2})?$")
"""An ISO 8601 date and time, with an optional UTC offset (group ``offset``)."""


def is_iso_datetime_text(value: object, *, offset_required: bool = False) -> bool:
    """Whether ``value`` is text of an ISO 8601 date and time (with a UTC offset, if ``offset_required``)."""
    match = ISO_DATETIME_TEXT.fullmatch(value) if isinstance(value, str) else None
    return match is not None and (match.group("offset") is not None or not offset_required)


def as_utc(value: datetime) -> datetime | None:
    """``value`` in UTC (naive: taken as UTC), or None when its offset moves it outside years 1-9999."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        return None
