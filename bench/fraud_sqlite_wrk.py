"""The embedded default's webhook under open-loop load: wrk (Poisson arrivals) beside the project's generator.

One gateway process started exactly as ``tessera up`` starts it (``services.cli.gateway_command``:
uvicorn, uvloop, httptools, no access log, one worker) with only ``TESSERA_DATA_DIR`` set (SQLite
database, embedded broker, no Redis), a tenant and key made by ``tessera keys create``, then:

- ``wrk`` (Debian's, not the project's code) with ``bench/wrk_fraud_open_loop.lua``: signed, unique
  simulated transactions, exponential inter-arrival gaps (a Poisson process at the offered rate),
  one connection per wrk thread, latency from each request's scheduled send time (see the script's
  header for the approach and its limits);
- the project's own open-loop generator (``bench/fraud.py``'s ``_loadgen``: evenly spaced sends,
  latency from each scheduled send time) at the same rates against the same server.

Each point is run ``--repeat`` times, alternating the generators, and one table is printed
(offered, achieved, p50/p90/p99/max, errors, server CPU, RSS, load average). ``--worker`` also runs
the Celery worker + beat as ``tessera up`` does (they poll the embedded broker and compete for
the same cores).

Usage::

    .venv/bin/python bench/fraud_sqlite_wrk.py                     # 400/s and 800/s, 20 s a point, ~2.5 min
    .venv/bin/python bench/fraud_sqlite_wrk.py --rates 400 --repeat 3 --point-s 20

Needs ``wrk`` on PATH (``apt-get install wrk``); without it only the project's generator runs.
The generators share the machine's cores with the server; the table records the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import fraud as fraud_bench  # noqa: E402  (the project's generator and helpers)

LUA_SCRIPT = REPO / "bench" / "wrk_fraud_open_loop.lua"
WEBHOOK_PATH = "/fraud/v1/transactions"
WARMUP_RATE, WARMUP_S = 200.0, 4.0
HEADROOM = 1.3  # transactions prepared per point, over rate x duration (Poisson draws run ahead)


@dataclass
class Server:
    """The gateway (and, with ``--worker``, the Celery worker) on a fresh data directory."""

    port: int
    env: dict[str, str]
    api_key: str
    secret: str
    processes: list[subprocess.Popen[bytes]]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def embedded_env(data_dir: Path) -> dict[str, str]:
    """The caller's environment without any TESSERA_ setting, plus the data directory (and no access log)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["TESSERA_DATA_DIR"] = str(data_dir)
    from shared.config import Settings

    if "access_log" in Settings.model_fields:  # benchmarks run without the per-request log line
        env["TESSERA_ACCESS_LOG"] = "false"
    return env


def start_server(data_dir: Path, with_worker: bool, log_dir: Path) -> Server:
    """Migrate, create a key, start the gateway as ``tessera up`` does; wait for /readyz."""
    from services.cli import gateway_command, worker_command
    from shared.queue import QUEUES

    env = embedded_env(data_dir)
    subprocess.run(fraud_bench.tessera_cmd("db", "upgrade"), env=env, cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = subprocess.run(fraud_bench.tessera_cmd("keys", "create", "--tenant", fraud_bench.BENCH_TENANT,
                                                 "--scope", "fraud"),
                         env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    api_key = re.search(r"API_KEY=(\S+)", out).group(1)  # type: ignore[union-attr]
    secret = re.search(r"WEBHOOK_SECRET=(\S+)", out).group(1)  # type: ignore[union-attr]
    port = fraud_bench.free_port()
    gateway = subprocess.Popen(gateway_command("127.0.0.1", port, 1), env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=(log_dir / "gateway.log").open("wb"))
    processes = [gateway]
    if with_worker:
        worker_env = {**env, "TESSERA_LOG_LEVEL": "WARNING"}
        processes.append(subprocess.Popen(worker_command(QUEUES, 1, beat=True), env=worker_env, cwd=REPO,
                                          stdout=subprocess.DEVNULL,
                                          stderr=(log_dir / "worker.log").open("wb")))
    server = Server(port, env, api_key, secret, processes)
    try:
        fraud_bench.wait_ready(port, gateway)
    except Exception:
        server.stop()
        raise
    return server


def signed_lines(server: Server, bodies: list[bytes]) -> bytes:
    """wrk's requests file: the API key, then "<signature>\\t<body>" a line (signed now: valid 300 s)."""
    from shared.security import sign_payload

    timestamp = int(time.time())
    lines = [server.api_key.encode()]
    lines += [sign_payload(server.secret, body, timestamp).encode() + b"\t" + body for body in bodies]
    return b"\n".join(lines) + b"\n"


def server_usage(server: Server) -> tuple[float, float | None]:
    """CPU seconds so far and current RSS (MiB) of the server processes (and their children)."""
    rss = 0.0
    for pid in server.pids:
        for member in (pid, *fraud_bench._children(pid)):
            try:
                status = Path(f"/proc/{member}/status").read_text()
            except OSError:
                continue
            found = re.search(r"VmRSS:\s+(\d+)", status)
            rss += int(found.group(1)) / 1024 if found else 0.0
    return sum(map(fraud_bench.proc_cpu_s, server.pids)), rss or None


def summarise(latencies_ms: list[float], sent: int, ok: int, errors: int, duration_s: float) -> dict[str, Any]:
    """One row's numbers from per-request latencies."""
    p50, p90, p99 = fraud_bench.percentiles(latencies_ms, 50, 90, 99)
    return {"sent": sent, "ok": ok, "errors": errors, "achieved": ok / duration_s, "p50_ms": p50,
            "p90_ms": p90, "p99_ms": p99, "max_ms": max(latencies_ms) if latencies_ms else None}


def run_wrk(server: Server, bodies: list[bytes], rate: float, duration_s: float, connections: int,
            workdir: Path, seed: int) -> dict[str, Any]:
    """One wrk point; latencies from the Lua script's per-request record."""
    requests_file, out_file = workdir / "wrk-requests.txt", workdir / "wrk-latencies.txt"
    requests_file.write_bytes(signed_lines(server, bodies))
    argv = ["wrk", f"-t{connections}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s", "--latency",
            "-s", str(LUA_SCRIPT), f"http://127.0.0.1:{server.port}{WEBHOOK_PATH}", "--",
            str(requests_file), f"{rate:g}", str(connections), str(out_file), str(seed)]
    completed = subprocess.run(argv, capture_output=True, text=True, check=True)
    lines = out_file.read_text().splitlines()
    counts = dict(item.split("=") for item in lines[-1].lstrip("# ").split())
    latencies = [int(line) / 1000 for line in lines[:-1]]
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)",
                                                   completed.stdout.split("Socket errors:")[-1])) \
        if "Socket errors:" in completed.stdout else 0
    own_p99 = re.search(r"^\s+99%\s+(\S+)", completed.stdout, re.MULTILINE)
    row = summarise(latencies, int(counts["sent"]), int(counts["ok"]),
                    int(counts["non200"]) + socket_errors, duration_s)
    row["wrk_p99_from_send"] = own_p99.group(1) if own_p99 else None
    row["held_back"] = int(counts["late"])
    return row


def run_project_generator(server: Server, bodies: list[bytes], rate: float, duration_s: float,
                          workdir: Path) -> dict[str, Any]:
    """One point of bench/fraud.py's own open-loop generator (evenly spaced sends)."""
    bodies_file = workdir / "own-bodies.jsonl"
    bodies_file.write_bytes(b"\n".join(bodies))
    plan: dict[str, Any] = {
        "host": "127.0.0.1", "port": server.port, "api_key": server.api_key, "secret": server.secret,
        "server_pids": server.pids, "bodies": str(bodies_file), "label": "project generator",
        "phases": [{"kind": "open", "rate": rate, "duration": duration_s}], "out": str(workdir / "own.json"),
        "path_prefix": "/fraud"}
    plan_file = workdir / "own-plan.json"
    plan_file.write_text(json.dumps(plan))
    subprocess.run([sys.executable, str(REPO / "bench" / "fraud.py"), "_loadgen", str(plan_file)],
                   cwd=REPO, check=True, env={**server.env, "PYTHONPATH": str(REPO)})
    point = json.loads(Path(plan["out"]).read_text())["points"][0]
    return {"sent": point["sent"], "ok": point["ok"], "errors": point["errors"], "achieved": point["achieved"],
            "p50_ms": point["p50_ms"], "p90_ms": point.get("p90_ms"), "p99_ms": point["p99_ms"],
            "max_ms": point["max_ms"]}


def measure(generator: str, server: Server, bodies: list[bytes], rate: float, args: argparse.Namespace,
            workdir: Path, seed: int) -> dict[str, Any]:
    """One point with either generator, with the server's CPU and RSS and the load average."""
    load = os.getloadavg()
    cpu_before, _ = server_usage(server)
    started = time.perf_counter()
    if generator == "wrk":
        row = run_wrk(server, bodies, rate, args.point_s, args.connections, workdir, seed)
    else:
        row = run_project_generator(server, bodies, rate, args.point_s, workdir)
    elapsed = time.perf_counter() - started
    cpu_after, rss = server_usage(server)
    row.update(generator=generator, rate=rate, server_cpu=(cpu_after - cpu_before) / max(elapsed, 1e-9),
               rss_mb=rss, loadavg=load)
    print(f"  {generator} {rate:g}/s: {row['achieved']:.0f}/s, p50 {fraud_bench.fmt(row['p50_ms'], 2)} ms, "
          f"p99 {fraud_bench.fmt(row['p99_ms'], 2)} ms, max {fraud_bench.fmt(row['max_ms'], 1)} ms, "
          f"errors {row['errors']}, server CPU {row['server_cpu']:.2f}, load {load[0]:.2f}",
          file=sys.stderr, flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of every point."""
    lines = ["| generator | offered | achieved | p50 ms | p90 ms | p99 ms | max ms | errors | server CPU (cores) "
             "| RSS MiB | load avg (1 min) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "wrk, Poisson" if r["generator"] == "wrk" else "bench/fraud.py, even"
        lines.append(f"| {name} | {r['rate']:g}/s | {r['achieved']:,.0f} | {fraud_bench.fmt(r['p50_ms'], 2)} | "
                     f"{fraud_bench.fmt(r['p90_ms'], 2)} | {fraud_bench.fmt(r['p99_ms'], 1)} | "
                     f"{fraud_bench.fmt(r['max_ms'], 1)} | {r['errors']} | {r['server_cpu']:.2f} | "
                     f"{fraud_bench.fmt(r['rss_mb'], 0)} | {r['loadavg'][0]:.2f} |")
    return "\n".join(lines)


def held_summary(rows: list[dict[str, Any]]) -> str:
    """Per generator and rate: in how many runs p99 <= budget, and the p99 range."""
    out = []
    for generator in dict.fromkeys(r["generator"] for r in rows):
        for rate in dict.fromkeys(r["rate"] for r in rows):
            points = [r for r in rows if r["generator"] == generator and r["rate"] == rate]
            if not points:
                continue
            held = [r for r in points if r["errors"] == 0 and r["p99_ms"] is not None
                    and r["p99_ms"] <= fraud_bench.P99_BUDGET_MS and r["achieved"] >= 0.95 * rate]
            p99s = [r["p99_ms"] for r in points if r["p99_ms"] is not None]
            out.append(f"- {generator} {rate:g}/s: p99 ≤ {fraud_bench.P99_BUDGET_MS:g} ms in {len(held)} of "
                       f"{len(points)} runs (p99 {min(p99s):.1f}-{max(p99s):.1f} ms)" if p99s else "")
    return "\n".join(line for line in out if line)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="400,800", help="comma-separated offered rates (tx/s)")
    parser.add_argument("--point-s", type=float, default=20.0, help="seconds a point")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each point (generators alternate)")
    parser.add_argument("--connections", type=int, default=16, help="wrk threads = connections")
    parser.add_argument("--generators", default="wrk,project", help="wrk, project, or both")
    parser.add_argument("--worker", action="store_true", help="also run the Celery worker + beat (tessera up)")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.generators = [g for g in args.generators.split(",") if g]
    if "wrk" in args.generators and shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk): running the project's generator only",
              file=sys.stderr)
        args.generators = [g for g in args.generators if g != "wrk"] or ["project"]
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    started = time.time()
    plan = [(generator, rate) for _ in range(args.repeat) for rate in args.rates for generator in args.generators]
    needed = [math.ceil(rate * args.point_s * HEADROOM) for _, rate in plan]
    total = int(WARMUP_RATE * WARMUP_S * HEADROOM) + sum(needed)
    df = fraud_bench.simulate(n_customers=max(1000, total // 50), n_days=30, seed=2)
    pool = fraud_bench.request_bodies(df, f"wrk{os.getpid()}").split(b"\n")
    if len(pool) < total:
        sys.exit(f"simulated {len(pool)} transactions, {total} needed")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-sqlite-") as tmp:
        workdir = Path(tmp)
        server = start_server(workdir / "data", args.worker, workdir)
        try:
            print(f"[gateway on :{server.port}, embedded default (SQLite), pids {server.pids}]", file=sys.stderr)
            cursor = int(WARMUP_RATE * WARMUP_S * HEADROOM)
            warm_args = argparse.Namespace(**{**vars(args), "point_s": WARMUP_S})
            warm = "wrk" if "wrk" in args.generators else "project"
            measure(warm, server, pool[:cursor], WARMUP_RATE, warm_args, workdir, seed=0)
            for seed, ((generator, rate), count) in enumerate(zip(plan, needed, strict=True), start=1):
                time.sleep(1.0)
                rows.append(measure(generator, server, pool[cursor:cursor + count], rate, args, workdir, seed))
                cursor += count
        finally:
            server.stop()
    fraud_bench.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = fraud_bench.RESULTS_DIR / "fraud_sqlite_wrk.json"
    out.write_text(json.dumps({"rows": rows, "args": {k: v for k, v in vars(args).items()},
                               "cpus": os.cpu_count(), "elapsed_s": time.time() - started}, indent=2))
    print(f"\n## Embedded default (SQLite), one gateway process{' + worker' if args.worker else ''}: "
          f"{args.point_s:g} s a point, {time.time() - started:.0f} s in all\n")
    print(table(rows))
    print()
    print(held_summary(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
