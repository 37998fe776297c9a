"""``bench/iiot.py --quick``, section by section: the tables and the JSON record in their smallest sizes.

Goes through every path of the benchmark (the simulated file streamed, scratch PostgreSQL databases
created from a seeded template and dropped, SQLite copies, each ingestion way in its own process,
MQTT on the loopback broker, scoring through the runtime on PostgreSQL, the edge ONNX model, and
the alert replay once a cloud model is shipped); its numbers mean nothing. A section whose pieces
have not landed says "not yet measured" with the reason, never a number. Each test runs one
section in its own process (well under a minute each on a quiet box).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[2]


def quick_run(sections: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Run ``bench/iiot.py --quick --sections <sections>``; its record and printed tables."""
    out = tmp_path / "iiot.json"
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "iiot.py"), "--quick", "--sections", sections,
                                "--out", str(out), "--workdir", str(tmp_path / "work")],
                               cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "2 CPU cores shared" in completed.stdout
    record = json.loads(out.read_text())
    assert record["mode"] == "quick" and record["simulated"] is True
    assert not leftover_databases(record["pid"]), "scratch databases were not dropped"
    return record, completed.stdout


def measured(point: dict[str, Any]) -> bool:
    """Whether a record entry holds figures (rather than "not yet measured" and its reason)."""
    return "status" not in point


def leftover_databases(pid: int) -> list[str]:
    """The bench's scratch PostgreSQL databases of the run with process id ``pid`` that still exist."""
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        names = [str(row[0]) for row in conn.execute("SELECT datname FROM pg_database")]
    return [name for name in names if name.startswith("tessera_bench_iiot_") and f"_{pid}" in name]


def test_ingestion_times_every_way_on_both_databases(tmp_path: Path) -> None:
    record, printed = quick_run("ingest", tmp_path)
    assert "### Ingestion" in printed
    ingest = record["ingest"]
    assert ingest["file"]["rows"] == record["plan"]["rows"]
    for backend in ("postgres", "sqlite"):
        ways = ingest[backend]
        for way in ("tessera", "copy", "to_sql", "to_sql-multi", "naive-orm"):
            assert ways[way]["rows_per_s"] > 0, (backend, way, ways[way])
            assert ways[way]["rows_stored"] == ways[way]["rows"], (backend, way)
        assert ways["tessera"]["rows"] == record["plan"]["rows"] and ways["tessera"]["rows_quarantined"] == 0
        assert ways["tessera@small"]["peak_rss_mb"] > 0 and ways["tessera"]["peak_rss_mb"] > 0
        assert ways["naive-orm"]["sample"] is True and ways["tessera"]["sample"] is False
        assert ways["goals"]["share_of_copy"] > 0


def test_mqtt_counts_every_published_reading_through_both_subscribers(tmp_path: Path) -> None:
    record, printed = quick_run("mqtt", tmp_path)
    mqtt = record["mqtt"]
    if not measured(mqtt):
        assert "no MQTT broker" in mqtt["why"]
        return
    assert "### MQTT" in printed
    for key in ("tessera@1", "raw@1", "tessera@50", "raw@50"):
        point = mqtt[key]
        assert point["readings"] == point["expected"] == record["plan"]["mqtt_readings"], (key, point)
        assert point["readings_per_s"] > 0 and not point["timed_out"]


def test_scoring_and_alerts_go_through_the_runtime(tmp_path: Path) -> None:
    record, printed = quick_run("scoring,alerts", tmp_path)
    assert "### Scoring" in printed
    cloud, edge = record["scoring"]["cloud"], record["scoring"]["edge"]
    assert cloud["batched"]["assets_scored"] == record["plan"]["scoring_assets"] and cloud["batched"]["failed"] == 0
    assert cloud["naive"]["assets_per_s"] > 0 and cloud["batched"]["model_windows_per_s"] > 0
    assert edge["onnx_batch1"]["windows_per_s"] > 0 and edge["onnx_bytes"] < 1 << 20
    alerts = record["alerts"]
    if measured(alerts):
        assert "### Alert lead time" in printed
        assert alerts["seed"] not in (0, 1000) and alerts["windows"] > 0
    else:
        assert alerts["status"] == "not yet measured" and alerts["why"]
