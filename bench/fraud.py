"""Fraud scoring benchmark: the model in-process, then the signed webhook end to end over HTTP.

Part 1, in-process (this process, no HTTP, no database). The served artifact is loaded the way the
API loads it (``serving.fraud_model_spec``); the items are simulated transactions with their window
state (``features.aggregates_for_row``), so every point pays for features, model and reasons:

- ``lightgbm per-row``: naive baseline, ``booster.predict`` on one precomputed feature row;
- ``lightgbm per-row + pred_contrib``: the same plus exact TreeSHAP (a naive way to give reasons);
- ``score_batch B=1``: the production batch function called per item, synchronously (unbatched);
- ``runtime unbatched c=K``: ``runtime.predict`` from K asyncio callers, ``max_batch_size=1``;
- ``runtime batched c=K``: the shipped spec (greedy dynamic batching, max batch 64).

Part 2, HTTP. ``services.fraud.api:app`` under uvicorn (uvloop, httptools, no access log,
``TESSERA_LOG_LEVEL=WARNING``; ``--workers N`` processes) in a subprocess, per state store:
``sqlite`` (embedded default: the database is the window state, a commit per request),
``postgres`` (the same on PostgreSQL), ``redis`` (PostgreSQL rows written behind through the
decision stream, window state and answers in Redis: the production configuration) and
``redis-unbatched`` (the same with the runtime's max_batch_size=1). Variants of a Redis run add
suffixes: ``-fastapi`` serves the webhook through its FastAPI route instead of the hot route
(``TESSERA_HOT_ROUTES=false``); ``-inapi`` runs the write-behind recorder inside the API process
instead of in its own ``tessera recorder fraud`` process (whose CPU is counted with the
server's). A load generator in a second
process (raw HTTP/1.1 keep-alive over asyncio/uvloop: ~30 us of client CPU a request) sends
signed ``POST /v1/transactions`` of simulated transactions (distinct ids, the simulator's customers
and terminals, event times increasing) at FIXED ARRIVAL RATES (open loop; latency is measured from
each request's scheduled send time, so a stalled server is not hidden by the client waiting), then
one closed-loop point (max throughput). Rates above the first saturated one are skipped. For the
``redis`` runs the bench then waits until every answered decision is a database row and reports
how long that took. The server is profiled once with py-spy under closed-loop load.

Usage::

    .venv/bin/python bench/fraud.py                  # full, ~10-15 min
    .venv/bin/python bench/fraud.py --quick          # ~2-3 min
    .venv/bin/python bench/fraud.py --skip-http      # part 1 only
    .venv/bin/python bench/fraud.py --dbs redis --workers 2 --rates 100,200,400

The newest artifact under ``models/fraud`` (or ``TESSERA_MODELS_DIR``) is used. PostgreSQL is
taken from ``--pg-url`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432``), Redis state from
``--redis-state`` (db 11, flushed); py-spy, if installed (``pip install -e '.[bench]'``), profiles
the server. Prints markdown tables; writes ``bench/results/fraud.json`` (and
``fraud_profile_<db>.txt``, collapsed stacks).

Note: the load generator and the server share this machine's cores; the JSON records the load
average at start, the server's and the generator's CPU per point.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS_DIR = REPO / "bench" / "results"
P99_BUDGET_MS = 15.0
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
BENCH_TENANT = "bench-bank"
CLOSED_MAX_RATE = 3000  # bodies prepared a second of closed-loop load (a faster server runs out early)


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------
def percentiles(values: list[float] | np.ndarray, *qs: float) -> list[float | None]:
    """Percentiles (0-100) of ``values``; None when empty."""
    if len(values) == 0:
        return [None for _ in qs]
    arr = np.asarray(values, dtype=np.float64)
    return [float(np.percentile(arr, q)) for q in qs]


def rss_reset() -> None:
    """Reset this process's peak RSS (VmHWM) so the next point measures its own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rss_peak_mb(pid: int | str = "self") -> float | None:
    """Peak resident set (VmHWM) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (uvicorn workers), from /proc."""
    total = 0.0
    for member in (pid, *_children(pid)):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    """Child processes of every thread of ``pid`` (a model's child process is started from a worker thread)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found + [grandchild for child in found for grandchild in _children(child)]


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_artifact(explicit: str | None) -> Path:
    """The artifact to benchmark: ``--artifact``, else the newest shipped/under TESSERA_MODELS_DIR."""
    if explicit:
        return Path(explicit)
    from services.fraud.serving import shipped_versions

    versions = shipped_versions()
    if not versions:
        from shared.config import get_settings

        sys.exit(f"no fraud artifact under {get_settings().models_dir}/fraud: "
                 "set TESSERA_MODELS_DIR (e.g. /tmp/tmpmodels) or pass --artifact")
    return versions[-1]


def simulate(n_customers: int, n_days: int, seed: int):  # type: ignore[no-untyped-def]
    """Simulated transactions in event-time order (handbook columns)."""
    from services.fraud.simulate import SimulationConfig, simulate_transactions

    df = simulate_transactions(SimulationConfig(n_customers=n_customers, n_terminals=2 * n_customers,
                                                n_days=n_days, seed=seed))
    return df.sort_values(["TX_TIME_SECONDS", "TRANSACTION_ID"]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Part 1: in-process
# ---------------------------------------------------------------------------------------------
def _timed_sync(name: str, fn, items: list[Any], budget_s: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    rss_reset()
    lat: list[float] = []
    cpu0, started = time.process_time(), time.perf_counter()
    deadline = started + budget_s
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        t1 = time.perf_counter()
        lat.append((t1 - t0) * 1000)
        if t1 > deadline:
            break
    elapsed = time.perf_counter() - started
    p50, p99 = percentiles(lat, 50, 99)
    return {"name": name, "concurrency": 1, "items": len(lat), "throughput": len(lat) / elapsed,
            "p50_ms": p50, "p99_ms": p99, "cpu_cores": (time.process_time() - cpu0) / elapsed,
            "peak_rss_mb": rss_peak_mb(), "mean_batch": 1.0}


async def _timed_runtime(name: str, spec, items: list[Any], concurrency: int,  # type: ignore[no-untyped-def]
                         budget_s: float) -> dict[str, Any]:
    from model_runtime.runtime import ModelRuntime

    runtime = ModelRuntime()
    await runtime.load(spec)
    # short warm-up through the batcher (thread start, first batches)
    await asyncio.gather(*(runtime.predict(spec.name, items[i]) for i in range(min(32, len(items)))))
    rss_reset()
    lat: list[float] = []
    next_index = 0
    batches_before = _batch_totals(spec.name)
    cpu0, started = proc_cpu_s(os.getpid()), time.perf_counter()
    deadline = started + budget_s

    async def caller() -> None:
        nonlocal next_index
        while next_index < len(items) and time.perf_counter() < deadline:
            item = items[next_index]
            next_index += 1
            t0 = time.perf_counter()
            await runtime.predict(spec.name, item)
            lat.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = proc_cpu_s(os.getpid()) - cpu0  # the model's child process too, where the spec runs it there
    batches, batched_items = (after - before for after, before in zip(_batch_totals(spec.name), batches_before,
                                                                       strict=True))
    await runtime.close()
    p50, p99 = percentiles(lat, 50, 99)
    return {"name": name, "concurrency": concurrency, "items": len(lat), "throughput": len(lat) / elapsed,
            "p50_ms": p50, "p99_ms": p99, "cpu_cores": cpu / elapsed, "peak_rss_mb": rss_peak_mb(),
            "mean_batch": batched_items / batches if batches else None}


def _batch_totals(model: str) -> tuple[float, float]:
    """Batches run and items in them so far, from the runtime's own ``tessera_model_batch_size`` histogram (the
    batcher observes it in this process, also for a model served from a child process)."""
    from prometheus_client import REGISTRY

    return tuple(REGISTRY.get_sample_value(f"tessera_model_batch_size_{kind}", {"model": model}) or 0.0
                 for kind in ("count", "sum"))  # type: ignore[return-value]


def run_inprocess(args: argparse.Namespace, artifact: Path) -> list[dict[str, Any]]:
    from services.fraud.features import aggregates_for_row, feature_vector, sequence_matrix
    from services.fraud.model import FraudScorer
    from services.fraud.serving import ScoringItem, fraud_model_spec, score_batch

    df = simulate(n_customers=500 if args.quick else 1000, n_days=30, seed=1)
    n = min(len(df), args.inproc_items)
    rng = np.random.default_rng(0)
    order = rng.permutation(np.arange(len(df) // 2, len(df)))[:n]  # later rows: windows are full
    review_threshold = 0.2  # the default tenant setting: only scores >= it get reasons
    items = []
    for i in order:
        row = df.iloc[i]
        items.append(ScoringItem(amount=float(row.TX_AMOUNT), tx_datetime=row.TX_DATETIME.to_pydatetime(),
                                 tx_time_s=float(row.TX_TIME_SECONDS), terminal_id=str(row.TERMINAL_ID),
                                 aggregates=aggregates_for_row(df, int(i)), explain_from=review_threshold))
    model_rows = [(feature_vector(it.amount, it.tx_datetime, it.aggregates),
                   sequence_matrix(it.amount, it.tx_time_s, it.terminal_id, it.aggregates.card_history))
                  for it in items]
    budget = args.inproc_seconds
    scorer = FraudScorer(artifact, verify=False)
    print(f"\n[in-process] artifact {artifact} (uses_sequence={scorer.uses_sequence}, "
          f"{scorer.trees.feature.shape[0]} trees, depth {scorer.trees.depth}); {n} items, "
          f"<= {budget:.0f} s a point", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []

    def model_inputs(pair):  # type: ignore[no-untyped-def]
        return scorer.model_inputs(pair[0][None, :], pair[1][None])

    def lgb_row(item):  # type: ignore[no-untyped-def]
        return scorer.booster.predict(model_inputs(item), raw_score=True, num_threads=1)

    def lgb_row_contrib(item):  # type: ignore[no-untyped-def]
        inputs = model_inputs(item)
        scorer.booster.predict(inputs, raw_score=True, num_threads=1)
        return scorer.booster.predict(inputs, pred_contrib=True, num_threads=1)

    for name, fn, inputs in (("lightgbm per-row, features precomputed (score only)", lgb_row, model_rows),
                             ("lightgbm per-row + pred_contrib (exact SHAP)", lgb_row_contrib, model_rows),
                             ("score_batch B=1: features + model + reasons", lambda item: score_batch(scorer, [item]),
                              items)):
        rows.append(_timed_sync(name, fn, inputs, budget))
        print(f"  {name}: {rows[-1]['throughput']:.0f}/s", file=sys.stderr, flush=True)

    base = fraud_model_spec(artifact)
    specs = (("runtime unbatched (max_batch 1)", dataclasses.replace(base, max_batch_size=1)),
             ("runtime batched (shipped spec)", base))

    async def runtime_points() -> None:
        for label, spec in specs:
            for c in args.inproc_concurrency:
                rows.append(await _timed_runtime(label, spec, items, c, budget))
                print(f"  {label} c={c}: {rows[-1]['throughput']:.0f}/s", file=sys.stderr, flush=True)

    _run_loop(runtime_points())
    return rows


def _run_loop(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def inprocess_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| scorer | callers | items | tx/s | p50 ms | p99 ms | mean batch | CPU cores | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['concurrency']} | {r['items']} | {fmt(r['throughput'], 0)} | "
                     f"{fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | {fmt(r['mean_batch'])} | "
                     f"{fmt(r['cpu_cores'], 2)} | {fmt(r['peak_rss_mb'], 0)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Part 2: load generator (runs in its own process: `bench/fraud.py _loadgen plan.json`)
# ---------------------------------------------------------------------------------------------
class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    __slots__ = ("gen", "transport", "buf", "scheduled", "open")

    def __init__(self, gen: LoadGen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.scheduled: float | None = None
        self.open = False

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self.open = True

    def send(self, request: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"content-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15:stop if stop > 0 else None])
            else:
                length = 0
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(head[9:12])
            del buf[:total]
            scheduled, self.scheduled = self.scheduled, None
            self.gen.on_response(self, status, scheduled)

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        self.open = False
        self.gen.on_lost(self)


class LoadGen:
    """Open-loop (fixed arrival rate) and closed-loop drivers over raw keep-alive connections."""

    def __init__(self, host: str, port: int, max_connections: int = 256) -> None:
        self.host, self.port, self.max_connections = host, port, max_connections
        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.connecting = 0
        self.backlog: collections.deque[tuple[bytes, float]] = collections.deque()
        self.reset()

    def reset(self) -> None:
        self.latencies_ok: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.conn_errors = 0
        self.outstanding = 0
        self.last_done = 0.0
        self.closed_next: Any = None

    # -- plumbing ----------------------------------------------------------------------------
    def dispatch(self, request: bytes, scheduled: float) -> None:
        self.outstanding += 1
        while self.idle:
            conn = self.idle.pop()
            if conn.open:
                conn.send(request, scheduled)
                return
        self.backlog.append((request, scheduled))
        if len(self.conns) + self.connecting < self.max_connections:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.connecting -= 1
            if self.backlog:
                self.backlog.popleft()
                self.outstanding -= 1
                self.conn_errors += 1
            return
        self.connecting -= 1
        self.conns.add(conn)
        self._next_for(conn)

    def _next_for(self, conn: _Conn) -> None:
        if self.closed_next is not None:
            request = self.closed_next()
            if request is not None:
                self.outstanding += 1
                conn.send(request, time.perf_counter())
                return
        if self.backlog:
            request, scheduled = self.backlog.popleft()
            conn.send(request, scheduled)
        else:
            self.idle.append(conn)

    def on_response(self, conn: _Conn, status: int, scheduled: float | None) -> None:
        now = time.perf_counter()
        self.outstanding -= 1
        self.statuses[status] += 1
        if status == 200 and scheduled is not None:
            self.latencies_ok.append((now - scheduled) * 1000)
            self.last_done = now
        self._next_for(conn)

    def on_lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn.scheduled is not None:
            conn.scheduled = None
            self.outstanding -= 1
            self.conn_errors += 1

    def abort_all(self) -> None:
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        self.conns.clear()
        self.idle.clear()
        self.backlog.clear()

    async def drain(self, timeout_s: float) -> int:
        """Wait for outstanding answers; returns how many never came (then drops the connections)."""
        deadline = time.perf_counter() + timeout_s
        while self.outstanding > 0 and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        missing = self.outstanding
        if missing:
            self.abort_all()
            await asyncio.sleep(0.05)
            self.outstanding = 0
        return missing

    # -- drivers -----------------------------------------------------------------------------
    async def open_loop(self, requests: list[bytes], rate: float) -> float:
        """Send request i at t0 + i / rate regardless of answers; returns t0."""
        t0 = time.perf_counter() + 0.01
        interval = 1.0 / rate
        i, n = 0, len(requests)
        while i < n:
            now = time.perf_counter()
            due = t0 + i * interval
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while i < n and t0 + i * interval <= now:
                self.dispatch(requests[i], t0 + i * interval)
                i += 1
        return t0

    async def closed_loop(self, requests: list[bytes], concurrency: int, duration_s: float) -> float:
        """``concurrency`` connections, each sending its next request as soon as it has an answer."""
        it = iter(requests)
        t0 = time.perf_counter()
        end = t0 + duration_s

        def next_request() -> bytes | None:
            return next(it, None) if time.perf_counter() < end else None

        self.closed_next = next_request
        for _ in range(concurrency):
            request = next_request()
            if request is not None:
                self.dispatch(request, time.perf_counter())
        await asyncio.sleep(duration_s)
        self.closed_next = None
        return t0


def _build_requests(plan: dict[str, Any], bodies: list[bytes]) -> list[bytes]:
    from shared.security import compute_signature

    timestamp = int(time.time())
    host = f"Host: {plan['host']}:{plan['port']}\r\n".encode()
    key = f"X-API-Key: {plan['api_key']}\r\n".encode()
    request_line = f"POST {plan.get('path_prefix', '')}/v1/transactions HTTP/1.1\r\n".encode()
    out = []
    for body in bodies:
        signature = compute_signature(plan["secret"], timestamp, body)
        out.append(request_line + host + key
                   + f"Tessera-Signature: t={timestamp},v1={signature}\r\n".encode()
                   + b"Content-Type: application/json\r\nContent-Length: "
                   + str(len(body)).encode() + b"\r\n\r\n" + body)
    return out


async def _loadgen_main(plan: dict[str, Any]) -> dict[str, Any]:
    bodies = Path(plan["bodies"]).read_bytes().split(b"\n")
    gen = LoadGen(plan["host"], plan["port"], plan.get("max_connections", 256))
    server_pids = plan["server_pids"]
    cursor = plan.get("start", 0)
    results: list[dict[str, Any]] = []
    saturated_at: float | None = None
    for phase in plan["phases"]:
        kind, duration = phase["kind"], phase["duration"]
        if kind == "open" and saturated_at is not None and phase["rate"] > saturated_at:
            results.append({**phase, "skipped": f"saturated at {saturated_at:g}/s"})
            continue
        count = int(phase["rate"] * duration) if kind == "open" else int(CLOSED_MAX_RATE * duration)
        if cursor + count > len(bodies):
            cursor = 0  # reused ids are answered from storage (replayed); avoided by sizing the data
        requests = _build_requests(plan, bodies[cursor:cursor + count])
        gc.collect()
        gen.reset()
        cpu_server0, cpu_self0 = sum(map(proc_cpu_s, server_pids)), time.process_time()
        if kind == "open":
            t0 = await gen.open_loop(requests, phase["rate"])
            sent = count
        else:
            t0 = await gen.closed_loop(requests, phase["concurrency"], duration)
            sent = sum(gen.statuses.values()) + gen.outstanding + gen.conn_errors
        missing = await gen.drain(plan.get("drain_s", 5.0))
        wall = max(time.perf_counter() - t0, 1e-9)
        cursor += sent
        ok = gen.statuses.get(200, 0)
        span = max(gen.last_done - t0, duration * 0.5) if ok else duration
        p50, p90, p99, p999 = percentiles(gen.latencies_ok, 50, 90, 99, 99.9)
        row = {**phase, "sent": sent, "ok": ok, "achieved": ok / span,
               "errors": sent - ok, "statuses": {str(k): v for k, v in gen.statuses.items()},
               "conn_errors": gen.conn_errors, "timeouts": missing, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
               "p999_ms": p999, "max_ms": max(gen.latencies_ok) if gen.latencies_ok else None,
               "server_cpu_cores": (sum(map(proc_cpu_s, server_pids)) - cpu_server0) / wall,
               "loadgen_cpu_cores": (time.process_time() - cpu_self0) / wall,
               "connections": len(gen.conns)}
        results.append(row)
        label = f"{phase['rate']:g}/s" if kind == "open" else f"closed c={phase['concurrency']}"
        print(f"    {plan.get('label', '')} {label}: {row['achieved']:.0f}/s ok, p50 {fmt(p50, 2)} ms, "
              f"p99 {fmt(p99, 2)} ms, errors {row['errors']}, server CPU {row['server_cpu_cores']:.2f}",
              file=sys.stderr, flush=True)
        if kind == "open" and phase.get("measure", True) and (
                row["achieved"] < 0.9 * phase["rate"] or row["errors"] > 0.01 * sent
                or (p99 or 0) > 1000):
            saturated_at = phase["rate"]
        if missing or kind == "closed":
            gen.abort_all()
        await asyncio.sleep(plan.get("pause_s", 1.0))
    gen.abort_all()
    return {"points": results, "cursor": cursor}


def loadgen_entry(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    gc.freeze()
    results = _run_loop(_loadgen_main(plan))
    Path(plan["out"]).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Part 2: server lifecycle
# ---------------------------------------------------------------------------------------------
def serve_entry(argv: list[str]) -> None:
    """`bench/fraud.py _serve PORT [--unbatched] [--inline|--threaded]`: uvicorn with the bench's options."""
    import uvicorn

    port = int(argv[0])
    workers = int(os.environ.get("BENCH_WORKERS", "1"))
    overrides: dict[str, Any] = {**({"max_batch_size": 1} if "--unbatched" in argv else {}),
                 **({"run_inline": True} if "--inline" in argv else {}),
                 **({"run_inline": False} if "--threaded" in argv else {})}
    if overrides:
        import services.fraud.serving as serving
        from model_runtime.runtime import ModelSpec

        shipped = serving.fraud_model_spec

        def bench_model_spec(artifact_dir: Path) -> ModelSpec:
            return dataclasses.replace(shipped(artifact_dir), **overrides)

        serving.fraud_model_spec = bench_model_spec
    uvicorn.run("services.fraud.api:app", host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", timeout_keep_alive=60, workers=workers)


@dataclasses.dataclass
class Database:
    label: str
    env: dict[str, str]
    cleanup: Any


def make_database(kind: str, args: argparse.Namespace, workdir: Path) -> Database:
    env = {"TESSERA_DATA_DIR": str(workdir / kind), "TESSERA_LOG_LEVEL": "WARNING", "TESSERA_ACCESS_LOG": "false"}
    (workdir / kind).mkdir(parents=True, exist_ok=True)
    variants = set(kind.split("-")[1:])
    suffix = " (runtime unbatched)" if "unbatched" in variants else ""
    suffix += " (model on the event loop)" if "inline" in variants else ""
    suffix += " (model in its worker thread)" if "threaded" in variants else ""
    if "fastapi" in variants:
        env["TESSERA_HOT_ROUTES"] = "false"
        suffix += ", FastAPI route"
    if kind.startswith("redis"):
        import redis

        redis.Redis.from_url(args.redis_state).flushdb()
        env["TESSERA_REDIS_URL"] = args.redis_state
        in_api = "inapi" in variants
        env["TESSERA_RECORDER_IN_API"] = "true" if in_api else "false"
        suffix = (" + Redis state, rows written behind" + (" (recorder in the API)" if in_api else "")
                  + suffix)
    if args.workers > 1:
        suffix += f", {args.workers} API workers"
    kind = kind.split("-")[0]
    if kind == "sqlite":
        return Database("SQLite" + suffix, env, lambda: None)
    import psycopg

    name = f"tessera_bench_fraud_{os.getpid()}_{int(time.time())}"
    admin = args.pg_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    env["TESSERA_DATABASE_URL"] = f"{args.pg_url}/{name}"
    if args.redis_broker:
        env["TESSERA_BROKER_URL"] = args.redis_broker
    return Database("PostgreSQL" + suffix, env, drop)


def wait_recorded(env: dict[str, str], expected: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """After a Redis-state run: how long until every answered decision is a database row."""
    from sqlalchemy import create_engine, text

    engine = create_engine(env["TESSERA_DATABASE_URL"])
    started = time.perf_counter()
    stored = 0
    try:
        while time.perf_counter() - started < timeout_s:
            with engine.connect() as connection:
                stored = connection.execute(text("SELECT count(*) FROM fraud_transactions")).scalar() or 0
            if stored >= expected:
                break
            time.sleep(0.1)
    finally:
        engine.dispose()
    return {"answered": expected, "rows": stored, "seconds_to_catch_up": round(time.perf_counter() - started, 2)}


def start_recorder(env: dict[str, str], log: Path, timeout_s: float = 90.0) -> subprocess.Popen:
    """``tessera recorder fraud`` in its own process, once it reads the stream."""
    process = subprocess.Popen(tessera_cmd("recorder", "fraud"), env={**env, "TESSERA_LOG_LEVEL": "INFO"},
                               cwd=REPO, stderr=log.open("wb"))
    deadline = time.time() + timeout_s
    while "recording fraud decisions" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the recorder did not start: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.3)
    return process


def stop_processes(processes: list[subprocess.Popen], timeout_s: float = 20.0) -> None:  # type: ignore[type-arg]
    """SIGTERM each process, wait for it, and kill the ones that do not stop in ``timeout_s``."""
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()


def tessera_cmd(*argv: str) -> list[str]:
    script = Path(sys.executable).parent / "tessera"
    return [str(script), *argv] if script.exists() else [sys.executable, "-m", "services.cli", *argv]


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server not ready in time")


def request_bodies(df, tag: str) -> bytes:  # type: ignore[no-untyped-def]
    """One JSON body a line, in event-time order (the processor's view of the simulated stream)."""
    import orjson

    channels = ("card_present", "ecommerce", "card_present", "card_present", "atm")
    lines = []
    times = df.TX_DATETIME.dt.strftime("%Y-%m-%dT%H:%M:%SZ").tolist()
    for tx_id, ts, customer, terminal, amount in zip(df.TRANSACTION_ID.tolist(), times,
                                                      df.CUSTOMER_ID.tolist(), df.TERMINAL_ID.tolist(),
                                                      df.TX_AMOUNT.tolist(), strict=True):
        lines.append(orjson.dumps({
            "id": f"{tag}-{tx_id}", "timestamp": ts, "customer_id": f"C{customer:06d}",
            "terminal_id": f"T{terminal:06d}", "amount": max(round(float(amount), 2), 0.01),
            "currency": "EUR", "channel": channels[tx_id % len(channels)],
            "merchant_category": "5411",
        }))
    return b"\n".join(lines)


def summarise_profile(collapsed: Path) -> list[tuple[str, float]]:
    """Share of non-idle samples per request stage, from py-spy's collapsed (raw) output.

    Each sample goes to the stage of the frame nearest its leaf that names one (so time in the
    Redis client under the webhook handler counts as Redis, not as the handler).
    """
    waits = ("Connection.wait", "wait_c", "select (selectors", "_wait_conn", "poll (", "sleep (")
    buckets = [  # checked per frame, leaf first; within a frame the first match wins
        ("model (score_batch: features, sequence model, trees, reasons)",
         ("score_batch", "serving.py", "lightgbm", "model.py", "features.py", "onnxruntime")),
        ("DB read (_read_state: 3 window queries)", ("_read_state",)),
        ("DB write (_store: INSERT + commit)", ("_store",)),
        ("write-behind recorder (in the API process)", ("recorder.py", "shared/streams.py")),
        ("Redis window state (client, Lua calls)", ("redis/", "shared/kv.py", "hiredis", "redis_state.py")),
        ("signature (verify_signature)", ("verify_signature", "compute_signature", "hmac.py")),
        ("API key (authorize / require_scope)", ("authorize (shared", "require_scope", "authenticate_api_key")),
        ("tenant policy cache", ("TenantPolicyCache", "load_tenant_policy")),
        ("body parse (pydantic)", ("parse_json", "model_validate_json")),
        ("rules + decision + record", ("evaluate_rules", "rule_facts", "decide (services", "explain (services",
                                       "decision_record", "_decision (services", "_scoring_item")),
        ("response JSON (serialize)", ("serialize_response", "jsonable_encoder", "render (",
                                       "_prepare_response_content", "model_dump_json", "to_json")),
        ("runtime batcher / queue", ("model_runtime",)),
        ("thread hand-off (to_thread, threadpool)", ("to_thread", "run_in_threadpool", "anyio", "concurrent/futures",
                                                     "threading.py")),
        ("hot route + request context (ids, metrics)", ("hot_routes.py", "observability.py", "prometheus",
                                                         "services/fraud/api.py")),
        ("FastAPI / Starlette routing and dependencies", ("starlette", "fastapi")),
        ("HTTP server (uvicorn, httptools)", ("uvicorn", "httptools")),
        ("event loop / asyncio", ("asyncio", "uvloop")),
    ]
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if any(w in frames[-1] for w in waits):  # GIL released, waiting on the database: not CPU here
            counts[WAIT_LABEL] += n
            continue
        counts[_stage_of(frames[1:], buckets)] += n
    return [(label, 100.0 * c / total) for label, c in counts.most_common()] if total else []


def _stage_of(frames: list[str], buckets: list[tuple[str, tuple[str, ...]]]) -> str:
    for frame in reversed(frames):
        for label, needles in buckets:
            if any(needle in frame for needle in needles):
                return label
    return "other (gc, imports, misc)"


WAIT_LABEL = "(waiting on the database socket, no CPU)"


def run_http(args: argparse.Namespace, artifact: Path, kind: str, workdir: Path,
             df) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    db = make_database(kind, args, workdir)
    env = {**os.environ, **db.env, "TESSERA_MODELS_DIR": str(artifact.parent.parent),
           "PYTHONPATH": str(REPO), "BENCH_WORKERS": str(1 if "unbatched" in kind else args.workers)}
    proc: subprocess.Popen | None = None
    recorder: subprocess.Popen | None = None
    try:
        subprocess.run(tessera_cmd("db", "upgrade"), env=env, cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out = subprocess.run(tessera_cmd("keys", "create", "--tenant", BENCH_TENANT, "--scope", "fraud"),
                             env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
        api_key = re.search(r"API_KEY=(\S+)", out).group(1)  # type: ignore[union-attr]
        secret = re.search(r"WEBHOOK_SECRET=(\S+)", out).group(1)  # type: ignore[union-attr]
        port = free_port()
        serve = [sys.executable, str(Path(__file__).resolve()), "_serve", str(port)]
        serve += [f"--{variant}" for variant in ("unbatched", "inline", "threaded") if variant in kind.split("-")]
        server_log = workdir / f"server-{kind}.log"
        proc = subprocess.Popen(serve, env=env, cwd=REPO, stderr=server_log.open("wb"))
        wait_ready(port, proc)
        if env.get("TESSERA_RECORDER_IN_API") == "false":
            recorder = start_recorder(env, workdir / f"recorder-{kind}.log")
        bodies_path = workdir / f"bodies-{kind}.jsonl"
        bodies_path.write_bytes(request_bodies(df, f"{kind}{os.getpid()}"))
        print(f"\n[http {db.label}] server pid {proc.pid} on :{port}, {len(df)} simulated transactions",
              file=sys.stderr, flush=True)
        # self-limiting warm-up (a fixed rate above capacity would leave a backlog for the first point)
        warm = {"kind": "closed", "concurrency": 4, "duration": args.warmup_s, "warmup": True}
        phases = [warm] + [{"kind": "open", "rate": r, "duration": args.point_s} for r in args.rates]
        phases.append({"kind": "closed", "concurrency": args.closed_concurrency, "duration": args.point_s})
        plan: dict[str, Any] = {"host": "127.0.0.1", "port": port, "api_key": api_key, "secret": secret,
                                "server_pids": [proc.pid] + ([recorder.pid] if recorder else []),
                                "bodies": str(bodies_path), "phases": phases,
                                "out": str(workdir / f"result-{kind}.json"), "label": db.label}
        plan_path = workdir / f"plan-{kind}.json"
        plan_path.write_text(json.dumps(plan))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "_loadgen", str(plan_path)],
                       env=env, cwd=REPO, check=True)
        result = json.loads(Path(plan["out"]).read_text())
        points = [p for p in result["points"] if not p.get("warmup")]
        plan["start"] = result["cursor"]
        profile = None
        if kind in args.profile_dbs:
            profile = profile_server(args, proc.pid, plan, workdir, kind, env)
        recorded = None
        if kind.startswith("redis"):
            answered = sum(p.get("ok", 0) for p in result["points"])
            recorded = wait_recorded(env, answered)
            print(f"    rows written behind: {recorded}", file=sys.stderr, flush=True)
        log_text = server_log.read_text(errors="replace")
        return {"database": db.label, "points": points, "profile": profile, "write_behind": recorded,
                "server_peak_rss_mb": rss_peak_mb(proc.pid),
                # tracebacks the server logged (ClientDisconnect when the generator drops a backlog)
                "server_exceptions_logged": log_text.count("Exception in ASGI application"),
                "server_log_tail": log_text[-2000:]}
    finally:
        stop_processes([p for p in (proc, recorder) if p is not None])
        db.cleanup()


def profile_server(args: argparse.Namespace, pid: int, plan: dict[str, Any], workdir: Path,
                   kind: str, env: dict[str, str]) -> dict[str, Any] | None:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        print("    (py-spy not installed: no profile; `pip install py-spy`)", file=sys.stderr)
        return None
    seconds = max(4, int(args.point_s))
    raw = RESULTS_DIR / f"fraud_profile_{kind}.txt"
    # drive the server at a fixed rate near its measured capacity while py-spy samples it
    plan = {**plan, "label": f"{plan['label']} (profiled)", "out": str(workdir / f"profile-{kind}.json"),
            "phases": [{"kind": "open", "rate": args.profile_rate, "duration": seconds + 2} if args.profile_rate
                       else {"kind": "closed", "concurrency": args.closed_concurrency, "duration": seconds + 2}]}
    plan_path = workdir / f"plan-profile-{kind}.json"
    plan_path.write_text(json.dumps(plan))
    load = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_loadgen", str(plan_path)],
                            env=env, cwd=REPO)
    time.sleep(1.0)
    spy = subprocess.run([py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
                          "--format", "raw", "--nonblocking", "--threads", "-o", str(raw)],
                         capture_output=True, text=True)
    load.wait()
    if spy.returncode != 0 or not raw.exists():
        print(f"    py-spy failed: {spy.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    point = json.loads(Path(plan["out"]).read_text())["points"][0]
    shares = summarise_profile(raw)
    cpu_ms_per_request = (1000.0 * point["server_cpu_cores"] / point["achieved"]) if point["achieved"] else None
    return {"collapsed_stacks": str(raw.relative_to(REPO)), "load": point, "shares_pct": shares,
            "server_cpu_ms_per_request": cpu_ms_per_request}


def http_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| database | offered | achieved tx/s | p50 ms | p99 ms | p99.9 ms | errors | server CPU | loadgen CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for p in run["points"]:
            offered = f"{p['rate']:g}/s" if p["kind"] == "open" else f"closed c={p['concurrency']}"
            if "skipped" in p:
                lines.append(f"| {run['database']} | {offered} | skipped ({p['skipped']}) | | | | | | |")
                continue
            errors = f"{p['errors']}" + (f" ({', '.join(f'{k}: {v}' for k, v in p['statuses'].items() if k != '200')})"
                                         if p["errors"] else "")
            lines.append(f"| {run['database']} | {offered} | {fmt(p['achieved'], 0)} | {fmt(p['p50_ms'], 2)} | "
                         f"{fmt(p['p99_ms'], 2)} | {fmt(p['p999_ms'], 1)} | {errors} | "
                         f"{fmt(p['server_cpu_cores'], 2)} | {fmt(p['loadgen_cpu_cores'], 2)} |")
    return "\n".join(lines)


def best_rate(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest offered open-loop rate held (>= 95 % achieved) at p99 <= budget with no errors."""
    good = [p for p in points if p["kind"] == "open" and "skipped" not in p and p["errors"] == 0
            and p["p99_ms"] is not None and p["p99_ms"] <= P99_BUDGET_MS and p["achieved"] >= 0.95 * p["rate"]]
    return max(good, key=lambda p: p["rate"]) if good else None


def profile_table(runs: list[dict[str, Any]]) -> str:
    out = []
    for run in runs:
        prof = run.get("profile")
        if not prof:
            continue
        per_req = prof["server_cpu_ms_per_request"]
        load = prof["load"]
        driven = f"open loop {load['rate']:g}/s" if load["kind"] == "open" else f"closed loop c={load['concurrency']}"
        out.append(f"Profile, {run['database']} (py-spy, {driven}: "
                   f"{prof['load']['achieved']:.0f} tx/s, server {prof['load']['server_cpu_cores']:.2f} cores, "
                   f"{fmt(per_req, 2)} ms CPU a request; stacks: {prof['collapsed_stacks']})\n")
        out.append("| stage | share of non-idle samples | share of CPU samples | ≈ ms CPU a request |")
        out.append("|---|---|---|---|")
        cpu_total = sum(share for label, share in prof["shares_pct"] if label != WAIT_LABEL) or 1.0
        for label, share in prof["shares_pct"]:
            cpu_share = None if label == WAIT_LABEL else 100.0 * share / cpu_total
            ms = per_req * cpu_share / 100 if per_req and cpu_share is not None else None
            out.append(f"| {label} | {share:.1f} % | {fmt(cpu_share)} % | {fmt(ms, 2)} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-2 min: short points, fewer rates")
    parser.add_argument("--artifact", help="artifact directory (default: newest under TESSERA_MODELS_DIR/fraud)")
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--out", type=Path, help="where the JSON record goes (default bench/results/fraud.json)")
    parser.add_argument("--dbs", help="comma-separated: sqlite, postgres (database state, a commit per request), "
                        "redis (PostgreSQL rows written behind, Redis window state), redis-unbatched (the same "
                        "with the runtime's max_batch_size=1: a naive per-request model call); default all four, "
                        "--quick: sqlite,redis")
    parser.add_argument("--rates", help="comma-separated open-loop rates (tx/s)")
    parser.add_argument("--point-s", type=float, help="seconds a point")
    parser.add_argument("--closed-concurrency", type=int, default=32)
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="server URL without database name")
    parser.add_argument("--redis-broker", default="redis://127.0.0.1:6379/14",
                        help="broker for the PostgreSQL run ('' keeps the embedded one)")
    parser.add_argument("--redis-state", default="redis://127.0.0.1:6379/11",
                        help="Redis for the 'redis' runs' window state (flushed first)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes for the server")
    parser.add_argument("--profile-dbs", default="sqlite,postgres,redis", help="runs to profile (comma-separated)")
    parser.add_argument("--profile-rate", type=float,
                        help="profile under this open-loop rate (tx/s) instead of the closed loop")
    args = parser.parse_args(argv)
    args.dbs = [d for d in (args.dbs or ("sqlite,redis" if args.quick else
                                         "sqlite,postgres,redis,redis-unbatched")).split(",") if d]
    args.profile_dbs = [d for d in args.profile_dbs.split(",") if d]
    if args.rates:
        args.rates = [float(r) for r in args.rates.split(",")]
    else:
        args.rates = [50, 200, 1200] if args.quick else [25, 50, 100, 200, 400, 800, 1200]
    args.point_s = args.point_s or (3.0 if args.quick else 10.0)
    args.warmup_s = 2.0 if args.quick else 5.0
    args.inproc_items = 1000 if args.quick else 4000
    args.inproc_seconds = 1.5 if args.quick else 5.0
    args.inproc_concurrency = [1, 8, 32, 64]
    return args


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_loadgen":
        loadgen_entry(argv[1])
        return
    if argv and argv[0] == "_serve":
        serve_entry(argv[1:])
        return
    args = parse_args(argv)
    started = time.time()
    load_before = os.getloadavg()
    artifact = find_artifact(args.artifact)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "fraud", "quick": args.quick, "artifact": str(artifact),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_at_start": load_before},
        "p99_budget_ms": P99_BUDGET_MS,
    }
    tables: list[str] = []
    if not args.skip_inprocess:
        rows = run_inprocess(args, artifact)
        report["inprocess"] = rows
        tables.append("### In-process scoring (no HTTP, no DB)\n\n" + inprocess_table(rows))
    if not args.skip_http:
        # enough distinct transactions for every point; event times increase through the run
        per_run = int(CLOSED_MAX_RATE * args.warmup_s + sum(args.rates) * args.point_s
                      + 2 * CLOSED_MAX_RATE * args.point_s + CLOSED_MAX_RATE * 2)
        df = simulate(n_customers=max(1000, per_run // 55), n_days=30, seed=2)
        runs = []
        with tempfile.TemporaryDirectory(prefix="tessera-bench-fraud-") as tmp:
            for kind in args.dbs:
                try:
                    runs.append(run_http(args, artifact, kind, Path(tmp), df))
                except Exception as exc:  # keep the other database's result
                    print(f"[http {kind}] failed: {exc!r}", file=sys.stderr)
                    runs.append({"database": kind, "points": [], "error": repr(exc)})
        report["http"] = runs
        held = []
        for run in runs:
            best = best_rate(run["points"])
            closed = next((p for p in run["points"] if p["kind"] == "closed" and "skipped" not in p), None)
            run["best_rate_at_p99_budget"] = best["rate"] if best else None
            held.append(f"- {run['database']}: highest fixed rate held at p99 ≤ {P99_BUDGET_MS:g} ms, no errors: "
                        + (f"**{best['rate']:g} tx/s** (p99 {best['p99_ms']:.2f} ms)" if best else "**none**")
                        + (f"; closed-loop max {closed['achieved']:.0f} tx/s at p99 {fmt(closed['p99_ms'], 1)} ms"
                           if closed else ""))
        tables.append("### HTTP webhook, open loop (signed POST /v1/transactions, loopback)\n\n"
                      + http_table(runs) + "\n\n" + "\n".join(held))
        prof = profile_table(runs)
        if prof:
            tables.append("### Server profile under load\n\n" + prof)
    report["elapsed_s"] = time.time() - started
    report["loadavg_at_end"] = os.getloadavg()
    out = args.out or RESULTS_DIR / "fraud.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\n## Fraud benchmark ({'quick' if args.quick else 'full'}; artifact {artifact.name}; "
          f"load average at start {load_before[0]:.2f}; {report['elapsed_s']:.0f} s)\n")
    print("\n\n".join(tables))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
