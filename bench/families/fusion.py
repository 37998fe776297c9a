"""Audio + text fusion family: utterances/s and p99 served one by one, by the model runtime, and by LitServe.

Model, decode and runtime spec: :mod:`bench.families.fusion_model` (a 1.22 M-parameter wav2vec2-style
audio encoder plus a byte-level RoBERTa-style text encoder fused by attention, random weights, seed 0).

Request (the same for every server): body = raw little-endian int16 PCM at 16 kHz, the transcript
URL-quoted in the ``X-Transcript`` header, ``Content-Type: application/octet-stream``; answer
``{"label": emotion, "probabilities": {emotion: p}}``. Either may be empty, not both.

Servers (each its own subprocess, uvicorn with uvloop + httptools, access log off; torch intra-op
threads :data:`THREADS` = 1 everywhere, and :data:`REPLICAS` = 2 model workers wherever the server
has workers, one per core of the 2-core box the table was measured on):

- ``one-by-one``: FastAPI ``def`` endpoint, decode + eager model per request in the threadpool (naive);
- ``runtime``: ``async def`` endpoint -> ``model_runtime`` (decode in ``prepare`` on the worker pool,
  padded + masked collation by :func:`run_collated`, greedy batches bounded by audio samples),
  two replicas of the spec (the runtime runs one batch thread per model), the less busy one taken;
- ``runtime+buckets``: the same with batches grouped by audio length (:func:`length_bucket`);
- ``runtime+onnx``, ``runtime+onnx+buckets``: the same two, the model served by the backend
  ``choose_cpu_backend`` measures fastest and accurate (eager, ONNX Runtime, ONNX dynamic int8; logits
  within 1e-3 of eager's);
- ``runtime+int8+buckets``: as ``runtime+onnx+buckets`` with ONNX Runtime's calibrated int8
  (``onnx-int8-static``: integer convolutions and matrix products) among the candidates, each judged on
  the answered probabilities within 0.01 of eager's (``fusion_model.choose_backend(quantized=True)``);
- ``litserve``: LitServe 0.2.19 serving the same eager model and decode, 2 inference workers, its
  own batching (:data:`LITSERVE_BATCH` / :data:`LITSERVE_TIMEOUT_S`), padding in ``predict``.

Before the load, every server answers three pool utterances (one without transcript) and the
answers are compared with the eager model run one by one (``answer_difference``: probabilities within 1e-3,
within 0.01 for the quantized server; the table prints the largest difference measured).

Why batching alone gains nothing here (measured on this box, 1 thread): a 1–6 s utterance is
already a large input (150–300 frames); the conv feature encoder takes ~85 % of the time and
runs no faster per item in a batch, while padding random lengths and a batch's activations
outgrowing the CPU cache make batches of 4 random utterances ~2x slower per item than one by one
(sorted lengths: about even). Batches are therefore capped at 8 s of audio.

Load: an asyncio HTTP/1.1 keep-alive client in its own subprocess, K callers in a closed loop, each
request a random utterance of a fixed pool of 32 (1–6 s, same seeds for every server). All servers
are up at once (idle but one); each point's seconds are split into rounds of slices taken server
after server in rotating order, so that other work on a shared box weighs on every server alike.
The table shows the CPU the measured server used and what the rest of the machine used meanwhile
(``bg cpu%``: anything but this benchmark), both in % of all CPUs.

Usage::

    python bench/families/fusion.py            # 8 s a point
    python bench/families/fusion.py --quick    # 1.5 s a point, about 2 minutes

Writes ``bench/results/fusion.json``. :func:`bench_fusion` and :func:`print_fusion` are the entry
points ``bench/runtime.py`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Response

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import litserve as ls  # noqa: E402
import orjson  # noqa: E402

from bench.families.fusion_model import (  # noqa: E402
    BUCKET_BASE,
    EMOTIONS,
    FLOAT_TOLERANCE,
    MODEL_NAME,
    POOL_SEED,
    POOL_SIZE,
    QUANTIZED_TOLERANCE,
    RUNTIME_BATCH,
    RUNTIME_BATCH_COST,
    FusionClassifier,
    FusionGraph,
    answer,
    choose_backend,
    decode,
    fusion_model,
    fusion_spec,
    parameter_counts,
    predict_one,
    run_fusion,
    utterance_pool,
)
from bench.families.litserve_peer import (  # noqa: E402
    ServerHandle,
    litserve_http,
    litserve_server,
    machine_busy_seconds,
    server_subprocess,
    tree_cpu_seconds,
    use_threads,
)
from bench.runtime import get_json  # noqa: E402
from model_runtime import get_runtime  # noqa: E402

THREADS = 1  # torch intra-op threads in every server, as bench/runtime.py's reference model
SERVERS = ("one-by-one", "runtime", "runtime+buckets", "runtime+onnx", "runtime+onnx+buckets",
           "runtime+int8+buckets", "litserve")
RUNTIME_VARIANTS = {"runtime": {"buckets": False, "choose_backend": False, "quantized": False},
                    "runtime+buckets": {"buckets": True, "choose_backend": False, "quantized": False},
                    "runtime+onnx": {"buckets": False, "choose_backend": True, "quantized": False},
                    "runtime+onnx+buckets": {"buckets": True, "choose_backend": True, "quantized": False},
                    "runtime+int8+buckets": {"buckets": True, "choose_backend": True, "quantized": True}}
CALLERS = (1, 4, 16)
REPLICAS = 2  # model workers per server: runtime replicas, LitServe inference workers (one thread each)
LITSERVE_BATCH, LITSERVE_TIMEOUT_S = RUNTIME_BATCH, 0.005  # LitServe bounds batches by count only




async def read_utterance(request: Request) -> tuple[bytes, str]:
    """``(body, transcript)`` of a request (a FastAPI dependency, for every server)."""
    return await request.body(), urllib.parse.unquote(request.headers.get("x-transcript", ""))


Utterance = Annotated[tuple[bytes, str], Depends(read_utterance)]


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------
def build_app(server: str) -> FastAPI:
    """The FastAPI app of ``one-by-one`` or a runtime variant (:data:`RUNTIME_VARIANTS`).

    A runtime server loads :data:`REPLICAS` specs of the same model (one batching worker thread
    each, the runtime having one per model) and sends each request to the one with the fewest
    requests in flight.
    """
    from prometheus_client import REGISTRY

    from shared.app import tune_garbage_collector
    from shared.errors import UnprocessableContent, install_problem_handlers

    model = fusion_model()
    runtime = get_runtime()
    replicas = [f"{MODEL_NAME}-{index}" for index in range(REPLICAS)]
    in_flight = dict.fromkeys(replicas, 0)
    backend: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if server in RUNTIME_VARIANTS:
            variant = RUNTIME_VARIANTS[server]
            served: FusionClassifier | FusionGraph = model
            if variant["choose_backend"]:
                served, backend["choice"] = await asyncio.to_thread(choose_backend, model,
                                                                    quantized=variant["quantized"])
            warmup = [(pcm, text) for pcm, text, _ in utterance_pool()[:4]]
            for name in replicas:
                await runtime.load(fusion_spec(served, name=name, buckets=variant["buckets"], warmup=warmup))
        tune_garbage_collector()
        yield
        await runtime.close()

    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)
    json_response = lambda result: Response(orjson.dumps(result), media_type="application/json")  # noqa: E731

    if server == "one-by-one":
        @app.post("/predict")
        def predict_sync(utterance: Utterance) -> Response:
            use_threads(THREADS)  # the threadpool's threads, like the runtime's worker
            try:
                item = decode(*utterance)
            except ValueError as exc:
                raise UnprocessableContent(str(exc)) from exc
            return json_response(predict_one(model, item))
    else:
        @app.post("/predict")
        async def predict_batched(utterance: Utterance) -> Response:
            name = min(in_flight, key=in_flight.__getitem__)  # the replica with the least work
            in_flight[name] += 1
            try:
                return json_response(await runtime.predict(name, utterance))
            finally:
                in_flight[name] -= 1

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/bench/stats")
    async def bench_stats() -> dict[str, Any]:
        batches = [sum(REGISTRY.get_sample_value(f"tessera_model_batch_size_{kind}", {"model": name}) or 0.0
                       for name in replicas) for kind in ("count", "sum")]
        return {"batches": batches, "backend": backend.get("choice")}

    return app


def serve(server: str, port: int) -> None:
    """Run one uvicorn server in this process until terminated."""
    import uvicorn

    use_threads(THREADS)
    uvicorn.run(build_app(server), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on")


@litserve_http(Utterance)
class FusionLitAPI(ls.LitAPI):
    """The fusion model behind LitServe: same decode and model, LitServe's batching, padding in ``batch``."""

    def __init__(self, max_batch_size: int = LITSERVE_BATCH, batch_timeout: float = LITSERVE_TIMEOUT_S,
                 threads: int = THREADS) -> None:
        super().__init__(max_batch_size=int(max_batch_size), batch_timeout=float(batch_timeout))
        self.threads = int(threads)

    def setup(self, device: str) -> None:
        """Build the model (seed 0)."""
        use_threads(self.threads)
        self.model = fusion_model()

    def decode_request(self, request: tuple[bytes, str]) -> dict[str, torch.Tensor]:
        """``(body, transcript)`` (read by the API server) -> the prepared item, or 422."""
        try:
            return decode(*request)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc

    def batch(self, inputs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Keep the items: :func:`run_fusion` pads and masks them in ``predict``."""
        return inputs

    def predict(self, x: Any) -> list[torch.Tensor]:
        """Logits per item of a batch (or of one item when batching is off)."""
        use_threads(self.threads)
        items = x if isinstance(x, list) else [x]
        with torch.inference_mode():
            return list(run_fusion(self.model, items))

    def unbatch(self, output: list[torch.Tensor]) -> list[torch.Tensor]:
        """One logits row per request."""
        return output

    def encode_response(self, output: Any) -> dict[str, Any]:
        """``{label, probabilities}``."""
        return answer(output[0] if isinstance(output, list) else output)


@contextlib.contextmanager
def fusion_server(server: str) -> Iterator[ServerHandle]:
    """One server of :data:`SERVERS` in a subprocess."""
    if server == "litserve":
        with litserve_server("bench.families.fusion:FusionLitAPI", max_batch_size=LITSERVE_BATCH,
                             batch_timeout=LITSERVE_TIMEOUT_S, threads=THREADS, workers=REPLICAS) as handle:
            yield handle
        return
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--server", server]
    env = {"TESSERA_LOG_JSON": "false", "TESSERA_ACCESS_LOG": "false", "TESSERA_TORCH_THREADS": str(THREADS)}
    with server_subprocess(command, "/healthz", env=env) as handle:
        yield handle


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client connection (Content-Length or chunked answers)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST and return ``(status, body)``; reconnects when the server closed the connection."""
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers.items())]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        fields: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        payload = await self._read_body(fields)
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    async def _read_body(self, fields: dict[str, str]) -> bytes:
        assert self.reader is not None
        if "content-length" in fields:
            return await self.reader.readexactly(int(fields["content-length"]))
        chunks = []
        while size := int((await self.reader.readline()).strip() or b"0", 16):
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readline()
        await self.reader.readline()
        return b"".join(chunks)

    def close(self) -> None:
        """Drop the connection (the next post opens a new one)."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(url: str, callers: int, seconds: float, seed: int) -> dict[str, Any]:
    """``callers`` callers, each posting random pool utterances back to back for ``seconds``."""
    parts = urllib.parse.urlsplit(url)
    pool = [(pcm, {"Content-Type": "application/octet-stream", "X-Transcript": urllib.parse.quote(text)})
            for pcm, text, _ in utterance_pool()]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    started = time.perf_counter()
    deadline = started + seconds

    async def caller(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        connection = HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80)
        while time.perf_counter() < deadline:
            body, headers = pool[rng.randrange(len(pool))]
            sent = time.perf_counter()
            try:
                status, _ = await connection.post(parts.path, body, headers)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                status = 0
                connection.close()
            latencies.append(time.perf_counter() - sent)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        connection.close()

    await asyncio.gather(*(caller(index) for index in range(callers)))
    return {"seconds": time.perf_counter() - started, "latencies_ms": [round(value * 1000, 3) for value in latencies],
            "statuses": statuses}


class LoadClient:
    """The closed-loop client in its own subprocess (so its CPU is not the server's), started once.

    Each :meth:`run` sends one job as a JSON line and reads the result line back.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "load"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, url: str, callers: int, seconds: float, seed: int = 1) -> dict[str, Any]:
        """:func:`closed_loop` with these arguments, in the client process; its result."""
        assert self.process.stdin is not None and self.process.stdout is not None
        job = {"url": url, "callers": callers, "seconds": seconds, "seed": seed}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load client exited")
        return dict(json.loads(line))

    def close(self) -> None:
        """End the client process (it exits at the end of its input)."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def load_main() -> None:
    """Entry of the client subprocess: one JSON job a line in, one JSON result a line out."""
    import uvloop

    for line in sys.stdin:
        job = json.loads(line)
        result = uvloop.run(closed_loop(job["url"], job["callers"], job["seconds"], job["seed"]))
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------
def measure_slice(client: LoadClient, handles: dict[str, ServerHandle], server: str, callers: int,
                  seconds: float, seed: int) -> dict[str, Any]:
    """One closed-loop run against ``server`` (the others idle), with its CPU shares and batches."""
    handle = handles[server]
    before = _batches(handle, server)
    window = CpuWindow(handle.pid, client.process.pid, [other.pid for other in handles.values()])
    run = client.run(handle.url + "/predict", callers, seconds, seed)
    run.update(window.shares())
    after = _batches(handle, server)
    run["batches"] = (after[0] - before[0], after[1] - before[1])
    return run


def merge_slices(server: str, callers: int, slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One table point out of a server's slices at one caller count (latencies pooled, CPU time-weighted)."""
    seconds = sum(run["seconds"] for run in slices)
    latencies = sorted(value for run in slices for value in run["latencies_ms"])
    statuses: dict[str, int] = {}
    for run in slices:
        for status, count in run["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    ok, total = statuses.get("200", 0), len(latencies)
    pick = lambda q: latencies[min(total - 1, int(q * total))] if total else None  # noqa: E731
    batches, items = (sum(run["batches"][index] for run in slices) for index in (0, 1))
    weighted = lambda key: sum(run[key] * run["seconds"] for run in slices) / seconds  # noqa: E731
    return {"server": server, "callers": callers, "seconds": seconds, "requests": total, "ok": ok,
            "utt_per_s": ok / seconds, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "error_rate": (total - ok) / total if total else 0.0, "statuses": statuses,
            "mean_batch": items / batches if batches else None, "slices": len(slices),
            **{key: weighted(key) for key in ("server_cpu_pct", "client_cpu_pct", "background_cpu_pct")}}


def measure_all(seconds: float, rounds: int, warmup_s: float) -> list[dict[str, Any]]:
    """Every server at every caller count, interleaved: all servers up at once, each point's time
    split into ``rounds`` slices taken in turn (rotating the order), so that other work on the
    box weighs on every server alike."""
    points: list[dict[str, Any]] = []
    client = LoadClient()
    try:
        with contextlib.ExitStack() as stack:
            handles = {server: stack.enter_context(fusion_server(server)) for server in SERVERS}
            differences = {server: answer_difference(handle.url + "/predict") for server, handle in handles.items()}
            backends = {server: get_json(handle.url + "/bench/stats")["backend"] for server, handle in handles.items()
                        if RUNTIME_VARIANTS.get(server, {}).get("choose_backend")}
            for handle in handles.values():
                client.run(handle.url + "/predict", 4, warmup_s, seed=99)
            for callers in CALLERS:
                slices: dict[str, list[dict[str, Any]]] = {server: [] for server in SERVERS}
                for round_index in range(rounds):
                    for server in SERVERS[round_index % len(SERVERS):] + SERVERS[:round_index % len(SERVERS)]:
                        slices[server].append(measure_slice(client, handles, server, callers, seconds / rounds,
                                                            seed=1 + round_index))
                for server in SERVERS:
                    point = merge_slices(server, callers, slices[server])
                    point.update(rss_mb=handles[server].peak_rss_mb(), answer_difference=differences[server],
                                 answers_match=differences[server] <= answer_tolerance(server))
                    if server in backends:
                        point["backend"] = backends[server]
                    points.append(point)
                    print(f"  {server:<20} K={callers:<3} {point['utt_per_s']:6.1f} utt/s  "
                          f"p99 {_fmt(point['p99_ms'], '.0f')} ms  background cpu {point['background_cpu_pct']:.0f} %",
                          flush=True)
    finally:
        client.close()
    return points


class CpuWindow:
    """CPU used during one run, in % of the whole machine: the server's (with its child processes),
    the load client's, and everything else's (other work on the box the run competed with; the
    benchmark's own idle servers are not counted there)."""

    def __init__(self, server_pid: int, client_pid: int, idle_pids: Sequence[int] = ()) -> None:
        self.pids = {"server": server_pid, "client": client_pid,
                     **{f"idle {pid}": pid for pid in idle_pids if pid != server_pid}}
        self.busy = machine_busy_seconds()
        self.used = {role: tree_cpu_seconds(pid) for role, pid in self.pids.items()}
        self.used["bench"] = _own_cpu_seconds()
        self.started = time.monotonic()

    def shares(self) -> dict[str, float]:
        """``{"server_cpu_pct", "client_cpu_pct", "background_cpu_pct"}`` since construction."""
        capacity = (time.monotonic() - self.started) * (os.cpu_count() or 1) / 100
        used = {role: tree_cpu_seconds(pid) - self.used[role] for role, pid in self.pids.items()}
        used["bench"] = _own_cpu_seconds() - self.used["bench"]
        others = machine_busy_seconds() - self.busy - sum(used.values())
        return {"server_cpu_pct": used["server"] / capacity, "client_cpu_pct": used["client"] / capacity,
                "background_cpu_pct": max(0.0, others) / capacity}


def _own_cpu_seconds() -> float:
    """CPU seconds of this process alone (not its children: those are the server and the client)."""
    times = os.times()
    return times.user + times.system


def answer_difference(url: str, count: int = 3) -> float:
    """Largest difference between the server's probabilities for the first ``count`` pool utterances (the
    first without its transcript) and the eager model's, one by one."""
    model = fusion_model()
    largest = 0.0
    for index, (pcm, text, _) in enumerate(utterance_pool()[:count]):
        text = "" if index == 0 else text
        request = urllib.request.Request(url, data=pcm, method="POST", headers={
            "Content-Type": "application/octet-stream", "X-Transcript": urllib.parse.quote(text)})
        with urllib.request.urlopen(request, timeout=30) as response:
            got = json.loads(response.read())["probabilities"]
        want = predict_one(model, decode(pcm, text))["probabilities"]
        largest = max(largest, *(abs(got[name] - want[name]) for name in EMOTIONS))
    return largest


def answer_tolerance(server: str) -> float:
    """How far a server's probabilities may be from eager's: :data:`QUANTIZED_TOLERANCE` for a quantized
    variant, :data:`FLOAT_TOLERANCE` (rounding) for the others."""
    return QUANTIZED_TOLERANCE if RUNTIME_VARIANTS.get(server, {}).get("quantized") else FLOAT_TOLERANCE


def _batches(handle: ServerHandle, server: str) -> tuple[float, float]:
    if server not in RUNTIME_VARIANTS:
        return 0.0, 0.0
    count, total = get_json(handle.url + "/bench/stats")["batches"]
    return float(count), float(total)


def ratios(points: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float | None]]]:
    """Per runtime variant and K: throughput vs one-by-one and vs litserve, and p99 vs one-by-one."""
    by = {(p["server"], p["callers"]): p for p in points}
    table: dict[str, dict[int, dict[str, float | None]]] = {}
    for variant in RUNTIME_VARIANTS:
        for callers in CALLERS:
            mine = by.get((variant, callers))
            if mine is None:
                continue
            row: dict[str, float | None] = {}
            for baseline in ("one-by-one", "litserve"):
                other = by.get((baseline, callers))
                row[f"vs_{baseline}"] = mine["utt_per_s"] / other["utt_per_s"] if other and other["utt_per_s"] else None
                row[f"p99_vs_{baseline}"] = (mine["p99_ms"] / other["p99_ms"]
                                             if other and other["p99_ms"] and mine["p99_ms"] else None)
            table.setdefault(variant, {})[callers] = row
    return table


def bench_fusion(quick: bool, seconds: float | None = None) -> dict[str, Any]:
    """Run every server at every caller count; print progress; return the JSON record."""
    seconds = seconds or (1.5 if quick else 8.0)
    rounds = 1 if quick else 4
    warmup_s = 0.5 if quick else 2.0
    model = fusion_model()
    pool = utterance_pool()
    print(f"fusion model: {parameter_counts(model)['total']:,} parameters; pool of {len(pool)} utterances, "
          f"mean {np.mean([s for *_, s in pool]):.2f} s", flush=True)
    points = measure_all(seconds, rounds, warmup_s)
    return {"family": "audio+text fusion", "points": points, "ratios": ratios(points),
            "parameters": parameter_counts(model),
            "config": {"seconds": seconds, "rounds": rounds, "quick": quick, "torch_threads": THREADS,
                       "callers": list(CALLERS),
                       "pool": {"size": POOL_SIZE, "seed": POOL_SEED,
                                "mean_s": float(np.mean([s for *_, s in pool]))},
                       "runtime": {"replicas": REPLICAS, "max_batch_size": RUNTIME_BATCH,
                                   "max_batch_cost_samples": RUNTIME_BATCH_COST,
                                   "bucket_base": BUCKET_BASE, "fill": "greedy", "prepare_in": "thread"},
                       "litserve": {"workers": REPLICAS, "max_batch_size": LITSERVE_BATCH,
                                    "batch_timeout_s": LITSERVE_TIMEOUT_S,
                                    "version": ls.__version__},
                       "load": "asyncio HTTP/1.1 keep-alive, closed loop, own subprocess; "
                               "all servers up, each point in rounds of slices taken in turn",
                       "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_fusion(record: dict[str, Any]) -> None:
    """One table: server x callers -> utt/s, p50, p99, errors, RSS, mean batch, runtime ratios, and the
    largest difference of the server's answered probabilities from eager's."""
    params = record["parameters"]
    print(f"\nAudio + text fusion ({params['total']:,} parameters: audio {params['audio_encoder']:,}, "
          f"text {params['text_encoder']:,}, fusion+head {params['fusion_and_head']:,}), "
          f"1–6 s utterances, torch threads {record['config']['torch_threads']}")
    print(f"{'server':<20} {'K':>3} {'utt/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'err %':>6} {'RSS MB':>7} "
          f"{'batch':>6} {'x 1-by-1':>8} {'x litsrv':>8} {'p99 x 1-by-1':>12} {'srv cpu%':>8} {'bg cpu%':>7} "
          f"{'answer diff':>11}")
    for p in record["points"]:
        row = record["ratios"].get(p["server"], {}).get(p["callers"], {})
        print(f"{p['server']:<20} {p['callers']:>3} {p['utt_per_s']:>7.1f} {_fmt(p['p50_ms']):>8} "
              f"{_fmt(p['p99_ms']):>8} {100 * p['error_rate']:>6.1f} {p['rss_mb']:>7.0f} "
              f"{_fmt(p['mean_batch']):>6} {_fmt(row.get('vs_one-by-one'), '.2f'):>8} "
              f"{_fmt(row.get('vs_litserve'), '.2f'):>8} {_fmt(row.get('p99_vs_one-by-one'), '.2f'):>12} "
              f"{_fmt(p.get('server_cpu_pct'), '.0f'):>8} {_fmt(p.get('background_cpu_pct'), '.0f'):>7} "
              f"{_fmt(p.get('answer_difference'), '.1e'):>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve_cmd = sub.add_parser("serve", help="run one server")
    serve_cmd.add_argument("--server", choices=[s for s in SERVERS if s != "litserve"], required=True)
    serve_cmd.add_argument("--port", type=int, required=True)
    sub.add_parser("load", help="the closed-loop client: JSON jobs on stdin, JSON results on stdout")
    parser.add_argument("--quick", action="store_true", help="1.5 s a point (about 2 minutes)")
    parser.add_argument("--seconds", type=float, help="measured seconds per point")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fusion.json")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.server, args.port)
        return
    if args.command == "load":
        load_main()
        return
    record = bench_fusion(args.quick, args.seconds)
    print_fusion(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
