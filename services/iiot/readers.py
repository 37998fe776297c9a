"""Streaming readers of reading files: CSV, JSON Lines and Parquet, long or wide, gzip accepted.

A file is read in chunks of about :data:`CHUNK_ROWS` rows, so memory stays flat whatever its size.
Each :class:`SourceChunk` carries its rows as a long-format frame (``row_number`` plus
:data:`~services.iiot.validation.LONG_COLUMNS`, values as received) for validation, the rows the
reader itself refused (``malformed_row``, ``line_too_long``, ``schema``) with their line number and
raw text, and the checkpoint after it (``end_position``: lines, or Parquet rows, consumed), from
which :func:`read_chunks` can resume (``skip``).

- The format comes from content first (gzip and Parquet magic bytes, a leading ``{``) and the
  file name second; everything else is CSV.
- The layout from the header: ``sensor`` and ``value`` columns make it long (``timestamp, asset,
  sensor, value[, unit]``; other columns are ignored); ``timestamp`` and ``asset`` with other
  columns make it wide (every other column a sensor id, values in the sensor's unit).
- Text files are split into lines by the reader, never more than :data:`MAX_LINE_BYTES` of one
  line in memory: a longer line is skipped to its end and quarantined as ``line_too_long``. One
  row per line: a quoted field spanning lines is refused as malformed.
- gzip input is decompressed as it is read, at most :func:`decompression_limit` bytes (a ratio
  cap and the upload size limit): past it the file is refused as a :class:`GzipBomb`.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, cast

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from services.iiot.validation import LONG_COLUMNS, wide_to_long
from shared.uploads import MAX_DECOMPRESSION_RATIO, decompression_limit

CHUNK_ROWS = 100_000
"""Source rows (lines) per chunk: one transaction each. Measured on a 1 M-row CSV: the ingestion adds
~125-200 MB to the process (the chunk read ahead included), the same for 250 k and 1 M rows; 200k-row
chunks were no faster and the first write waits for a bigger first chunk."""
BLOCK_BYTES = 4 << 20
"""Bytes read from the (decompressed) file at a time."""
MAX_LINE_BYTES = 1 << 20
"""A longer line is quarantined as ``line_too_long`` (a wide row of 1000 sensors is ~20 KB)."""
RAW_PREVIEW_BYTES = 200
"""What is kept of a line too long to store."""
GZIP_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"
Format = Literal["csv", "jsonl", "parquet"]
Layout = Literal["long", "wide"]
REQUIRED_LONG = ("timestamp", "asset", "sensor", "value")


class FileRefused(ValueError):
    """A whole file that cannot be ingested, with a reason written for the tenant."""


class GzipBomb(FileRefused):
    """A gzip file that decompresses past its limit."""


@dataclass(frozen=True)
class FileShape:
    """What a file is: its format, whether gzip-compressed, its layout and columns (as in the file)."""

    format: Format
    compressed: bool
    layout: Layout
    columns: tuple[str, ...]

    @property
    def sensor_columns(self) -> list[str]:
        """The wide layout's sensor columns."""
        return [column for column in self.columns if column.strip().lower() not in ("timestamp", "asset")]


@dataclass
class SourceChunk:
    """One chunk of a file: rows to validate, rows the reader refused, and where it ends."""

    frame: pd.DataFrame
    """Long format: ``row_number`` plus LONG_COLUMNS (values as received)."""
    refused: pd.DataFrame
    """``row_number``, ``reason``, ``detail``, ``raw`` (reader-level refusals)."""
    rows_read: int
    """Source rows (non-empty lines after the header, Parquet rows) in this chunk."""
    end_position: int
    """Lines (Parquet rows) of the file consumed through this chunk: the checkpoint."""
    progress: float
    """Fraction of the file's bytes consumed (0..1)."""
    raw_text: Callable[[Iterable[int]], list[str]] = field(repr=False, default=lambda rows: ["" for _ in rows])
    """The raw text of rows by row number (for the quarantine)."""


def refused_frame(rows: list[tuple[int, str, str, str]]) -> pd.DataFrame:
    """Reader refusals as a frame (``row_number``, ``reason``, ``detail``, ``raw``)."""
    return pd.DataFrame({"row_number": pd.Series([row[0] for row in rows], dtype=np.int64),
                         "reason": pd.Series([row[1] for row in rows], dtype=object),
                         "detail": pd.Series([row[2] for row in rows], dtype=object),
                         "raw": pd.Series([row[3] for row in rows], dtype=object)})


# --- shape: format, compression, layout ---------------------------------------------------------------

def sniff_head(head: bytes, filename: str | None = None) -> tuple[Format, bool, bytes]:
    """(format, gzip-compressed, the first decompressed bytes) from a file's first bytes and its name."""
    compressed = head.startswith(GZIP_MAGIC)
    if compressed:
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, 1 << 20)
        except zlib.error as exc:
            raise FileRefused(f"a gzip file that does not decompress: {exc}") from None
    if head.startswith(PARQUET_MAGIC):
        if compressed:
            raise FileRefused("a gzip-compressed Parquet file: Parquet compresses its own columns; send it as is")
        return "parquet", False, head
    name = (filename or "").lower().removesuffix(".gz")
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"{") or name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl", compressed, head
    return "csv", compressed, head


def layout_of(columns: Iterable[str]) -> Layout:
    """``long`` or ``wide`` from a header; :class:`FileRefused` (a ``schema`` problem) for neither, or
    for a header naming a column twice."""
    columns = list(columns)
    _refuse_duplicate_columns(columns)
    names = {column.strip().lower() for column in columns}
    if "sensor" in names or "value" in names:
        missing = [column for column in REQUIRED_LONG if column not in names]
        if missing:
            raise FileRefused(f"schema: the long format needs columns {', '.join(REQUIRED_LONG)}[, unit]; "
                              f"missing {', '.join(missing)}")
        return "long"
    if {"timestamp", "asset"} <= names and len(names) > 2:
        return "wide"
    raise FileRefused("schema: expected the long format (timestamp, asset, sensor, value[, unit]) or the wide "
                      "format (timestamp, asset and one column per sensor)")


def _refuse_duplicate_columns(columns: list[str]) -> None:
    """:class:`FileRefused` naming the first column the header has twice (the long layout's columns
    and ``timestamp``/``asset`` compared as the reader matches them: trimmed, any case)."""
    seen: set[str] = set()
    for column in columns:
        name = column.strip().lower()
        key = name if name in LONG_COLUMNS else column
        if key in seen:
            raise FileRefused(f"schema: the header names column {key!r} more than once")
        seen.add(key)


def first_line(text: bytes) -> bytes:
    """The first non-empty line of ``text`` (without a byte-order mark), or what there is of it."""
    for line in text.lstrip(b"\xef\xbb\xbf").split(b"\n"):
        if line.strip():
            return line.rstrip(b"\r")
    return b""


def header_columns(line: bytes, file_format: Format) -> tuple[str, ...]:
    """The column names of a CSV header line or of a JSON Lines file's first object."""
    try:
        if file_format == "jsonl":
            record = orjson.loads(line)
            if not isinstance(record, dict):
                raise FileRefused("schema: the first line of a JSON Lines file is not a JSON object")
            return tuple(str(key) for key in record)
        return tuple(next(csv.reader([line.decode("utf-8")]), []))
    except (orjson.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise FileRefused(f"schema: unreadable first line: {exc}") from None


def check_head(head: bytes, filename: str | None = None) -> None:
    """Refuse a file by its first bytes (before the rest is received) when its header cannot be ours.

    A head shorter than the first line (a huge first line) is left to the reader.
    """
    file_format, _compressed, text = sniff_head(head, filename)
    if file_format == "parquet":
        return
    line = first_line(text)
    if not line or (len(line) == len(text.rstrip()) and len(text) >= 64 << 10):
        if not line:
            raise FileRefused("schema: the file is empty")
        return
    layout_of(header_columns(line, file_format))


def file_shape(path: Path, filename: str | None = None) -> FileShape:
    """The shape of a stored file; :class:`FileRefused` when it has no usable header."""
    with path.open("rb") as handle:
        head = handle.read(64 << 10)
    file_format, compressed, _ = sniff_head(head, filename)
    if file_format == "parquet":
        try:
            columns = tuple(pq.ParquetFile(path).schema_arrow.names)
        except Exception as exc:
            raise FileRefused(f"an unreadable Parquet file: {type(exc).__name__}: {str(exc)[:200]}") from None
        return FileShape("parquet", False, layout_of(columns), columns)
    with _open_text(path, compressed, limit=None) as stream:
        for piece in text_pieces(stream):
            if isinstance(piece, TooLong):
                raise FileRefused(f"schema: the first line is longer than {MAX_LINE_BYTES} bytes")
            line = first_line(piece)
            if line:
                columns = header_columns(line, file_format)
                return FileShape(file_format, compressed, layout_of(columns), columns)
    raise FileRefused("schema: the file is empty")


# --- text streams: gzip with a limit, lines with a length cap -----------------------------------------

class LimitedStream(io.RawIOBase):
    """A binary stream that refuses (:class:`GzipBomb`) to yield more than ``limit`` bytes, and a gzip
    stream that is truncated or corrupt (:class:`FileRefused`, saying which)."""

    def __init__(self, inner: IO[bytes], limit: int | None, position: Callable[[], int]) -> None:
        self.inner, self.limit, self.total, self.position = inner, limit, 0, position

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.inner.read(size)
        except EOFError:
            raise FileRefused("the gzip stream is truncated: it ends before its end-of-stream marker") from None
        except gzip.BadGzipFile as exc:
            raise FileRefused(_bad_gzip_reason(exc)) from None
        except zlib.error as exc:
            raise FileRefused(f"the gzip stream is corrupt: {exc}") from None
        self.total += len(data)
        if self.limit is not None and self.total > self.limit:
            raise GzipBomb(f"the gzip file decompresses to more than {self.limit} bytes "
                           f"(limit: {MAX_DECOMPRESSION_RATIO}x its compressed size, at most the upload limit)")
        return data


def _bad_gzip_reason(exc: gzip.BadGzipFile) -> str:
    """Why a gzip stream failed past its first member's header (which :func:`sniff_head` read): bytes
    that are no gzip member after a complete one, or a member whose check fails."""
    if str(exc).startswith(("Not a gzipped file", "Unknown compression method")):
        return "trailing data after the gzip stream: the bytes after its end are not another gzip member"
    return f"the gzip stream is corrupt: {exc}"


class _OpenText:
    def __init__(self, path: Path, compressed: bool, limit: int | None) -> None:
        self.raw = path.open("rb")
        if compressed:
            inner: IO[bytes] = cast(IO[bytes], gzip.GzipFile(fileobj=self.raw, mode="rb"))
        else:
            inner = self.raw
        self.stream = LimitedStream(inner, limit if compressed else None, self.raw.tell)

    def __enter__(self) -> LimitedStream:
        return self.stream

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def _open_text(path: Path, compressed: bool, limit: int | None) -> _OpenText:
    return _OpenText(path, compressed, limit)


@dataclass
class TooLong:
    """A line longer than :data:`MAX_LINE_BYTES`: its first bytes and its length."""

    preview: bytes
    length: int


Piece = bytes | TooLong
"""Complete lines, each ending in ``\\n``, or one overlong line."""


def text_pieces(stream: LimitedStream, max_line_bytes: int = MAX_LINE_BYTES,
                block_bytes: int = BLOCK_BYTES) -> Iterator[Piece]:
    """The stream as pieces of whole lines (the last line given its ``\\n``); an overlong line is a
    :class:`TooLong`, skipped to its end without being held."""
    carry, skipping = b"", None
    while block := stream.read(block_bytes):
        if skipping is not None:
            newline = block.find(b"\n")
            if newline < 0:
                skipping.length += len(block)
                continue
            skipping.length += newline
            yield skipping
            skipping, block = None, block[newline + 1:]
        data = carry + block
        last = data.rfind(b"\n")
        if last >= 0:
            yield from _split_overlong(data[:last + 1], max_line_bytes)
            data = data[last + 1:]
        carry = data
        if len(carry) > max_line_bytes:
            skipping, carry = TooLong(carry[:RAW_PREVIEW_BYTES], len(carry)), b""
    if skipping is not None:
        yield skipping
    elif carry:
        yield carry + b"\n"


def _line_bounds(piece: bytes) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Start offset and end offset (its ``\\n``) of each line of a piece."""
    ends = np.flatnonzero(np.frombuffer(piece, dtype=np.uint8) == 10)
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    return starts, ends


def _split_overlong(body: bytes, max_line_bytes: int) -> Iterator[Piece]:
    if len(body) <= max_line_bytes + 1 or _no_overlong_line(body, max_line_bytes):
        yield body
        return
    starts, ends = _line_bounds(body)
    overlong = np.flatnonzero(ends - starts > max_line_bytes)
    position = 0
    for index in overlong.tolist():
        if starts[index] > position:
            yield body[position:starts[index]]
        yield TooLong(body[starts[index]:starts[index] + RAW_PREVIEW_BYTES], int(ends[index] - starts[index]))
        position = int(ends[index]) + 1
    if position < len(body):
        yield body[position:]


def _no_overlong_line(body: bytes, max_line_bytes: int) -> bool:
    """True when no line of ``body`` is longer than ``max_line_bytes`` (False: perhaps one is).

    Such a line would hold a whole aligned window of half that length without a newline, so a few
    ``find`` calls that each stop at the window's first newline settle it for a usual body."""
    window = max(max_line_bytes // 2, 1)
    return all(body.find(b"\n", start, start + window) >= 0 for start in range(0, len(body) - window, window))


def _cut_after_lines(piece: bytes, lines: int) -> int:
    """The offset just past the ``lines``-th line of ``piece``."""
    return int(np.flatnonzero(np.frombuffer(piece, dtype=np.uint8) == 10)[lines - 1]) + 1


def line_chunks(pieces: Iterator[Piece], chunk_lines: int, first_number: int = 1) -> Iterator[tuple[int, list[Piece]]]:
    """Pieces regrouped into chunks of ``chunk_lines`` lines: (number of the chunk's first line, pieces)."""
    pending: list[Piece] = []
    count, number = 0, first_number
    for piece in pieces:
        if isinstance(piece, TooLong):
            pending.append(piece)
            count += 1
        else:
            lines = piece.count(b"\n")
            while count + lines >= chunk_lines:
                cut = _cut_after_lines(piece, chunk_lines - count)
                pending.append(piece[:cut])
                yield number, pending
                piece, lines = piece[cut:], lines - (chunk_lines - count)
                pending, count, number = [], 0, number + chunk_lines
            if lines:
                pending.append(piece)
                count += lines
        if count >= chunk_lines:
            yield number, pending
            pending, count, number = [], 0, number + chunk_lines
    if pending:
        yield number, pending


def drop_lines(pieces: list[Piece], lines: int) -> list[Piece]:
    """``pieces`` without their first ``lines`` lines."""
    kept: list[Piece] = []
    for piece in pieces:
        size = 1 if isinstance(piece, TooLong) else piece.count(b"\n")
        if lines >= size:
            lines -= size
            continue
        if lines and isinstance(piece, bytes):
            piece = piece[_cut_after_lines(piece, lines):]
        lines = 0
        kept.append(piece)
    return kept


def _leading_blank_lines(pieces: list[Piece]) -> int | None:
    """How many blank lines come before the first non-blank one (None: all are blank)."""
    blank = 0
    for piece in pieces:
        if isinstance(piece, TooLong):
            return blank
        for line in piece.split(b"\n")[:-1]:
            if line.strip():
                return blank
            blank += 1
    return None


def lines_of(pieces: list[Piece]) -> list[bytes | TooLong]:
    """The pieces as a list of lines (``\\n`` removed)."""
    lines: list[bytes | TooLong] = []
    for piece in pieces:
        if isinstance(piece, TooLong):
            lines.append(piece)
        else:
            lines.extend(piece.split(b"\n")[:-1])
    return lines


# --- chunks ---------------------------------------------------------------------------------------------

def read_chunks(path: Path, shape: FileShape, *, skip: int = 0, chunk_rows: int = CHUNK_ROWS,
                max_decompressed_bytes: int | None = None) -> Iterator[SourceChunk]:
    """The chunks of the file at ``path`` after its first ``skip`` lines (Parquet: rows)."""
    if shape.format == "parquet":
        yield from _parquet_chunks(path, shape, skip, chunk_rows)
        return
    size = max(path.stat().st_size, 1)
    limit = decompression_limit(size, max_decompressed_bytes) if shape.compressed else None
    with _open_text(path, shape.compressed, limit) as stream:
        header_seen = shape.format != "csv"  # JSON Lines has no header line: each object names its fields
        for first, pieces in line_chunks(text_pieces(stream), chunk_rows):
            if not header_seen:  # the header is the first non-blank line
                blank = _leading_blank_lines(pieces)
                header_seen = blank is not None
                dropped = blank + 1 if blank is not None else sum(
                    1 if isinstance(piece, TooLong) else piece.count(b"\n") for piece in pieces)
                pieces, first = drop_lines(pieces, dropped), first + dropped
            if first <= skip:
                pieces, first = drop_lines(pieces, skip - first + 1), skip + 1
            if not pieces:
                continue
            progress = min(1.0, stream.position() / size)
            if shape.format == "csv":
                yield _parse_csv_pieces(pieces, first, shape, progress)
            else:
                yield _parse_json_lines(lines_of(pieces), first, shape, progress)


def _raw_of(lines: list[bytes | TooLong], first: int) -> Callable[[Iterable[int]], list[str]]:
    def raw_text(row_numbers: Iterable[int]) -> list[str]:
        texts = []
        for number in row_numbers:
            line = lines[int(number) - first]
            data = line.preview if isinstance(line, TooLong) else line
            texts.append(data.rstrip(b"\r").decode("utf-8", errors="replace"))
        return texts
    return raw_text


Refusal = tuple[int, str, str, str]
"""(line number, reason, detail, raw text)."""


def _split_out(lines: list[bytes | TooLong], first: int) -> tuple[list[int], list[bytes], list[Refusal]]:
    """(line numbers, lines) to parse, and the overlong ones refused; empty lines dropped."""
    numbers, kept, refused = [], [], []
    for offset, line in enumerate(lines):
        if isinstance(line, TooLong):
            refused.append(_too_long(first + offset, line))
        elif line.strip():
            numbers.append(first + offset)
            kept.append(line)
    return numbers, kept, refused


def _too_long(number: int, line: TooLong) -> Refusal:
    return (number, "line_too_long", f"line of {line.length} bytes, more than {MAX_LINE_BYTES}",
            line.preview.decode("utf-8", errors="replace"))


@dataclass
class _ParsedPiece:
    """One piece of a CSV chunk: its rows, its refusals, and how to find a line's raw text."""

    frame: pd.DataFrame
    refused: list[Refusal]
    rows: int
    first: int
    piece: bytes = b""
    bounds: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
    """Start and end of each line (found when first needed: most pieces quarantine nothing)."""
    lines: int = 0
    """Lines in ``piece``."""

    def raw(self, number: int) -> str:
        index = number - self.first
        if not self.piece:
            return self.refused[0][3] if self.refused else ""
        if self.bounds is None:
            self.bounds = _line_bounds(self.piece)
        starts, ends = self.bounds
        return self.piece[starts[index]:ends[index]].rstrip(b"\r").decode("utf-8", errors="replace")


def _parse_csv_pieces(pieces: list[Piece], first: int, shape: FileShape, progress: float) -> SourceChunk:
    plain = None
    if not any(isinstance(piece, TooLong) for piece in pieces):
        plain = _parse_plain_chunk(b"".join(cast(list[bytes], pieces)), first, shape)
    if plain is not None:
        return SourceChunk(frame=_to_long(plain.frame, shape), refused=refused_frame([]), rows_read=plain.rows,
                           end_position=first + plain.lines - 1, progress=progress, raw_text=lambda rows: [
                               plain.raw(int(row)) for row in rows])
    parsed, number = [], first
    for piece in pieces:
        if isinstance(piece, TooLong):
            parsed.append(_ParsedPiece(_empty_csv_frame(shape), [_too_long(number, piece)], 1, number))
            number += 1
            continue
        parsed.append(_parse_csv_piece(piece, number, shape))
        number += parsed[-1].lines
    frames = [part.frame for part in parsed if not part.frame.empty]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames[0] if frames else
                                                                           _empty_csv_frame(shape))
    firsts = [part.first for part in parsed]

    def raw_text(row_numbers: Iterable[int]) -> list[str]:
        return [parsed[bisect.bisect_right(firsts, int(row)) - 1].raw(int(row)) for row in row_numbers]

    return SourceChunk(frame=_to_long(frame, shape), refused=refused_frame([row for part in parsed
                                                                            for row in part.refused]),
                       rows_read=sum(part.rows for part in parsed), end_position=number - 1, progress=progress,
                       raw_text=raw_text)


def _parse_csv_piece(piece: bytes, first: int, shape: FileShape) -> _ParsedPiece:
    """Rows of one piece: fields counted per line with numpy, the clean lines parsed by pandas' C reader."""
    data = np.frombuffer(piece, dtype=np.uint8)
    starts, ends = _line_bounds(piece)
    lengths = ends - starts
    blank = (lengths == 0) | ((lengths == 1) & (data[starts.clip(max=len(data) - 1)] == 13))
    commas = np.cumsum(data == 44, dtype=np.int32)[ends]
    commas[1:] -= commas[:-1].copy()
    good = ~blank & (commas == len(shape.columns) - 1)
    slow = np.zeros(len(ends), dtype=bool)
    if b'"' in piece:
        slow[np.unique(np.searchsorted(ends, np.flatnonzero(data == 34)))] = True
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        slow |= ~blank
    slow &= ~blank
    good &= ~slow
    refused: list[Refusal] = []
    extra_rows: list[list[object]] = []
    for index in np.flatnonzero(~good & ~blank & ~slow).tolist():
        refused.append((first + index, "malformed_row", f"expected {len(shape.columns)} fields, found "
                        f"{int(commas[index]) + 1}", _line(piece, starts, ends, index)))
    for index in np.flatnonzero(slow).tolist():
        fields, why = _parse_one_line(piece[starts[index]:ends[index]], len(shape.columns))
        if fields is None:
            refused.append((first + index, "malformed_row", why, _line(piece, starts, ends, index)))
        else:
            extra_rows.append([first + index, *fields])
    frame = _csv_frame(_clean_bytes(piece, starts, ends, good), first + np.flatnonzero(good), extra_rows, shape)
    return _ParsedPiece(frame, refused, int((~blank).sum()), first, piece, (starts, ends), len(ends))


_PLAIN_TYPES = {"timestamp": pa.string(), "asset": pa.dictionary(pa.int32(), pa.string()),
                "sensor": pa.dictionary(pa.int32(), pa.string()), "unit": pa.dictionary(pa.int32(), pa.string()),
                "value": pa.float64()}


def _parse_plain_chunk(text: bytes, first: int, shape: FileShape) -> _ParsedPiece | None:
    """The fast way through a long-layout chunk that is plain (None when it is not): no quotes, every
    line a row with the header's number of fields, UTF-8, numeric values, every timestamp with a UTC
    offset (``Z``, ``+02:00``; Arrow's ISO 8601 parser is strict), no empty asset, sensor or timestamp,
    no ``nan`` or ``inf`` written out (an empty value is fine).
    Any other chunk goes the general way (:func:`_parse_csv_piece`), so a row's outcome never depends
    on the way it took; the fast way only makes no Python object per row: Arrow's C++ reader gives
    asset, sensor and unit as categoricals, timestamps as ``datetime64[us, UTC]``, values as float64."""
    names = [column.strip().lower() for column in shape.columns]
    if shape.layout != "long" or len(set(names)) != len(names) or b'"' in text:
        return None
    types = {column: _PLAIN_TYPES[name] for column, name in zip(shape.columns, names, strict=True)
             if name in _PLAIN_TYPES}
    lines = text.count(b"\n")
    try:
        table = pa_csv.read_csv(
            io.BytesIO(text),
            read_options=pa_csv.ReadOptions(column_names=list(shape.columns), use_threads=False,
                                            block_size=max(len(text) + 1, 1 << 20)),
            convert_options=pa_csv.ConvertOptions(column_types=types, include_columns=list(types),
                                                  null_values=[""]))  # Arrow's default also has NA, nan...
        if table.num_rows != lines:  # blank lines (Arrow skips them): the general way numbers rows
            return None
        columns = {name.strip().lower(): column for name, column in zip(table.column_names, table.columns,
                                                                         strict=True)}
        if columns["timestamp"].null_count or _has_empty(columns["asset"]) or _has_empty(columns["sensor"]) \
                or pc.any(pc.is_nan(columns["value"])).as_py() or pc.any(pc.is_inf(columns["value"])).as_py():
            return None  # NaN or inf written out: pandas keeps such a column as text (its detail says so)
        stamps = columns["timestamp"].cast(pa.timestamp("us", "UTC"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    by_name = {name.strip().lower(): name for name in types}
    frame = pd.DataFrame({"row_number": np.arange(first, first + lines, dtype=np.int64),
                          by_name["timestamp"]: _utc_series(stamps),
                          **{by_name[name]: columns[name].to_pandas() for name in ("asset", "sensor", "unit")
                             if name in columns},
                          by_name["value"]: columns["value"].to_numpy()})
    return _ParsedPiece(frame, [], lines, first, text, None, lines)


def _utc_series(stamps: pa.ChunkedArray) -> pd.Series:
    """Arrow UTC timestamps (no nulls) as a ``datetime64[us, UTC]`` series (Arrow's own ``to_pandas``
    of a zoned column takes ~9 us a value)."""
    micros = np.concatenate([chunk.cast(pa.int64()).to_numpy() for chunk in stamps.chunks]) if stamps.num_chunks \
        else np.zeros(0, dtype=np.int64)
    return pd.Series(micros.view("datetime64[us]")).dt.tz_localize("UTC")


def _has_empty(column: pa.ChunkedArray) -> bool:
    """Whether a dictionary column holds a null or an empty text."""
    return bool(column.null_count) or any(
        bool(pc.any(pc.equal(chunk.dictionary, "")).as_py()) for chunk in column.chunks if len(chunk.dictionary))


def _line(piece: bytes, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64], index: int) -> str:
    return piece[starts[index]:ends[index]].rstrip(b"\r").decode("utf-8", errors="replace")


def _parse_one_line(line: bytes, columns: int) -> tuple[list[str] | None, str]:
    """A line that has quotes or is not plain UTF-8, parsed alone: (fields, '') or (None, why)."""
    try:
        text = line.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    try:
        fields = next(csv.reader([text], strict=True), [])
    except csv.Error as exc:
        return None, f"unreadable CSV: {exc}"
    if len(fields) != columns:
        return None, f"expected {columns} fields, found {len(fields)}"
    return fields, ""


def _clean_bytes(piece: bytes, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64],
                 good: npt.NDArray[np.bool_]) -> bytes:
    """The good lines of ``piece`` joined (the piece itself when all are good)."""
    if good.all():
        return piece
    edges = np.diff(np.concatenate(([0], good.astype(np.int8), [0])))
    run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return b"".join(piece[starts[begin]:ends[end] + 1] for begin, end in zip(run_starts.tolist(), run_ends.tolist(),
                                                                             strict=True))


def _empty_csv_frame(shape: FileShape) -> pd.DataFrame:
    return pd.DataFrame({"row_number": pd.Series([], dtype=np.int64),
                         **{name: pd.Series([], dtype=object) for name in shape.columns}})


def _csv_frame(clean: bytes, numbers: npt.NDArray[np.int64], extra_rows: list[list[object]],
               shape: FileShape) -> pd.DataFrame:
    """The parsed rows with their ``row_number``: text columns as text, numbers parsed by the C reader
    (a column with text in it stays text; validation refuses those values)."""
    names = list(shape.columns)
    text_columns = {name: str for name in names if name.strip().lower() in ("timestamp", "asset", "sensor", "unit")}
    if len(numbers):
        frame = pd.read_csv(io.BytesIO(clean), header=None, names=names, dtype=text_columns, engine="c",
                            index_col=False, keep_default_na=False, na_values=[""], skip_blank_lines=False)
        frame.insert(0, "row_number", numbers.astype(np.int64))
    else:
        frame = _empty_csv_frame(shape)
    if extra_rows:
        extra = pd.DataFrame(extra_rows, columns=["row_number", *names])
        frame = pd.concat([frame.astype({name: object for name in names}), extra], ignore_index=True)
        frame = frame.sort_values("row_number", kind="stable").reset_index(drop=True)
    return frame


def _to_long(frame: pd.DataFrame, shape: FileShape) -> pd.DataFrame:
    """A parsed frame (file's own column names) as the long format validation takes."""
    renamed = frame.rename(columns={column: column.strip().lower() for column in shape.columns
                                    if column.strip().lower() in LONG_COLUMNS})
    if shape.layout == "wide":
        return wide_to_long(renamed, shape.sensor_columns)
    if "unit" not in renamed:
        renamed["unit"] = ""
    return renamed[["row_number", *LONG_COLUMNS]]


def _parse_json_lines(lines: list[bytes | TooLong], first: int, shape: FileShape, progress: float) -> SourceChunk:
    numbers, candidates, refused = _split_out(lines, first)
    records, record_numbers = [], []
    for number, line in zip(numbers, candidates, strict=True):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            refused.append((number, "malformed_row", f"not JSON: {str(exc)[:120]}",
                            line.decode("utf-8", errors="replace")))
            continue
        missing = _missing_keys(record, shape)
        if missing:
            refused.append((number, "schema" if isinstance(record, dict) else "malformed_row", missing,
                            line.decode("utf-8", errors="replace")))
            continue
        records.append(record)
        record_numbers.append(number)
    frame = _json_frame(records, record_numbers, shape)
    return SourceChunk(frame=frame, refused=refused_frame(refused),
                       rows_read=len(numbers) + sum(1 for row in refused if row[1] == "line_too_long"),
                       end_position=first + len(lines) - 1, progress=progress, raw_text=_raw_of(lines, first))


def _missing_keys(record: object, shape: FileShape) -> str:
    """Why a JSON line is not a row ('' when it is one)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    needed = REQUIRED_LONG if shape.layout == "long" else ("timestamp", "asset")
    missing = [key for key in needed if key not in record]
    return f"missing {', '.join(missing)}" if missing else ""


def _json_frame(records: list[dict[str, object]], numbers: list[int], shape: FileShape) -> pd.DataFrame:
    if shape.layout == "long":
        columns = {name: [record.get(name) for record in records] for name in LONG_COLUMNS}
        frame = pd.DataFrame({"row_number": np.asarray(numbers, dtype=np.int64),
                              **{name: pd.Series(values, dtype=object) for name, values in columns.items()}})
        frame["unit"] = frame["unit"].where(frame["unit"].notna(), "")
        return frame
    sensors = sorted({key for record in records for key in record} - {"timestamp", "asset"})
    wide = pd.DataFrame({"row_number": np.asarray(numbers, dtype=np.int64),
                         **{name: pd.Series([record.get(name) for record in records], dtype=object)
                            for name in ("timestamp", "asset", *sensors)}})
    return wide_to_long(wide, sensors)


def _parquet_chunks(path: Path, shape: FileShape, skip: int, chunk_rows: int) -> Iterator[SourceChunk]:
    parquet = pq.ParquetFile(path)
    total = max(parquet.metadata.num_rows, 1)
    position = 0
    for batch in parquet.iter_batches(batch_size=chunk_rows):
        start, position = position, position + batch.num_rows
        if position <= skip:
            continue
        frame = batch.to_pandas()
        if start < skip:
            frame, start = frame.iloc[skip - start:], skip
        frame.insert(0, "row_number", np.arange(start + 1, start + 1 + len(frame), dtype=np.int64))
        yield SourceChunk(frame=_to_long(frame.reset_index(drop=True), shape), refused=refused_frame([]),
                          rows_read=len(frame), end_position=position, progress=position / total,
                          raw_text=_parquet_raw(frame))


def _parquet_raw(frame: pd.DataFrame) -> Callable[[Iterable[int]], list[str]]:
    indexed = frame.set_index("row_number")

    def raw_text(row_numbers: Iterable[int]) -> list[str]:
        return [orjson.dumps(indexed.loc[int(number)].to_dict(), default=str).decode() for number in row_numbers]
    return raw_text
