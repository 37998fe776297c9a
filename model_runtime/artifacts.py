"""Versioned model artifacts on disk: files, a manifest with sha256 digests, and a model card.

Layout of one artifact (``<models_dir>/<name>/<version>/``)::

    manifest.json   {"name", "version", "created_at", "framework", "files": {relpath: sha256},
                     "metrics": {...}, "data": "...", "rebuild_command": "...", "extra": {...}}
    MODEL_CARD.md   data, metrics as measured, how to rebuild
    <payload files> whatever the model needs (state dicts, ONNX graphs, boosters, tokenizers...)

The same loader accepts a bare ``save_pretrained`` directory (``config.json`` beside weights), so a
user with real weights points the config at it; such a directory has no manifest and is hashed on load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MODEL_CARD_NAME = "MODEL_CARD.md"


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


def _payload_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.name not in (MANIFEST_NAME, MODEL_CARD_NAME)
    )


def save_artifact(directory: Path, *, name: str, version: str, framework: str,
                  metrics: dict[str, Any] | None = None, data: str = "", rebuild_command: str = "",
                  model_card: str = "", extra: dict[str, Any] | None = None) -> ArtifactManifest:
    """Seal a directory whose payload files are already written: hash them, write manifest and card."""
    files = {p.relative_to(directory).as_posix(): sha256_file(p) for p in _payload_files(directory)}
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


def load_manifest(directory: Path, *, verify: bool = True) -> ArtifactManifest:
    """Read and (by default) verify an artifact directory.

    A directory without a manifest but with ``config.json`` is taken as a ``save_pretrained``
    checkpoint: its files are hashed now and the manifest is synthesised (name = folder name).
    """
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        if (directory / "config.json").exists():
            files = {p.relative_to(directory).as_posix(): sha256_file(p) for p in _payload_files(directory)}
            return ArtifactManifest(name=directory.name, version="local", files=files,
                                    framework="transformers", data="user-supplied checkpoint")
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME} and is not a save_pretrained directory")
    raw = json.loads(manifest_path.read_text())
    manifest = ArtifactManifest(**raw)
    if verify:
        verify_artifact(directory, manifest)
    return manifest


def verify_artifact(directory: Path, manifest: ArtifactManifest) -> None:
    """Raise :class:`ArtifactError` if any payload file is missing or differs from its digest."""
    for relpath, expected in manifest.files.items():
        path = directory / relpath
        if not path.exists():
            raise ArtifactError(f"{manifest.name} {manifest.version}: missing file {relpath}")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{manifest.name} {manifest.version}: sha256 mismatch for {relpath}")


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
