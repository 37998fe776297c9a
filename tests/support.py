"""Helpers for tests that run real processes and servers on loopback."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import uvicorn

from shared.processes import end_with_parent

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO_ROOT.parent / "shared"


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TEST_PORTS_FROM, TEST_PORTS_PER_WORKER = 20000, 1500
"""Each pytest-xdist worker draws its servers' ports from its own slice of 20000-31999."""
_port_choice = random.Random()  # its own generator: tests that seed the global one do not repeat its draws
_ports_handed_out: collections.deque[int] = collections.deque(maxlen=256)  # not yet bound, maybe


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range where it can.

    A port from ``bind(("127.0.0.1", 0))`` is an ephemeral one, the range the kernel also takes the
    local port of every outgoing connection from: between this call and the server's own bind, a
    test's client connecting to PostgreSQL or Redis could take it (seen once in a full run: uvicorn's
    "address already in use"). Below the range only explicit binds take ports, and each xdist worker
    keeps to its own slice, so two workers never hand out the same one.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = TEST_PORTS_FROM + (int(worker) % 8 if worker.isdigit() else 0) * TEST_PORTS_PER_WORKER
    if first + TEST_PORTS_PER_WORKER <= _ephemeral_low():
        for port in _port_choice.sample(range(first, first + TEST_PORTS_PER_WORKER), 50):
            if port in _ports_handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:  # in use, or lingering in TIME_WAIT
                    continue
            _ports_handed_out.append(port)
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@functools.cache
def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


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


def model_child(pid: int) -> bool:
    """Whether ``pid`` is a model's child process (multiprocessing's spawn entry point)."""
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1,
               details: Callable[[], str] | None = None) -> None:
    """Poll ``predicate`` until true or fail the test naming ``what`` (and ``details()``, when given)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    suffix = f": {details()}" if details else ""
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{suffix}")


async def wait_until_async(predicate: Callable[[], bool], timeout_s: float, what: str,
                           interval_s: float = 0.001) -> None:
    """:func:`wait_until` inside a running event loop: yields to it between polls instead of blocking it."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


class ManagedProcess:
    """A child process whose combined output is captured line by line for assertions."""

    def __init__(self, argv: list[str], env: Mapping[str, str], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        # Dies with the test process however it ends (a killed pytest left Celery workers behind that
        # went on consuming the next run's queues).
        self.process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=functools.partial(end_with_parent, os.getpid()),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_output(self, pattern: str, timeout_s: float = 60.0) -> None:
        """Block until a line matches ``pattern`` (regex) or the process dies."""
        regex = re.compile(pattern)

        def seen() -> bool:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise AssertionError(f"{self.name} exited ({code}):\n{self.output[-4000:]}")
            return any(regex.search(line) for line in list(self.lines))

        wait_until(seen, timeout_s, f"{self.name} to print {pattern!r}\n{self.output[-3000:]}")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (worker and its pool children)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)

    def _read_to_the_end(self) -> None:
        """After the group is gone: every line it wrote is in :attr:`lines` (nothing more can come)."""
        self._reader.join(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM the leader, wait, then SIGKILL the group if needed; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of the group, if any
        self._read_to_the_end()
        return int(self.process.returncode)


def python_argv(*args: str) -> list[str]:
    """argv running this interpreter."""
    return [sys.executable, *args]


@contextlib.contextmanager
def served_in_thread(app: Any, *, lifespan: Literal["on", "off"] = "off") -> Iterator[str]:
    """``app`` under uvicorn in this process (its lifespan off unless asked) on a free loopback port;
    yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
