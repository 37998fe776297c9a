"""HTTP app of the CT nodule detection vertical, mounted at ``/nodule``.

- DICOMweb STOW-RS (``POST /dicomweb/studies[/{study}]``): a ``multipart/related`` body of
  ``application/dicom`` parts, streamed part by part to disk, each instance checked and stored as a
  C-STORE one would be; the answer is PS3.18's Store Instances Response as DICOM JSON (200 all
  stored, 202 some, 409 none; 415 for a part of another type, 400 for a malformed body or a
  study path that is not a DICOM UID).
- ``POST /v1/uploads``: a zip of DICOM files (multipart/form-data ``file``), streamed to disk,
  each member stored like a STOW-RS part; the answer (200) lists what was stored and what failed,
  a member that cannot be read failing alone; 422 for a file that is not a zip or holds no file.
- WADO-RS (``GET /dicomweb/studies/{study}/series/{series}/instances/{sop}``): a received
  instance or one of our result objects, ``multipart/related; type="application/dicom"`` or a
  single ``application/dicom`` part (:mod:`services.nodule.wado`).
- ``GET /v1/jobs/{id}``, ``GET /v1/studies``, ``GET /v1/studies/{uid}``,
  ``POST /v1/studies/{uid}/clinical``: analysis jobs, study states with per-series errors and
  findings with risk (computed on read: clinical data posted later counts), clinical data.
- ``GET /v1/studies/{uid}/results`` (SR, SEG, key images made) and
  ``GET /v1/studies/{uid}/nodules/{label}/key-image.png``.

Every route needs an API key with the ``nodule`` scope and sees its tenant's studies only.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.requests import ClientDisconnect

from services.nodule import analysis, results, wado
from services.nodule.db import ClinicalData, Result, Series, SeriesFinding, Study
from services.nodule.dicom_io import (
    PartOutcome,
    RelatedPartsReader,
    incoming_dir,
    store_parts,
    store_zip,
    stow_boundary,
    stow_response,
    stow_status_code,
    uid_problem,
)
from services.nodule.fusion import NoduleRisk, SeriesRisk, highest_category
from services.nodule.schemas import (
    AnalysisJob,
    ClinicalDataIn,
    ClinicalDataOut,
    NoduleFinding,
    PriorComparison,
    ResultObject,
    SeriesStatus,
    StudyDetail,
    StudyState,
    StudySummary,
    UploadItem,
    UploadResult,
)
from shared.app import create_service_app, mounted_base_url
from shared.db import SessionDep
from shared.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    UnprocessableContent,
    problem_responses,
)
from shared.jobs import get_job
from shared.paging import Offset
from shared.security import Principal, require_scope
from shared.uploads import binary_schema, multipart_upload_body, receive_multipart_upload, refuse_declared_size

TRACKING_ISSUE = 17
NodulePrincipal = Annotated[Principal, Depends(require_scope("nodule"))]
KEYED = problem_responses(401, 403)
DICOM_JSON = "application/dicom+json"
MAX_STOW_BYTES = 8 << 30
"""Largest STOW-RS body: a thin-slice study of 1,000+ uncompressed 512 x 512 slices fits."""
MAX_UPLOAD_BYTES = 8 << 30
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")
FEED_BATCH_BYTES = 1 << 20
"""Received bytes are parsed (and written) in batches of this size, in a worker thread."""

STOW_RS_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    'multipart/related; type="application/dicom"': {
        "schema": binary_schema("application/dicom", "one DICOM instance per part", MAX_STOW_BYTES)}}}}
"""STOW-RS request body (DICOM PS3.18 10.5): read raw by the route, so documented here."""
STOW_RS_ANSWERS: dict[int | str, dict[str, Any]] = {
    **{code: {"description": meaning, "content": {DICOM_JSON: {}}} for code, meaning in {
        200: "every instance stored (ReferencedSOPSequence with each RetrieveURL)",
        202: "some stored, some not (FailedSOPSequence gives each failure's FailureReason)",
        409: "none stored (FailedSOPSequence)"}.items()},
    **problem_responses(400, 413, 415, notes={415: "A part that is not application/dicom, or a body that is "
                                              'not multipart/related; type="application/dicom".'})}
"""STOW-RS answers: a PS3.18 response dataset as DICOM JSON, or a problem for the whole request."""
STOW_RS_STUDY_ANSWERS: dict[int | str, dict[str, Any]] = {
    **STOW_RS_ANSWERS, **problem_responses(400, notes={400: "A malformed body, or a study instance UID in the path "
                                                            "that is not a DICOM UID."})}


# --- DICOMweb ------------------------------------------------------------------------------------


dicomweb = APIRouter(prefix="/dicomweb", tags=["dicomweb"], responses=KEYED)


@dicomweb.post("/studies", summary="Store instances (STOW-RS)", response_class=Response,
               responses=STOW_RS_ANSWERS, openapi_extra=STOW_RS_BODY)
async def store_instances(request: Request, principal: NodulePrincipal) -> Response:
    """Store CT instances of any studies, as a PACS does over DICOMweb."""
    return await _stow(request, principal.tenant_id, None)


@dicomweb.post("/studies/{study_instance_uid}", summary="Store instances of one study (STOW-RS)",
               response_class=Response, responses=STOW_RS_STUDY_ANSWERS, openapi_extra=STOW_RS_BODY)
async def store_study_instances(study_instance_uid: str, request: Request, principal: NodulePrincipal) -> Response:
    """Store CT instances that must belong to ``study_instance_uid`` (others fail with FailureReason 0xA901).

    A path that is not a DICOM UID is a 400 before the body is read.
    """
    problem = uid_problem(study_instance_uid)
    if problem is not None:
        raise BadRequest(f"the study instance UID in the path is not a DICOM UID: {problem}")
    return await _stow(request, principal.tenant_id, study_instance_uid)


async def _stow(request: Request, tenant_id: str, study_uid: str | None) -> Response:
    paths = await _receive_parts(request)
    outcomes = await asyncio.to_thread(store_parts, paths, tenant_id=tenant_id, source="stow-rs",
                                       expected_study_uid=study_uid)
    base_url = mounted_base_url(request) + "/dicomweb"
    body = stow_response(outcomes, base_url, study_uid)
    return Response(orjson.dumps(body), status_code=stow_status_code(outcomes), media_type=DICOM_JSON)


async def _receive_parts(request: Request) -> list[Path]:
    """Stream the multipart/related body to one file per part (parsed in batches off the loop)."""
    reader = RelatedPartsReader(stow_boundary(request.headers.get("content-type")))
    refuse_declared_size(request, MAX_STOW_BYTES)
    received, pending_bytes = 0, 0
    pending: list[bytes] = []
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_STOW_BYTES:
                raise PayloadTooLarge(f"the body is larger than {MAX_STOW_BYTES} bytes", max_bytes=MAX_STOW_BYTES)
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= FEED_BATCH_BYTES:
                await asyncio.to_thread(reader.feed, b"".join(pending))
                pending, pending_bytes = [], 0
        await asyncio.to_thread(reader.feed, b"".join(pending))
        return reader.finish()
    except ClientDisconnect:
        reader.discard()
        raise BadRequest("the client closed the connection before the body ended") from None
    except BaseException:
        reader.discard()
        raise


class NotAcceptable(ProblemError):
    """No representation the client accepts (WADO-RS Accept / transfer-syntax)."""

    status, title, type_slug = 406, "Not Acceptable", "not-acceptable"


WADO_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the instance", "content": {'multipart/related; type="application/dicom"': {},
                                                       wado.DICOM: {}}},
    **problem_responses(404, 406, notes={404: "No such instance in this tenant's studies.",
                                         406: "Neither multipart/related; type=\"application/dicom\" nor "
                                              "application/dicom in the stored transfer syntax is acceptable."})}


@dicomweb.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}",
              summary="Retrieve an instance (WADO-RS)", response_class=Response, responses=WADO_ANSWERS)
def retrieve_instance(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str, request: Request,
                      principal: NodulePrincipal, session: SessionDep) -> Response:
    """A received CT instance or one of our results (SR, SEG, key image), as PS3.18 WADO-RS answers it."""
    path = results.instance_path(session, principal.tenant_id, study_instance_uid, series_instance_uid,
                                 sop_instance_uid)
    syntax = wado.stored_transfer_syntax(path)
    representation = wado.choose_representation(request.headers.get("accept"), syntax)
    if representation is None:
        raise NotAcceptable(f"the instance is stored in transfer syntax {syntax}; transcoding is not offered")
    content = path.read_bytes()
    if representation == "single":
        return Response(content, media_type=f"{wado.DICOM}; transfer-syntax={syntax}")
    body, content_type = wado.multipart_body([(content, syntax)])
    return Response(body, headers={"content-type": content_type})


@dicomweb.get("/studies/{study_instance_uid}/series/{series_instance_uid}", summary="Retrieve a series (WADO-RS)",
              response_class=Response, responses=WADO_ANSWERS)
def retrieve_series(study_instance_uid: str, series_instance_uid: str, request: Request,
                    principal: NodulePrincipal, session: SessionDep) -> Response:
    """Every instance of a received series or of one of our result series, one part each."""
    paths = results.series_paths(session, principal.tenant_id, study_instance_uid, series_instance_uid)
    syntaxes = [wado.stored_transfer_syntax(path) for path in paths]
    if any(wado.choose_representation(request.headers.get("accept"), syntax) != "multipart" for syntax in syntaxes):
        raise NotAcceptable("a series is answered as multipart/related; type=\"application/dicom\" in the "
                            "transfer syntaxes it is stored in; transcoding is not offered")
    body, content_type = wado.multipart_body([(path.read_bytes(), syntax) for path, syntax in zip(paths, syntaxes,
                                                                                                  strict=True)])
    return Response(body, headers={"content-type": content_type})


# --- uploads, jobs, studies -------------------------------------------------------------------------


about = APIRouter(prefix="/v1", tags=["status"])


@about.get("/status")
async def status() -> dict[str, object]:
    """What this vertical offers today: ingest, analysis jobs and study status (detection in progress)."""
    return {"vertical": "nodule", "state": "in progress", "tracking_issue": TRACKING_ISSUE}


router = APIRouter(prefix="/v1", tags=["nodule"], responses=KEYED)


def _zip_head(head: bytes) -> None:
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise UnprocessableContent("the file is not a zip archive")


@router.post("/uploads", summary="Upload a zipped series",
             openapi_extra=multipart_upload_body("file", description="a zip of one series' DICOM files",
                                                 media_type="application/zip", max_bytes=MAX_UPLOAD_BYTES),
             responses=problem_responses(400, 413, 415, 422, notes={
                 422: "The file is not a zip archive (no readable central directory), or it holds no file."}))
async def upload_series(request: Request, principal: NodulePrincipal) -> UploadResult:
    """Upload a zip of a series' DICOM files, streamed to disk and stored as if pushed by C-STORE.

    The answer is a 200 listing each member, stored or failed: a member that is not a CT instance
    or cannot be read (corrupt, CRC error, encrypted, unsupported compression) fails alone with its
    DICOM status and reason, and the other members are stored (as STOW-RS does).
    """
    upload = await receive_multipart_upload(request, incoming_dir(), max_bytes=MAX_UPLOAD_BYTES, part_types=ZIP_TYPES,
                                            name_prefix=f"upload-{uuid.uuid4().hex}-", name_suffix=".zip",
                                            check_head=_zip_head, head_bytes=4)
    outcomes = await asyncio.to_thread(store_zip, upload.path, tenant_id=principal.tenant_id)
    items = [_upload_item(outcome) for outcome in outcomes]
    stored = sum(item.stored for item in items)
    return UploadResult(stored=stored, failed=len(items) - stored, items=items)


def _upload_item(outcome: PartOutcome) -> UploadItem:
    return UploadItem(member=outcome.name, stored=outcome.stored, duplicate=outcome.duplicate, status=outcome.status,
                      reason=outcome.reason, sop_instance_uid=outcome.sop_instance_uid,
                      series_instance_uid=outcome.series_instance_uid, study_instance_uid=outcome.study_instance_uid)


@router.get("/jobs/{job_id}", summary="An analysis job",
            responses=problem_responses(404, notes={404: "No nodule job with this id for this tenant."}))
def get_analysis_job(job_id: str, principal: NodulePrincipal, session: SessionDep) -> AnalysisJob:
    """Status and progress of one of the tenant's series analyses."""
    job = get_job(session, job_id, tenant_id=principal.tenant_id)
    if not job.task_name.startswith("nodule."):
        raise NotFound(f"job {job_id} does not exist")
    return AnalysisJob(id=job.id, status=job.status, progress=job.progress, error=job.error)


@router.get("/studies", summary="List studies")
def list_studies(principal: NodulePrincipal, session: SessionDep,
                 limit: Annotated[int, Query(ge=1, le=500)] = 100,
                 offset: Offset = 0) -> list[StudySummary]:
    """The tenant's studies (newest first) with their analysis status and Lung-RADS category (as analysed)."""
    studies = analysis.list_studies(session, principal.tenant_id, limit=limit, offset=offset)
    categories = analysis.stored_lung_rads(session, principal.tenant_id, [s.study_instance_uid for s in studies])
    return [_summary(study, categories.get(study.study_instance_uid)) for study in studies]


@router.get("/studies/{study_instance_uid}", summary="A study's findings",
            responses=problem_responses(404, notes={404: "No study with this UID for this tenant."}))
def get_study(study_instance_uid: str, principal: NodulePrincipal, session: SessionDep) -> StudyDetail:
    """A study's status (received, analysing, done, failed with reason), its series with their errors,
    and its findings with measurements, malignancy probability, Lung-RADS category per nodule and for
    the study, and the comparison with the patient's prior study when there is one."""
    tenant_id = principal.tenant_id
    study = analysis.get_study(session, tenant_id, study_instance_uid)
    clinical = analysis.get_clinical_data(session, tenant_id, study_instance_uid)
    rows = analysis.study_findings(session, tenant_id, study_instance_uid)
    risks = [analysis.assess_finding(session, row) for row in rows]
    return StudyDetail(
        **_summary(study, highest_category(risk.lung_rads for risk in risks)).model_dump(),
        findings=[finding for row, risk in zip(rows, risks, strict=True) for finding in _findings(row, risk)],
        series=[_series_status(series) for series in analysis.study_series(session, tenant_id, study_instance_uid)],
        clinical=_clinical_in(clinical) if clinical else None,
        lung_rads_note=next((risk.lung_rads_note for risk in risks if risk.lung_rads_note), None),
        baseline=all(risk.baseline for risk in risks) if risks else None,
        prior_study_instance_uid=next((r.prior_study_instance_uid for r in risks if r.prior_study_instance_uid), None),
        interval_days=next((risk.interval_days for risk in risks if risk.interval_days is not None), None))


@router.get("/studies/{study_instance_uid}/results", summary="A study's result objects",
            responses=problem_responses(404, notes={404: "No study with this UID for this tenant."}))
def list_results(study_instance_uid: str, request: Request, principal: NodulePrincipal,
                 session: SessionDep) -> list[ResultObject]:
    """The SR, SEG and key images made for the study, each with its WADO-RS URL."""
    analysis.get_study(session, principal.tenant_id, study_instance_uid)
    base_url = mounted_base_url(request) + "/dicomweb"
    return [_result_object(row, base_url) for row in results.study_results(session, principal.tenant_id,
                                                                           study_instance_uid)]


@router.get("/studies/{study_instance_uid}/nodules/{label}/key-image.png", summary="A nodule's key image",
            response_class=Response, responses={200: {"description": "PNG", "content": {"image/png": {}}},
                                                **problem_responses(404)})
def get_key_image(study_instance_uid: str, label: int, principal: NodulePrincipal, session: SessionDep,
                  series: Annotated[str | None, Query(description="the analysed series, when several")] = None
                  ) -> Response:
    """The axial slice through the nodule in a lung window, its outline and size burned in (PNG)."""
    row, _nodule = results.find_nodule(session, principal.tenant_id, study_instance_uid, label, series)
    png = results.key_image(row, label, lambda: analysis.instance_paths(session, principal.tenant_id,
                                                                        row.series_instance_uid))
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=60",
                             "ETag": '"' + hashlib.sha256(png).hexdigest()[:32] + '"'})


@router.post("/studies/{study_instance_uid}/clinical", summary="Clinical data of a study",
             responses=problem_responses(404, 422, notes={404: "No study with this UID for this tenant."}))
def post_clinical_data(study_instance_uid: str, clinical: ClinicalDataIn, principal: NodulePrincipal,
                       session: SessionDep) -> ClinicalDataOut:
    """Store (replace) smoking history, family history and emphysema for a study's risk estimate."""
    stored = analysis.save_clinical_data(session, principal.tenant_id, study_instance_uid, clinical.model_dump())
    session.commit()
    return ClinicalDataOut(**_clinical_in(stored).model_dump(), study_instance_uid=study_instance_uid,
                           updated_at=stored.updated_at)


def _summary(study: Study, lung_rads: str | None = None) -> StudySummary:
    return StudySummary(study_instance_uid=study.study_instance_uid, status=StudyState(study.state),
                        failure_reason=study.failure_reason, lung_rads_category=lung_rads)


def _series_status(series: Series) -> SeriesStatus:
    return SeriesStatus(series_instance_uid=series.series_instance_uid, state=series.state,
                        instance_count=series.instance_count, last_instance_at=series.last_instance_at,
                        job_id=series.job_id, error_code=series.error_code, error_message=series.error_message)


def _findings(row: SeriesFinding, risk: SeriesRisk) -> list[NoduleFinding]:
    by_label = risk.by_label()
    return [_finding(row, nodule, by_label.get(int(nodule["label"]), NoduleRisk(label=int(nodule["label"]))))
            for nodule in row.nodules]


def _finding(row: SeriesFinding, nodule: dict[str, Any], risk: NoduleRisk) -> NoduleFinding:
    return NoduleFinding(
        series_instance_uid=row.series_instance_uid, label=nodule["label"],
        centre_lps_mm=tuple(nodule["centre_lps_mm"]), long_axis_mm=nodule["long_axis_mm"],
        short_axis_mm=nodule["short_axis_mm"], volume_mm3=nodule["volume_mm3"], mean_hu=nodule["mean_hu"],
        nodule_type=nodule["nodule_type"], solid_component_mm=nodule.get("solid_component_mm"),
        confidence=nodule["confidence"], upper_lobe=nodule.get("upper_lobe"),
        malignancy_probability=risk.malignancy_probability, brock_model=risk.brock_model,
        malignancy_note=risk.malignancy_note, lung_rads_category=risk.lung_rads,
        prior=PriorComparison(**asdict(risk.prior)) if risk.prior is not None else None)


def _result_object(row: Result, base_url: str) -> ResultObject:
    url = (f"{base_url}/studies/{row.study_instance_uid}/series/{row.series_instance_uid}"
           f"/instances/{row.sop_instance_uid}")
    return ResultObject(kind=row.kind, study_instance_uid=row.study_instance_uid,
                        series_instance_uid=row.series_instance_uid, sop_instance_uid=row.sop_instance_uid,
                        sop_class_uid=row.sop_class_uid, source_series_instance_uid=row.source_series_instance_uid,
                        retrieve_url=url)


def _clinical_in(clinical: ClinicalData) -> ClinicalDataIn:
    return ClinicalDataIn(pack_years=clinical.pack_years, current_smoker=clinical.current_smoker,
                          family_history_lung_cancer=clinical.family_history_lung_cancer,
                          emphysema=clinical.emphysema)


app = create_service_app("nodule", title="Tessera — CT nodule detection with DICOM fusion",
                         routers=[about, router, dicomweb])
