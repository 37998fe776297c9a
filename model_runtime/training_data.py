"""A user's own training data: one table file, a date range, and what the model card records of them.

Every vertical's ``training.py`` trains on the user's export the same way::

    tessera train <vertical> --data FILE [--from DATE --to DATE] [--version V]

- :func:`add_data_arguments` adds ``--data``, ``--from`` and ``--to`` to its parser (dates are whole
  days, ``YYYY-MM-DD``, both inclusive); :func:`date_range_from` reads them back.
- :func:`read_table` reads CSV (plain or compressed: ``.csv.gz``, ``.csv.bz2``, ``.csv.zip``,
  ``.csv.xz``, ``.csv.zst``) or Parquet (``.parquet``, ``.pq``; needs ``pyarrow``) and names the
  columns that are missing; :func:`parse_timestamps` reads a date/time column as naive UTC and
  names the rows it cannot read.
- :class:`DataProvenance` is what the card records (``extra["training_data"]`` of the manifest):
  the file, its sha256, its row count and dates, and the rows and dates used.

Errors are :class:`TrainingDataError`, whose message is written for the user; a training ``main``
hands it to ``parser.error`` (exit status 2, one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model_runtime.artifacts import sha256_file

CSV_COMPRESSIONS = (".gz", ".bz2", ".zip", ".xz", ".zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
TRAINING_DATA_KEY = "training_data"
"""Manifest ``extra`` key of :meth:`DataProvenance.as_card`."""
SHOWN_ROWS = 3
"""Bad rows named in an error message (then a count of the rest)."""


class TrainingDataError(ValueError):
    """The user's data file or date range cannot be trained on; the message says why and where."""


def table_format(path: Path) -> str:
    """``"csv"`` or ``"parquet"`` from the file name; :class:`TrainingDataError` for anything else."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in PARQUET_SUFFIXES:
        return "parquet"
    if suffixes and suffixes[-1] in CSV_COMPRESSIONS:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] == ".csv":
        return "csv"
    raise TrainingDataError(f"{path}: unknown file type; expected .csv (optionally compressed: "
                            f"{', '.join('.csv' + c for c in CSV_COMPRESSIONS)}) or {' / '.join(PARQUET_SUFFIXES)}")


def read_table(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """The file's rows, checked to hold every ``required`` column (a file with no rows is refused).

    CSV columns are read as pandas infers them (text ids stay text); Parquet keeps its types.
    """
    kind = table_format(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    try:
        frame = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path, low_memory=False)
    except ImportError as exc:
        raise TrainingDataError(f"{path}: reading Parquet needs pyarrow ({exc}); install it, or export "
                                "the data as CSV") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise TrainingDataError(f"{path}: not a readable {kind.upper()} file ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise TrainingDataError(f"{path}: missing column(s) {', '.join(missing)} (required: "
                                f"{', '.join(required)}; the file has: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise TrainingDataError(f"{path}: the file has a header but no rows")
    return frame


def bad_rows_text(bad: np.ndarray, values: pd.Series) -> str:
    """'data row 4 ('x'), data row 9 ('') and 3 more' for a boolean mask over ``values`` (rows 1-based)."""
    positions = np.flatnonzero(bad)
    shown = ", ".join(f"data row {p + 1} ({values.iloc[p]!r})" for p in positions[:SHOWN_ROWS])
    more = len(positions) - SHOWN_ROWS
    return shown + (f" and {more} more" if more > 0 else "")


def parse_timestamps(values: pd.Series, column: str) -> pd.Series:
    """Date/times (ISO 8601 text, with or without an offset, or already datetimes) as naive UTC.

    Text without an offset is taken as UTC. Unreadable or empty values raise
    :class:`TrainingDataError` naming their rows.
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = pd.to_datetime(values, utc=True)
    else:
        parsed = pd.to_datetime(values.astype("string"), utc=True, format="ISO8601", errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        raise TrainingDataError(f"{column}: {int(bad.sum())} value(s) are not ISO 8601 date/times "
                                f"(e.g. 2024-03-01T14:05:00Z): {bad_rows_text(bad, values)}")
    return parsed.dt.tz_convert(None)


def parse_day(text: str) -> dt.date:
    """An ISO date ``YYYY-MM-DD`` (an argparse ``type``: a bad one is a usage error, exit status 2)."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; expected YYYY-MM-DD") from None


@dataclass(frozen=True)
class DateRange:
    """Whole days ``first``..``last``, both inclusive; None leaves that end open."""

    first: dt.date | None = None
    last: dt.date | None = None

    def __post_init__(self) -> None:
        if self.first and self.last and self.first > self.last:
            raise TrainingDataError(f"--from {self.first} is after --to {self.last}")

    def mask(self, timestamps: pd.Series) -> np.ndarray:
        """(N,) bool: which naive-UTC ``timestamps`` fall inside the range."""
        inside = np.ones(len(timestamps), dtype=bool)
        if self.first is not None:
            inside &= (timestamps >= pd.Timestamp(self.first)).to_numpy()
        if self.last is not None:
            inside &= (timestamps < pd.Timestamp(self.last) + pd.Timedelta(days=1)).to_numpy()
        return inside

    def select(self, frame: pd.DataFrame, column: str) -> pd.DataFrame:
        """The rows of ``frame`` whose ``column`` falls inside; none is a :class:`TrainingDataError`."""
        chosen = frame[self.mask(frame[column])]
        if chosen.empty:
            covered = f"{frame[column].min().date()}..{frame[column].max().date()}"
            raise TrainingDataError(f"no rows between {self.first or 'the start'} and {self.last or 'the end'} "
                                    f"(the file covers {covered})")
        return chosen

    def option_text(self) -> str:
        """The range as command-line options (empty when open at both ends)."""
        return "".join(f" --{name} {day}" for name, day in (("from", self.first), ("to", self.last)) if day)


@dataclass(frozen=True)
class DataProvenance:
    """What a model card records of the file a model was trained on."""

    file: str
    sha256: str
    rows: int
    first_date: str
    last_date: str
    rows_used: int
    used_from: str
    used_to: str

    @classmethod
    def of(cls, path: Path, file_times: pd.Series, used_times: pd.Series) -> DataProvenance:
        """From the file and the event times of all its rows and of the rows used (naive UTC)."""
        return cls(file=str(path), sha256=sha256_file(path), rows=len(file_times),
                   first_date=str(file_times.min().date()), last_date=str(file_times.max().date()),
                   rows_used=len(used_times), used_from=str(used_times.min().date()),
                   used_to=str(used_times.max().date()))

    def as_card(self) -> dict[str, Any]:
        """JSON-ready record (manifest ``extra["training_data"]``)."""
        return asdict(self)

    def describe(self) -> str:
        """One sentence for the card's Data section."""
        return (f"File {Path(self.file).name} (sha256 {self.sha256}): {self.rows} rows dated "
                f"{self.first_date}..{self.last_date}; {self.rows_used} rows from "
                f"{self.used_from}..{self.used_to} used.")


def add_data_arguments(parser: argparse.ArgumentParser, *, columns_help: str) -> None:
    """Add ``--data FILE``, ``--from DATE`` and ``--to DATE`` (the same in every vertical)."""
    parser.add_argument("--data", type=Path, metavar="FILE",
                        help="train on this export (.csv[.gz] or .parquet) instead of the shipped data; "
                             + columns_help)
    parser.add_argument("--from", dest="date_from", type=parse_day, metavar="DATE",
                        help="first day of --data to use, YYYY-MM-DD (default: the file's first)")
    parser.add_argument("--to", dest="date_to", type=parse_day, metavar="DATE",
                        help="last day of --data to use, inclusive, YYYY-MM-DD (default: the file's last)")


def date_range_from(args: argparse.Namespace) -> DateRange:
    """The ``--from``/``--to`` range of parsed arguments (:class:`TrainingDataError` when reversed)."""
    return DateRange(args.date_from, args.date_to)
