"""The streaming readers in-process: every row comes out once with its line number whatever the chunk
size or resume point, awkward text (CRLF, BOM, quotes, blank lines, bad UTF-8) is read or refused
with a reason, overlong lines are skipped without being held, gzip is capped."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pandas as pd
import pytest

from services.iiot.readers import (
    FileRefused,
    GzipBomb,
    LimitedStream,
    TooLong,
    check_head,
    file_shape,
    read_chunks,
    text_pieces,
)

HEADER = b"timestamp,asset,sensor,value,unit\n"


def rows_of(path: Path, **options: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every chunk's rows and refusals, concatenated."""
    chunks = list(read_chunks(path, file_shape(path), **options))  # type: ignore[arg-type]
    frames = [chunk.frame for chunk in chunks]
    refused = [chunk.refused for chunk in chunks]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
            pd.concat(refused, ignore_index=True) if refused else pd.DataFrame())


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def numbered_csv(lines: int) -> bytes:
    return HEADER + b"".join(f"2025-03-01T08:{n // 60:02d}:{n % 60:02d}Z,pump-1,temp,{n},\n".encode()
                             for n in range(lines))


@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 100_000])
def test_every_row_comes_out_once_with_its_line_number_whatever_the_chunk_size(tmp_path: Path,
                                                                                chunk_rows: int) -> None:
    path = write(tmp_path, "a.csv", numbered_csv(250))
    frame, refused = rows_of(path, chunk_rows=chunk_rows)
    assert refused.empty
    assert frame["row_number"].tolist() == list(range(2, 252))
    assert frame["value"].astype(float).tolist() == [float(n) for n in range(250)]


@pytest.mark.parametrize("skip", [0, 1, 2, 50, 251])
def test_resuming_after_a_checkpoint_reads_exactly_the_lines_after_it(tmp_path: Path, skip: int) -> None:
    path = write(tmp_path, "a.csv", numbered_csv(250))
    chunks = list(read_chunks(path, file_shape(path), chunk_rows=30))
    resumed, _ = rows_of(path, chunk_rows=30, skip=skip)
    numbers = resumed["row_number"].tolist() if not resumed.empty else []
    assert numbers == list(range(max(skip, 1) + 1, 252))
    assert chunks[-1].end_position == 251


def test_awkward_text_is_read_and_broken_rows_are_refused_with_their_lines(tmp_path: Path) -> None:
    content = (b"\xef\xbb\xbftimestamp,asset,sensor,value,unit\r\n"
               b"2025-03-01T08:00:00Z,pump-1,temp,1.5,\r\n"
               b"\r\n"
               b'2025-03-01T08:00:01Z,"pump-1",temp,"2,5",degC\r\n'      # quoted: 5 fields
               b"2025-03-01T08:00:02Z,pump-1,temp,3\r\n"                 # 4 fields
               b'2025-03-01T08:00:03Z,"pump-1,temp,4,\r\n'               # unterminated quote
               b"2025-03-01T08:00:04Z,pump-\xff,temp,5,\r\n"             # not UTF-8
               b"2025-03-01T08:00:05Z,pump-1,temp,6,")                   # no final newline
    frame, refused = rows_of(write(tmp_path, "b.csv", content))
    assert frame["row_number"].tolist() == [2, 4, 8]
    assert [str(value) for value in frame["value"]] == ["1.5", "2,5", "6"]
    assert frame["unit"].fillna("").tolist() == ["", "degC", ""]
    assert refused[["row_number", "reason"]].values.tolist() == [[5, "malformed_row"], [6, "malformed_row"],
                                                                 [7, "malformed_row"]]
    assert refused["raw"].tolist()[0] == "2025-03-01T08:00:02Z,pump-1,temp,3"


def test_an_overlong_line_is_skipped_to_its_end_without_being_held() -> None:
    big = b"y" * 5000
    stream = LimitedStream(io.BytesIO(b"a\n" + big + b"\nb\nc"), None, lambda: 0)
    pieces = list(text_pieces(stream, max_line_bytes=100, block_bytes=64))
    too_long = [piece for piece in pieces if isinstance(piece, TooLong)]
    assert len(too_long) == 1 and too_long[0].length == 5000 and len(too_long[0].preview) <= 200
    assert b"".join(piece for piece in pieces if isinstance(piece, bytes)) == b"a\nb\nc\n"


def test_gzip_is_read_and_a_bomb_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv.gz", gzip.compress(numbered_csv(100)))
    frame, _ = rows_of(path)
    assert len(frame) == 100
    bomb = write(tmp_path, "d.csv.gz", gzip.compress(numbered_csv(10) + b"0" * (4 << 20)))
    with pytest.raises(GzipBomb, match="decompresses to more than 40000 bytes"):
        rows_of(bomb, max_decompressed_bytes=40_000)


def test_wide_and_json_lines_become_long_rows(tmp_path: Path) -> None:
    wide = write(tmp_path, "w.csv", b"timestamp,asset,temp,vib\n2025-03-01T08:00:00Z,pump-1,50,\n"
                                    b"2025-03-01T08:00:01Z,pump-1,51,2.5\n")
    frame, _ = rows_of(wide)
    assert sorted(zip(frame["row_number"], frame["sensor"], frame["value"].astype(float), strict=True)) == [
        (2, "temp", 50.0), (3, "temp", 51.0), (3, "vib", 2.5)]
    jsonl = write(tmp_path, "j.jsonl", b'{"timestamp": "2025-03-01T08:00:00Z", "asset": "pump-1", "sensor": "temp", '
                                      b'"value": 1}\n[1, 2]\n{"timestamp": "x", "asset": "a"}\n')
    frame, refused = rows_of(jsonl)
    assert frame["row_number"].tolist() == [1]
    assert refused[["row_number", "reason"]].values.tolist() == [[2, "malformed_row"], [3, "schema"]]


@pytest.mark.parametrize("head", [b"", b"time,machine,reading\n", b'{"timestamp": 1, "value": 2}\n'])
def test_a_head_that_cannot_be_readings_is_refused(head: bytes) -> None:
    with pytest.raises(FileRefused):
        check_head(head)


def test_a_gzipped_parquet_file_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    pd.DataFrame({"timestamp": ["2025-03-01T08:00:00Z"], "asset": ["a"], "sensor": ["s"], "value": [1.0]}).to_parquet(
        buffer)
    with pytest.raises(FileRefused, match="gzip-compressed Parquet"):
        check_head(gzip.compress(buffer.getvalue()))


_PLAIN_ROWS = [
    b"2025-03-01T08:00:00Z,p1,temp,1.5,",
    b"2025-03-01T08:00:01.250Z,p1,temp,1e2,degC",
    b"2025-03-01T10:00:02+02:00,p1,temp,-3,degF",           # an offset, a unit converted
    b"2025-03-01T08:00:03+0000,p2,temp,-0.0,",
    b"2025-03-01T08:00:04Z,p2,temp,7,degC",
    b"2025-03-01T08:00:05Z,p2,temp,,degC",                   # an empty value: not a number
    b"2025-03-01T08:00:06Z,p9,temp,1,",                      # unknown asset, unknown sensor
    b"2025-03-01T08:00:07Z,p1,pressure,1,",
    b"2025-03-01T08:00:08Z,p1,temp,999,",                    # out of range
    b"2025-03-01T08:00:09Z,p1,temp,2,furlongs",              # unknown unit, incompatible unit
    b"2025-03-01T08:00:10Z,p1,temp,2,bar",
    b"2099-03-01T08:00:11Z,p1,temp,2,",                      # far in the future
]


def outcome(path: Path, registry: object) -> tuple[list[object], list[object]]:
    """Kept and quarantined rows of every chunk of ``path`` after :func:`check_rows`."""
    from services.iiot.validation import check_rows

    kept, quarantined = [], []
    for chunk in read_chunks(path, file_shape(path), chunk_rows=5):
        checked = check_rows(chunk.frame, registry)  # type: ignore[arg-type]
        kept += checked.kept.assign(ts=checked.kept["ts"].astype(str)).values.tolist()
        quarantined += checked.quarantined.values.tolist()
        quarantined += chunk.refused.values.tolist()
    return kept, quarantined


@pytest.mark.parametrize("extra", [
    b"",                                                     # plain: the fast way takes every chunk
    b"2025-03-01T09:00:00,p1,temp,1,\n",                     # a naive time (the plant's zone decides)
    b"2025-03-01T09:00:00Z,p1,temp,one,\n",                  # text in a value
    b"2025-03-01T09:00:00Z,p1,temp,nan,\n",                  # NaN, inf, NA written out
    b"2025-03-01T09:00:00Z,p1,temp,-inf,\n",
    b"2025-03-01T09:00:00Z,p1,temp,NA,\n",
    b"\n",                                                   # a blank line
    b'2025-03-01T09:00:00Z,"p1",temp,1,\n',                  # quotes
    b"2025-03-01T09:00:00Z,p1,temp\n",                       # too few fields
    b"2025-03-01T09:00:00Z,,temp,1,\n",                      # no asset
    b"2025-03-01T09:00:00Z,p-\xff,temp,1,\n",                # not UTF-8
    b"2025-03-01 09:00:00.1234567Z,p1,temp,1,\n",            # more digits than microseconds
])
def test_the_fast_way_gives_every_row_the_outcome_the_general_way_gives(tmp_path: Path, extra: bytes,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain chunks are read by Arrow (no Python object per row), the rest by the general way; a row's
    outcome (kept with its time and value, or quarantined with its reason and detail) is the same."""
    from services.iiot import readers
    from tests.iiot.test_validation import REGISTRY

    path = write(tmp_path, "a.csv", HEADER + b"\n".join(_PLAIN_ROWS[:6]) + b"\n" + extra
                 + b"\n".join(_PLAIN_ROWS[6:]) + b"\n")
    taken: list[bool] = []
    fast = readers._parse_plain_chunk

    def spy(*args: object) -> object:
        result = fast(*args)  # type: ignore[arg-type]
        taken.append(result is not None)
        return result

    monkeypatch.setattr(readers, "_parse_plain_chunk", spy)
    either = outcome(path, REGISTRY)
    assert taken == ([True] * 3 if not extra else [True, False, True])
    monkeypatch.setattr(readers, "_parse_plain_chunk", lambda *args: None)
    general = outcome(path, REGISTRY)
    assert either == general
    assert len(either[0]) + len(either[1]) == len(_PLAIN_ROWS) + (1 if extra.strip() else 0)
