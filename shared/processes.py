"""Child processes that never outlive their parent.

On Linux, :func:`end_with_parent` asks the kernel to signal the calling process when its parent
dies, however it dies (SIGKILL, a crash): `tessera up` arranges it for every server it starts, and
a server for the worker processes it spawns itself (speech decoders), so nothing keeps running
once the process that owns it is gone. Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
# Looked up once at import, before any fork: a child between fork and exec must not load libraries.
_PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def end_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Have ``signum`` sent to this process when its parent dies; if ``parent_pid`` is already gone
    (it died before this took effect), send it now."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
