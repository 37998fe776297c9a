"""What the schemathesis contract tests share: the served app under uvicorn, the seed and budget,
the configuration's common part, the header hook and pytest 9's node id for schemathesis.

Imported by ``tests/fraud/test_openapi_fuzz.py`` and ``tests/test_openapi_fuzz_verticals.py``; a module
that fuzzes imports :func:`node_id_for_schemathesis` too (an autouse fixture works where it is named).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis

from tests.support import ManagedProcess, free_port, python_argv

SEED = int(os.environ.get("TESSERA_FUZZ_SEED", "14"))
MAX_EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "20"))
"""Per operation and phase; a deeper run: ``TESSERA_FUZZ_EXAMPLES=500 TESSERA_FUZZ_SEED=7 pytest <a fuzz test>``."""
TRANSPORT_HEADERS = frozenset({"connection", "content-length", "host", "te", "trailer", "transfer-encoding", "upgrade"})


def start_uvicorn(app: str, env: dict[str, str], name: str) -> tuple[ManagedProcess, str]:
    """``app`` starting under uvicorn on a free loopback port (not yet waited for)."""
    port = free_port()
    argv = python_argv("-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
                       "--http", "httptools")
    return ManagedProcess(argv, env, name), f"http://127.0.0.1:{port}"


def fuzz_config(api_key: str, **settings: Any) -> schemathesis.Config:
    """Every phase that runs under pytest, a fixed seed and budget, the key as declared; ``settings``
    add to it (``checks``, ``operations``)."""
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none", "deterministic": True},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
        "auth": {"openapi": {"ApiKey": {"api_key": api_key}}},
        **settings,
    })


def without_transport_headers(_context: schemathesis.HookContext, headers: dict[str, Any]) -> dict[str, Any]:
    """``map_headers``: no generated HTTP framing header (``Transfer-Encoding: 8Gl@Uid*`` makes the
    HTTP server, not the app, answer 400 text/plain "Invalid HTTP request received.")."""
    return {name: value for name, value in (headers or {}).items() if name.lower() not in TRANSPORT_HEADERS}


@pytest.fixture(autouse=True)
def node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy schemas read ``Node._nodeid``, which pytest 9.2 replaced by ``_id``.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
