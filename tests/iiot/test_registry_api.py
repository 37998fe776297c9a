"""The asset registry over real HTTP (uvicorn on loopback, SQLite and PostgreSQL): create / list /
get / replace / patch / delete at each level, the bulk tree upsert, the rules (units, ranges,
time zones, ids) as precise 422s, 409s (duplicates, a unit change under stored readings), keyset
paging, and tenant walls (another tenant's ids answer 404)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, insert, select

from services.iiot.db import Asset, Sensor, readings
from services.iiot.registry import REGISTRY_EXAMPLE
from services.iiot.simulate import simulate_fleet
from shared.db import session_factory
from shared.security import create_api_key
from tests.conftest import Variant, variant_stack
from tests.scaffold import ScaffoldServer, assert_problem, documented_unbuilt_operations, serve_scaffold


@contextlib.contextmanager
def serve_iiot(request: pytest.FixtureRequest, stack_variant: Variant) -> Iterator[ScaffoldServer]:
    """``services.iiot.api:app`` under uvicorn on a migrated database of ``stack_variant``; no
    traceback in its log when it stops (a 500 fails the module)."""
    stack = variant_stack(request, stack_variant)
    with serve_scaffold("services.iiot.api:app", stack, f"iiot-{stack.name}") as server:
        yield server
        assert "Traceback" not in server.process.output, server.process.output[-6000:]


@pytest.fixture(scope="module")
def iiot_server(request: pytest.FixtureRequest, stack_variant: Variant) -> Iterator[ScaffoldServer]:
    """The IIoT app served on each variant (see :func:`serve_iiot`)."""
    with serve_iiot(request, stack_variant) as server:
        yield server


@dataclass
class Tenant:
    """A tenant with an ``iiot`` key, and a client that sends it."""

    id: str
    client: httpx.Client


@contextlib.contextmanager
def new_tenant(server: ScaffoldServer) -> Iterator[Tenant]:
    """A tenant of its own with an ``iiot`` key, and a client sending it to ``server``'s ``/v1``."""
    tenant_id = f"factory-{uuid.uuid4().hex[:8]}"
    with session_factory(server.database_url)() as session:
        key = create_api_key(session, tenant_id=tenant_id, name="test", scopes=["iiot"])
        session.commit()
    with httpx.Client(base_url=server.base_url + "/v1", headers={"X-API-Key": key}, timeout=30) as client:
        yield Tenant(tenant_id, client)


@pytest.fixture
def tenant(iiot_server: ScaffoldServer) -> Iterator[Tenant]:
    with new_tenant(iiot_server) as chosen:
        yield chosen


@pytest.fixture
def other_tenant(iiot_server: ScaffoldServer) -> Iterator[Tenant]:
    with new_tenant(iiot_server) as chosen:
        yield chosen


def test_the_vertical_says_built_and_documents_no_endpoint_as_not_built(iiot_server: ScaffoldServer) -> None:
    status = httpx.get(f"{iiot_server.base_url}/v1/status", timeout=10).json()
    assert status == {"vertical": "iiot", "state": "built", "tracking_issue": 19}
    assert documented_unbuilt_operations(iiot_server.openapi()) == set()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is a problem+json of ``status`` about the path it was sent to; its document."""
    return assert_problem(response, status, response.request.url.path)


def created(response: httpx.Response, path: str) -> dict[str, Any]:
    """``response`` is a 201 whose Location ends with ``path``; its body."""
    assert response.status_code == 201, response.text
    assert response.headers["location"].endswith(path)
    body: dict[str, Any] = response.json()
    return body


def build_pump(client: httpx.Client, plant: str = "plant-1", line: str = "line-a", asset: str = "pump-7") -> None:
    """A plant with a line, an asset on it and a temperature sensor."""
    assert client.post("/plants", json={"plant_id": plant, "timezone": "Europe/Berlin"}).status_code == 201
    assert client.post("/lines", json={"line_id": line, "plant_id": plant}).status_code == 201
    assert client.post("/assets", json={"asset_id": asset, "line_id": line, "kind": "pump"}).status_code == 201
    response = client.post(f"/assets/{asset}/sensors", json={"sensor_id": "temp", "unit": "°C", "min_value": -20,
                                                             "max_value": 120, "sampling_interval_s": 60})
    assert response.status_code == 201, response.text


# --- create, read, change, delete ------------------------------------------------------------------

def test_each_level_is_created_read_listed_changed_and_deleted(tenant: Tenant) -> None:
    client = tenant.client
    plant = created(client.post("/plants", json={"plant_id": "leipzig", "name": "Leipzig",
                                                 "timezone": "Europe/Berlin"}), "/v1/plants/leipzig")
    assert (plant["plant_id"], plant["timezone"]) == ("leipzig", "Europe/Berlin")
    created(client.post("/lines", json={"line_id": "bottling-a", "plant_id": "leipzig"}), "/v1/lines/bottling-a")
    asset = created(client.post("/assets", json={"asset_id": "pump-7", "line_id": "bottling-a", "kind": "pump",
                                                 "details": {"serial": "X1", "rated_kw": 7.5}}), "/v1/assets/pump-7")
    assert (asset["plant_id"], asset["line_id"], asset["details"]["rated_kw"]) == ("leipzig", "bottling-a", 7.5)
    sensor = created(client.post("/assets/pump-7/sensors", json={"sensor_id": "bearing-temp", "unit": "°F",
                                                                 "min_value": 0, "max_value": 250}),
                     "/v1/assets/pump-7/sensors/bearing-temp")
    assert (sensor["unit"], sensor["quantity"], sensor["reading_count"], sensor["last_ts"]) == \
        ("degF", "temperature", 0, None)

    assert client.get("/plants/leipzig").json()["name"] == "Leipzig"
    assert client.get("/lines/bottling-a").json()["plant_id"] == "leipzig"
    assert client.get("/assets/pump-7").json()["kind"] == "pump"
    assert [s["sensor_id"] for s in client.get("/assets/pump-7/sensors").json()] == ["bearing-temp"]
    assert [a["asset_id"] for a in client.get("/assets", params={"line_id": "bottling-a"}).json()] == ["pump-7"]
    assert client.get("/assets", params={"plant_id": "elsewhere"}).json() == []
    assert [line["line_id"] for line in client.get("/lines", params={"plant_id": "leipzig"}).json()] == ["bottling-a"]

    patched = client.patch("/assets/pump-7/sensors/bearing-temp", json={"max_value": 300, "sampling_interval_s": 10})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["max_value"], patched.json()["min_value"], patched.json()["unit"]) == (300, 0, "degF")
    assert client.patch("/plants/leipzig", json={"name": "Leipzig Nord"}).json()["timezone"] == "Europe/Berlin"
    assert client.patch("/assets/pump-7", json={"details": None}).json()["details"] == {}

    replaced = client.put("/assets/pump-7", json={"asset_id": "pump-7", "line_id": "bottling-a", "name": "P7"})
    assert replaced.status_code == 200 and replaced.json()["kind"] is None and replaced.json()["name"] == "P7"
    assert client.put("/lines/new-line", json={"line_id": "new-line", "plant_id": "leipzig"}).status_code == 201
    moved = client.patch("/assets/pump-7", json={"line_id": "new-line"})
    assert moved.json()["line_id"] == "new-line"

    assert client.delete("/assets/pump-7/sensors/bearing-temp").status_code == 204
    problem(client.get("/assets/pump-7/sensors/bearing-temp"), 404)
    assert client.delete("/plants/leipzig").status_code == 204
    for path in ("/plants/leipzig", "/lines/bottling-a", "/lines/new-line", "/assets/pump-7"):
        problem(client.get(path), 404)


def test_put_creates_then_replaces_and_is_idempotent(tenant: Tenant) -> None:
    client = tenant.client
    body = {"plant_id": "p1", "name": "One", "timezone": "America/Chicago"}
    assert client.put("/plants/p1", json=body).status_code == 201
    again = client.put("/plants/p1", json=body)
    assert again.status_code == 200 and again.json()["timezone"] == "America/Chicago"
    assert client.put("/plants/p1", json={"plant_id": "p1"}).json()["timezone"] == "UTC"  # a full replacement
    mismatch = problem(client.put("/plants/p1", json={"plant_id": "p2"}), 422)
    assert mismatch["errors"][0]["loc"] == ["body", "plant_id"]


def test_duplicates_are_409_and_other_tenants_ids_are_404(tenant: Tenant, other_tenant: Tenant) -> None:
    build_pump(tenant.client)
    assert "PUT replaces" in problem(tenant.client.post("/plants", json={"plant_id": "plant-1"}), 409)["detail"]
    problem(tenant.client.post("/assets", json={"asset_id": "pump-7", "line_id": "line-a"}), 409)
    problem(tenant.client.post("/assets/pump-7/sensors", json={"sensor_id": "temp", "unit": "K"}), 409)

    other = other_tenant.client
    for path in ("/plants/plant-1", "/lines/line-a", "/assets/pump-7", "/assets/pump-7/sensors",
                 "/assets/pump-7/sensors/temp"):
        problem(other.get(path), 404)
    problem(other.patch("/assets/pump-7", json={"name": "mine"}), 404)
    problem(other.delete("/plants/plant-1"), 404)
    problem(other.post("/assets/pump-7/sensors", json={"sensor_id": "x", "unit": "bar"}), 404)
    assert other.get("/plants").json() == []
    assert other.get("/registry").json() == {"plants": [], "lines": [], "assets": [], "sensors": []}
    wall = problem(other.post("/lines", json={"line_id": "l9", "plant_id": "plant-1"}), 422)
    assert wall["errors"][0]["loc"] == ["body", "plant_id"] and "does not exist" in wall["detail"]
    build_pump(other)  # the same ids are the other tenant's own
    assert tenant.client.get("/assets/pump-7").json()["kind"] == "pump"


@pytest.mark.parametrize(("path", "body", "loc", "words"), [
    ("/plants", {"plant_id": "p", "timezone": "Mars/Olympus"}, ["body", "timezone"], "unknown time zone"),
    ("/plants", {"plant_id": "a/b"}, ["body", "plant_id"], "pattern"),
    ("/plants", {"plant_id": "p", "colour": "red"}, ["body", "colour"], "Extra inputs"),
    ("/assets/pump-7/sensors", {"sensor_id": "s", "unit": "furlong"}, ["body", "unit"], "unknown unit 'furlong'"),
    ("/assets/pump-7/sensors", {"sensor_id": "s", "unit": "bar", "min_value": 5, "max_value": 5}, ["body"],
     "min_value < max_value"),
    ("/assets/pump-7/sensors", {"sensor_id": "s", "unit": "bar", "sampling_interval_s": 0},
     ["body", "sampling_interval_s"], "greater than 0"),
    ("/assets/pump-7/sensors", {"sensor_id": "s", "unit": "bar", "quantity": "temperature"}, ["body"],
     "does not match unit 'bar'"),
    ("/assets/pump-7/sensors", {"sensor_id": "s", "unit": "bar", "max_value": "10"}, ["body", "max_value"],
     "valid number"),
    ("/assets", {"asset_id": "a", "line_id": "nowhere"}, ["body", "line_id"], "line 'nowhere' does not exist"),
])
def test_bad_input_is_a_precise_422(tenant: Tenant, path: str, body: dict[str, Any], loc: list[str],
                                    words: str) -> None:
    build_pump(tenant.client)
    document = problem(tenant.client.post(path, json=body), 422)
    assert any(error["loc"] == loc and words in error["msg"] for error in document["errors"]), document


def test_quantity_is_derived_or_checked_against_the_unit(tenant: Tenant) -> None:
    build_pump(tenant.client)
    client = tenant.client
    sensors = [{"sensor_id": "acc", "unit": "g", "quantity": "vibration"},
               {"sensor_id": "hum", "unit": "%", "quantity": "humidity"},
               {"sensor_id": "flow", "unit": "m³/h"}]
    out = [client.post("/assets/pump-7/sensors", json=sensor).json() for sensor in sensors]
    assert [(s["unit"], s["quantity"]) for s in out] == [("g", "vibration"), ("%", "humidity"), ("m3/h", "flow")]
    changed = client.patch("/assets/pump-7/sensors/flow", json={"unit": "L/min"})
    assert (changed.json()["unit"], changed.json()["quantity"]) == ("L/min", "flow")
    problem(client.patch("/assets/pump-7/sensors/flow", json={"unit": "psi", "quantity": "flow"}), 422)
    problem(client.patch("/assets/pump-7/sensors/temp", json={"min_value": 500}), 422)  # above max_value 120


def test_a_sensor_with_readings_keeps_its_unit(tenant: Tenant, iiot_server: ScaffoldServer) -> None:
    build_pump(tenant.client)
    sensor_pk = store_reading(iiot_server, tenant.id, "pump-7", "temp")
    conflict = problem(tenant.client.patch("/assets/pump-7/sensors/temp", json={"unit": "degF"}), 409)
    assert "has readings stored in 'degC'" in conflict["detail"]
    problem(tenant.client.put("/assets/pump-7/sensors/temp", json={"sensor_id": "temp", "unit": "K"}), 409)
    tree = {"plants": [{"plant_id": "plant-1", "lines": [{"line_id": "line-a", "assets": [
        {"asset_id": "pump-7", "sensors": [{"sensor_id": "temp", "unit": "degF"}]},
        {"asset_id": "pump-8"}]}]}]}
    problem(tenant.client.put("/registry", json=tree), 409)
    problem(tenant.client.get("/assets/pump-8"), 404)  # nothing of the refused tree was written
    same = tenant.client.patch("/assets/pump-7/sensors/temp", json={"unit": "celsius", "max_value": 130})
    assert same.status_code == 200 and same.json()["unit"] == "degC"  # an alias is no change
    assert tenant.client.delete("/assets/pump-7").status_code == 204
    assert reading_count(iiot_server, sensor_pk) == 0  # the asset's readings went with it


def store_reading(server: ScaffoldServer, tenant_id: str, asset_id: str, sensor_id: str) -> int:
    """Write one reading of the sensor straight into the table (as ingestion would); its pk."""
    with session_factory(server.database_url)() as session:
        sensor_pk = session.scalars(select(Sensor.id).join(Asset, Asset.id == Sensor.asset_pk).where(
            Asset.tenant_id == tenant_id, Asset.asset_id == asset_id, Sensor.sensor_id == sensor_id)).one()
        session.execute(insert(readings).values(sensor_pk=sensor_pk, ts=datetime(2026, 1, 1, tzinfo=UTC), value=60.0))
        session.commit()
    return sensor_pk


def reading_count(server: ScaffoldServer, sensor_pk: int) -> int:
    with session_factory(server.database_url)() as session:
        return int(session.scalar(select(func.count()).select_from(readings).where(readings.c.sensor_pk == sensor_pk))
                   or 0)


# --- paging ------------------------------------------------------------------------------------------

def test_lists_are_keyset_paged_with_a_link_to_the_next_page(tenant: Tenant) -> None:
    for number in range(5):
        assert tenant.client.post("/plants", json={"plant_id": f"plant-{number}"}).status_code == 201
    seen: list[str] = []
    response = tenant.client.get("/plants", params={"limit": 2})
    while True:
        assert response.status_code == 200
        seen += [plant["plant_id"] for plant in response.json()]
        if "link" not in response.headers:
            break
        next_url = response.headers["link"].split(";")[0].strip("<>")
        assert "after=" in next_url
        response = tenant.client.get(next_url)
    assert seen == [f"plant-{number}" for number in range(5)]
    problem(tenant.client.get("/plants", params={"limit": 0}), 422)


# --- the whole tree ------------------------------------------------------------------------------------

def fleet_tree(assets: int, sensors_per_asset: int) -> dict[str, Any]:
    """Two plants, two lines each, ``assets`` assets spread over the lines."""
    units = ("degC", "mm/s", "bar", "A", "rpm")
    tree: dict[str, Any] = {"plants": [{"plant_id": f"site-{p}", "timezone": "Europe/Berlin", "lines": [
        {"line_id": f"line-{p}-{l_}", "assets": []} for l_ in range(2)]} for p in range(2)]}
    lines = [line for plant in tree["plants"] for line in plant["lines"]]
    for number in range(assets):
        lines[number % len(lines)]["assets"].append({"asset_id": f"asset-{number:04d}", "kind": "pump", "sensors": [
            {"sensor_id": f"s{s}", "unit": units[s % len(units)], "min_value": 0, "max_value": 1000,
             "sampling_interval_s": 60} for s in range(sensors_per_asset)]})
    return tree


def test_the_tree_upsert_is_one_idempotent_request(tenant: Tenant) -> None:
    client = tenant.client
    example = client.put("/registry", json=REGISTRY_EXAMPLE)
    assert example.status_code == 200, example.text
    assert example.json()["sensors"] == {"created": 2, "updated": 0, "unchanged": 0}
    assert client.get("/registry").json() == client.get("/registry").json()

    tree = fleet_tree(assets=200, sensors_per_asset=5)
    started = time.perf_counter()
    first = client.put("/registry", json=tree).json()
    took_s = time.perf_counter() - started
    assert first["plants"]["created"] == 2 and first["assets"]["created"] == 200
    assert first["sensors"]["created"] == 1000
    assert took_s < 20, f"1204 nodes took {took_s:.1f} s"
    again = client.put("/registry", json=tree).json()
    assert again["sensors"] == {"created": 0, "updated": 0, "unchanged": 1000}
    assert again["assets"]["unchanged"] == 200

    tree["plants"][0]["lines"][0]["assets"][0]["sensors"][0]["max_value"] = 2000
    tree["plants"][1]["lines"][1]["assets"].append({"asset_id": "asset-new"})
    changed = client.put("/registry", json=tree).json()
    assert changed["sensors"]["updated"] == 1 and changed["assets"]["created"] == 1
    stored = client.get("/registry").json()
    assert len(stored["assets"]) == 202 and len(stored["sensors"]) == 1002
    assert client.get("/assets/asset-0000/sensors/s0").json()["max_value"] == 2000
    assert client.get("/assets/asset-new").json()["line_id"] == "line-1-1"


def test_the_simulators_flat_payload_round_trips(tenant: Tenant) -> None:
    payload = simulate_fleet(assets=6, days=0.25, seed=3).registry_payload()
    first = tenant.client.put("/registry", json=payload)
    assert first.status_code == 200, first.text
    assert first.json()["sensors"]["created"] == len(payload["sensors"])
    exported = tenant.client.get("/registry").json()
    assert [sensor["sensor_id"] for sensor in exported["sensors"]] == \
        [sensor["sensor_id"] for sensor in sorted(payload["sensors"], key=lambda s: (s["asset_id"], s["sensor_id"]))]
    assert "lines" not in exported["plants"][0]
    back = tenant.client.put("/registry", json=exported).json()  # what GET answers, PUT takes unchanged
    assert all(level["created"] == level["updated"] == 0 for level in back.values()), back
    mixed = {"plants": [{"plant_id": "extra", "lines": [{"line_id": "extra-line"}]}],
             "assets": [{"asset_id": "late", "line_id": "extra-line"}],
             "sensors": [{"asset_id": "late", "sensor_id": "amps", "unit": "mA"}]}
    assert tenant.client.put("/registry", json=mixed).json()["sensors"]["created"] == 1
    assert tenant.client.get("/assets/late/sensors/amps").json()["quantity"] == "current"


def test_a_tree_naming_an_id_twice_is_a_422_at_the_second(tenant: Tenant) -> None:
    tree = fleet_tree(assets=2, sensors_per_asset=1)
    tree["plants"][1]["lines"][0]["assets"].append({"asset_id": "asset-0000"})
    document = problem(tenant.client.put("/registry", json=tree), 422)
    assert document["errors"][0]["loc"] == ["body", "plants", 1, "lines", 0, "assets", 0]
    assert "appears twice (first at body.plants.0.lines.0.assets.0)" in document["detail"]
    flat_twice = {"sensors": [{"asset_id": "a", "sensor_id": "s", "unit": "A"}] * 2}
    assert problem(tenant.client.put("/registry", json=flat_twice), 422)["errors"][0]["loc"] == ["body", "sensors", 1]
    bad_unit = fleet_tree(assets=1, sensors_per_asset=1)
    bad_unit["plants"][0]["lines"][0]["assets"][0]["sensors"][0]["unit"] = "parsec"
    document = problem(tenant.client.put("/registry", json=bad_unit), 422)
    assert document["errors"][0]["loc"][:9] == ["body", "plants", 0, "lines", 0, "assets", 0, "sensors", 0]


def test_without_the_iiot_scope_nothing_is_served(iiot_server: ScaffoldServer) -> None:
    assert httpx.get(f"{iiot_server.base_url}/v1/plants", timeout=10).status_code == 401
    other = {"X-API-Key": iiot_server.key_for("fraud")}
    assert httpx.put(f"{iiot_server.base_url}/v1/registry", json=REGISTRY_EXAMPLE, headers=other,
                     timeout=10).status_code == 403
