"""Validation rules in-process (no database): time zones and DST, typed timestamps, gaps, the watermark."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd

from services.iiot.validation import Registry, check_rows, check_watermarks

REGISTRY = Registry(
    keys=pd.Index(["p1\x1ftemp", "p2\x1ftemp"], dtype=object), sensor_pk=np.array([1, 2], dtype=np.int64),
    unit=np.array(["degC", "degC"], dtype=object), min_value=np.array([-50.0, np.nan]),
    max_value=np.array([200.0, np.nan]), interval_s=np.array([10.0, np.nan]),
    asset_ids=pd.Index(["p1", "p2"], dtype=object), asset_timezone=np.array(["Europe/Berlin", "UTC"], dtype=object))


def long_frame(rows: list[tuple[object, str, object]]) -> pd.DataFrame:
    return pd.DataFrame({"row_number": np.arange(1, len(rows) + 1), "timestamp": [row[0] for row in rows],
                         "asset": [row[1] for row in rows], "sensor": "temp", "value": [row[2] for row in rows],
                         "unit": ""})


def test_naive_times_are_the_plants_wall_clock_and_dst_gaps_or_overlaps_are_refused() -> None:
    checked = check_rows(long_frame([
        ("2025-07-01T10:00:00", "p1", 1.0),        # Berlin summer time: 08:00 UTC
        ("2025-07-01T10:00:00", "p2", 1.0),        # a UTC plant
        ("2025-07-01T10:00:00+02:00", "p1", 1.0),  # an offset wins over the zone
        ("2025-03-30T02:30:00", "p1", 1.0),        # does not exist in Berlin
        ("2025-10-26T02:30:00", "p1", 1.0),        # happens twice in Berlin
    ]), REGISTRY)
    assert [ts.isoformat() for ts in checked.kept["ts"]] == ["2025-07-01T08:00:00+00:00", "2025-07-01T10:00:00+00:00",
                                                             "2025-07-01T08:00:00+00:00"]
    assert checked.quarantined["row_number"].tolist() == [4, 5]
    assert set(checked.quarantined["reason"]) == {"bad_timestamp"}


def test_typed_timestamps_from_parquet_are_taken_as_they_are() -> None:
    aware = pd.Series(pd.to_datetime(["2025-07-01T08:00:00Z"], utc=True))
    naive = pd.Series(pd.to_datetime(["2025-07-01T10:00:00"]))
    frame = long_frame([(None, "p1", 1.0)])
    assert check_rows(frame.assign(timestamp=aware), REGISTRY).kept["ts"].iloc[0] == pd.Timestamp(
        "2025-07-01T08:00:00Z")
    assert check_rows(frame.assign(timestamp=naive), REGISTRY).kept["ts"].iloc[0] == pd.Timestamp(
        "2025-07-01T08:00:00Z")


def test_gaps_are_counted_from_the_watermark_and_between_readings() -> None:
    times = ["2025-07-01T08:00:30Z", "2025-07-01T08:00:10Z", "2025-07-01T08:00:20Z", "2025-07-01T08:02:00Z"]
    checked = check_rows(long_frame([(ts, "p1", 1.0) for ts in times]), REGISTRY)
    watermark = datetime(2025, 7, 1, 7, 59, 0, tzinfo=UTC)  # 70 s before the first: a gap (interval 10 s)
    ordered = check_watermarks(checked.kept, {1: watermark}, lambda rows: np.zeros(len(rows), bool), REGISTRY)
    assert ordered.kept["row_number"].tolist() == [2, 3, 1, 4], "sorted by time before the watermark check"
    assert ordered.gaps == 2  # 07:59:00 → 08:00:10 and 08:00:30 → 08:02:00
    assert ordered.watermarks == {1: datetime(2025, 7, 1, 8, 2, tzinfo=UTC)}
    assert ordered.counts == {1: 4}


def test_a_value_at_the_watermark_is_a_duplicate_only_when_stored() -> None:
    checked = check_rows(long_frame([("2025-07-01T08:00:00Z", "p2", 1.0), ("2025-07-01T07:00:00Z", "p2", 1.0),
                                     ("2025-07-01T09:00:00Z", "p2", 1.0)]), REGISTRY)
    mark = datetime(2025, 7, 1, 8, tzinfo=UTC)

    def stored(rows: pd.DataFrame) -> np.ndarray:
        return np.asarray(rows["ts"] == pd.Timestamp(mark))

    ordered = check_watermarks(checked.kept, {2: mark}, stored, REGISTRY)
    assert ordered.kept["row_number"].tolist() == [3]
    assert dict(zip(ordered.quarantined["row_number"], ordered.quarantined["reason"], strict=True)) == {
        1: "duplicate", 2: "out_of_order"}
