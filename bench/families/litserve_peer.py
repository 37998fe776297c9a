"""LitServe as a peer server for the serving benchmarks: any ``LitAPI`` class, one subprocess.

:func:`litserve_server` starts ``python bench/families/litserve_peer.py serve --api module:Class``
in a subprocess and yields its base URL once ``/health`` answers; the subprocess builds the API
with ``Class(max_batch_size=..., batch_timeout=..., threads=...)`` and runs one ``LitServer`` (CPU,
one inference worker, one API server, uvloop + httptools, access log off), as
``shared/reference/performance.md`` measured LitServe 0.2.19. Every API class used this way takes
those three keyword arguments; ``threads`` is torch's intra-op thread count in the inference worker.

:class:`ReferenceLitAPI` serves ``bench.runtime``'s reference model (body
``{"sequence": [[16 floats] x 32]}``, answer ``{label, probabilities}``) for the goodput comparison
at c=256; :data:`REFERENCE_CONFIGS` holds the two batch settings of performance.md::

    with litserve_server("bench.families.litserve_peer:ReferenceLitAPI", **REFERENCE_CONFIGS["b64-10ms"]) as peer:
        ...  # load peer.url + "/predict"; peer.peak_rss_mb() after each point
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import litserve as ls  # noqa: E402
import torch  # noqa: E402
from fastapi import Request  # noqa: E402

from bench.runtime import answer, free_port, reference_model  # noqa: E402

ApiT = TypeVar("ApiT", bound=ls.LitAPI)
REFERENCE_API = "bench.families.litserve_peer:ReferenceLitAPI"
REFERENCE_CONFIGS: dict[str, dict[str, float]] = {
    "b64-10ms": {"max_batch_size": 64, "batch_timeout": 0.010},
    "b16-2ms": {"max_batch_size": 16, "batch_timeout": 0.002},
}


def litserve_http(request_type: Any = Request) -> Callable[[type[ApiT]], type[ApiT]]:
    """Class decorator: LitServe reads a request as ``request_type`` and answers with no response model.

    LitServe builds its endpoint from the annotations of ``decode_request`` (parameter ``request``)
    and ``encode_response`` (return); under ``from __future__ import annotations`` they are strings
    it cannot resolve. ``Request`` (the default) makes LitServe parse the JSON body; an
    ``Annotated[T, Depends(reader)]`` hands ``decode_request`` what ``reader(request)`` returns (a
    raw body, a header), as FastAPI resolves dependencies.
    """

    def expose(api_class: type[ApiT]) -> type[ApiT]:
        api_class.decode_request.__annotations__["request"] = request_type
        api_class.encode_response.__annotations__.pop("return", None)
        return api_class

    return expose


def use_threads(threads: int) -> None:
    """Set torch's intra-op thread count in the calling thread when it differs (cheap to repeat)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@litserve_http()
class ReferenceLitAPI(ls.LitAPI):
    """``bench.runtime``'s reference model behind LitServe, batched by LitServe.

    Parameters
    ----------
    max_batch_size, batch_timeout : int, float
        LitServe's batching (items, seconds).
    threads : int
        torch intra-op threads in the inference worker.
    """

    def __init__(self, max_batch_size: int = 64, batch_timeout: float = 0.010, threads: int = 1) -> None:
        super().__init__(max_batch_size=int(max_batch_size), batch_timeout=float(batch_timeout))
        self.threads = int(threads)

    def setup(self, device: str) -> None:
        """Build the model (seed 0, as ``bench.runtime.reference_model``)."""
        use_threads(self.threads)
        self.model = reference_model()

    def decode_request(self, request: dict[str, Any]) -> torch.Tensor:
        """``{"sequence": [[16 floats] x 32]}`` -> (32, 16) float32 tensor."""
        return torch.tensor(request["sequence"], dtype=torch.float32)

    def predict(self, x: torch.Tensor) -> list[list[float]]:
        """Class probabilities of a stacked batch (LitServe's default ``batch`` stacks tensors)."""
        use_threads(self.threads)
        with torch.inference_mode():
            batch = x if x.ndim == 3 else x.unsqueeze(0)
            return torch.softmax(self.model(batch), dim=-1).tolist()

    def unbatch(self, output: Any) -> list[Any]:
        """One probability row per request."""
        return list(output)

    def encode_response(self, output: Any) -> dict[str, Any]:
        """``{label, probabilities}``, as ``bench.runtime`` answers."""
        row = output[0] if self.max_batch_size == 1 else output
        return answer(row)


def load_api_class(path: str) -> type[ls.LitAPI]:
    """``"package.module:ClassName"`` -> the class."""
    module_name, _, class_name = path.partition(":")
    api_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(api_class, type) and issubclass(api_class, ls.LitAPI)):
        raise TypeError(f"{path} is not a LitAPI class")
    return api_class


def serve_litapi(api: ls.LitAPI, port: int, host: str = "127.0.0.1", workers: int = 1) -> None:
    """Run one LitServe server for ``api`` in this process until terminated.

    ``workers`` inference worker processes on the CPU and one API server process, uvloop +
    httptools, access log off, no client file written.
    """
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=workers)
    server.run(host=host, port=port, num_api_servers=1, log_level="warning", generate_client_file=False,
               loop="uvloop", http="httptools", access_log=False)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc/<pid>/task/*/children``)."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
                found.extend(children)
                frontier.extend(children)
    return found


def peak_rss_mb(pid: int) -> float:
    """Sum of the peak resident set size (``VmHWM``) of ``pid`` and its descendants, in MB.

    Pages shared between processes (torch's libraries after a fork) count once per process.
    """
    total_kb = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/status") as handle:
            total_kb += next((int(line.split()[1]) for line in handle if line.startswith("VmHWM:")), 0)
    return total_kb / 1024


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its live descendants."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{member}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds this machine spent busy (all CPUs, everything but idle and iowait) since boot."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def is_healthy(url: str) -> bool:
    """Whether ``GET url`` answers 200 (any body: LitServe's ``/health`` says ``ok`` in plain text)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class ServerHandle:
    """A benchmark server subprocess: its base URL and process id."""

    url: str
    pid: int

    def peak_rss_mb(self) -> float:
        """Peak RSS of the server and its child processes so far (MB)."""
        return peak_rss_mb(self.pid)


@contextlib.contextmanager
def server_subprocess(command: list[str], health_path: str, startup_s: float = 120.0,
                      env: dict[str, str] | None = None) -> Iterator[ServerHandle]:
    """Start ``command`` (which must serve ``--port``'s value, appended here) and wait for ``health_path``.

    Yields a :class:`ServerHandle`; the process (and, through its own shutdown, its children) is
    terminated on exit.
    """
    port = free_port()
    # stderr discarded: LitServe logs every request it cancels at shutdown (thousands of tracebacks)
    process = subprocess.Popen([*command, "--port", str(port)], env={**os.environ, **(env or {})},
                               start_new_session=True, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if is_healthy(base + health_path):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {' '.join(command)} did not start")
            time.sleep(0.2)
        yield ServerHandle(base, process.pid)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server, then its whole session if it lingers (LitServe's workers)."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, 15)  # orphaned workers of this server's own session, if any


@contextlib.contextmanager
def litserve_server(api: str, *, max_batch_size: float, batch_timeout: float, threads: int = 1,
                    workers: int = 1) -> Iterator[ServerHandle]:
    """A LitServe server for the LitAPI class ``api`` (``"module:Class"``) in a subprocess.

    Parameters
    ----------
    api : str
        Import path of a ``LitAPI`` subclass taking ``max_batch_size``, ``batch_timeout`` and
        ``threads`` keyword arguments.
    max_batch_size, batch_timeout : float
        LitServe's batch size and batch timeout (seconds).
    threads : int
        torch intra-op threads in each inference worker.
    workers : int
        Inference worker processes (LitServe's ``workers_per_device``).
    """
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--api", api,
               "--max-batch-size", str(int(max_batch_size)), "--batch-timeout", str(batch_timeout),
               "--threads", str(threads), "--workers", str(workers)]
    with server_subprocess(command, "/health") as handle:
        yield handle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run one LitServe server")
    serve_cmd.add_argument("--api", default=REFERENCE_API, help="module:LitAPIClass")
    serve_cmd.add_argument("--port", type=int, required=True)
    serve_cmd.add_argument("--max-batch-size", type=int, default=64)
    serve_cmd.add_argument("--batch-timeout", type=float, default=0.010)
    serve_cmd.add_argument("--threads", type=int, default=1)
    serve_cmd.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    use_threads(args.threads)
    api_class = load_api_class(args.api)
    serve_litapi(api_class(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,  # type: ignore[call-arg]
                           threads=args.threads), args.port, workers=args.workers)


if __name__ == "__main__":
    main()
