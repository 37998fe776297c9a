"""Artifact digests are checked once and trusted while a file's identity is unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_runtime.artifacts import ArtifactError, DigestCache, load_manifest, save_artifact


def _sealed(directory: Path) -> None:
    directory.mkdir()
    (directory / "weights.bin").write_bytes(b"w" * 4096)
    (directory / "sub").mkdir()
    (directory / "sub" / "graph.onnx").write_bytes(b"g" * 1024)
    save_artifact(directory, name="m", version="v1", framework="torch")


def test_a_second_load_hashes_nothing(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache" / "digests.json"
    artifact = tmp_path / "artifact"
    _sealed(artifact)
    first = DigestCache(cache_path)
    load_manifest(artifact, digest_cache=first)
    assert sorted(p.name for p in first.hashed) == ["graph.onnx", "weights.bin"]
    second = DigestCache(cache_path)
    load_manifest(artifact, digest_cache=second)
    assert second.hashed == []


def test_a_file_rewritten_with_the_same_size_is_hashed_again_and_refused(tmp_path: Path) -> None:
    cache_path = tmp_path / "digests.json"
    artifact = tmp_path / "artifact"
    _sealed(artifact)
    load_manifest(artifact, digest_cache=DigestCache(cache_path))
    weights = artifact / "weights.bin"
    before = weights.stat()
    weights.write_bytes(b"x" * 4096)  # same size, new content
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old mtime put back
    tampered = DigestCache(cache_path)
    with pytest.raises(ArtifactError, match="sha256 mismatch for weights.bin"):
        load_manifest(artifact, digest_cache=tampered)
    assert [p.name for p in tampered.hashed] == ["weights.bin"]
    with pytest.raises(ArtifactError):  # and stays refused on the next start
        load_manifest(artifact, digest_cache=DigestCache(cache_path))


def test_a_replaced_file_is_hashed_again(tmp_path: Path) -> None:
    cache_path = tmp_path / "digests.json"
    artifact = tmp_path / "artifact"
    _sealed(artifact)
    load_manifest(artifact, digest_cache=DigestCache(cache_path))
    graph = artifact / "sub" / "graph.onnx"
    replacement = tmp_path / "graph.onnx"
    replacement.write_bytes(graph.read_bytes())  # same bytes, new inode
    os.replace(replacement, graph)
    cache = DigestCache(cache_path)
    load_manifest(artifact, digest_cache=cache)
    assert [p.name for p in cache.hashed] == ["graph.onnx"]


def test_sealing_fills_the_default_cache_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("TESSERA_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        artifact = tmp_path / "artifact"
        _sealed(artifact)
        assert (tmp_path / "data" / "artifact-digests.json").exists()
        cache = DigestCache()
        load_manifest(artifact, digest_cache=cache)
        assert cache.hashed == []
    finally:
        get_settings.cache_clear()


def test_an_unreadable_cache_only_costs_hashing(tmp_path: Path) -> None:
    cache_path = tmp_path / "digests.json"
    artifact = tmp_path / "artifact"
    _sealed(artifact)
    cache_path.write_text("{not json")
    cache = DigestCache(cache_path)
    load_manifest(artifact, digest_cache=cache)
    assert len(cache.hashed) == 2
    missing = DigestCache(tmp_path / "no-such-dir" / "file-as-dir" / "x.json")
    (tmp_path / "no-such-dir").write_text("a file where a folder should be")
    load_manifest(artifact, digest_cache=missing)  # cannot write: still loads
    assert len(missing.hashed) == 2
