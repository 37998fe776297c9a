"""Query parameters of offset-paged lists, shared by every vertical's API.

An offset is bounded so that a request cannot ask the database for a number it cannot hold
(SQLite's integers end at 2**63 - 1: a larger ``OFFSET`` was a 500, not a 422).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

MAX_OFFSET = 1_000_000
"""The largest offset a list accepts (past it, narrow the list by its filters instead)."""

Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"items to skip, at most {MAX_OFFSET:,}")]
"""``offset`` of an offset-paged list: 0 to :data:`MAX_OFFSET` (422 outside)."""
