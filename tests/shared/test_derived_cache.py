"""The platform's cache of derived artifacts on disk: keyed by a digest of every input, written
atomically, least recently used evicted, and never an error of its own (pure logic on tmp_path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shared.derived_cache import DerivedFileCache, digest_of, file_fingerprint


def test_the_digest_tells_apart_lists_that_concatenate_alike() -> None:
    assert digest_of(["ab", "c"]) != digest_of(["a", "bc"])
    assert digest_of(["ab", b"c"]) == digest_of([b"ab", "c"])
    assert len(digest_of([])) == 32


def test_a_file_fingerprint_changes_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    assert file_fingerprint(path).endswith(":missing")
    path.write_bytes(b"one")
    before = file_fingerprint(path)
    path.write_bytes(b"three")
    assert file_fingerprint(path) != before


def test_a_kept_artifact_is_read_back_and_a_missing_one_is_none(tmp_path: Path) -> None:
    cache = DerivedFileCache(tmp_path / "cache", prefix="lm", suffix=".json")
    key = digest_of(["texts"])
    assert cache.read(key) is None
    cache.write(key, b"{}")
    assert cache.read(key) == b"{}"
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [f"lm-{key}.json"]  # no partial file left


def test_the_least_recently_used_go_first(tmp_path: Path) -> None:
    cache = DerivedFileCache(tmp_path, prefix="lm", keep=2)
    cache.write("a", b"1")
    cache.write("b", b"2")
    past = time.time() - 60
    os.utime(cache.path_for("a"), (past, past))
    os.utime(cache.path_for("b"), (past - 60, past - 60))
    assert cache.read("b") == b"2"  # used now: newer than a
    cache.write("c", b"3")
    assert cache.read("a") is None
    assert (cache.read("b"), cache.read("c")) == (b"2", b"3")


def test_a_cache_that_cannot_be_written_is_only_slower(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")
    cache = DerivedFileCache(blocked / "cache", prefix="lm")  # its directory cannot be made
    cache.write("k", b"data")
    assert cache.read("k") is None
    assert "could not keep" in caplog.text


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DerivedFileCache(tmp_path, prefix="lm", keep=0)
