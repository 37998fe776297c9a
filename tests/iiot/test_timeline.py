"""Risk views over real HTTP (uvicorn on loopback, SQLite and PostgreSQL): the asset and line
(fog) timeline PNGs decode with Pillow and show what was stored (scores by tier, alert spans,
maintenance, the driving asset), no scores is a PNG that says so, the line's risk now as JSON,
time-range checks, and tenant walls.

Risk scores, alerts and maintenance records are written straight into their tables here (the
scorer and the alert policy that write them are tested apart); times are fixed, not the clock's,
except for the default range (the last 14 days), which is relative to now by definition."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pandas as pd
import pytest
from PIL import Image
from sqlalchemy import select

from services.iiot.db import RESOLVED, Alert, Asset, MaintenanceRecord, RiskScore
from services.iiot.timeline import (
    ALERT_ACKNOWLEDGED,
    ALERT_OPEN,
    LINE_RISK,
    MAINTENANCE_COLOURS,
    PALETTE,
    STRIP_TOP,
    TIER_COLOURS,
    AssetHistory,
    render_asset_timeline,
)
from shared.db import session_factory, utcnow
from tests.conftest import Variant
from tests.iiot.test_registry_api import Tenant, new_tenant, problem, serve_iiot
from tests.scaffold import ScaffoldServer

T0 = datetime(2026, 3, 1, tzinfo=UTC)
RANGE = {"start": (T0 - timedelta(days=1)).isoformat(), "end": (T0 + timedelta(days=6)).isoformat()}
LINE_TREE = {"plants": [{"plant_id": "plant-1", "timezone": "Europe/Berlin", "lines": [{"line_id": "line-a", "assets": [
    {"asset_id": "pump-1"}, {"asset_id": "pump-2"}, {"asset_id": "pump-3"}, {"asset_id": "idle-4"}]}]}]}


def asset_pks(server: ScaffoldServer, tenant_id: str) -> dict[str, int]:
    with session_factory(server.database_url)() as session:
        return {asset_id: pk for pk, asset_id in session.execute(
            select(Asset.id, Asset.asset_id).where(Asset.tenant_id == tenant_id))}


def store_history(server: ScaffoldServer, tenant_id: str, start: datetime = T0) -> None:
    """Five days of hourly scores: pump-1 degrades towards a failure, pump-2 stays low, pump-3 is
    scored at the edge on day one only; an alert on pump-1 (acknowledged, resolved by the repair)."""
    pks = asset_pks(server, tenant_id)
    rows: list[RiskScore] = []
    for hour in range(5 * 24):
        at = start + timedelta(hours=hour)
        p1 = min(0.02 + hour / (4 * 24), 0.97) if hour < 4 * 24 else 0.03
        rows.append(RiskScore(tenant_id=tenant_id, asset_pk=pks["pump-1"], window_end=at, p_failure=p1,
                              rul_hours=max(96.0 - hour, 0.0) if hour < 96 else 400.0, tier="cloud"))
        rows.append(RiskScore(tenant_id=tenant_id, asset_pk=pks["pump-2"], window_end=at, p_failure=0.05,
                              rul_hours=600.0, tier="cloud"))
        if hour < 24:
            rows.append(RiskScore(tenant_id=tenant_id, asset_pk=pks["pump-3"], window_end=at, p_failure=0.3,
                                  rul_hours=None, tier="edge"))
    alert = Alert(tenant_id=tenant_id, asset_pk=pks["pump-1"], state=RESOLVED, opened_at=start + timedelta(hours=50),
                  opened_p=0.55, peak_p=0.97, last_p=0.03, acknowledged_at=start + timedelta(hours=60),
                  resolved_at=start + timedelta(hours=97))
    repair = MaintenanceRecord(tenant_id=tenant_id, asset_pk=pks["pump-1"], kind="repair",
                               occurred_at=start + timedelta(hours=96))
    with session_factory(server.database_url)() as session:
        session.add_all([*rows, alert, repair])
        session.commit()


def png(response: httpx.Response) -> Image.Image:
    """``response`` is a PNG; decoded."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG"
    return image.convert("RGB")


def colours(image: Image.Image) -> set[Any]:
    return {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, stack_variant: Variant) -> Iterator[ScaffoldServer]:
    with serve_iiot(request, stack_variant) as served:
        yield served


@pytest.fixture
def fresh(server: ScaffoldServer) -> Iterator[Tenant]:
    """A tenant with plant-1 (Europe/Berlin) and line-a's assets, nothing scored."""
    with new_tenant(server) as tenant:
        assert tenant.client.put("/registry", json=LINE_TREE).status_code == 200
        yield tenant


@pytest.fixture
def line_a(fresh: Tenant, server: ScaffoldServer) -> Tenant:
    """:func:`fresh` with :func:`store_history` from T0."""
    store_history(server, fresh.id)
    return fresh


@pytest.fixture
def outsider(server: ScaffoldServer) -> Iterator[Tenant]:
    with new_tenant(server) as tenant:
        yield tenant


def test_the_asset_timeline_shows_risk_rul_alerts_and_maintenance(line_a: Tenant) -> None:
    image = png(line_a.client.get("/assets/pump-1/risk.png", params=RANGE))
    assert image.size == (1000, 460)
    seen = colours(image)
    assert {TIER_COLOURS["cloud"], ALERT_OPEN, ALERT_ACKNOWLEDGED, MAINTENANCE_COLOURS["repair"]} <= seen
    edge = png(line_a.client.get("/assets/pump-3/risk.png", params=RANGE))
    assert TIER_COLOURS["edge"] in colours(edge) and ALERT_OPEN not in colours(edge)


def test_no_scores_yet_is_a_png_saying_so(line_a: Tenant) -> None:
    image = png(line_a.client.get("/assets/idle-4/risk.png", params=RANGE))
    assert image.size == (1000, 200)  # the message frame
    assert TIER_COLOURS["cloud"] not in colours(image)
    before = {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00Z"}
    assert png(line_a.client.get("/lines/line-a/risk.png", params=before)).size == (1000, 200)
    assert line_a.client.put("/lines/empty-line", json={"line_id": "empty-line", "plant_id": "plant-1"}).is_success
    assert png(line_a.client.get("/lines/empty-line/risk.png")).size == (1000, 200)


def test_the_fog_view_draws_the_line_risk_and_its_driver(line_a: Tenant) -> None:
    image = png(line_a.client.get("/lines/line-a/risk.png", params=RANGE))
    assert image.width == 1000 and image.height > 400
    seen = colours(image)
    assert LINE_RISK in seen and PALETTE[0] in seen and PALETTE[1] in seen
    strip = image.crop((70, STRIP_TOP + 2, 980, STRIP_TOP + 10))  # pump-1 (the first colour) drives most
    counts = {colour: count for count, colour in strip.getcolors(maxcolors=1 << 16) or []}
    assert max(counts, key=lambda colour: counts[colour]) == PALETTE[0]


def test_the_line_risk_now_combines_the_latest_scores(line_a: Tenant) -> None:
    body = line_a.client.get("/lines/line-a/risk").json()
    assert (body["line_id"], body["plant_id"], body["method"]) == ("line-a", "plant-1", "1 - prod(1 - p_i)")
    by_asset = {asset["asset_id"]: asset for asset in body["assets"]}
    assert by_asset["pump-1"]["p_failure"] == pytest.approx(0.03) and by_asset["pump-2"]["p_failure"] == 0.05
    assert by_asset["pump-3"]["stale"] is True and by_asset["pump-3"]["contribution"] is None  # 4 days old
    assert by_asset["idle-4"]["p_failure"] is None and by_asset["idle-4"]["stale"] is False
    assert body["p_failure"] == pytest.approx(1 - 0.97 * 0.95)
    assert (body["driver"], body["min_rul_asset"], body["min_rul_hours"]) == ("pump-2", "pump-1", 400.0)
    assert body["as_of"].startswith("2026-03-05T23:00:00")
    assert [asset["asset_id"] for asset in body["assets"]][:2] == ["pump-2", "pump-1"]
    counted = line_a.client.get("/lines/line-a/risk", params={"stale_after_h": 24 * 10}).json()
    assert counted["p_failure"] == pytest.approx(1 - 0.97 * 0.95 * 0.7) and counted["driver"] == "pump-3"


def test_the_default_range_is_the_last_two_weeks(fresh: Tenant, server: ScaffoldServer) -> None:
    store_history(server, fresh.id, start=utcnow() - timedelta(days=6))
    assert png(fresh.client.get("/assets/pump-1/risk.png")).size == (1000, 460)
    assert png(fresh.client.get("/lines/line-a/risk.png")).height > 400


def test_bad_ranges_are_422_and_other_tenants_ids_404(line_a: Tenant, outsider: Tenant) -> None:
    backwards = {"start": RANGE["end"], "end": RANGE["start"]}
    assert "before end" in problem(line_a.client.get("/assets/pump-1/risk.png", params=backwards), 422)["detail"]
    too_long = {"start": "2024-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}
    problem(line_a.client.get("/lines/line-a/risk.png", params=too_long), 422)
    problem(line_a.client.get("/lines/line-a/risk", params={"stale_after_h": 0}), 422)
    for path in ("/assets/pump-1/risk.png", "/lines/line-a/risk.png", "/lines/line-a/risk", "/assets/nope/risk.png"):
        problem(outsider.client.get(path, params=RANGE if path.endswith(".png") else None), 404)


@pytest.mark.parametrize("start", [datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 3, 29, 0, 30, tzinfo=UTC)])
@pytest.mark.parametrize("hours", [5, 72])
def test_time_axes_across_daylight_saving_changes(start: datetime, hours: int) -> None:
    scores = pd.DataFrame({"window_end": pd.to_datetime([start], utc=True), "p_failure": [0.5], "rul_hours": [10.0],
                           "tier": ["cloud"]})
    history = AssetHistory("pump-1", "line-a", "Europe/Berlin", scores)
    image = Image.open(io.BytesIO(render_asset_timeline(history, start, start + timedelta(hours=hours), title="t")))
    assert image.size == (1000, 460)
