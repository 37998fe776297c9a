"""HTTP app of the CT nodule detection vertical, mounted at ``/nodule``: a scaffold (issue 17).

Every endpoint issue 17 names is declared at its real path and method, with its provisional
contract in the OpenAPI, and answers ``501`` problem+json (``tracking_issue: 17``) to a caller whose
API key holds the ``nodule`` scope; without one it answers 401 or 403, as the built endpoint will.
The DICOM C-STORE listener is not declared until it exists.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from services.nodule.schemas import AnalysisJob, StudyFindings, StudySummary
from shared.app import create_service_app
from shared.errors import NotBuilt, problem_responses
from shared.security import Principal, require_scope
from shared.uploads import binary_schema, multipart_upload_body

TRACKING_ISSUE = 17
NodulePrincipal = Annotated[Principal, Depends(require_scope("nodule"))]
KEYED = problem_responses(401, 403, 501)

STOW_RS_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    'multipart/related; type="application/dicom"': {
        "schema": binary_schema("application/dicom", "one DICOM instance per part", None)}}}}
"""STOW-RS request body (DICOM PS3.18 10.5): read raw by the route, so documented here."""
STOW_RS_ANSWERS: dict[int | str, dict[str, Any]] = {
    code: {"description": meaning, "content": {"application/dicom+json": {}}} for code, meaning in {
        200: "every instance stored (ReferencedSOPSequence)",
        202: "some stored, some not (FailedSOPSequence gives each failure's reason)",
        409: "none stored (FailedSOPSequence)",
        415: "a part that is not application/dicom"}.items()}
"""STOW-RS answers: a PS3.18 response dataset as DICOM JSON."""

dicomweb = APIRouter(prefix="/dicomweb", tags=["dicomweb"], responses=KEYED)


@dicomweb.post("/studies", summary="Store instances (STOW-RS)", response_class=Response,
               responses=STOW_RS_ANSWERS, openapi_extra=STOW_RS_BODY)
async def store_instances(principal: NodulePrincipal) -> None:
    """Store CT instances of any studies, as a PACS does over DICOMweb."""
    raise NotBuilt(TRACKING_ISSUE)


@dicomweb.post("/studies/{study_instance_uid}", summary="Store instances of one study (STOW-RS)",
               response_class=Response, responses=STOW_RS_ANSWERS, openapi_extra=STOW_RS_BODY)
async def store_study_instances(study_instance_uid: str, principal: NodulePrincipal) -> None:
    """Store CT instances that must belong to ``study_instance_uid`` (others fail in FailedSOPSequence)."""
    raise NotBuilt(TRACKING_ISSUE)


about = APIRouter(prefix="/v1", tags=["status"])


@about.get("/status")
async def status() -> dict[str, object]:
    """What this vertical offers today: a scaffold whose endpoints answer 501 until its issue is built."""
    return {"vertical": "nodule", "state": "scaffold", "tracking_issue": TRACKING_ISSUE}


router = APIRouter(prefix="/v1", tags=["nodule"], responses=KEYED)


@router.post("/uploads", summary="Upload a zipped series", response_class=Response,
             openapi_extra=multipart_upload_body("file", description="a zip of one series' DICOM files",
                                                 media_type="application/zip"))
async def upload_series(request: Request, principal: NodulePrincipal) -> None:
    """Upload a zip of a series' DICOM files, streamed to disk and stored as if pushed by C-STORE."""
    raise NotBuilt(TRACKING_ISSUE)


@router.get("/jobs/{job_id}", summary="An analysis job")
async def get_analysis_job(job_id: str, principal: NodulePrincipal) -> AnalysisJob:
    """Status and progress of one of the tenant's series analyses."""
    raise NotBuilt(TRACKING_ISSUE)


@router.get("/studies", summary="List studies")
async def list_studies(principal: NodulePrincipal) -> list[StudySummary]:
    """The tenant's studies with their analysis status and Lung-RADS category."""
    raise NotBuilt(TRACKING_ISSUE)


@router.get("/studies/{study_instance_uid}", summary="A study's findings")
async def get_study(study_instance_uid: str, principal: NodulePrincipal) -> StudyFindings:
    """A study's status (received, analysing, done, failed with reason) and its findings with
    measurements, risk and Lung-RADS category."""
    raise NotBuilt(TRACKING_ISSUE)


app = create_service_app("nodule", title="Tessera — CT nodule detection with DICOM fusion",
                         routers=[about, router, dicomweb])
