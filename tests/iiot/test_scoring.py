"""Scoring's windows: one read per run, each window cut to its own 48 hours (real feature code)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import numpy as np

from services.iiot.scoring import DueAsset, build_windows, default_window_builder
from shared.db import session_scope
from tests.conftest import Stack
from tests.iiot.test_alerts_lifecycle import START, add_reading, new_asset


def test_each_window_holds_its_own_48_hours(migrated_stack: Stack) -> None:
    tenant_id = f"plant-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        sensor = new_asset(session, tenant_id, "pump-w")
        for hour in range(100):
            add_reading(session, sensor, hour, 20.0 + hour)
        due = [DueAsset(sensor.asset_pk, "pump-w", START + timedelta(hours=h), (sensor,)) for h in (9, 60, 99)]
        early, middle, late = build_windows(session, due, default_window_builder(), 48.0)
        batched = build_windows(session, due, None, 48.0)  # scoring's path: the feature code's batch form
    for one, other in zip((early, middle, late), batched, strict=True):
        assert one.end == other.end
        np.testing.assert_allclose(one.window, other.window, atol=1e-6)
        np.testing.assert_array_equal(one.mask, other.mask)
    assert [int(w.mask.sum()) for w in (early, middle, late)] == [10, 48, 48]
    assert early.window.shape == middle.window.shape == (48, 10)
    temperature = 0  # the first step feature: the temperature channel's mean, scaled by its range
    assert np.all(np.diff(late.window[:, temperature]) > 0)  # the readings rise hour by hour
    assert late.window[-1, temperature] > middle.window[-1, temperature] > early.window[-1, temperature]
