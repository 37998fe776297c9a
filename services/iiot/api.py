"""HTTP app of the IIoT failure-prediction vertical, mounted at ``/iiot``: a scaffold (issue 19).

Every endpoint issue 19 names is declared at its real path and method, with its provisional
contract in the OpenAPI, and answers ``501`` problem+json (``tracking_issue: 19``) to a caller whose
API key holds the ``iiot`` scope; without one it answers 401 or 403, as the built endpoint will.
Bodies are documented but not read or validated yet. The MQTT subscriber is not declared until it
exists.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from services.iiot.schemas import READINGS_EXAMPLE, IngestAccepted, IngestJob, ReadingsAccepted, ReadingsBatch
from shared.app import create_service_app, raw_json_body
from shared.errors import NotBuilt, problem_responses
from shared.security import Principal, require_scope
from shared.uploads import multipart_upload_body

TRACKING_ISSUE = 19
IiotPrincipal = Annotated[Principal, Depends(require_scope("iiot"))]
KEYED = problem_responses(401, 403, 501)
PNG_TIMELINE: dict[int | str, dict[str, Any]] = {
    200: {"description": "the timeline as a PNG image", "content": {"image/png": {}}}}

about = APIRouter(prefix="/v1", tags=["status"])


@about.get("/status")
async def status() -> dict[str, object]:
    """What this vertical offers today: a scaffold whose endpoints answer 501 until its issue is built."""
    return {"vertical": "iiot", "state": "scaffold", "tracking_issue": TRACKING_ISSUE}


router = APIRouter(prefix="/v1", tags=["iiot"], responses=KEYED)


@router.post("/ingest", summary="Ingest a file of readings", status_code=202, openapi_extra=multipart_upload_body(
    "file", description="readings as CSV, Parquet or JSON Lines, long or wide format"))
async def ingest_file(request: Request, principal: IiotPrincipal) -> IngestAccepted:
    """Accept a file of readings of any size, streamed to disk and ingested as a durable job."""
    raise NotBuilt(TRACKING_ISSUE)


@router.get("/jobs/{job_id}", summary="An ingestion job")
async def get_ingest_job(job_id: str, principal: IiotPrincipal) -> IngestJob:
    """Rows read, kept and quarantined, rate and ETA of one of the tenant's ingestion jobs."""
    raise NotBuilt(TRACKING_ISSUE)


@router.post("/readings", summary="Send a batch of readings",
             openapi_extra=raw_json_body(ReadingsBatch, READINGS_EXAMPLE))
async def post_readings(principal: IiotPrincipal) -> ReadingsAccepted:
    """A gateway's small batch of readings, through the same validation as files."""
    raise NotBuilt(TRACKING_ISSUE)


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


app = create_service_app("iiot", title="Tessera — IIoT failure prediction", routers=[about, router],
                         documented_models=[ReadingsBatch])
