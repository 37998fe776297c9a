"""Serving benchmark: the reference model behind uvicorn three ways, loaded by wrk on loopback.

Reference model (``shared/reference/performance.md``): transformer encoder classifier, 2 layers,
d_model 128, 4 heads, ff 256, learned positions, input 32x16 floats as JSON
``{"sequence": [[16 floats] x 32]}``, 271k parameters, ``torch.set_num_threads(1)``.

Servers (each a separate uvicorn process, uvloop + httptools, started one after the other):

- ``def``: FastAPI ``def`` endpoint, the model called per request in the threadpool (naive baseline);
- ``async``: ``async def`` endpoint calling the model inline on the event loop;
- ``runtime``: ``async def`` endpoint -> ``model_runtime`` dynamic batching, greedy policy;
- ``runtime-window``: the same with the Ray/LitServe-style fixed 2 ms window (policy comparison).

Every server parses the body with the same pydantic model, records server-side latency per
status (so admitted (200) latency can be told apart from fast 503s at the overload point) and tunes
the garbage collector after start-up as every Tessera service does (``shared.app``): the modes
differ only in how the model is called.

Then one table per model family the runtime serves (``bench/families/``), each against the naive
way in the same run: ``volume`` (3D U-Net, sliding-window patches of concurrent studies against
MONAI's ``sliding_window_inference`` per study), ``fusion`` (audio + text utterances from concurrent
callers, batched against one-by-one and LitServe), ``sensor`` (attention over sensor windows,
batched against unbatched); and ``fraud``, the fraud model's in-process figures
(``bench/fraud.py --skip-http``), to show nothing regressed.

Usage::

    python bench/runtime.py            # everything (~25 min), 10 s a reference point
    python bench/runtime.py --quick    # ~6 min
    python bench/runtime.py --families reference,volume     # a subset
    python bench/runtime.py serve --mode runtime --port 8765   # one server, for poking at

Writes ``bench/results/runtime.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import torch
from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEQ_LEN, FEATURES, CLASSES = 32, 16, 2
MODEL_NAME = "reference"
MODES = ("def", "async", "runtime", "runtime-window", "litserve-b64", "litserve-b16")
PEER_MODES = {"litserve-b64": "b64-10ms", "litserve-b16": "b16-2ms"}
"""LitServe 0.2.19 serving the same model (``bench/families/litserve_peer.py``), as performance.md measured it."""
CONCURRENCY = (1, 32, 128)
OVERLOAD_CONCURRENCY = 256
OVERLOAD_LEVELS: tuple[int, ...] = (OVERLOAD_CONCURRENCY,)
"""Concurrency levels past saturation measured this run (``--overload``)."""
RUNTIME_BATCH, RUNTIME_QUEUE, WINDOW_MS = 64, 96, 2.0
RUNTIME_QUEUE_DELAY_MS: float | None = None  # measured: with instant client retries it sheds too much
RUNTIME_LATENCY_TARGET_MS = float(os.environ.get("TESSERA_BENCH_LATENCY_TARGET_MS", "50"))
"""Admission by measured capacity (``ModelSpec.latency_target_ms``); 0 turns it off (queue bound only)."""
RUNTIME_HOLD_REFUSALS_S = float(os.environ.get("TESSERA_BENCH_HOLD_REFUSALS_S", "0.2"))
"""How long the load-shedding gate holds a refusal at least (``SheddingGate(hold_s=...)``)."""
RUNTIME_MAX_REFUSALS_PER_S = float(os.environ.get("TESSERA_BENCH_MAX_REFUSALS_PER_S", "500"))
"""The gate holds refusals longer when many are held, answering about this many a second (0: fixed hold)."""
RUNTIME_REFUSAL_SHARE = float(os.environ.get("TESSERA_BENCH_REFUSAL_SHARE", "0.05"))
"""...and at most this share of the requests it answers a second (0: no share bound)."""
RUNTIME_MAX_HOLD_S = float(os.environ.get("TESSERA_BENCH_MAX_HOLD_S", "3.0"))
"""Longest hold of a refusal (s)."""
RUNTIME_GATE_IN_FLIGHT = os.environ.get("TESSERA_BENCH_GATE_IN_FLIGHT", "0") == "1"
"""The gate also bounds requests in flight by the answered rate x the latency target (Little's law). Off:
its refusals come first, so the runtime's admission never sees saturation and lets the mean reach the target."""


class ReferenceClassifier(torch.nn.Module):
    """(N, 32, 16) float -> (N, 2) logits: 2-layer transformer encoder, d_model 128, 4 heads, ff 256."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(FEATURES, 128)
        self.position = torch.nn.Parameter(torch.zeros(1, SEQ_LEN, 128))
        layer = torch.nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(128, CLASSES)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(sequence) + self.position).mean(dim=1))


def reference_model() -> ReferenceClassifier:
    """The reference model with fixed random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    return ReferenceClassifier().eval()


def example_body(seed: int = 1) -> str:
    """One request body: ``{"sequence": [[16 floats] x 32]}``."""
    rng = random.Random(seed)
    rows = [[round(rng.gauss(0, 1), 5) for _ in range(FEATURES)] for _ in range(SEQ_LEN)]
    return json.dumps({"sequence": rows})


# ---------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------
class SequenceIn(BaseModel):
    """Request body: ``{"sequence": [[16 floats] x 32]}``."""

    sequence: list[list[float]]


async def raw_body(request: Request) -> bytes:
    """The request body as bytes (a dependency, so the ``def`` endpoint gets it too)."""
    return await request.body()


def decode(body: bytes) -> torch.Tensor:
    """Request bytes -> (32, 16) float32 tensor, or 422. The same decoder serves every mode."""
    from pydantic import ValidationError

    from shared.errors import UnprocessableContent

    try:
        array = np.asarray(SequenceIn.model_validate_json(body).sequence, dtype=np.float32)
    except (ValidationError, ValueError) as exc:
        raise UnprocessableContent(f"body is not {{\"sequence\": [[floats]]}}: {exc}") from exc
    if array.shape != (SEQ_LEN, FEATURES):
        raise UnprocessableContent(f"sequence must be {SEQ_LEN}x{FEATURES}, got {array.shape}")
    return torch.from_numpy(array)


def answer(probabilities: list[float]) -> dict[str, Any]:
    """Response body for one item."""
    return {"label": max(range(len(probabilities)), key=probabilities.__getitem__),
            "probabilities": probabilities}


def run_reference(model: torch.nn.Module, items: list[torch.Tensor]) -> list[list[float]]:
    """Batched forward: list of (32, 16) tensors -> list of class probabilities."""
    with torch.inference_mode():
        return torch.softmax(model(torch.stack(items)), dim=-1).tolist()


class StatusLatency:
    """Plain ASGI middleware recording server-side latency per HTTP status (for admitted p99)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.samples: dict[int, list[float]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/bench"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.samples.setdefault(status, []).append(time.perf_counter() - started)

    def report(self) -> dict[str, Any]:
        """Count, p50 and p99 (ms) per status since the last report; resets."""
        samples, self.samples = self.samples, {}
        report = {}
        for status, values in samples.items():
            values.sort()
            pick = lambda q, v=values: v[min(len(v) - 1, int(q * len(v)))] * 1000  # noqa: E731
            report[str(status)] = {"count": len(values), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}
        return report


def build_server(mode: str) -> StatusLatency:
    """The ASGI app for one mode, wrapped in :class:`StatusLatency`.

    Every mode reads the raw body, decodes it with :func:`decode` and answers with orjson, so the
    modes differ only in how the model is called.
    """
    from prometheus_client import REGISTRY

    from model_runtime import ModelSpec, get_runtime
    from shared.app import tune_garbage_collector
    from shared.errors import install_problem_handlers
    from shared.shedding import SheddingGate

    model = reference_model()
    runtime = get_runtime()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if mode.startswith("runtime"):
            await runtime.load(ModelSpec(
                name=MODEL_NAME, version="bench", loader=lambda _ctx: model, prepare=decode,
                run_batch=run_reference, finalize=answer, max_batch_size=RUNTIME_BATCH,
                max_queue=RUNTIME_QUEUE, max_queue_delay_ms=RUNTIME_QUEUE_DELAY_MS, max_wait_ms=WINDOW_MS,
                latency_target_ms=RUNTIME_LATENCY_TARGET_MS or None,
                fill="window" if mode == "runtime-window" else "greedy",
                warmup_items=[example_body().encode()] * 8))
        tune_garbage_collector()  # every mode, as every Tessera service app does after start-up
        yield
        await runtime.close()

    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)
    # The runtime modes put the platform's load-shedding gate in front: a request the model would
    # refuse is answered 503 before FastAPI (admitted requests take the same FastAPI path as the others).
    # The gate's admission is the request's: predict uses it instead of asking again, and the
    # requests between the gate and the queue count as admitted work.
    refusals = {("POST", "/predict"): lambda: runtime.admit_request(MODEL_NAME)}
    gate = SheddingGate(app, refusals, hold_s=RUNTIME_HOLD_REFUSALS_S,
                        max_refusals_per_s=RUNTIME_MAX_REFUSALS_PER_S or None,
                        max_refusal_share=RUNTIME_REFUSAL_SHARE or None, max_hold_s=RUNTIME_MAX_HOLD_S,
                        latency_target_s=(RUNTIME_LATENCY_TARGET_MS / 1000
                                          if RUNTIME_GATE_IN_FLIGHT and RUNTIME_LATENCY_TARGET_MS else None))
    timing = StatusLatency(gate if mode.startswith("runtime") else app)

    def json_response(result: dict[str, Any]) -> Response:
        return Response(orjson.dumps(result), media_type="application/json")

    if mode == "def":
        @app.post("/predict")
        def predict_sync(body: Annotated[bytes, Depends(raw_body)]) -> Response:
            return json_response(answer(run_reference(model, [decode(body)])[0]))
    elif mode == "async":
        @app.post("/predict")
        async def predict_inline(request: Request) -> Response:
            return json_response(answer(run_reference(model, [decode(await request.body())])[0]))
    else:
        @app.post("/predict")
        async def predict_batched(request: Request) -> Response:
            # The raw body is the item: the runtime checks capacity before decoding it, so a
            # refused request costs almost nothing on the event loop.
            return json_response(await runtime.predict(MODEL_NAME, await request.body()))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/bench/stats")
    async def bench_stats() -> dict[str, Any]:
        labels = {"model": MODEL_NAME}
        batches = [REGISTRY.get_sample_value(f"tessera_model_batch_size_{kind}", labels) or 0.0
                   for kind in ("count", "sum")]
        return {"latency": timing.report(), "runtime": runtime.stats(), "batches": batches, "gc": gc_pauses(),
                "gc_young_objects": gc.get_count()[0]}

    return timing


def gc_pauses() -> dict[str, dict[str, float]]:
    """Per generation: collections, their total and the ones over 5 ms (``tessera_gc_pause_seconds``), so far."""
    from prometheus_client import REGISTRY

    totals = {}
    for generation in ("0", "1", "2"):
        labels = {"generation": generation}
        count = REGISTRY.get_sample_value("tessera_gc_pause_seconds_count", labels) or 0.0
        under_5ms = REGISTRY.get_sample_value("tessera_gc_pause_seconds_bucket", {**labels, "le": "0.005"}) or 0.0
        totals[generation] = {"count": count, "total_ms": 1000 * (REGISTRY.get_sample_value(
            "tessera_gc_pause_seconds_sum", labels) or 0.0), "over_5ms": count - under_5ms}
    return totals


def serve(mode: str, port: int) -> None:
    """Run one server in this process until terminated."""
    import uvicorn

    torch.set_num_threads(1)
    uvicorn.run(build_server(mode), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on")


# ---------------------------------------------------------------------------------------------
# Load side
# ---------------------------------------------------------------------------------------------
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [=[BODY]=]
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do merged[code] = (merged[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(merged) do table.insert(parts, string.format('"%d":%d', code, n)) end
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"socket_errors":%d,"timeouts":%d,"statuses":{%s}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.timeout,
    table.concat(parts, ",")))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def server_process(mode: str) -> Any:
    """Start one server subprocess and yield ``(base URL, pid)`` once it answers /healthz."""
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "serve", "--mode", mode, "--port", str(port)],
                               env={**os.environ, "TESSERA_LOG_JSON": "false", "TESSERA_ACCESS_LOG": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                get_json(base + "/healthz")
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {mode} did not start")
            time.sleep(0.1)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=20)


def run_wrk(base: str, script: Path, connections: int, seconds: float) -> dict[str, Any]:
    """One closed-loop wrk run; returns its JSON summary."""
    return finish_wrk(start_wrk(base, script, connections, seconds))


def start_wrk(base: str, script: Path, connections: int, seconds: float) -> subprocess.Popen[str]:
    """Start one closed-loop wrk run in the background (:func:`finish_wrk` waits for its summary)."""
    threads = 1 if connections == 1 else 2
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "15s",
               "-s", str(script), base + "/predict"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def finish_wrk(run: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait for a wrk run; its JSON summary."""
    output, _ = run.communicate()
    if run.returncode != 0:
        raise subprocess.CalledProcessError(run.returncode, run.args, output)
    line = next(line for line in output.splitlines() if line.startswith("WRKJSON "))
    return json.loads(line.removeprefix("WRKJSON "))


class BoxMeter:
    """What the shared box did during one measured point: load average, and CPU cores used by the
    server (its process tree), by wrk, and by everything else on the machine (other helpers' work).

    Use ``with BoxMeter(pid) as box: ...``, then ``box.record``.
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.record: dict[str, float] = {}

    def __enter__(self) -> BoxMeter:
        from bench.families.litserve_peer import machine_busy_seconds, tree_cpu_seconds

        self._load = os.getloadavg()[0]
        self._wall = time.monotonic()
        self._machine = machine_busy_seconds()
        self._server = tree_cpu_seconds(self.server_pid)
        self._children = _children_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        from bench.families.litserve_peer import machine_busy_seconds, tree_cpu_seconds

        wall = max(1e-9, time.monotonic() - self._wall)
        machine = (machine_busy_seconds() - self._machine) / wall
        server = (tree_cpu_seconds(self.server_pid) - self._server) / wall
        wrk = (_children_cpu_seconds() - self._children) / wall
        self.record = {"load1_before": self._load, "load1_after": os.getloadavg()[0],
                       "machine_cores": machine, "server_cores": server, "wrk_cores": wrk,
                       "other_cores": max(0.0, machine - server - wrk)}


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_peer_point(base: str, pid: int, script: Path, connections: int, seconds: float,
                       warmup_s: float) -> dict[str, Any]:
    """One point of a peer server (no ``/bench/stats``): wrk's figures only."""
    run_wrk(base, script, connections, warmup_s)
    with BoxMeter(pid) as box:
        wrk = run_wrk(base, script, connections, seconds)
    total = max(1, wrk["requests"])
    statuses = {int(k): v for k, v in wrk["statuses"].items()}
    ok = statuses.get(200, 0)
    return {"concurrency": connections, "req_per_s": wrk["requests"] / (wrk["duration_us"] / 1e6),
            "ok_per_s": ok / (wrk["duration_us"] / 1e6), "p50_ms": wrk["p50_us"] / 1000,
            "p99_ms": wrk["p99_us"] / 1000, "max_ms": wrk["max_us"] / 1000,
            "rate_503": statuses.get(503, 0) / total,
            "error_rate": (total - ok - statuses.get(503, 0) + wrk["socket_errors"]) / total,
            "server_p50_ms_200": None, "server_p99_ms_200": None, "server_p99_ms_503": None,
            "statuses": statuses, "runtime": None, "mean_batch": None, "box": box.record}


@contextlib.contextmanager
def any_server(mode: str) -> Any:
    """Our server for ``mode``, or the LitServe peer; yields ``(base URL, pid)``."""
    if mode in PEER_MODES:
        from bench.families.litserve_peer import REFERENCE_API, REFERENCE_CONFIGS, litserve_server

        config = REFERENCE_CONFIGS[PEER_MODES[mode]]
        with litserve_server(REFERENCE_API, max_batch_size=config["max_batch_size"],
                             batch_timeout=config["batch_timeout"]) as handle:
            yield handle.url, handle.pid
    else:
        with server_process(mode) as server:
            yield server


SETTLE_S = 2.0
"""Seconds each measured wrk run of our servers runs before the server-side window opens."""


def measure_point(base: str, pid: int, script: Path, connections: int, seconds: float,
                  warmup_s: float) -> dict[str, Any]:
    """Warm up, then measure one (server, concurrency) point; adds server-side per-status figures.

    The measured wrk run keeps its connections through :data:`SETTLE_S` before the server's window
    (answered and refused counts, admitted latency) opens: opening ``connections`` connections at
    once is a start-up transient (at c=512 it allocates enough at once for a 40-60 ms garbage
    collection), not the steady state a point stands for. wrk's own figures (p50, p99, errors)
    cover its whole run, the settling included.
    """
    run_wrk(base, script, connections, warmup_s)
    measured = start_wrk(base, script, connections, SETTLE_S + seconds)
    time.sleep(SETTLE_S)
    before = get_json(base + "/bench/stats")  # also resets the server-side latency window
    with BoxMeter(pid) as box:
        opened = time.monotonic()
        wrk = finish_wrk(measured)
        server = get_json(base + "/bench/stats")
        window_s = time.monotonic() - opened
    batches, items = (after - earlier for after, earlier in zip(server["batches"], before["batches"],
                                                                 strict=True))
    counts = {int(status): figures["count"] for status, figures in server["latency"].items()}
    total = max(1, sum(counts.values()))
    statuses = {int(k): v for k, v in wrk["statuses"].items()}
    admitted = server["latency"].get("200", {})
    return {
        "concurrency": connections,
        "req_per_s": sum(counts.values()) / window_s,
        "ok_per_s": counts.get(200, 0) / window_s,
        "p50_ms": wrk["p50_us"] / 1000, "p99_ms": wrk["p99_us"] / 1000, "max_ms": wrk["max_us"] / 1000,
        "rate_503": counts.get(503, 0) / total,
        "error_rate": (sum(statuses.values()) - statuses.get(200, 0) - statuses.get(503, 0) + wrk["socket_errors"])
        / max(1, wrk["requests"]),
        "server_p50_ms_200": admitted.get("p50_ms"), "server_p99_ms_200": admitted.get("p99_ms"),
        "server_p99_ms_503": server["latency"].get("503", {}).get("p99_ms"),
        "statuses": statuses, "server_statuses": counts, "window_s": window_s,
        "runtime": server["runtime"].get(MODEL_NAME),
        "mean_batch": items / batches if batches else None, "box": box.record,
        "gc": {generation: {key: value - before.get("gc", {}).get(generation, {}).get(key, 0.0)
                            for key, value in totals.items()}
               for generation, totals in server.get("gc", {}).items()},
        "gc_young_objects": server.get("gc_young_objects"),
    }


def measure_backends() -> dict[str, Any]:
    """Eager vs ONNX Runtime vs ONNX int8 for the reference model (1 thread)."""
    from model_runtime import choose_cpu_backend

    torch.set_num_threads(1)
    torch.manual_seed(2)
    example = torch.randn(64, SEQ_LEN, FEATURES)
    choice = choose_cpu_backend(reference_model(), example, max_abs_error=1e-3, batch_sizes=(1, 8, 64))
    return choice.as_dict()


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_backends(record: dict[str, Any]) -> None:
    print(f"\nCPU backends, reference model, 1 thread (chosen: {record['chosen']})")
    print(f"{'backend':<10} {'b=1 ms':>8} {'b=8 ms/item':>12} {'b=64 ms/item':>13} {'max |err|':>10}")
    for m in record["measurements"]:
        if m["error"]:
            print(f"{m['name']:<10} failed: {m['error']}")
            continue
        per_item = m["per_item_ms"]
        print(f"{m['name']:<10} {m['latency_ms'][1]:>8.3f} {per_item[8]:>12.3f} {per_item[64]:>13.3f} "
              f"{m['max_abs_error']:>10.2e}")


def print_table(points: list[dict[str, Any]]) -> None:
    print(f"\n{'server':<15} {'c':>5} {'req/s':>8} {'200/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'503 %':>6} "
          f"{'err %':>6} {'200 p99 srv':>11} {'model p99':>9} {'mean batch':>10} {'load1':>6} {'others':>6} "
          f"{'GC ms >5ms':>11}")
    for p in points:
        box = p.get("box") or {}
        label = f"{p['concurrency']}{'r' if p.get('recheck') else ''}"
        model_p99 = (p.get("runtime") or {}).get("p99_ms")
        print(f"{p['server']:<15} {label:>5} {p['req_per_s']:>8.0f} {p['ok_per_s']:>8.0f} "
              f"{p['p50_ms']:>8.2f} {p['p99_ms']:>8.1f} {100 * p['rate_503']:>6.1f} {100 * p['error_rate']:>6.1f} "
              f"{fmt(p['server_p99_ms_200']):>11} {fmt(model_p99):>9} {fmt(p['mean_batch']):>10} "
              f"{fmt(box.get('load1_before'), '.2f'):>6} {fmt(box.get('other_cores'), '.2f'):>6} "
              f"{gc_summary(p.get('gc')):>11}")
    print("(c=...r: the c=128 point measured again after the overload points; model p99: queued to answered in the "
          "runtime's batcher, over its recent items; the rest of '200 p99 srv' is the HTTP stack, the prepare "
          "hand-off and the wait for the event loop; load1: load average before the point; others: CPU cores used "
          "by other processes on the box during it; GC: milliseconds the server's garbage collections took during "
          "the point, and how many took over 5 ms)")


def gc_summary(gc_delta: dict[str, dict[str, float]] | None) -> str:
    """``total ms / collections over 5 ms`` of a point's garbage collections (``-`` for peers)."""
    if not gc_delta:
        return "-"
    total = sum(totals["total_ms"] for totals in gc_delta.values())
    long_ones = sum(totals["over_5ms"] for totals in gc_delta.values())
    return f"{total:.0f} / {long_ones:.0f}"


def ratios(points: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Batched / other throughput of answered (200) requests per concurrency."""
    by = {(p["server"], p["concurrency"]): p["ok_per_s"] for p in points}
    table: dict[str, dict[int, float]] = {}
    for baseline in ("def", "async", *PEER_MODES):
        row = {c: by[("runtime", c)] / by[(baseline, c)] for c in (*CONCURRENCY, *OVERLOAD_LEVELS)
               if by.get((baseline, c)) and ("runtime", c) in by}
        if row:
            table[f"runtime/{baseline}"] = row
    return table


def goodput(points: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Past saturation, per server and overload level: answered/s against its best below, and the admitted p99.

    Keyed ``"<server> c=<level>"``. The peak is the best answered/s of every point below the overload
    levels, the c=128 re-check after them included (the stricter comparison); the admitted p99 is
    compared with the peak point's. The admitted p99 is the server-side p99 of 200s where the
    server reports it (ours), else wrk's p99 over every request (a peer that refuses nothing).
    """
    summary: dict[str, dict[str, float]] = {}
    for server in {p["server"] for p in points}:
        mine = [p for p in points if p["server"] == server]
        below = [p for p in mine if p["concurrency"] in CONCURRENCY]
        if not below:
            continue
        peak = max(below, key=lambda p: p["ok_per_s"])
        admitted_p99 = lambda p: p["server_p99_ms_200"] if p["server_p99_ms_200"] is not None else p["p99_ms"]  # noqa: E731
        for over in (p for p in mine if p["concurrency"] not in CONCURRENCY):
            summary[f"{server} c={over['concurrency']}"] = {
                "server": server, "concurrency": over["concurrency"],
                "peak_ok_per_s": peak["ok_per_s"], "peak_concurrency": peak["concurrency"],
                "peak_is_recheck": bool(peak.get("recheck")),
                "overload_ok_per_s": over["ok_per_s"], "share_of_peak": over["ok_per_s"] / peak["ok_per_s"],
                "admitted_p99_ms_at_peak": admitted_p99(peak), "admitted_p99_ms_overload": admitted_p99(over),
                "rate_503": over["rate_503"]}
    return summary


def bench(quick: bool, seconds: float | None, modes: list[str],
          overload: tuple[int, ...] = (OVERLOAD_CONCURRENCY,)) -> dict[str, Any]:
    """Run every point, print the tables, return the JSON record.

    Servers measured past saturation (ours greedy, the LitServe peers) run c=1, 32, 128, then each
    ``overload`` level, then c=128 again: the box is shared, and the re-check shows whether the
    peak moved while the overload points ran.
    """
    global OVERLOAD_LEVELS
    OVERLOAD_LEVELS = tuple(overload)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    seconds = seconds or (3.0 if quick else 10.0)
    warmup_s = 1.0 if quick else 2.0
    backends = measure_backends()
    print_backends(backends)
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch) / "post.lua"
        script.write_text(WRK_SCRIPT.replace("BODY", example_body()))
        for mode in modes:
            with any_server(mode) as (base, pid):
                past_saturation = mode == "runtime" or mode in PEER_MODES
                levels = [*CONCURRENCY, *overload, CONCURRENCY[-1]] if past_saturation else list(CONCURRENCY)
                for index, connections in enumerate(levels):
                    measure = measure_peer_point if mode in PEER_MODES else measure_point
                    point = measure(base, pid, script, connections, seconds, warmup_s)
                    point["server"] = mode
                    point["recheck"] = index >= len(CONCURRENCY) + len(overload)
                    points.append(point)
                    print(f"  {mode:<15} c={connections:<4} {point['req_per_s']:7.0f} req/s "
                          f"p99 {point['p99_ms']:7.1f} ms  load {point['box']['load1_before']:.2f}, "
                          f"others {point['box']['other_cores']:.2f} cores", flush=True)
    print_table(points)
    ratio_table = ratios(points)
    past = goodput(points)
    print("\npast saturation: answered/s against the server's best below it (c=1/32/128 and the c=128 re-check)")
    for key, row in sorted(past.items()):
        recheck = " re-check" if row["peak_is_recheck"] else ""
        print(f"  {key:<20} {row['overload_ok_per_s']:7.0f}/s = {100 * row['share_of_peak']:5.1f} % of "
              f"{row['peak_ok_per_s']:.0f}/s (c={row['peak_concurrency']}{recheck}); admitted p99 "
              f"{row['admitted_p99_ms_overload']:.1f} ms against {row['admitted_p99_ms_at_peak']:.1f} ms there")
    record: dict[str, Any] = {"points": points, "backends": backends, "ratios": ratio_table, "goodput": past,
              "config": {"seconds": seconds, "quick": quick, "load": "wrk (closed loop, Lua POST body)",
                         "runtime_batch": RUNTIME_BATCH, "runtime_queue": RUNTIME_QUEUE,
                         "runtime_queue_delay_ms": RUNTIME_QUEUE_DELAY_MS,
                         "runtime_latency_target_ms": RUNTIME_LATENCY_TARGET_MS,
                         "window_ms": WINDOW_MS, "overload": list(overload),
                         "hold_refusals_s": RUNTIME_HOLD_REFUSALS_S,
                         "max_refusals_per_s": RUNTIME_MAX_REFUSALS_PER_S,
                         "refusal_share": RUNTIME_REFUSAL_SHARE, "max_hold_s": RUNTIME_MAX_HOLD_S,
                         "gate_in_flight_bound": RUNTIME_GATE_IN_FLIGHT,
                         "cpus": os.cpu_count(),
                         "python": platform.python_version(),
                         "torch": torch.__version__}}
    print("\nbatched/unbatched throughput (200s per second):")
    for name, ratio_row in ratio_table.items():
        print(f"  {name:<15} " + "  ".join(f"c={c}: {r:.2f}x" for c, r in ratio_row.items()))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve_cmd = sub.add_parser("serve", help="run one server")
    serve_cmd.add_argument("--mode", choices=MODES, required=True)
    serve_cmd.add_argument("--port", type=int, required=True)
    parser.add_argument("--quick", action="store_true", help="3 s a point (about a minute in all)")
    parser.add_argument("--seconds", type=float, help="measured seconds per point")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of servers")
    parser.add_argument("--overload", default=str(OVERLOAD_CONCURRENCY),
                        help="reference family: comma-separated concurrency levels past saturation (e.g. 256,512)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime.json")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.mode, args.port)
        return
    families = args.families.split(",")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    record: dict[str, Any] = {}
    if "reference" in families:
        record = bench(args.quick, args.seconds, args.modes.split(","),
                       tuple(int(level) for level in args.overload.split(",")))
    for family in families:
        if family != "reference":
            print(f"\n== {family} ==", flush=True)
            record[family] = FAMILY_RUNNERS[family](args.quick)
    for family in families:
        if family != "reference":
            FAMILY_PRINTERS[family](record[family])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


# ---------------------------------------------------------------------------------------------
# The other model families (bench/families/) and the fraud model's in-process figures
# ---------------------------------------------------------------------------------------------
FAMILIES = ("reference", "volume", "fusion", "sensor", "fraud")


def run_volume(quick: bool) -> dict[str, Any]:
    """3D U-Net volumes (:mod:`bench.families.volume`)."""
    from bench.families.volume import bench_volume

    return bench_volume(quick)


def run_fusion(quick: bool) -> dict[str, Any]:
    """Audio + text utterances (:mod:`bench.families.fusion`)."""
    from bench.families.fusion import bench_fusion

    return bench_fusion(quick, 3.0 if quick else 8.0)


def run_sensor(quick: bool) -> dict[str, Any]:
    """Sensor windows (:mod:`bench.families.sensor`)."""
    from bench.families.sensor import bench_sensor

    return bench_sensor(quick)


def run_fraud(quick: bool) -> dict[str, Any]:
    """The fraud model in-process (``bench/fraud.py --skip-http``), its JSON record."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "fraud.json"
        command = [sys.executable, str(REPO / "bench" / "fraud.py"), "--skip-http", "--out", str(out)]
        subprocess.run([*command, *(["--quick"] if quick else [])], check=True)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def print_volume(record: dict[str, Any]) -> None:
    from bench.families.volume import print_volume as print_table

    print_table(record)


def print_fusion(record: dict[str, Any]) -> None:
    from bench.families.fusion import print_fusion as print_table

    print_table(record)


def print_sensor(record: dict[str, Any]) -> None:
    from bench.families.sensor import print_sensor as print_table

    print_table(record)


def print_fraud(record: dict[str, Any]) -> None:
    """The fraud run printed its own table as it went; repeat its headline rows."""
    print("\nfraud model in-process: see the table printed above (bench/fraud.py --skip-http)")
    del record


FAMILY_RUNNERS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "volume": run_volume, "fusion": run_fusion, "sensor": run_sensor, "fraud": run_fraud}
FAMILY_PRINTERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "volume": print_volume, "fusion": print_fusion, "sensor": print_sensor, "fraud": print_fraud}


if __name__ == "__main__":
    main()
