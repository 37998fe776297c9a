"""Readings files and databases for ``bench/iiot.py`` (simulated data: the numbers are throughput only).

- :func:`make_files`: a long-format CSV (``timestamp, asset, sensor, value, unit``) of a **simulated**
  fleet written by H4's streaming :func:`services.iiot.simulate.write_readings` (never the whole
  file in memory), its first rows as a smaller file, the same rows resolved to the readings table's
  layout (``sensor_pk, ts, value, ingest_pk``, for ``psql \\copy`` / ``sqlite3 .import``, the write
  limit), the fleet's registry and its sensor keys. Kept in the work directory and reused by a
  later run asking for the same sizes.
- :class:`BenchDatabases`: a migrated template database with the fleet's registry (PostgreSQL:
  ``CREATE DATABASE ... TEMPLATE``; SQLite: a file copied), a fresh copy per measured point, all
  dropped at the end.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
TENANT = "bench-iiot"
DB_PREFIX = "tessera_bench_iiot"
START = datetime(2026, 1, 1, tzinfo=UTC)


def head_csv(source: Path, target: Path, rows: int) -> int:
    """The header and the first ``rows`` data rows of ``source`` into ``target``; returns the rows copied."""
    copied = 0
    with source.open() as reader, target.open("w") as sink:
        sink.write(reader.readline())
        for line in reader:
            if copied >= rows:
                break
            sink.write(line)
            copied += 1
    return copied


def write_resolved_csv(source: Path, target: Path, keys: dict[str, int], ingest_pk: int = 1,
                       chunk_rows: int = 1_000_000) -> int:
    """``source``'s rows as the readings table stores them (``sensor_pk,ts,value,ingest_pk``), header-less.

    ``keys``: ``"asset/sensor"`` → the sensor's primary key (:func:`sensor_keys`)."""
    lookup = pd.Series(keys)
    written = 0
    with target.open("w") as sink:
        for chunk in pd.read_csv(source, chunksize=chunk_rows, dtype={"asset": str, "sensor": str}):
            pks = (chunk["asset"] + "/" + chunk["sensor"]).map(lookup).astype("int64")
            out = pd.DataFrame({"sensor_pk": pks, "ts": chunk["timestamp"], "value": chunk["value"],
                                "ingest_pk": ingest_pk})
            out.to_csv(sink, header=False, index=False)
            written += len(out)
    return written


def pg_admin_url(pg_url: str) -> str:
    """A libpq URL to the server's ``postgres`` database (for CREATE / DROP DATABASE)."""
    return pg_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"


@dataclass
class BenchDatabases:
    """A migrated, seeded template per backend and a fresh copy of it for each measured point."""

    workdir: Path
    pg_url: str
    registry: dict[str, list[dict[str, Any]]]
    """The fleet's registry as :meth:`services.iiot.simulate.FleetRegistry.payload` gives it."""
    _copies: list[str] = field(default_factory=list)
    _serial: int = 0

    @property
    def template_name(self) -> str:
        return f"{DB_PREFIX}_tpl_{os.getpid()}"

    def prepare(self, backends: tuple[str, ...]) -> None:
        """Create, migrate and seed the template of each backend (``sqlite``, ``postgres``)."""
        if "postgres" in backends:
            self._pg_execute(f'DROP DATABASE IF EXISTS "{self.template_name}" WITH (FORCE)',
                             f'CREATE DATABASE "{self.template_name}"')
            self._copies.append(self.template_name)
            self._migrate_and_seed(f"{self.pg_url}/{self.template_name}")
        if "sqlite" in backends:
            template = f"sqlite:///{self.workdir / 'template.db'}"
            self.discard(template)  # one left in a reused work directory by an earlier run
            self._migrate_and_seed(template)

    def fresh(self, backend: str) -> str:
        """A SQLAlchemy URL to a new copy of ``backend``'s template (empty readings, seeded registry)."""
        self._serial += 1
        if backend == "sqlite":
            target = self.workdir / f"point{self._serial}.db"
            shutil.copyfile(self.workdir / "template.db", target)
            return f"sqlite:///{target}"
        name = f"{DB_PREFIX}_{os.getpid()}_{self._serial}"
        self._pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                         f'CREATE DATABASE "{name}" TEMPLATE "{self.template_name}"')
        self._copies.append(name)
        return f"{self.pg_url}/{name}"

    def discard(self, url: str) -> None:
        """Drop a copy made by :meth:`fresh` (its disk space back before the next point)."""
        if url.startswith("sqlite"):
            path = Path(url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        name = url.rsplit("/", 1)[1]
        self._pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self._copies.remove(name)

    def close(self) -> None:
        """Drop every PostgreSQL database this object created."""
        for name in list(self._copies):
            with contextlib.suppress(Exception):
                self._pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._copies.clear()

    def _pg_execute(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(pg_admin_url(self.pg_url), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]  # names are ours, not input

    def _migrate_and_seed(self, url: str) -> None:
        env = {**os.environ, "TESSERA_DATABASE_URL": url, "TESSERA_DATA_DIR": str(self.workdir / "data"),
               "TESSERA_LOG_LEVEL": "WARNING"}
        subprocess.run([sys.executable, "-m", "services.cli", "db", "upgrade"], cwd=REPO, env=env, check=True,
                       capture_output=True)
        seed_registry(url, self.registry)


def sensor_keys(registry: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """``"asset/sensor"`` → the ``iiot_sensors.id`` :func:`seed_registry` gives it (registry order from 1)."""
    return {f"{sensor['asset_id']}/{sensor['sensor_id']}": pk for pk, sensor in enumerate(registry["sensors"], 1)}


def seed_registry(url: str, registry: dict[str, list[dict[str, Any]]]) -> None:
    """The fleet's plants, lines, assets and sensors (ids in registry order from 1) for :data:`TENANT`."""
    from sqlalchemy import insert

    from services.iiot.db import Asset, Line, Plant, Sensor
    from shared.db import make_engine

    plant_pk = {p["plant_id"]: pk for pk, p in enumerate(registry["plants"], 1)}
    line_pk = {line["line_id"]: pk for pk, line in enumerate(registry["lines"], 1)}
    asset_pk = {a["asset_id"]: pk for pk, a in enumerate(registry["assets"], 1)}
    now = datetime.now(UTC)
    common = {"tenant_id": TENANT, "created_at": now}
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(insert(Plant), [{**common, "id": plant_pk[p["plant_id"]], **p}
                                               for p in registry["plants"]])
            connection.execute(insert(Line), [
                {**common, "id": line_pk[x["line_id"]], "plant_pk": plant_pk[x["plant_id"]], "line_id": x["line_id"],
                 "name": x["name"]} for x in registry["lines"]])
            connection.execute(insert(Asset), [
                {**common, "id": asset_pk[a["asset_id"]], "line_pk": line_pk[a["line_id"]], "asset_id": a["asset_id"],
                 "kind": a["kind"], "name": a["name"], "details": {}} for a in registry["assets"]])
            connection.execute(insert(Sensor), [
                {**common, "id": pk, "asset_pk": asset_pk[s["asset_id"]], "reading_count": 0,
                 **{key: value for key, value in s.items() if key != "asset_id"}}
                for pk, s in enumerate(registry["sensors"], 1)])
        if not url.startswith("sqlite"):
            with engine.begin() as connection:
                for table in ("iiot_plants", "iiot_lines", "iiot_assets", "iiot_sensors"):
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
    finally:
        engine.dispose()


@dataclass(frozen=True)
class BenchFiles:
    """The files one run ingests (see :func:`make_files`)."""

    big: Path
    small: Path
    resolved: Path
    rows: int
    small_rows: int
    registry: dict[str, list[dict[str, Any]]]
    manifest: dict[str, Any]

    @property
    def keys_path(self) -> Path:
        return self.big.parent / "keys.json"


def make_files(directory: Path, rows: int, small_rows: int, assets: int, seed: int) -> BenchFiles:
    """Write (or reuse, when ``directory`` holds them for the same sizes) the run's files."""
    from services.iiot.simulate import write_readings

    directory.mkdir(parents=True, exist_ok=True)
    big, small, resolved = directory / "readings.csv", directory / "readings_small.csv", directory / "resolved.csv"
    manifest_path, wanted = directory / "manifest.json", {"rows": rows, "small_rows": small_rows, "assets": assets,
                                                         "seed": seed}
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("wanted") == wanted:
        manifest = json.loads(manifest_path.read_text())
        registry = json.loads((directory / "registry.json").read_text())
        return BenchFiles(big, small, resolved, rows, small_rows, registry, {**manifest, "reused": True})
    started = time.perf_counter()
    written = write_readings(big, "csv", rows, assets=assets, seed=seed)
    seconds = time.perf_counter() - started
    registry = written.registry.payload()
    (directory / "registry.json").write_text(json.dumps(registry))
    keys = sensor_keys(registry)
    (directory / "keys.json").write_text(json.dumps(keys))
    head_csv(big, small, small_rows)
    write_resolved_csv(big, resolved, keys)
    manifest = {"wanted": wanted, "generator": "services.iiot.simulate.write_readings (simulated fleet)",
                "rows": written.rows, "bytes": big.stat().st_size, "simulated_days": written.days,
                "assets": assets, "sensors": len(registry["sensors"]), "seconds_to_write": seconds}
    manifest_path.write_text(json.dumps(manifest))
    return BenchFiles(big, small, resolved, rows, small_rows, registry, {**manifest, "reused": False})


def count_readings(url: str) -> int:
    """Rows in the readings table of ``url``."""
    from sqlalchemy import func, select

    from services.iiot.db import readings
    from shared.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(readings)).scalar_one())
    finally:
        engine.dispose()


def csv_rows(path: Path) -> Iterator[list[str]]:
    """Data rows of a CSV file (header skipped)."""
    with path.open(newline="") as source:
        reader = csv.reader(source)
        next(reader)
        yield from reader


def timed(callable_: Any, *args: Any) -> tuple[Any, float]:
    """(result, seconds) of ``callable_(*args)``."""
    started = time.perf_counter()
    result = callable_(*args)
    return result, time.perf_counter() - started
