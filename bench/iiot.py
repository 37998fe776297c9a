"""IIoT vertical benchmark: ingestion, MQTT, scoring and alert lead time in one run (simulated data).

One run, four tables, ``bench/results/iiot.json``:

1. **Ingestion** of a long-format CSV (``timestamp, asset, sensor, value, unit``; 10 M rows in the
   full run, generated once and streamed) into ``iiot_readings`` on SQLite and on PostgreSQL (a
   scratch database ``tessera_bench_iiot_*`` created from a migrated, seeded template per point and
   dropped after). Ways (see :mod:`bench._iiot_ingest`): the project's ingestion path, naive ORM
   inserts (on a sample, rows/s extrapolated and said so), pandas ``to_sql`` (``method=None`` and
   ``"multi"``; on a sample), and ``psql \\copy`` / ``sqlite3 .import`` of the same rows already in
   the table's layout (the write limit). Each way in its own process: its peak RSS is its own; the
   project's path is measured at 1 M and 10 M rows (peak memory should not grow with the file).
2. **MQTT** readings/s through validation (H6's subscriber; paho publisher; Mosquitto at 127.0.0.1:1883).
3. **Scoring**: assets/s by the cloud model through the shared runtime, windows/s by the edge ONNX
   model on one core, beside a naive baseline (one asset at a time, no batching).
4. **Alert lead time** on a held-out simulated fleet: % of failures alerted >= 72 h ahead, median
   lead time, false alerts per asset-month.

A section whose pieces have not landed yet is reported as "not yet measured" with the reason; no
number is ever filled in for it.

Usage::

    nice -n 5 python bench/iiot.py              # full (~15 min on 2 shared cores; also: tessera bench iiot)
    python bench/iiot.py --quick                # small sizes (~1 min; what tests/bench runs)
    python bench/iiot.py --sections ingest --backends postgres --rows 2000000
    python bench/iiot.py --sections scoring,alerts --update   # rerun sections into the existing record

PostgreSQL from ``--pg-url`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432``); MQTT from
``--mqtt`` (default 127.0.0.1:1883). Note: this box has 2 cores shared with other work; every
figure is from one run and noisy (compare ratios measured in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._iiot_data import BenchDatabases, BenchFiles, make_files  # noqa: E402
from bench._measure import peak_rss_mb  # noqa: E402

RESULTS = REPO / "bench" / "results" / "iiot.json"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
NOT_MEASURED = "not yet measured"
SHARED_BOX = "2 CPU cores shared with other work (other sessions building and testing at the same time)"
FILE_SEED = 11
"""The simulated fleet of the ingestion file (the alert section's held-out fleet uses another seed)."""
GOAL_PG_ROWS_PER_S, GOAL_COPY_SHARE, GOAL_NAIVE_FACTOR = 200_000, 0.70, 20.0


@dataclass(frozen=True)
class Plan:
    """The sizes of one run (full or ``--quick``)."""

    rows: int
    """rows of the big file (the project's path and the copy limit ingest all of them)."""
    small_rows: int
    """the smaller file the project's path ingests too (peak memory at two sizes)."""
    naive_rows: int
    """rows the naive ORM way inserts (a sample: rows/s extrapolated)."""
    to_sql_rows: int
    """rows the pandas to_sql ways insert (a sample)."""
    assets: int
    mqtt_readings: int
    """readings published per MQTT point."""
    mqtt_timeout_s: float
    scoring_assets: int
    scoring_days: float
    scoring_repeats: int
    edge_windows: int
    alert_assets: int
    alert_days: float
    alert_stride_h: float


FULL = Plan(rows=10_000_000, small_rows=1_000_000, naive_rows=50_000, to_sql_rows=500_000, assets=200,
            mqtt_readings=50_000, mqtt_timeout_s=240.0, scoring_assets=100, scoring_days=3.0, scoring_repeats=2,
            edge_windows=5_000, alert_assets=30, alert_days=120.0, alert_stride_h=1.0)
QUICK = Plan(rows=20_000, small_rows=5_000, naive_rows=1_000, to_sql_rows=5_000, assets=20, mqtt_readings=2_000,
             mqtt_timeout_s=30.0, scoring_assets=10, scoring_days=2.5, scoring_repeats=1, edge_windows=200,
             alert_assets=4, alert_days=20.0, alert_stride_h=6.0)


# -- helpers ---------------------------------------------------------------------------------------

def cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _commit() -> str | None:
    """The repository's HEAD commit (the code measured; other work may be uncommitted beside it)."""
    completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                               check=False)
    return completed.stdout.strip() or None


def fmt(value: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or "—"."""
    return "—" if value is None else f"{value:,.{digits}f}"


def not_measured(why: str) -> dict[str, Any]:
    """The record of something that could not be measured in this run (never a number)."""
    return {"status": NOT_MEASURED, "why": why}


# -- 1. ingestion ------------------------------------------------------------------------------------
INGEST_WAYS = ("tessera", "copy", "to_sql", "to_sql-multi", "naive-orm")


def ingest_point(way: str, url: str, path: Path, rows: int, keys_path: Path) -> dict[str, Any]:
    """One ingestion way in this process (``point ingest``): rows written, seconds, CPU, peak RSS."""
    from bench import _iiot_ingest as ways

    keys: dict[str, int] = json.loads(keys_path.read_text())
    handlers: dict[str, Callable[[], int | dict[str, Any]]] = {
        "naive-orm": lambda: ways.naive_orm(url, path, rows, keys),
        "to_sql": lambda: ways.pandas_to_sql(url, path, rows, keys, multi=False),
        "to_sql-multi": lambda: ways.pandas_to_sql(url, path, rows, keys, multi=True),
        "tessera": lambda: ways.tessera_ingest(path),
    }
    _warm_imports()
    cpu_before, started = cpu_s(), time.perf_counter()
    done = handlers[way]()
    seconds = time.perf_counter() - started
    point = {"seconds": seconds, "cpu_s": cpu_s() - cpu_before, "peak_rss_mb": peak_rss_mb()}
    if isinstance(done, dict):
        return {**point, "rows": done["rows_read"], "rows_kept": done["rows_kept"],
                "rows_quarantined": done["rows_quarantined"], "gaps": done["gaps"], "error": done["error"],
                "server_cpu_s": done.get("server_cpu_s")}
    return {**point, "rows": done}


def _warm_imports() -> None:
    """Import what every way uses before the clock starts (~2 s on this box: a worker has them loaded)."""
    import pandas  # noqa: F401
    import sqlalchemy.orm  # noqa: F401

    from services.iiot import db, ingest  # noqa: F401
    from shared import jobs  # noqa: F401


def run_ingest_point(way: str, url: str, path: Path, rows: int, files: BenchFiles, workdir: Path) -> dict[str, Any]:
    """:func:`ingest_point` in a subprocess (its own peak RSS); the rows stored counted afterwards."""
    from bench._iiot_data import count_readings

    argv = [sys.executable, str(Path(__file__).resolve()), "point", "ingest", "--way", way, "--url", url,
            "--file", str(path), "--rows", str(rows), "--keys", str(files.keys_path)]
    env = {**os.environ, "TESSERA_DATABASE_URL": url, "TESSERA_DATA_DIR": str(workdir / "data"),
           "TESSERA_LOG_LEVEL": "WARNING"}
    load_before = os.getloadavg()[0]
    completed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        return {"status": "failed", "why": (completed.stderr.strip().splitlines() or ["?"])[-1],
                "stderr_tail": completed.stderr[-2000:]}
    point: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    point["rows_stored"] = count_readings(url)
    point["rows_per_s"] = point["rows"] / point["seconds"] if point["seconds"] > 0 else None
    point["load_avg_1m"] = [load_before, os.getloadavg()[0]]  # before, after: the box is shared
    return point


def bench_ingest(plan: Plan, backends: tuple[str, ...], pg_url: str, workdir: Path,
                 ways: tuple[str, ...] = (), repeat: int = 1) -> dict[str, Any]:
    """Section 1: every way (or ``ways``: labels of :func:`ingest_backend`) on every backend; the files
    made once (or reused from ``workdir``) and shared. ``repeat``: the project's way and the copy limit
    run this many times, alternating (the box is shared: a ratio is read within a pair)."""
    files = make_files(workdir / "files", plan.rows, plan.small_rows, plan.assets, FILE_SEED)
    record: dict[str, Any] = {"file": files.manifest, "small_file_rows": files.small_rows}
    print(f"ingest: {files.rows:,} rows, {files.manifest['bytes'] / 1e6:,.0f} MB CSV "
          f"({files.manifest['sensors']} sensors, {files.manifest['simulated_days']:.0f} simulated days) "
          f"{'reused' if files.manifest['reused'] else 'written'} "
          f"({files.manifest['seconds_to_write']:.0f} s to write)", flush=True)
    databases = BenchDatabases(workdir / "db", pg_url, files.registry)
    (workdir / "db").mkdir(exist_ok=True)
    try:
        databases.prepare(backends)
        for backend in backends:
            record[backend] = ingest_backend(backend, plan, databases, files, workdir, ways, repeat)
    finally:
        databases.close()
    return record


def ingest_backend(backend: str, plan: Plan, databases: BenchDatabases, files: BenchFiles, workdir: Path,
                   only: tuple[str, ...] = (), repeat: int = 1) -> dict[str, Any]:
    """Every way on one backend (``only``: these labels), each into a fresh copy of the seeded database;
    ``tessera`` and ``copy`` ``repeat`` times, alternating (labels ``tessera#2``, ``copy#2``, ...)."""
    from bench import _iiot_ingest as ways

    results: dict[str, Any] = {}
    pairs = [point for run in range(1, repeat + 1) for point in (
        (_nth("tessera", run), files.big, plan.rows), (_nth("copy", run), files.resolved, plan.rows))]
    points = [pairs[0], ("tessera@small", files.small, plan.small_rows), *pairs[1:],
              ("to_sql", files.big, plan.to_sql_rows), ("to_sql-multi", files.big, plan.to_sql_rows),
              ("naive-orm", files.big, plan.naive_rows)]
    for label, path, rows in points:
        if only and label.split("#")[0] not in only:
            continue
        way = label.split("@")[0].split("#")[0]
        if way == "tessera" and (why := ways.tessera_missing()):
            results[label] = not_measured(why)
            continue
        url = databases.fresh(backend)
        try:
            if way == "copy":
                load_before = os.getloadavg()[0]
                stored, seconds, cpu = ways.copy_limit(url, path)
                results[label] = {"rows": stored, "rows_stored": stored, "seconds": seconds,
                                  "rows_per_s": stored / seconds, "tool": "sqlite3 .import" if backend == "sqlite"
                                  else "psql \\copy", "cpu_s": cpu["client_cpu_s"],
                                  "server_cpu_s": cpu["server_cpu_s"],
                                  "load_avg_1m": [load_before, os.getloadavg()[0]]}
            else:
                results[label] = run_ingest_point(way, url, path, rows, files, workdir)
            results[label]["sample"] = rows < plan.rows and label != "tessera@small"
        finally:
            databases.discard(url)
        point = results[label]
        print(f"  {backend:<8} {label:<14} {fmt(point.get('rows'))} rows  {fmt(point.get('rows_per_s'))} rows/s  "
              f"peak {fmt(point.get('peak_rss_mb'))} MB  cpu {fmt(point.get('cpu_s'), 1)} s  "
              f"server cpu {fmt(point.get('server_cpu_s'), 1)} s  load {point.get('load_avg_1m', '')}  "
              f"{point.get('status', '')}", flush=True)
    results["goals"] = ingest_goals(backend, results)
    return results


def _nth(way: str, run: int) -> str:
    """The label of the ``run``-th repetition of ``way`` (the first keeps the bare name)."""
    return way if run == 1 else f"{way}#{run}"


def _rates(ways_: dict[str, Any], way: str) -> list[float]:
    """rows/s of every repetition of ``way`` (``way``, ``way#2``, ...) in run order."""
    return [float(point["rows_per_s"]) for label, point in ways_.items()
            if label.split("#")[0] == way and isinstance(point, dict) and point.get("rows_per_s")]


def ingest_goals(backend: str, ways_: dict[str, Any]) -> dict[str, Any]:
    """The issue's ingestion goals, checked on this run's figures (None where a figure is missing)."""
    def rate(label: str) -> float | None:
        """The median over repetitions (the only run when there is one)."""
        values = sorted(_rates(ways_, label))
        return values[len(values) // 2] if len(values) % 2 else \
            (sum(values[len(values) // 2 - 1:len(values) // 2 + 1]) / 2 if values else None)

    ours, copy, naive = rate("tessera"), rate("copy"), rate("naive-orm")
    big, small = ways_.get("tessera", {}).get("peak_rss_mb"), ways_.get("tessera@small", {}).get("peak_rss_mb")
    pairs = list(zip(_rates(ways_, "tessera"), _rates(ways_, "copy"), strict=False))
    goals: dict[str, Any] = {
        "tessera_rows_per_s_median": ours, "copy_rows_per_s_median": copy,
        "share_of_copy_per_pair": [mine / limit for mine, limit in pairs],
        "share_of_copy": ours / copy if ours and copy else None,
        "times_naive_orm": ours / naive if ours and naive else None,
        "peak_rss_ratio_big_over_small": big / small if big and small else None,
    }
    if backend == "postgres":
        goals["rows_per_s_goal_met"] = None if ours is None else ours >= GOAL_PG_ROWS_PER_S
        goals["share_of_copy_goal_met"] = None if goals["share_of_copy"] is None else \
            goals["share_of_copy"] >= GOAL_COPY_SHARE
    goals["times_naive_goal_met"] = None if goals["times_naive_orm"] is None else \
        goals["times_naive_orm"] >= GOAL_NAIVE_FACTOR
    return goals


WAY_LABELS = {
    "tessera": "Tessera ingest (the project's path)",
    "tessera@small": "Tessera ingest, smaller file (memory)",
    "copy": "write limit: {tool} of the resolved rows",
    "to_sql": "pandas to_sql (method=None)",
    "to_sql-multi": "pandas to_sql (method=\"multi\")",
    "naive-orm": "naive ORM (session.add, commit per 1,000)",
}


def print_ingest(record: dict[str, Any]) -> None:
    """Markdown table of section 1."""
    file_ = record["file"]
    print(f"\n### Ingestion: long-format CSV, {file_['rows']:,} rows ({file_['bytes'] / 1e6:,.0f} MB, "
          f"{file_['sensors']:,} sensors of {file_['assets']} simulated assets), into iiot_readings\n")
    print("| database | way | rows | rows/s | peak RSS (MB) | note |")
    print("|---|---|---:|---:|---:|---|")
    for backend in ("postgres", "sqlite"):
        if backend not in record:
            continue
        for label, point in record[backend].items():
            if label == "goals":
                continue
            name = WAY_LABELS[label.split("#")[0]].format(tool=point.get("tool", "copy"))
            if "#" in label:
                name += f" (run {label.split('#')[1]})"
            if point.get("status"):
                print(f"| {backend} | {name} | — | — | — | {point['status']}: {point['why']} |")
                continue
            note = "sample; rows/s extrapolates" if point.get("sample") else ""
            if point.get("rows_quarantined"):
                note += f" {point['rows_quarantined']:,} quarantined"
            if point.get("rows_stored") is not None and point["rows_stored"] != point["rows"]:
                note += f" stored {point['rows_stored']:,}"
            print(f"| {backend} | {name} | {point['rows']:,} | {fmt(point['rows_per_s'])} | "
                  f"{fmt(point.get('peak_rss_mb'))} | {note} |")
    for backend in ("postgres", "sqlite"):
        goals = record.get(backend, {}).get("goals")
        if goals:
            print(f"\n{backend}: Tessera = {fmt_ratio(goals['share_of_copy'], pct=True)} of the write limit, "
                  f"{fmt_ratio(goals['times_naive_orm'])}x naive ORM; peak RSS big/small file "
                  f"{fmt_ratio(goals['peak_rss_ratio_big_over_small'])}"
                  + _per_pair(goals))


def _per_pair(goals: dict[str, Any]) -> str:
    """"; per alternating pair: 71 %, 69 %" when the project's way and the limit ran more than once."""
    shares = goals.get("share_of_copy_per_pair", [])
    return f"; per alternating pair: {', '.join(fmt_ratio(x, pct=True) for x in shares)}" if len(shares) > 1 else ""


def fmt_ratio(value: float | None, pct: bool = False) -> str:
    """A ratio as "1.23" or "45 %", or "—"."""
    if value is None:
        return "—"
    return f"{100 * value:.0f} %" if pct else f"{value:.2f}"


# -- 2. MQTT ----------------------------------------------------------------------------------------
MQTT_WAYS = ("tessera", "raw")
MQTT_BATCHES = (1, 50)
"""Readings per message: one a message (a sensor publishing each value), 50 (a gateway's batch)."""


def broker_listening(broker: str) -> bool:
    """Whether something accepts TCP connections at ``mqtt://host:port``."""
    import socket

    host, port = broker.removeprefix("mqtt://").split(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


def bench_mqtt(plan: Plan, broker: str, pg_url: str, workdir: Path) -> dict[str, Any]:
    """Section 2: readings/s through H6's subscriber and validation, beside a raw paho subscriber."""
    from bench import _iiot_ingest
    from bench._iiot_mqtt import run_mqtt_point

    if not broker_listening(broker):
        return not_measured(f"no MQTT broker at {broker}")
    from services.iiot.simulate import write_readings

    registry = write_readings(workdir / "mqtt-registry.csv", "csv", 1000, assets=plan.assets,
                              seed=FILE_SEED).registry.payload()
    record: dict[str, Any] = {"broker": broker, "database": "postgres", "qos": 1}
    missing = _iiot_ingest.accept_readings_missing()
    databases = BenchDatabases(workdir / "mqtt-db", pg_url, registry)
    (workdir / "mqtt-db").mkdir(exist_ok=True)
    try:
        if missing is None:
            databases.prepare(("postgres",))
        for batch in MQTT_BATCHES:
            for way in MQTT_WAYS:
                label = f"{way}@{batch}"
                if way == "tessera" and missing:
                    record[label] = not_measured(missing)
                    continue
                url = databases.fresh("postgres") if way == "tessera" else None
                env = {"TESSERA_DATABASE_URL": url, "TESSERA_LOG_LEVEL": "WARNING",
                       "TESSERA_DATA_DIR": str(workdir / "mqtt-data")} if url else {}
                try:
                    record[label] = run_mqtt_point(way, broker, registry, plan.mqtt_readings, batch, env, workdir,
                                                   timeout_s=plan.mqtt_timeout_s)
                finally:
                    if url:
                        databases.discard(url)
                point = record[label]
                print(f"  mqtt {label:<11} {fmt(point.get('readings'))} readings  "
                      f"{fmt(point.get('readings_per_s'))} readings/s", flush=True)
    finally:
        databases.close()
    return record


def print_mqtt(record: dict[str, Any]) -> None:
    """Markdown table of section 2."""
    print(f"\n### MQTT: readings/s through validation (QoS 1, Mosquitto on loopback, {record['database']})\n")
    print("| subscriber | readings/message | readings | messages | readings/s | subscriber CPU s | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    names = {"tessera": "Tessera (H6 subscriber → validation → database)",
             "raw": "raw paho + json.loads (ceiling: no validation, no database)"}
    for batch in MQTT_BATCHES:
        for way in MQTT_WAYS:
            point = record.get(f"{way}@{batch}")
            if point is None:
                continue
            if point.get("status"):
                print(f"| {names[way]} | {batch} | — | — | — | — | {point['status']}: {point['why']} |")
                continue
            note = "timed out before every reading was counted" if point.get("timed_out") else ""
            print(f"| {names[way]} | {batch} | {point['readings']:,} | {point['messages']:,} | "
                  f"{fmt(point['readings_per_s'])} | {point['cpu_s']:.1f} | {note} |")


# -- 3. scoring ----------------------------------------------------------------------------------
def bench_scoring(plan: Plan, pg_url: str, workdir: Path) -> dict[str, Any]:
    """Section 3: cloud assets/s through H5's scoring on PostgreSQL (subprocess), edge windows/s on one core."""
    from bench._iiot_scoring import edge_point
    from services.iiot.simulate import write_readings

    directory = workdir / "scoring"
    directory.mkdir(parents=True, exist_ok=True)
    written = write_readings(directory / "readings.csv", "csv", None, assets=plan.scoring_assets,
                             days=plan.scoring_days, seed=FILE_SEED + 1)
    record: dict[str, Any] = {"assets": plan.scoring_assets, "readings": written.rows, "window_h": 48,
                              "database": "postgres"}
    databases = BenchDatabases(directory / "db", pg_url, written.registry.payload())
    (directory / "db").mkdir(exist_ok=True)
    try:
        databases.prepare(("postgres",))
        url = databases.fresh("postgres")
        argv = [sys.executable, str(Path(__file__).resolve()), "point", "scoring", "--url", url,
                "--file", str(written.path), "--rows", str(plan.scoring_repeats)]
        env = {**os.environ, "TESSERA_DATABASE_URL": url, "TESSERA_DATA_DIR": str(directory / "data"),
               "TESSERA_LOG_LEVEL": "WARNING"}
        completed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False, env=env)
        if completed.returncode != 0:
            record["cloud"] = {"status": "failed", "why": (completed.stderr.strip().splitlines() or ["?"])[-1],
                               "stderr_tail": completed.stderr[-2000:]}
        else:
            record["cloud"] = json.loads(completed.stdout.strip().splitlines()[-1])
    finally:
        databases.close()
    record["edge"] = edge_point(plan.edge_windows)
    cloud, edge = record["cloud"], record["edge"]
    print(f"  scoring cloud batched {fmt(cloud.get('batched', {}).get('assets_per_s'))} assets/s, naive "
          f"{fmt(cloud.get('naive', {}).get('assets_per_s'))}; edge onnx b1 "
          f"{fmt(edge['onnx_batch1']['windows_per_s'])} windows/s", flush=True)
    return record


def print_scoring(record: dict[str, Any]) -> None:
    """Markdown table of section 3."""
    cloud, edge = record["cloud"], record["edge"]
    print(f"\n### Scoring: {record['assets']} simulated assets, 48 h windows\n")
    print("| model | way | items | seconds | throughput | note |")
    print("|---|---|---:|---:|---:|---|")
    if cloud.get("status"):
        print(f"| cloud | H5 score_tenant | — | — | — | {cloud['status']}: {cloud['why']} |")
    else:
        for label, name in (("batched", "H5 score_tenant, runtime batches of 64"),
                            ("naive", "naive: same pipeline, one asset at a time (batch 1)")):
            point = cloud[label]
            print(f"| cloud ({cloud['model']}) | {name} | {point['assets_scored']} assets | {point['seconds']:.2f} | "
                  f"{fmt(point['assets_per_s'])} assets/s | read + windows + model + RiskScore + policy, "
                  f"PostgreSQL; median of {point['runs']}; the model alone: {fmt(point['model_windows_per_s'])} "
                  "windows/s |")
    for label, name in (("onnx_batch1", "ONNX Runtime, 1 thread, batch 1"),
                        ("onnx_batch64", "ONNX Runtime, 1 thread, batch 64"),
                        ("torch_eager_batch1", "naive: eager torch, 1 thread, batch 1")):
        point = edge[label]
        print(f"| edge ({edge['model']}, {edge['onnx_bytes'] / 1024:.0f} KiB ONNX) | {name} | {point['windows']:,} "
              f"windows | {point['seconds']:.2f} | {fmt(point['windows_per_s'])} windows/s | |")


# -- 4. alerts ----------------------------------------------------------------------------------------
def bench_alerts(plan: Plan) -> dict[str, Any]:
    """Section 4: alert lead time on a held-out simulated fleet (see :mod:`bench._iiot_scoring`)."""
    from bench._iiot_scoring import alert_point

    record = alert_point(plan.alert_assets, plan.alert_days, plan.alert_stride_h)
    if not record.get("status"):
        print(f"  alerts: {record['alerted_at_least_goal']}/{record['failures']} failures alerted >= 72 h ahead, "
              f"{record['false_alerts']} false alerts", flush=True)
    return record


def print_alerts(record: dict[str, Any]) -> None:
    """Markdown table of section 4."""
    print(f"\n### Alert lead time: held-out simulated fleet (seed {record['seed']}, {record['assets']} assets x "
          f"{record['fleet_days']:g} days, scored every {record['stride_h']:g} h by {record['model']}; "
          f"default AlertPolicy)\n")
    print("| rule | failures | alerted | alerted >= 72 h ahead | median lead time (h) | false alerts | "
          "false alerts per asset-month |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rules = [("onset" if record.get("rule") == "onset" else "window", record)]
    if "window_rule" in record:
        rules.append(("window", record["window_rule"]))
    for rule, figures in rules:
        share = figures["share_alerted_at_least_goal"]
        print(f"| {rule} | {figures['failures']} | {figures['alerted']} | {figures['alerted_at_least_goal']} "
              f"({fmt_ratio(share, pct=True)}) | {fmt(figures['median_lead_h'], 1)} | {figures['false_alerts']} | "
              f"{fmt(figures['false_alerts_per_asset_month'], 2)} |")
    print(f"\nGoals: >= 90 % alerted >= 72 h ahead, < 1 false alert per asset-month. Lead time: from the earliest "
          "alert opened within the failure's degradation (onset rule: from its simulated onset; window rule: "
          f"within {record['max_lead_h']:.0f} h before it) to the failure (missed failures count 0 h in the "
          "median); any other opening is a false alert, including one before a preventive maintenance.")


# -- the run -----------------------------------------------------------------------------------------
SECTIONS = ("ingest", "mqtt", "scoring", "alerts")


def bench(plan: Plan, sections: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run the chosen sections; a section's failure is recorded, the others still run."""
    record: dict[str, Any] = {
        "benchmark": "iiot", "mode": "quick" if plan == QUICK else "full", "plan": asdict(plan),
        "simulated": True, "pid": os.getpid(), "commit": _commit(), "started_at": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "note": SHARED_BOX,
            "load_avg_at_start": os.getloadavg(), "nice": os.nice(0)},
    }
    for section in sections:
        try:
            if section == "ingest":
                record["ingest"] = bench_ingest(plan, tuple(args.backends.split(",")), args.pg_url, workdir,
                                                tuple(w for w in args.ingest_ways.split(",") if w), args.repeat)
            elif section == "mqtt":
                record["mqtt"] = bench_mqtt(plan, args.mqtt, args.pg_url, workdir)
            elif section == "scoring":
                record["scoring"] = bench_scoring(plan, args.pg_url, workdir)
            elif section == "alerts":
                record["alerts"] = bench_alerts(plan)
        except Exception as error:  # recorded, and the other sections still run
            record[section] = {"status": "failed", "why": f"{type(error).__name__}: {error}"}
            print(f"{section}: failed: {error!r}", file=sys.stderr, flush=True)
    return record


def print_tables(record: dict[str, Any]) -> None:
    """Every section's markdown table (README-ready)."""
    print(f"\n## IIoT benchmark ({record['mode']}; {SHARED_BOX}; simulated data)")
    if "ingest" in record and "file" in record["ingest"]:
        print_ingest(record["ingest"])
    if "mqtt" in record and "broker" in record["mqtt"]:
        print_mqtt(record["mqtt"])
    if "scoring" in record and "edge" in record["scoring"]:
        print_scoring(record["scoring"])
    if "alerts" in record and "failures" in record["alerts"]:
        print_alerts(record["alerts"])
    for section in SECTIONS:
        if section in record and record[section].get("status"):
            print(f"\n### {section}: {record[section]['status']} ({record[section]['why']})")


def main(argv: list[str] | None = None) -> int:
    """``python bench/iiot.py [--quick] [--sections ...] [--backends ...] [--out PATH]``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    point = sub.add_parser("point", help="one measured way in this process (prints its JSON)")
    point.add_argument("kind", choices=("ingest", "mqtt", "scoring"))
    point.add_argument("--way", default="tessera", choices=(*INGEST_WAYS, *MQTT_WAYS))
    point.add_argument("--rows", type=int, required=True)
    point.add_argument("--url", help="ingest: the database")
    point.add_argument("--file", type=Path, help="ingest: the CSV")
    point.add_argument("--keys", type=Path, help="ingest: the sensor keys (JSON)")
    point.add_argument("--broker", help="mqtt: the broker URL")
    point.add_argument("--prefix", help="mqtt: the topic prefix")
    point.add_argument("--timeout", type=float, default=300.0, help="mqtt: give up after this many seconds")
    point.add_argument("--progress", type=Path, help="mqtt: where the subscriber writes its readings done")
    parser.add_argument("--quick", action="store_true", help="small sizes (~1 min; numbers mean little)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--backends", default="postgres,sqlite")
    parser.add_argument("--rows", type=int, default=None, help="rows of the big file (overrides the plan)")
    parser.add_argument("--ingest-ways", default="", help=f"ingest: only these ({', '.join(WAY_LABELS)})")
    parser.add_argument("--repeat", type=int, default=1,
                        help="ingest: run the project's way and the copy limit this many times, alternating")
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--update", action="store_true",
                        help="replace only the sections run in an existing --out record (the others keep theirs)")
    args = parser.parse_args(argv)
    if args.command == "point" and args.kind == "scoring":
        from bench._iiot_scoring import scoring_point

        print(json.dumps(scoring_point(args.url, args.file, args.rows)))
        return 0
    if args.command == "point" and args.kind == "mqtt":
        from bench._iiot_mqtt import subscriber_point

        print(json.dumps(subscriber_point(args.way, args.broker, args.prefix, args.rows, args.timeout,
                                          args.progress)))
        return 0
    if args.command == "point":
        print(json.dumps(ingest_point(args.way, args.url, args.file, args.rows, args.keys)))
        return 0
    plan = QUICK if args.quick else FULL
    if args.rows:
        plan = Plan(**{**asdict(plan), "rows": args.rows, "small_rows": min(plan.small_rows, args.rows // 10)})
    started = time.monotonic()
    print(f"bench iiot ({'quick' if args.quick else 'full'}): {SHARED_BOX}", flush=True)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-iiot-")))
        workdir.mkdir(parents=True, exist_ok=True)
        record = bench(plan, [s.strip() for s in args.sections.split(",") if s.strip()], args, workdir)
    record["wall_s"] = time.monotonic() - started
    if args.update and args.out.exists():  # rerun sections replace theirs; the rest stays from its run
        earlier = json.loads(args.out.read_text())
        ran = [s for s in SECTIONS if s in record]
        record = {**earlier, **{s: {**record[s], "rerun_at": record["started_at"]} for s in ran},
                  "reruns": [*earlier.get("reruns", []), {"sections": ran, "at": record["started_at"],
                                                          "machine": record["machine"]}]}
    print_tables(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
