"""`tessera up` ends every process it started, whatever ends it: a closed terminal (SIGHUP), SIGTERM,
SIGQUIT, or SIGKILL of `tessera up` itself (Linux: the children die with their parent)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from services.cli import STOP_GRACE_S
from shared.processes import ALLOCATOR_ENV
from tests.support import ManagedProcess, alive, descendants, free_port, model_child, python_argv, wait_until


def port_free(port: int) -> bool:
    """True when a new server could bind 127.0.0.1:port (what the next `make run` needs)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def survivors(pids: set[int]) -> list[str]:
    """The command line of each process in ``pids`` still running, for a failure message."""
    found = []
    for pid in sorted(pids):
        if alive(pid):
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100].decode()
                found.append(f"{pid} {command}")
    return found


def environment(pid: int) -> dict[str, str]:
    """The environment process ``pid`` started with ({} once it has ended)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in raw.split(b"\0") if entry)


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; parent-death signal is Linux's")
@pytest.mark.parametrize("ending", [signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_every_signal_that_ends_tessera_up_ends_its_children(tmp_path: Path, ending: signal.Signals) -> None:
    port = free_port()
    env = {"TESSERA_DATA_DIR": str(tmp_path / "data"), "TESSERA_PORT": str(port), "TESSERA_LOG_JSON": "false",
           "PYTHONUNBUFFERED": "1", "TESSERA_FRAUD_MODEL_PROCESS": "true"}  # the gateway's model child too
    up = ManagedProcess(python_argv("-m", "services.cli", "up"), env, "tessera-up")
    children: set[int] = set()
    try:
        up.wait_for_output(r"ready\.", timeout_s=120)  # the Celery worker
        wait_until(lambda: serving(port), 90, "the gateway to serve")
        wait_until(lambda: any(model_child(pid) for pid in descendants(up.process.pid)), 90,
                   "the gateway's fraud model child process to start")
        children = descendants(up.process.pid)
        assert len(children) >= 4, children  # uvicorn and its model child, the worker and its pool / beat
        started = [environment(pid) for pid in children]
        assert all(ALLOCATOR_ENV.items() <= env.items() for env in started if env), "glibc settings missing"
        os.killpg(up.process.pid, ending)  # a closed terminal signals its foreground process group
        up.process.wait(timeout=60)
        # after SIGKILL no supervisor is left to escalate: each child gets SIGTERM from the kernel and stops
        # gracefully (an idle Celery worker takes ~5 s here, more on a loaded CI box), so allow `up`'s own grace
        wait_until(lambda: port_free(port) and not any(alive(pid) for pid in children), STOP_GRACE_S + 10,
                   f"the port to be free and every child of `tessera up` to end after {ending.name}",
                   details=lambda: f"still running: {survivors(children)}")
        if ending != signal.SIGKILL:
            assert up.process.returncode == 0, up.output[-3000:]
            assert f"{ending.name} received; stopping" in up.output and "tessera up: all stopped" in up.output
    finally:
        up.stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
