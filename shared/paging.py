"""Bounds on the numbers a request hands to the database: list offsets and integer row ids.

A request must not ask the database for a number it cannot hold: SQLite's integers end at
2**63 - 1 and PostgreSQL's ``integer`` ids at 2**31 - 1, and either overflow was a 500, not a 422.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

MAX_OFFSET = 1_000_000
"""The largest offset a list accepts (past it, narrow the list by its filters instead)."""

Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"items to skip, at most {MAX_OFFSET:,}")]
"""``offset`` of an offset-paged list: 0 to :data:`MAX_OFFSET` (422 outside)."""

MAX_ROW_ID = 2**31 - 1
"""Integer row ids are 32-bit (``integer`` on PostgreSQL): a larger one is refused (422), never queried."""


def row_id_in_range(value: int) -> bool:
    """Whether ``value`` can be an integer row id (1 to :data:`MAX_ROW_ID`)."""
    return 1 <= value <= MAX_ROW_ID
