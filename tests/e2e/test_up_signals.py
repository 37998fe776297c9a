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

from tests.support import ManagedProcess, free_port, python_argv, wait_until


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, merely not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_free(port: int) -> bool:
    """True when a new server could bind 127.0.0.1:port (what the next `make run` needs)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def model_child(pid: int) -> bool:
    """Whether ``pid`` is a model's child process (multiprocessing's spawn entry point)."""
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


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
        os.killpg(up.process.pid, ending)  # a closed terminal signals its foreground process group
        up.process.wait(timeout=60)
        wait_until(lambda: port_free(port) and not any(alive(pid) for pid in children), 15,
                   f"the port to be free and every child of `tessera up` to end after {ending.name}")
        if ending != signal.SIGKILL:
            assert up.process.returncode == 0, up.output[-3000:]
            assert f"{ending.name} received; stopping" in up.output and "tessera up: all stopped" in up.output
    finally:
        up.stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
