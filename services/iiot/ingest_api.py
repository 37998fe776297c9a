"""Ingestion endpoints of the IIoT vertical: files as durable jobs, gateway batches, quarantine."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from services.iiot.schemas import READINGS_EXAMPLE, IngestAccepted, IngestJob, ReadingsAccepted, ReadingsBatch
from shared.app import raw_json_body
from shared.errors import NotBuilt, problem_responses
from shared.security import Principal, require_scope
from shared.uploads import multipart_upload_body

TRACKING_ISSUE = 19
IiotPrincipal = Annotated[Principal, Depends(require_scope("iiot"))]

router = APIRouter(prefix="/v1", tags=["ingestion"], responses=problem_responses(401, 403, 501))


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
