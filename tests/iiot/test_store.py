"""Bulk writes and the stored-reading lookup against each database variant."""

from __future__ import annotations

import numpy as np
import pandas as pd

from services.iiot.store import stored_lookup, write_readings
from services.iiot.validation import micros_to_ts
from shared.db import session_scope
from tests.conftest import Stack


def test_the_stored_lookup_answers_for_every_sensor_of_a_chunk(migrated_stack: Stack) -> None:
    """On PostgreSQL one statement answers for all sensors (per-sensor ranges, both ends included)."""
    seconds = np.array([10, 20, 30, 10, 40], dtype=np.int64)
    with session_scope() as session:
        write_readings(session, pd.DataFrame({"sensor_pk": [1, 1, 1, 2, 2], "ts": micros_to_ts(seconds * 1_000_000),
                                              "value": 1.0, "ingest_pk": 1}))
    asked_seconds = np.array([10, 15, 30, 40, 41, 10, 30], dtype=np.int64)
    asked = pd.DataFrame({"sensor_pk": np.array([1, 1, 1, 2, 2, 3, 2], dtype=np.int64),
                          "ts": micros_to_ts(asked_seconds * 1_000_000)})
    with session_scope() as session:
        assert stored_lookup(session)(asked).tolist() == [True, False, True, True, False, False, False]
