"""The bounds every reading and every time the IIoT vertical takes must keep, on the server and on an
edge gateway alike (no SQLAlchemy here: the gateway imports this module on the device)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

MAX_FUTURE = timedelta(days=1)
"""A reading further ahead of now than this is a bad timestamp: it would hold the watermark hostage."""
EARLIEST_READING = datetime(1970, 1, 1, tzinfo=UTC)
"""A reading before this is a bad timestamp: nothing these sensors measure predates the Unix epoch, and
the floor keeps every time kept inside the range the storage converts (a Python ``datetime`` of years
1-9999; a year-1 reading with a +14:00 offset once broke the watermark arithmetic with a 500)."""
LATEST_TIME = datetime(9999, 12, 30, tzinfo=UTC)
"""The latest time :func:`aware_utc` accepts: more than a day short of ``datetime.max``, so an offset
or a day added to it stays representable."""
TIME_WINDOW = f"from {EARLIEST_READING:%Y-%m-%dT%H:%M:%SZ} to {LATEST_TIME:%Y-%m-%dT%H:%M:%SZ}"
"""The times a maintenance record or a time-range query may name (:func:`aware_utc`)."""
MAX_UTC_OFFSET = timedelta(days=1)
"""More than any time zone's offset from UTC: a wall time further than this outside the accepted
window is outside it in every zone."""
MAX_ABS_VALUE = 1e15
"""A reading of a larger magnitude is ``out_of_range`` for every sensor, with or without an expected
range: the features square and sum values in float64 and cast them to float32, so larger magnitudes
overflow (a 1e308 reading stopped its asset from being scored); no physical reading in the supported
units comes near it."""
