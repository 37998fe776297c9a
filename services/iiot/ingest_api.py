"""Ingestion endpoints of the IIoT vertical: files as durable jobs, gateway batches, quarantine.

Thin: parse, call :mod:`services.iiot.ingest`, answer. Every query is filtered by the caller's
tenant; another tenant's job or ingestion answers 404 like an unknown one.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.iiot.db import Ingest, QuarantinedRow
from services.iiot.ingest import accept_readings, elapsed_s, storage_dir
from services.iiot.readers import FileRefused, check_head
from services.iiot.schemas import (
    MAX_BATCH_BYTES,
    READINGS_EXAMPLE,
    IngestAccepted,
    IngestJob,
    QuarantinedRowOut,
    QuarantinePage,
    ReadingsAccepted,
    ReadingsBatch,
)
from services.iiot.tasks import ingest_file_job
from services.iiot.validation import Reason
from shared.app import raw_json_body
from shared.config import get_settings
from shared.db import SessionDep, session_scope
from shared.errors import NotFound, PayloadTooLarge, UnprocessableContent, parse_json, problem_responses
from shared.jobs import FAILED, SUCCEEDED, Job, submit_job
from shared.paging import MAX_ROW_ID, row_id_in_range
from shared.security import Principal, require_scope
from shared.uploads import (
    HeadCheck,
    StoredUpload,
    multipart_upload_body,
    receive_multipart_upload,
    refuse_declared_size,
)

IiotPrincipal = Annotated[Principal, Depends(require_scope("iiot"))]
QUARANTINE_PAGE_MAX = 1000
CSV_PAGE_ROWS = 5000
QUARANTINE_CSV_COLUMNS = ("row_number", "reason", "detail", "asset_id", "sensor_id", "raw", "received_at")

router = APIRouter(prefix="/v1", tags=["ingestion"], responses=problem_responses(401, 403))


@router.post("/ingest", summary="Ingest a file of readings", status_code=202,
             responses={200: {"description": "The same file was sent before: its job", "model": IngestAccepted},
                        **problem_responses(400, 413, 415, 422, notes={
                            422: "Also a file whose header is neither the long nor the wide format, or empty."})},
             openapi_extra=multipart_upload_body("file", description="readings as CSV, Parquet or JSON Lines (gzip "
                                                 "accepted), long format (timestamp, asset, sensor, value[, unit]) "
                                                 "or wide (timestamp, asset, one column per sensor)"))
async def ingest_file(request: Request, response: Response, principal: IiotPrincipal,
                      session: SessionDep) -> IngestAccepted:
    """Accept a file of readings of any size, streamed to disk and ingested as a durable job.

    Idempotent by content: the same file again answers 200 with the first job (202 when new).
    """
    tenant = principal.tenant_id
    upload = await receive_multipart_upload(
        request, storage_dir(), max_bytes=get_settings().iiot_max_upload_bytes,
        name_prefix=f"{hashlib.sha256(tenant.encode()).hexdigest()[:16]}-", check_head=_head_checker())
    existing = _ingest_by_digest(session, tenant, upload.sha256)
    if existing is None:
        try:
            return _submit(session, tenant, upload)
        except IntegrityError:  # the same file, accepted concurrently
            session.rollback()
            existing = _ingest_by_digest(session, tenant, upload.sha256)
            assert existing is not None
    response.status_code = 200
    job = session.get(Job, existing.job_id) if existing.job_id else None
    if job is not None and job.status in (SUCCEEDED, FAILED):
        upload.path.unlink(missing_ok=True)  # its job has run: this copy would never be read
    return IngestAccepted(job_id=existing.job_id or "", ingest_id=existing.id, status=job.status if job else "pending")


def _head_checker() -> HeadCheck:
    """The upload's head check: 422 before the rest is received for a header that cannot be ours."""
    def check(head: bytes) -> None:
        try:
            check_head(head)
        except FileRefused as exc:
            raise UnprocessableContent(str(exc)) from None
    return check


def _ingest_by_digest(session: Session, tenant_id: str, digest: str) -> Ingest | None:
    return session.scalar(select(Ingest).where(Ingest.tenant_id == tenant_id, Ingest.digest == digest))


def _submit(session: Session, tenant_id: str, upload: StoredUpload) -> IngestAccepted:
    ingest = Ingest(tenant_id=tenant_id, source="file", digest=upload.sha256, filename=upload.filename,
                    size_bytes=upload.size)
    session.add(ingest)
    session.flush()
    job = submit_job(session, ingest_file_job, key=f"iiot-ingest:{tenant_id}:{upload.sha256}",
                     payload={"ingest_pk": ingest.id, "path": str(upload.path.resolve())}, tenant_id=tenant_id)
    ingest.job_id = job.id
    session.commit()
    return IngestAccepted(job_id=job.id, ingest_id=ingest.id, status=job.status)


@router.get("/jobs/{job_id}", summary="An ingestion job", responses=problem_responses(404))
async def get_ingest_job(job_id: str, principal: IiotPrincipal, session: SessionDep) -> IngestJob:
    """Rows read, kept and quarantined, rate and ETA of one of the tenant's ingestion jobs."""
    ingest = session.scalar(select(Ingest).where(Ingest.tenant_id == principal.tenant_id, Ingest.job_id == job_id))
    job = session.get(Job, job_id) if ingest is not None else None
    if ingest is None or job is None or job.tenant_id != principal.tenant_id:
        raise NotFound(f"ingestion job {job_id} does not exist")
    return job_view(ingest, job)


def job_view(ingest: Ingest, job: Job) -> IngestJob:
    """An ingestion and its job as the API shows them (rate and ETA from the time it has run)."""
    elapsed = elapsed_s(ingest)
    progress = 1.0 if job.status == SUCCEEDED else float(job.progress or 0.0)
    rate = ingest.rows_read / elapsed if elapsed else None
    eta = elapsed * (1 - progress) / progress if elapsed and 0 < progress < 1 else (0.0 if progress >= 1 else None)
    return IngestJob(id=job.id, ingest_id=ingest.id, status=job.status, filename=ingest.filename,
                     file_format=ingest.file_format, layout=ingest.layout, size_bytes=ingest.size_bytes,
                     rows_read=ingest.rows_read, rows_kept=ingest.rows_kept, rows_quarantined=ingest.rows_quarantined,
                     gaps=ingest.gaps, progress=progress, rows_per_s=rate, eta_s=eta,
                     error=ingest.error or job.error, created_at=ingest.created_at, started_at=ingest.started_at,
                     finished_at=ingest.finished_at)


@router.post("/readings", summary="Send a batch of readings",
             responses=problem_responses(413, 415, 422, notes={
                 422: "A reading of the wrong type (a value sent as text), an unknown field, or more than "
                      "10 000 readings; semantic problems are quarantined instead, with reasons."}),
             openapi_extra=raw_json_body(ReadingsBatch, READINGS_EXAMPLE))
async def post_readings(request: Request, principal: IiotPrincipal) -> ReadingsAccepted:
    """A gateway's small batch of readings, through the same validation as files (idempotent by content)."""
    refuse_declared_size(request, MAX_BATCH_BYTES)
    body = await _bounded_body(request, MAX_BATCH_BYTES)
    batch = parse_json(ReadingsBatch, body)
    rows = [reading.model_dump() for reading in batch.readings]
    outcome = await asyncio.to_thread(accept_readings, principal.tenant_id, rows, source="api")
    return ReadingsAccepted(ingest_id=outcome.ingest_id or 0, kept=outcome.kept, quarantined=outcome.quarantined,
                            reasons=outcome.reasons, replayed=outcome.replayed)


async def _bounded_body(request: Request, limit: int) -> bytes:
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise PayloadTooLarge(f"a batch body is at most {limit} bytes; send more as a file to /ingest",
                                  max_bytes=limit)
    return bytes(received)


@router.get("/quarantine", summary="Quarantined rows", responses=problem_responses(404, 422))
async def list_quarantine(principal: IiotPrincipal, session: SessionDep,
                          ingest: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID,
                                                             description="only this ingestion's rows")] = None,
                          reason: Annotated[Reason | None, Query(description="only this reason code")] = None,
                          limit: Annotated[int, Query(ge=1, le=QUARANTINE_PAGE_MAX)] = 100,
                          cursor: Annotated[str | None, Query(max_length=20, pattern=r"^\d+$",
                                                              description="next_cursor of the previous page")] = None,
                          ) -> QuarantinePage:
    """The tenant's quarantined rows, oldest first, by keyset pages."""
    if ingest is not None:
        _owned_ingest(session, principal.tenant_id, ingest)
    after = int(cursor or 0)
    if after and not row_id_in_range(after):
        raise UnprocessableContent("cursor: not a cursor this API issued (take it from next_cursor)")
    rows = _quarantine_page(session, principal.tenant_id, ingest, reason, after, limit + 1)
    items = [quarantined_view(row) for row in rows[:limit]]
    return QuarantinePage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)


def _owned_ingest(session: Session, tenant_id: str, ingest_id: int) -> Ingest:
    ingest = session.get(Ingest, ingest_id)
    if ingest is None or ingest.tenant_id != tenant_id:
        raise NotFound(f"ingestion {ingest_id} does not exist")
    return ingest


def _quarantine_page(session: Session, tenant_id: str, ingest_pk: int | None, reason: str | None, after: int,
                     limit: int) -> list[QuarantinedRow]:
    query = select(QuarantinedRow).where(QuarantinedRow.tenant_id == tenant_id, QuarantinedRow.id > after)
    if ingest_pk is not None:
        query = query.where(QuarantinedRow.ingest_pk == ingest_pk)
    if reason is not None:
        query = query.where(QuarantinedRow.reason == reason)
    return list(session.scalars(query.order_by(QuarantinedRow.id).limit(limit)))


def quarantined_view(row: QuarantinedRow) -> QuarantinedRowOut:
    """A quarantined row as the API shows it."""
    return QuarantinedRowOut(id=row.id, ingest_id=row.ingest_pk, source=row.source, row_number=row.row_number,
                             reason=row.reason, detail=row.detail, raw=row.raw, asset_id=row.asset_id,
                             sensor_id=row.sensor_id, received_at=row.received_at)


IngestId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="the ingestion's id")]


@router.get("/ingests/{ingest_id}/quarantine.csv", summary="Download an ingestion's quarantined rows",
            response_class=StreamingResponse, responses={200: {"content": {"text/csv": {}}}, **problem_responses(404)})
async def download_quarantine(ingest_id: IngestId, principal: IiotPrincipal, session: SessionDep) -> StreamingResponse:
    """Every quarantined row of one of the tenant's ingestions as CSV, streamed page by page."""
    _owned_ingest(session, principal.tenant_id, ingest_id)
    return StreamingResponse(_quarantine_csv(principal.tenant_id, ingest_id), media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="quarantine-{ingest_id}.csv"'})


def _quarantine_csv(tenant_id: str, ingest_id: int) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(QUARANTINE_CSV_COLUMNS)
    after = 0
    while True:
        with session_scope() as session:
            rows = _quarantine_page(session, tenant_id, ingest_id, None, after, CSV_PAGE_ROWS)
        for row in rows:
            writer.writerow([row.row_number, row.reason, row.detail, row.asset_id, row.sensor_id, row.raw,
                             row.received_at.isoformat()])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        if len(rows) < CSV_PAGE_ROWS:
            return
        after = rows[-1].id
