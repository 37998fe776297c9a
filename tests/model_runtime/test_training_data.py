"""The generic pieces of training on a user's file: formats, timestamps, date ranges, provenance."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pandas as pd
import pytest

from model_runtime.training_data import (
    DataProvenance,
    DateRange,
    TrainingDataError,
    parse_timestamps,
    read_table,
    table_format,
)


@pytest.mark.parametrize(("name", "kind"), [("a.csv", "csv"), ("a.CSV.gz", "csv"), ("a.csv.zst", "csv"),
                                            ("a.parquet", "parquet"), ("a.pq", "parquet")])
def test_the_format_comes_from_the_name(name: str, kind: str) -> None:
    assert table_format(Path(name)) == kind


@pytest.mark.parametrize("name", ["a.xlsx", "a.gz", "a"])
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(TrainingDataError, match="unknown file type"):
        table_format(Path(name))


def test_a_compressed_csv_reads_and_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv.gz"
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_csv(path, index=False)
    assert read_table(path, ["a", "b"]).b.tolist() == ["x", "y"]
    with pytest.raises(TrainingDataError, match=r"missing column\(s\) c, d .*the file has: a, b"):
        read_table(path, ["a", "c", "d"])


def test_timestamps_become_naive_utc_and_bad_ones_are_named() -> None:
    parsed = parse_timestamps(pd.Series(["2024-03-01T12:00:00+02:00", "2024-03-01 10:30:00", "2024-03-01T10:00Z"]),
                              "WHEN")
    assert parsed.tolist() == [pd.Timestamp("2024-03-01 10:00"), pd.Timestamp("2024-03-01 10:30"),
                               pd.Timestamp("2024-03-01 10:00")]
    with pytest.raises(TrainingDataError, match=r"WHEN: 2 value\(s\) .*data row 2 \('03/01/2024'\), data row 3"):
        parse_timestamps(pd.Series(["2024-03-01T10:00:00Z", "03/01/2024", None]), "WHEN")


def test_a_date_range_takes_whole_days_at_both_ends() -> None:
    times = pd.Series(pd.to_datetime(["2024-01-31 23:59:59", "2024-02-01 00:00:00", "2024-02-03 23:59:59",
                                      "2024-02-04 00:00:00"]))
    assert DateRange(dt.date(2024, 2, 1), dt.date(2024, 2, 3)).mask(times).tolist() == [False, True, True, False]
    assert DateRange(last=dt.date(2024, 2, 1)).mask(times).tolist() == [True, True, False, False]
    assert DateRange().mask(times).all()
    assert DateRange(dt.date(2024, 2, 1), None).option_text() == " --from 2024-02-01"
    with pytest.raises(TrainingDataError, match="--from 2024-02-03 is after --to 2024-02-01"):
        DateRange(dt.date(2024, 2, 3), dt.date(2024, 2, 1))
    frame = pd.DataFrame({"when": times})
    with pytest.raises(TrainingDataError, match=r"no rows between 2025-01-01 and the end \(the file covers "
                                                r"2024-01-31..2024-02-04\)"):
        DateRange(dt.date(2025, 1, 1)).select(frame, "when")


def test_provenance_records_the_file_digest_rows_and_dates(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("when\n2024-01-01\n2024-01-05\n2024-01-09\n")
    times = pd.Series(pd.to_datetime(["2024-01-01 00:00", "2024-01-05 00:00", "2024-01-09 13:00"]))
    record = DataProvenance.of(path, times, times[1:]).as_card()
    assert record == {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "rows": 3,
                      "first_date": "2024-01-01", "last_date": "2024-01-09", "rows_used": 2,
                      "used_from": "2024-01-05", "used_to": "2024-01-09"}
