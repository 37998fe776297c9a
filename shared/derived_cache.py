"""Derived artifacts kept on disk by a digest of everything they are derived from.

Some artifacts take seconds to derive and are a pure function of inputs that rarely change (a
language model built from shipped texts and a pronouncing dictionary): a process that restarts
should read them back, not derive them again. :class:`DerivedFileCache` keeps each one in a file
named by the digest of its inputs (:func:`digest_of`; the caller names every input, its own code
included, so a change to any of them is a miss, never a stale hit). Files are written atomically
(a partial file never has the final name), the ``keep`` most recently used are kept, and a cache
that cannot be read or written is only a slower path: the artifact is derived and returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("tessera.derived_cache")


def digest_of(parts: Iterable[bytes | str]) -> str:
    """SHA-256 (hex, 32 characters) of ``parts``, each length-prefixed so that no two lists collide."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:32]


def file_fingerprint(path: Path) -> str:
    """A file's path, size and modification time (``missing`` when absent): a cheap stand-in for its
    content, for large inputs that only an installation changes (a model in a wheel)."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file in its folder and a rename, so that a reader sees
    the old file or the whole new one, never part of it (``mode``: mkstemp's 0600 would hide the file from a
    process running as another user). Raises ``OSError``, the temporary file removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


class DerivedFileCache:
    """Files under ``directory`` named ``<prefix>-<key><suffix>``, at most ``keep`` of them.

    Parameters
    ----------
    directory : Path
        Created on first write.
    prefix, suffix : str
        What the cache's files are called around their key.
    keep : int
        Most files kept; the least recently used (read or written) go first.
    """

    def __init__(self, directory: Path, *, prefix: str, suffix: str = "", keep: int = 8) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory = directory
        self.prefix = prefix
        self.suffix = suffix
        self.keep = keep

    def path_for(self, key: str) -> Path:
        """Where the artifact of ``key`` is kept."""
        return self.directory / f"{self.prefix}-{key}{self.suffix}"

    def read(self, key: str) -> bytes | None:
        """The artifact of ``key``, or ``None`` when it is not kept (or cannot be read)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used: evicted last
        except OSError:
            return None
        return data

    def write(self, key: str, data: bytes) -> None:
        """Keep ``data`` as the artifact of ``key`` (atomically), then evict beyond ``keep``; a failure is logged."""
        try:
            write_atomically(self.path_for(key), data)
            self._evict()
        except OSError as exc:
            logger.warning("derived cache %s: could not keep %s (%s); it will be derived again next time",
                           self.directory, self.path_for(key).name, exc)

    def _evict(self) -> None:
        files = sorted(self.directory.glob(f"{self.prefix}-*{self.suffix}"), key=_used_at, reverse=True)
        for stale in files[self.keep:]:
            stale.unlink(missing_ok=True)


def _used_at(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
