"""Versioned model artifacts on disk: files, a manifest with sha256 digests, and a model card.

Layout of one artifact (``<models_dir>/<name>/<version>/``)::

    manifest.json   {"name", "version", "created_at", "framework", "files": {relpath: sha256},
                     "metrics": {...}, "data": "...", "rebuild_command": "...", "extra": {...}}
    MODEL_CARD.md   data, metrics as measured, how to rebuild
    <payload files> whatever the model needs (state dicts, ONNX graphs, boosters, tokenizers...)

The same loader accepts a bare ``save_pretrained`` directory (``config.json`` beside weights), so a
user with real weights points the config at it; such a directory has no manifest and is hashed on load.

Digests are checked once, not at every start: :class:`DigestCache` (``<data_dir>/artifact-digests.json``)
remembers each file's sha256 with its identity — size, mtime, ctime (ns), inode and device — and a
file is hashed again only when any of these changed. A file rewritten in place changes its mtime and
ctime even when its size is the same, and ``os.utime`` can restore the mtime but not the ctime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.derived_cache import write_atomically

MANIFEST_NAME = "manifest.json"
MODEL_CARD_NAME = "MODEL_CARD.md"
DIGEST_CACHE_NAME = "artifact-digests.json"
logger = logging.getLogger("tessera.model_runtime.artifacts")


class ArtifactError(Exception):
    """An artifact is missing, incomplete or does not match its recorded digests."""


@dataclass(frozen=True)
class ArtifactManifest:
    """What an artifact directory claims to contain."""

    name: str
    version: str
    files: dict[str, str]
    framework: str = "torch"
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    metrics: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    rebuild_command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """One sha256 over all file digests: identifies the artifact's exact content."""
        joined = "\n".join(f"{path}:{sha}" for path, sha in sorted(self.files.items()))
        return hashlib.sha256(joined.encode()).hexdigest()


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _file_identity(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


class DigestCache:
    """sha256 digests of files, trusted while the file's identity (size, mtimes, inode) is unchanged.

    Parameters
    ----------
    path : Path, optional
        The cache file; defaults to ``<settings.data_dir>/artifact-digests.json``. It is rewritten
        atomically (temporary file + rename), so concurrent processes at worst hash a file twice.
        A cache that cannot be read or written only costs hashing, never a refused load.
    """

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            from shared.config import get_settings

            path = get_settings().data_dir / DIGEST_CACHE_NAME
        self.path = path
        self.hashed: list[Path] = []
        """Files this instance actually read and hashed (the others were answered from the cache)."""

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        live = {key: entry for key, entry in entries.items() if os.path.exists(key)}
        try:
            write_atomically(self.path, json.dumps(live, sort_keys=True).encode())  # 0644: other users read it
        except OSError as exc:
            logger.warning("artifact digest cache %s not written (%r); files will be hashed again", self.path, exc)

    def digests(self, paths: list[Path]) -> dict[Path, str]:
        """sha256 of each file: from the cache when its identity is unchanged, else hashed (and cached)."""
        entries = self._read()
        found: dict[Path, str] = {}
        changed = False
        for path in paths:
            key = str(path.resolve())
            identity = _file_identity(path.stat())
            entry = entries.get(key)
            if isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
                found[path] = entry["sha256"]
                continue
            found[path] = sha256_file(path)
            self.hashed.append(path)
            # the identity from before the read: a write during hashing leaves a stale identity, hashed again
            entries[key] = {"identity": identity, "sha256": found[path]}
            changed = True
        if changed:
            self._write(entries)
        return found


def _payload_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.name not in (MANIFEST_NAME, MODEL_CARD_NAME)
    )


def save_artifact(directory: Path, *, name: str, version: str, framework: str,
                  metrics: dict[str, Any] | None = None, data: str = "", rebuild_command: str = "",
                  model_card: str = "", extra: dict[str, Any] | None = None) -> ArtifactManifest:
    """Seal a directory whose payload files are already written: hash them, write manifest and card."""
    payload = _payload_files(directory)
    digests = DigestCache().digests(payload)  # sealing hashes once; the first load then reads the cache
    files = {p.relative_to(directory).as_posix(): digests[p] for p in payload}
    if not files:
        raise ArtifactError(f"{directory} holds no payload files to seal")
    manifest = ArtifactManifest(name=name, version=version, files=files, framework=framework,
                                metrics=metrics or {}, data=data, rebuild_command=rebuild_command,
                                extra=extra or {})
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.__dict__, indent=2, sort_keys=True) + "\n")
    card = model_card or _default_card(manifest)
    (directory / MODEL_CARD_NAME).write_text(card)
    return manifest


def _default_card(manifest: ArtifactManifest) -> str:
    metric_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(manifest.metrics.items()))
    return (
        f"# {manifest.name} {manifest.version}\n\n"
        f"Framework: {manifest.framework}. Created {manifest.created_at}.\n\n"
        f"## Data\n{manifest.data or 'not recorded'}\n\n"
        f"## Metrics (as measured)\n| metric | value |\n|---|---|\n{metric_rows}\n\n"
        f"## Rebuild\n`{manifest.rebuild_command or 'not recorded'}`\n"
    )


def load_manifest(directory: Path, *, verify: bool = True,
                  digest_cache: DigestCache | None = None) -> ArtifactManifest:
    """Read and (by default) verify an artifact directory.

    A directory without a manifest but with ``config.json`` is taken as a ``save_pretrained``
    checkpoint: its files are hashed (or taken from the digest cache) and the manifest is
    synthesised (name = folder name). ``digest_cache`` defaults to the one under ``data_dir``.
    """
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        if (directory / "config.json").exists():
            payload = _payload_files(directory)
            digests = (digest_cache or DigestCache()).digests(payload)
            files = {p.relative_to(directory).as_posix(): digests[p] for p in payload}
            return ArtifactManifest(name=directory.name, version="local", files=files,
                                    framework="transformers", data="user-supplied checkpoint")
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME} and is not a save_pretrained directory")
    raw = json.loads(manifest_path.read_text())
    manifest = ArtifactManifest(**raw)
    if verify:
        verify_artifact(directory, manifest, digest_cache=digest_cache)
    return manifest


def verify_artifact(directory: Path, manifest: ArtifactManifest, *,
                    digest_cache: DigestCache | None = None) -> None:
    """Raise :class:`ArtifactError` if any payload file is missing or differs from its digest.

    Files whose identity is unchanged since they were last hashed are taken from ``digest_cache``
    (default: the one under ``data_dir``); the others are hashed now.
    """
    paths = {relpath: directory / relpath for relpath in manifest.files}
    for relpath, path in paths.items():
        if not path.is_file():
            raise ArtifactError(f"{manifest.name} {manifest.version}: missing file {relpath}")
    cache = digest_cache or DigestCache()
    actual = cache.digests(list(paths.values()))
    mismatched = [relpath for relpath, path in paths.items() if actual[path] != manifest.files[relpath]]
    if mismatched:
        raise ArtifactError(f"{manifest.name} {manifest.version}: sha256 mismatch for {', '.join(sorted(mismatched))}")


def list_versions(models_dir: Path, name: str) -> list[str]:
    """Versions of ``name`` present under ``models_dir``, oldest first (by manifest time)."""
    root = models_dir / name
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if (child / MANIFEST_NAME).exists():
            created = json.loads((child / MANIFEST_NAME).read_text()).get("created_at", "")
            found.append((created, child.name))
    return [version for _, version in sorted(found)]


def copy_artifact(source: Path, destination: Path) -> None:
    """Copy a sealed artifact (e.g. promote a candidate), refusing to overwrite another version."""
    if destination.exists():
        raise ArtifactError(f"{destination} already exists")
    shutil.copytree(source, destination)
