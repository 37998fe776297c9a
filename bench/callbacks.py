"""Bank callback latency: from a flagged decision's answer to its signed callback at the bank.

For each stack, the bench starts what ``tessera up`` starts (the fraud API under uvicorn, as in
``bench/fraud.py``; one Celery worker with concurrency 1 and the sweeper's beat) plus, for the
Redis stack, the write-behind recorder in its own process (``compose.yaml``'s layout). It sets the
tenant's review threshold to 0 (every decision is flagged, so every transaction queues a callback)
and its callback URL to a receiver on loopback (a real HTTP server in this process; allow-listed
with ``TESSERA_CALLBACK_ALLOWED_HOSTS=127.0.0.1``), sends signed
``POST /v1/transactions`` of simulated transactions at a fixed rate, and records when each answer
came back and when its callback arrived. Latency = callback arrival - answer (one clock: loopback).

Stacks: ``sqlite`` (the embedded default: SQLite file, SQLite-backed broker; decisions committed
by the API before it answers) and ``redis`` (PostgreSQL + Redis broker + Redis window state, rows
written behind by the recorder: the production configuration).

Reports per stack: flagged decisions, callbacks received, p50 / p99 / max latency, lost (no
callback within ``--settle-s`` after the last answer), duplicated (a transaction called back more
than once), bad signatures.

Usage::

    .venv/bin/python bench/callbacks.py                      # both stacks, ~3 min
    .venv/bin/python bench/callbacks.py --stacks sqlite --rate 20 --seconds 20

Needs PostgreSQL and Redis on loopback for ``redis`` (``make services``). Writes
``bench/results/callbacks.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.fraud import (  # noqa: E402  (the path above makes the repo importable when run as a script)
    BENCH_TENANT,
    DEFAULT_PG,
    RESULTS_DIR,
    find_artifact,
    fmt,
    free_port,
    make_database,
    percentiles,
    request_bodies,
    simulate,
    start_recorder,
    stop_processes,
    tessera_cmd,
    wait_ready,
)

STACK_LABELS = {"sqlite": "SQLite + embedded broker (default)", "redis": "PostgreSQL + Redis"}


@dataclass
class Receiver:
    """The bank's callback endpoint: a threaded HTTP server on loopback recording each arrival."""

    secret: str = ""
    arrivals: dict[str, list[float]] = field(default_factory=dict)
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        """Start serving in a daemon thread; returns the server and its callback URL."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                arrived = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.record(body, self.headers.get("Tessera-Signature"), arrived)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/bank/callbacks"

    def record(self, body: bytes, signature: str | None, arrived: float) -> None:
        from shared.security import SignatureError, verify_signature

        try:
            verify_signature(signature, body, [self.secret], tolerance_s=300)
        except SignatureError:
            with self.lock:
                self.bad_signatures += 1
            return
        transaction_id = json.loads(body)["transaction_id"]
        with self.lock:
            self.arrivals.setdefault(transaction_id, []).append(arrived)


def send_transactions(port: int, api_key: str, secret: str, bodies: list[bytes],
                      rate: float) -> dict[str, float]:
    """Signed webhooks at a fixed rate; the wall time each flagged decision was answered, by id."""
    import httpx

    from shared.security import sign_payload

    answered: dict[str, float] = {}
    started = time.perf_counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": api_key}, timeout=10) as client:
        for index, body in enumerate(bodies):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            response = client.post("/v1/transactions", content=body, headers={
                "Tessera-Signature": sign_payload(secret, body), "Content-Type": "application/json"})
            if response.status_code == 200 and response.json()["decision"] != "approve":
                answered[response.json()["transaction_id"]] = time.time()
    return answered


def configure_tenant(port: int, api_key: str, callback_url: str) -> None:
    """Flag every decision and point the callbacks at the receiver."""
    import httpx

    response = httpx.put(f"http://127.0.0.1:{port}/v1/settings", headers={"X-API-Key": api_key}, timeout=10,
                         json={"review_threshold": 0.0, "decline_threshold": 1.0, "callback_url": callback_url})
    if response.status_code != 200:
        raise RuntimeError(f"PUT /v1/settings answered {response.status_code}: {response.text}")


def wait_settled(receiver: Receiver, answered: dict[str, float], settle_s: float) -> float:
    """Wait until every flagged decision was called back (or ``settle_s`` passed); returns seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < settle_s:
        with receiver.lock:
            if all(tx in receiver.arrivals for tx in answered):
                break
        time.sleep(0.2)
    time.sleep(2.0)  # late duplicates, if any, arrive now
    return time.monotonic() - started


def summarise(stack: str, receiver: Receiver, answered: dict[str, float], waited_s: float) -> dict[str, Any]:
    """Latency percentiles and lost / duplicated / unexpected callback counts."""
    with receiver.lock:
        arrivals = dict(receiver.arrivals)
    latencies = [(arrivals[tx][0] - at) * 1000 for tx, at in answered.items() if tx in arrivals]
    p50, p99 = percentiles(latencies, 50, 99)
    return {"stack": STACK_LABELS[stack], "flagged": len(answered), "received": len(latencies),
            "p50_ms": p50, "p99_ms": p99, "max_ms": max(latencies) if latencies else None,
            "lost": len(answered) - len(latencies),
            "duplicated": sum(len(times) - 1 for times in arrivals.values()),
            "unexpected": len(set(arrivals) - set(answered)), "bad_signatures": receiver.bad_signatures,
            "settled_after_s": round(waited_s, 1)}


def worker_log_counts(log: Path) -> dict[str, int]:
    """Symptoms of early publishing in the worker's log."""
    text = log.read_text(errors="replace")
    return {"skipped_missing": text.count("skipped: missing"),
            "reenqueued_stalled": text.count("re-enqueueing stalled job")}


def start_worker(env: dict[str, str], log: Path, timeout_s: float = 90.0) -> subprocess.Popen[bytes]:
    """``tessera worker --beat`` (every queue, concurrency 1: what ``tessera up`` runs), once ready."""
    process = subprocess.Popen(tessera_cmd("worker", "--beat"), env={**env, "TESSERA_LOG_LEVEL": "INFO"}, cwd=REPO,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while not re.search(r"ready\.", log.read_text(errors="replace")):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the worker did not start: {log.read_text(errors='replace')[-800:]}")
        time.sleep(0.3)
    return process


def run_stack(args: argparse.Namespace, stack: str, artifact: Path, workdir: Path) -> dict[str, Any]:
    """One stack end to end: processes up, traffic, wait for callbacks, processes down."""
    db = make_database(stack, args, workdir)
    env = {**os.environ, **db.env, "TESSERA_MODELS_DIR": str(artifact.parent.parent), "PYTHONPATH": str(REPO),
           "TESSERA_RECORDER_IN_API": "false", "TESSERA_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
           **dict(item.split("=", 1) for item in args.env)}
    if stack == "redis":
        import redis

        redis.Redis.from_url(args.redis_broker).flushdb()
    processes: list[subprocess.Popen[bytes]] = []
    receiver = Receiver()
    server, callback_url = receiver.serve()
    try:
        subprocess.run(tessera_cmd("db", "upgrade"), env=env, cwd=REPO, check=True, capture_output=True)
        keys = subprocess.run(tessera_cmd("keys", "create", "--tenant", BENCH_TENANT, "--scope", "fraud"),
                              env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
        found = {name.lower(): value for name, value in  # API_KEY= today, api_key= before (old builds)
                 re.findall(r"(API_KEY|WEBHOOK_SECRET)=(\S+)", keys, re.IGNORECASE)}
        if len(found) != 2:
            raise RuntimeError(f"tessera keys create printed no key: {keys[-500:]!r}")
        api_key, receiver.secret = found["api_key"], found["webhook_secret"]
        port = free_port()
        processes.append(subprocess.Popen([sys.executable, str(REPO / "bench" / "fraud.py"), "_serve", str(port)],
                                          env=env, cwd=REPO, stderr=(workdir / f"server-{stack}.log").open("wb")))
        wait_ready(port, processes[-1])
        if stack == "redis":
            processes.append(start_recorder(env, workdir / f"recorder-{stack}.log"))
        worker_log = workdir / f"worker-{stack}.log"
        processes.append(start_worker(env, worker_log))
        configure_tenant(port, api_key, callback_url)
        df = simulate(n_customers=200, n_days=30, seed=3)
        bodies = request_bodies(df.tail(int(args.rate * args.seconds)), f"cb-{stack}-{os.getpid()}").split(b"\n")
        print(f"[{stack}] sending {len(bodies)} flagged transactions at {args.rate:g}/s", file=sys.stderr, flush=True)
        answered = send_transactions(port, api_key, receiver.secret, bodies, args.rate)
        waited = wait_settled(receiver, answered, args.settle_s)
        return {**summarise(stack, receiver, answered, waited), **worker_log_counts(worker_log)}
    finally:
        server.shutdown()
        stop_processes(list(reversed(processes)))
        db.cleanup()


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the runs."""
    lines = ["| stack | flagged | called back | p50 ms | p99 ms | max ms | lost | duplicated | "
             "worker: skipped missing / re-enqueued stalled |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stack']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['stack']} | {r['flagged']} | {r['received']} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
                     f"{fmt(r['max_ms'])} | {r['lost']} | {r['duplicated']} | "
                     f"{r['skipped_missing']} / {r['reenqueued_stalled']} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", default="sqlite,redis", help="comma-separated: sqlite, redis")
    parser.add_argument("--rate", type=float, default=10.0, help="transactions a second (all flagged)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of traffic")
    parser.add_argument("--settle-s", type=float, default=180.0,
                        help="after the last answer, wait this long for callbacks before counting them lost")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL server URL without database name")
    parser.add_argument("--redis-broker", default="redis://127.0.0.1:6379/14", help="broker (flushed first)")
    parser.add_argument("--redis-state", default="redis://127.0.0.1:6379/11", help="window state (flushed first)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for every process")
    args = parser.parse_args(argv)
    args.stacks = [s for s in args.stacks.split(",") if s]
    args.workers = 1  # read by bench.fraud.make_database
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    artifact = find_artifact(None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-callbacks-") as tmp:
        for stack in args.stacks:
            try:
                rows.append(run_stack(args, stack, artifact, Path(tmp)))
            except Exception as exc:  # keep the other stack's result
                print(f"[{stack}] failed: {exc!r}", file=sys.stderr)
                rows.append({"stack": STACK_LABELS.get(stack, stack), "error": repr(exc)})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "callbacks.json").write_text(json.dumps({"rate": args.rate, "seconds": args.seconds,
                                                             "rows": rows}, indent=2))
    print(f"\n## Bank callback latency ({args.rate:g} flagged tx/s for {args.seconds:g} s; answer -> callback)\n")
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
