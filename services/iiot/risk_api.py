"""Risk views of the IIoT vertical: an asset's and a line's (fog) risk timelines."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from shared.errors import NotBuilt, problem_responses
from shared.security import Principal, require_scope

TRACKING_ISSUE = 19
IiotPrincipal = Annotated[Principal, Depends(require_scope("iiot"))]
PNG_TIMELINE: dict[int | str, dict[str, Any]] = {
    200: {"description": "the timeline as a PNG image", "content": {"image/png": {}}}}

router = APIRouter(prefix="/v1", tags=["risk"], responses=problem_responses(401, 403, 501))


@router.get("/assets/{asset_id}/risk.png", summary="An asset's risk timeline", response_class=Response,
            responses=PNG_TIMELINE)
async def asset_risk_timeline(asset_id: str, principal: IiotPrincipal) -> Response:
    """The asset's failure risk and remaining useful life over time, alerts and maintenance marked."""
    raise NotBuilt(TRACKING_ISSUE)


@router.get("/lines/{line_id}/risk.png", summary="A line's risk timeline", response_class=Response,
            responses=PNG_TIMELINE)
async def line_risk_timeline(line_id: str, principal: IiotPrincipal) -> Response:
    """The fog view: a line's risk over time and which asset drives it."""
    raise NotBuilt(TRACKING_ISSUE)
