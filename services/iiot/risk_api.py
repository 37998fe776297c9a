"""Risk views of the IIoT vertical: an asset's and a line's (fog) risk timelines, and a line's risk now.

- ``GET /v1/assets/{asset_id}/risk.png``: the asset's P(failure) and RUL over time, alerts and
  maintenance marked (:func:`services.iiot.timeline.render_asset_timeline`).
- ``GET /v1/lines/{line_id}/risk.png``: the fog view, the line risk over time over its assets'
  risks, and which asset drives it (:func:`services.iiot.timeline.render_line_timeline`).
- ``GET /v1/lines/{line_id}/risk``: the line risk from each asset's latest score, the driving
  asset, the shortest RUL, and every asset's part (:mod:`services.iiot.fog`).

The PNGs cover ``start``..``end`` (default: the 14 days up to now). With no scores in the range
they are still a PNG, saying so: an asset scored for the first time tomorrow is not an error.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import pandas as pd
from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field

from services.iiot import fog
from services.iiot.registry import ID_PATTERN
from services.iiot.timeline import (
    asset_history,
    latest_line_scores,
    line_scores,
    render_asset_timeline,
    render_line_timeline,
    render_message,
)
from services.iiot.validation import TIME_WINDOW, aware_utc
from shared.config import get_settings
from shared.db import SessionDep, utcnow
from shared.errors import UnprocessableContent, problem_responses
from shared.security import Principal, require_scope

IiotPrincipal = Annotated[Principal, Depends(require_scope("iiot"))]
AssetId = Annotated[str, Path(pattern=ID_PATTERN, description="the tenant's id of the asset")]
LineId = Annotated[str, Path(pattern=ID_PATTERN, description="the tenant's id of the line")]
Start = Annotated[datetime | None, Query(description=f"from (ISO 8601; without an offset: UTC; {TIME_WINDOW}); "
                                                    "default end - 14 days")]
End = Annotated[datetime | None, Query(description=f"to (ISO 8601; without an offset: UTC; {TIME_WINDOW}); "
                                                  "default now")]
StaleAfter = Annotated[float | None, Query(gt=0, le=24 * 30, description=(
    "hours after which an asset's latest score no longer counts in the line risk; default three scoring "
    "intervals, at least 1 h"))]

DEFAULT_RANGE = timedelta(days=14)
MAX_RANGE = timedelta(days=366)
GRID_POINTS = 600
"""Time steps of the fog view: about one per pixel and a half of the plot."""
PNG_CACHE = "private, max-age=60"
PNG_TIMELINE: dict[int | str, dict[str, Any]] = {
    200: {"description": "the timeline as a PNG image (a frame saying so when there are no scores yet)",
          "content": {"image/png": {}}},
    **problem_responses(404, 422, notes={404: "No such id for this tenant.",
                                         422: "Also start not before end, a range over 366 days, or a time "
                                              f"outside {TIME_WINDOW}."})}

router = APIRouter(prefix="/v1", tags=["risk"], responses=problem_responses(401, 403))


class AssetRiskOut(BaseModel):
    """One asset's latest score and its part in its line's risk."""

    asset_id: str
    p_failure: float | None = Field(description="its latest P(failure within the horizon); null: never scored")
    rul_hours: float | None
    window_end: datetime | None
    tier: str | None = Field(description="cloud, edge or fog: which scorer produced it")
    contribution: float | None = Field(description="how much the line risk would fall if this asset were healthy")
    stale: bool = Field(description="older than stale_after before the line's newest score: not counted")


class LineRiskOut(BaseModel):
    """A line's risk now: the probability that any of its assets fails within the horizon."""

    line_id: str
    plant_id: str
    method: str = Field(description="how the line risk combines the assets' risks (independence assumed)")
    as_of: datetime | None = Field(description="the newest score counted")
    p_failure: float | None = Field(description="the line risk; null when no asset has a fresh score")
    driver: str | None = Field(description="the asset contributing most")
    driver_contribution: float | None
    min_rul_hours: float | None
    min_rul_asset: str | None
    assets: list[AssetRiskOut] = Field(description="every asset of the line, largest contribution first")


def _time_range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """The range asked for, in UTC (naive = UTC), with its defaults; 422 when empty, too long, or a
    time given is outside :data:`~services.iiot.validation.TIME_WINDOW`."""
    end = _in_window(end, "end") if end is not None else utcnow()
    start = _in_window(start, "start") if start is not None else end - DEFAULT_RANGE
    if start >= end:
        raise UnprocessableContent(f"start ({start.isoformat()}) must be before end ({end.isoformat()})", errors=[
            {"loc": ["query", "start"], "msg": "not before end", "type": "value_error"}])
    if end - start > MAX_RANGE:
        raise UnprocessableContent(f"the range is {(end - start).days} days; at most {MAX_RANGE.days}", errors=[
            {"loc": ["query", "start"], "msg": "range too long", "type": "value_error"}])
    return start, end


def _in_window(moment: datetime, name: str) -> datetime:
    try:
        return aware_utc(moment, name)
    except ValueError as exc:
        raise UnprocessableContent(str(exc), errors=[
            {"loc": ["query", name], "msg": str(exc), "type": "value_error"}]) from None


def _stale_after(hours: float | None) -> timedelta:
    if hours is not None:
        return timedelta(hours=hours)
    return max(timedelta(seconds=3 * get_settings().iiot_scoring_interval_s), timedelta(hours=1))


def _png(content: bytes) -> Response:
    return Response(content, media_type="image/png", headers={"Cache-Control": PNG_CACHE})


def _span(start: datetime, end: datetime) -> str:
    return f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"


@router.get("/assets/{asset_id}/risk.png", summary="An asset's risk timeline", response_class=Response,
            responses=PNG_TIMELINE)
def asset_risk_timeline(asset_id: AssetId, principal: IiotPrincipal, session: SessionDep, start: Start = None,
                        end: End = None) -> Response:
    """The asset's failure risk and remaining useful life over time, alerts (open, acknowledged,
    resolved) and maintenance (failure, repair, preventive, inspection) marked."""
    start, end = _time_range(start, end)
    history = asset_history(session, principal.tenant_id, asset_id, start, end)
    title = f"asset {asset_id} (line {history.line_id}): risk and RUL, {_span(start, end)}"
    if history.scores.empty and not history.alerts and not history.maintenance:
        return _png(render_message(title, f"No risk scores yet for asset {asset_id} in this range."))
    return _png(render_asset_timeline(history, start, end, title=title))


@router.get("/lines/{line_id}/risk.png", summary="A line's risk timeline", response_class=Response,
            responses=PNG_TIMELINE)
def line_risk_timeline(line_id: LineId, principal: IiotPrincipal, session: SessionDep, start: Start = None,
                       end: End = None, stale_after_h: StaleAfter = None) -> Response:
    """The fog view: the line's risk (P(any asset fails within the horizon)) over time over its
    assets' risks, and which asset drives it."""
    start, end = _time_range(start, end)
    stale_after = _stale_after(stale_after_h)
    scores = line_scores(session, principal.tenant_id, line_id, start - stale_after, end)
    title = f"line {line_id} (plant {scores.plant_id}): fog view, {_span(start, end)}"
    if scores.scores.empty:
        what = "no assets yet" if not scores.asset_ids else "no risk scores yet"
        return _png(render_message(title, f"Line {line_id}: {what} in this range."))
    times = pd.date_range(start, end, periods=GRID_POINTS)
    timeline = fog.line_risk_over_time(scores.scores, times, stale_after=stale_after)
    return _png(render_line_timeline(timeline, start, end, zone=scores.timezone, title=title))


@router.get("/lines/{line_id}/risk", summary="A line's risk now", response_model=LineRiskOut,
            responses=problem_responses(404, 422, notes={404: "No such line for this tenant."}))
def line_risk_now(line_id: LineId, principal: IiotPrincipal, session: SessionDep,
                  stale_after_h: StaleAfter = None) -> LineRiskOut:
    """The line risk from each asset's latest score (``1 - prod(1 - p_i)``: the probability that any
    asset fails within the horizon), the asset driving it, the shortest remaining useful life,
    and each asset's part. Scores older than ``stale_after_h`` before the newest are listed as
    stale and not counted."""
    plant_id, asset_ids, latest = latest_line_scores(session, principal.tenant_id, line_id)
    fresh = fog.latest_scores(latest, stale_after=_stale_after(stale_after_h))
    risk = fog.line_risk(fresh)
    shares = {share.asset_id: share.contribution for share in risk.assets} if risk else {}
    by_asset = {score.asset_id: score for score in latest}
    assets = [AssetRiskOut(asset_id=asset_id, p_failure=score.p_failure if score else None,
                           rul_hours=score.rul_hours if score else None, window_end=score.window_end if score else None,
                           tier=score.tier if score else None, contribution=shares.get(asset_id),
                           stale=score is not None and asset_id not in shares)
              for asset_id in asset_ids for score in [by_asset.get(asset_id)]]
    assets.sort(key=lambda a: (a.contribution is None, -(a.contribution or 0.0), a.asset_id))
    return LineRiskOut(
        line_id=line_id, plant_id=plant_id, method=fog.METHOD,
        as_of=max((s.window_end for s in fresh if s.window_end), default=None),
        p_failure=risk.p_failure if risk else None, driver=risk.driver if risk else None,
        driver_contribution=risk.driver_contribution if risk else None,
        min_rul_hours=risk.min_rul_hours if risk else None, min_rul_asset=risk.min_rul_asset if risk else None,
        assets=assets)

