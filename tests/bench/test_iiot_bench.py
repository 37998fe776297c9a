"""``bench/iiot.py --quick``: every section in its smallest sizes, the tables and the JSON record.

Goes through every path of the benchmark (the files generated and streamed, scratch PostgreSQL
databases created from a seeded template and dropped, SQLite copies, each ingestion way in its own
process, MQTT on the loopback broker, scoring and the alert replay where those pieces exist) in
under a minute; its numbers mean nothing. A section whose pieces have not landed says "not yet
measured" with the reason, never a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("ingest", "mqtt", "scoring", "alerts")


def measured(point: dict[str, object]) -> bool:
    """Whether a record entry holds figures (rather than "not yet measured" and its reason)."""
    return "status" not in point


def test_the_quick_run_measures_every_landed_way_and_writes_the_record(tmp_path: Path) -> None:
    out = tmp_path / "iiot.json"
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "iiot.py"), "--quick", "--out", str(out),
                                "--workdir", str(tmp_path / "work")],
                               cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "### Ingestion" in completed.stdout and "2 CPU cores shared" in completed.stdout
    record = json.loads(out.read_text())
    assert record["mode"] == "quick" and record["simulated"] is True
    assert set(SECTIONS) <= set(record)
    ingest = record["ingest"]
    assert ingest["file"]["rows"] == record["plan"]["rows"]
    for backend in ("postgres", "sqlite"):
        ways = ingest[backend]
        for way in ("copy", "to_sql", "to_sql-multi", "naive-orm"):
            assert ways[way]["rows_per_s"] > 0, (backend, way, ways[way])
            assert ways[way]["rows_stored"] == ways[way]["rows"], (backend, way)
        for way in ("to_sql", "naive-orm"):
            assert ways[way]["peak_rss_mb"] > 0 and ways[way]["sample"] is True
        if measured(ways["tessera"]):
            assert ways["tessera"]["rows_stored"] == record["plan"]["rows"]
            assert ways["tessera"]["rows_per_s"] > 0 and ways["tessera@small"]["peak_rss_mb"] > 0
        else:
            assert ways["tessera"]["why"]
    for section in SECTIONS[1:]:
        assert measured(record[section]) or record[section]["status"] == "not yet measured", record[section]

    assert not leftover_databases(record["pid"]), "scratch databases were not dropped"


def leftover_databases(pid: int) -> list[str]:
    """The bench's scratch PostgreSQL databases of the run with process id ``pid`` that still exist."""
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        names = [str(row[0]) for row in conn.execute("SELECT datname FROM pg_database")]
    return [name for name in names if name.startswith("tessera_bench_iiot_") and f"_{pid}" in name]
