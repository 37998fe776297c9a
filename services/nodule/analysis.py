"""From a complete series to findings: the quiet-period sweep, the analysis job, study states.

1. :func:`queue_complete_series` (a periodic sweep) finds series that received nothing for
   ``TESSERA_NODULE_QUIET_PERIOD_S``, marks each complete and submits one durable job per series
   (:mod:`shared.jobs`) keyed by tenant, series, instance count and a digest of its SOP instance
   UIDs: a second sweep, a second sweeper or a re-delivered message finds the same key and adds
   nothing; a series that receives more instances later gets a new key, hence one new job.
2. :func:`analyse_series` (the job's handler) assembles the series' volume(s) with
   :func:`services.nodule.volume.assemble_series`, records progress, and runs the detector on each
   volume (:func:`run_detector`). What cannot be assembled is recorded on the series (code and
   message, visible in the API) and fails the job with that reason; the study's other series are
   untouched. With the findings it stores the risk (:mod:`services.nodule.fusion`: Brock, Lung-RADS,
   the comparison with the patient's prior study) and makes the DICOM results
   (:func:`services.nodule.results.make_results`: SR, SEG, key images, and the send job when a PACS
   is configured), all in the job's transaction.
3. :func:`refresh_study_state` derives a study's state from its series'.
4. :func:`assess_finding` recomputes a series' risk with what is known now (the API calls it on
   read, so clinical data posted after the analysis counts).

Failure states are written in their own committed transaction (the job's own transaction rolls
back when the handler raises); the findings and the ``done`` state commit with the job's success.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
from celery import Task
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from services.nodule.db import (
    ANALYSING,
    COMPLETE,
    DONE,
    FAILED,
    RECEIVED,
    RECEIVING,
    ClinicalData,
    Instance,
    Series,
    SeriesFinding,
    Study,
)
from services.nodule.dicom_io import storage_root
from services.nodule.findings import SeriesFindings
from services.nodule.fusion import (
    PatientContext,
    PriorSeries,
    SeriesRisk,
    assess_series,
    highest_category,
    in_upper_lobe,
    lung_z_extent,
)
from services.nodule.results import make_results
from services.nodule.volume import SeriesError, SeriesVolume, assemble_series
from shared.config import get_settings
from shared.db import session_scope, utcnow
from shared.errors import NotFound
from shared.jobs import Job, PublicJobError, submit_job

logger = logging.getLogger("tessera.nodule.analysis")

SWEEP_LIMIT = 200
"""Series completed per sweep at most (the next sweep takes the rest)."""
DETECTOR_NOT_INSTALLED = "detector not installed"
ProgressCallback = Callable[[float], None]


class SeriesNotAnalysable(PublicJobError):
    """The series could not be assembled into a volume (the reason names no patient data)."""


class DetectorNotInstalled(PublicJobError):
    """No detector (module or trained model) in this build: the series is assembled but not analysed."""


class DetectionRefusedError(SeriesNotAnalysable):
    """The detector cannot analyse this series (too few slices, not axial): its reason."""


# --- the quiet-period sweep ---------------------------------------------------------------------------


def queue_complete_series(session: Session, task: Task, *, now: datetime | None = None,
                          quiet_period_s: float | None = None) -> list[Job]:
    """Mark every series quiet for ``quiet_period_s`` complete and submit its analysis job.

    Parameters
    ----------
    session:
        The caller's transaction: the series updates and the jobs commit together, and each job's
        message is sent after that commit.
    task:
        The job task that analyses a series.
    now, quiet_period_s:
        The clock and the quiet period (defaults: now, ``TESSERA_NODULE_QUIET_PERIOD_S``).

    Returns
    -------
    list[Job]
        The jobs submitted by this sweep (an already known key is not counted).
    """
    now = now or utcnow()
    quiet = timedelta(seconds=get_settings().nodule_quiet_period_s if quiet_period_s is None else quiet_period_s)
    quiet_series = session.scalars(select(Series).where(Series.state == RECEIVING,
                                                        Series.last_instance_at <= now - quiet)
                                   .order_by(Series.last_instance_at).limit(SWEEP_LIMIT)).all()
    submitted = []
    for series in quiet_series:
        job = _complete_and_submit(session, task, series)
        if job is not None:
            submitted.append(job)
    return submitted


def _complete_and_submit(session: Session, task: Task, series: Series) -> Job | None:
    """Compare-and-set the series complete (no instance arrived meanwhile), then submit its job."""
    count, last = series.instance_count, series.last_instance_at
    completed = session.execute(
        update(Series).where(Series.tenant_id == series.tenant_id,
                             Series.series_instance_uid == series.series_instance_uid,
                             Series.state == RECEIVING, Series.instance_count == count,
                             Series.last_instance_at == last)
        .values(state=COMPLETE, analysed_count=count, error_code=None, error_message=None)
        .execution_options(synchronize_session=False))
    if getattr(completed, "rowcount", 0) != 1:
        return None
    key = analysis_key(series.tenant_id, series.series_instance_uid, count,
                       sop_digest(session, series.tenant_id, series.series_instance_uid))
    payload = {"series_instance_uid": series.series_instance_uid, "study_instance_uid": series.study_instance_uid,
               "instance_count": count}
    job = submit_job(session, task, key=key, payload=payload, tenant_id=series.tenant_id, max_attempts=3)
    session.execute(update(Series).where(Series.tenant_id == series.tenant_id,
                                         Series.series_instance_uid == series.series_instance_uid)
                    .values(job_id=job.id).execution_options(synchronize_session=False))
    refresh_study_state(session, series.tenant_id, series.study_instance_uid)
    logger.info("series complete: analysis queued", extra={"job_id": job.id, "instances": count})
    return job


def sop_digest(session: Session, tenant_id: str, series_instance_uid: str) -> str:
    """A short digest of the series' SOP instance UIDs (sorted): which instances a job analyses."""
    uids = session.scalars(select(Instance.sop_instance_uid).where(
        Instance.tenant_id == tenant_id, Instance.series_instance_uid == series_instance_uid)
        .order_by(Instance.sop_instance_uid)).all()
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]


def analysis_key(tenant_id: str, series_instance_uid: str, instance_count: int, digest: str) -> str:
    """The idempotency key of one analysis of one state of a series (at most 200 characters)."""
    return f"nodule.analyse/{tenant_id}/{series_instance_uid}/{instance_count}/{digest}"


# --- the analysis job ---------------------------------------------------------------------------------


def analyse_series(session: Session, job_id: str, tenant_id: str, payload: dict[str, Any],
                   on_progress: ProgressCallback) -> dict[str, Any]:
    """Assemble and analyse one complete series (the body of the ``nodule.analyse_series`` job).

    Parameters
    ----------
    session:
        The job's transaction: findings and the ``done`` state commit with the job's success.
    job_id, tenant_id, payload:
        The job, its tenant, and its payload (series and study UIDs, instance count).
    on_progress:
        Called with the fraction done (0..1); it also renews the job's lease.

    Returns
    -------
    dict
        The job's result: volumes assembled, nodules found, errors of parts of the series.

    Raises
    ------
    SeriesNotAnalysable
        Nothing of the series could be assembled (the reason is recorded on the series).
    DetectorNotInstalled
        This build has no detector (recorded on the series as well).
    """
    series_uid, study_uid = payload["series_instance_uid"], payload["study_instance_uid"]
    _set_state_now(tenant_id, series_uid, study_uid, ANALYSING)
    paths = instance_paths(session, tenant_id, series_uid)
    on_progress(0.05)
    results = assemble_series(paths)
    volumes = [result for result in results if isinstance(result, SeriesVolume)]
    errors = [result for result in results if isinstance(result, SeriesError)]
    on_progress(0.3)
    try:
        if not volumes:
            raise SeriesNotAnalysable(describe_errors(errors) or "no instance of the series could be read")
        findings = [run_detector(volume, on_progress if len(volumes) == 1 else None) for volume in volumes]
    except (SeriesNotAnalysable, DetectorNotInstalled) as exc:
        code = errors[0].code.value if errors and not volumes else _error_code(exc)
        _record_failure_now(tenant_id, series_uid, study_uid, code, str(exc))
        raise
    except Exception:
        # The job records the exception for operators; the series must not stay "analysing" forever.
        _record_failure_now(tenant_id, series_uid, study_uid, "internal_error",
                            f"internal error; see the worker log for job {job_id}")
        raise
    on_progress(0.9)
    _record_study_date(session, tenant_id, study_uid, volumes[0])
    rows = _save_findings(session, job_id, tenant_id, study_uid, findings, volumes)
    risks = [_assess_and_store(session, row) for row in rows]
    _finish_series(session, tenant_id, series_uid, study_uid, errors)
    outcome = {"series_instance_uid": series_uid, "volumes": len(volumes),
               "nodules": sum(len(found.nodules) for found in findings),
               "errors": [{"code": error.code.value, "message": error.message} for error in errors]}
    return outcome | make_results(session, job_id, tenant_id, list(zip(findings, volumes, risks, strict=True)))


def run_detector(volume: SeriesVolume, on_progress: ProgressCallback | None = None) -> SeriesFindings:
    """Detect nodules in one assembled volume with :func:`services.nodule.detect.detect_series`.

    The student network is loaded into this process's runtime on first use. The detector's
    coroutine runs on this process's detector event loop (:func:`detector_loop`: a Celery worker
    has none of its own), so the runtime's batcher and the sliding-window inferer keep one loop
    from job to job.

    Raises
    ------
    DetectorNotInstalled
        When this build has no ``services.nodule.detect`` module, or no trained nodule model to
        load: no finding is ever made up.
    SeriesNotAnalysable
        When the detector refuses the series (too few slices, not axial), with its reason.
    """
    detect = _detector_module()
    try:
        return asyncio.run_coroutine_threadsafe(_detect(detect, volume, on_progress), detector_loop()).result()
    except detect.DetectionRefused as refused:
        raise DetectionRefusedError(refused.reason) from None


_LOOP: tuple[int, asyncio.AbstractEventLoop] | None = None
_LOOP_LOCK = threading.Lock()


def detector_loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for the detector, running in a daemon thread (started on first use;
    a forked child starts its own)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP[0] != os.getpid() or _LOOP[1].is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="nodule-detector-loop", daemon=True).start()
            _LOOP = (os.getpid(), loop)
        return _LOOP[1]


def close_detector() -> None:
    """Unload the detector from this process's runtime and stop its event loop (a worker shutting
    down, or a test leaving the process as it found it); the next analysis starts both again."""
    global _LOOP
    with _LOOP_LOCK:
        held, _LOOP = _LOOP, None
    if held is None or held[0] != os.getpid() or held[1].is_closed():
        return
    loop = held[1]

    async def unload() -> None:
        from model_runtime import get_runtime
        from services.nodule.model import STUDENT_NAME

        runtime = get_runtime()
        if STUDENT_NAME in runtime.loaded():
            await runtime.unload(STUDENT_NAME)

    asyncio.run_coroutine_threadsafe(unload(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)


def _detector_module() -> Any:
    try:
        from services.nodule import detect  # type: ignore[attr-defined,unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name not in ("services.nodule.detect", "services.nodule"):
            raise
        raise DetectorNotInstalled(DETECTOR_NOT_INSTALLED) from None
    return detect


async def _detect(detect: Any, volume: SeriesVolume, on_progress: ProgressCallback | None) -> SeriesFindings:
    from model_runtime.runtime import get_runtime
    from services.nodule.model import STUDENT_NAME

    runtime = get_runtime()
    if STUDENT_NAME not in runtime.loaded():
        try:
            await detect.load_detector(runtime)
        except FileNotFoundError:
            raise DetectorNotInstalled(f"{DETECTOR_NOT_INSTALLED}: no trained nodule model "
                                       "(`tessera train nodule` builds one)") from None
    patches = None if on_progress is None else _patch_progress(on_progress)
    found = await detect.detect_series(volume, runtime=runtime, on_progress=patches)
    if not isinstance(found, SeriesFindings):
        raise TypeError(f"detect_series returned {type(found).__name__}, not SeriesFindings")
    return found


def _patch_progress(on_progress: ProgressCallback) -> Callable[[int, int], None]:
    """The detector reports (patches done, total); the job's progress runs from 0.3 to 0.9 meanwhile."""
    def report(done: int, total: int) -> None:
        on_progress(0.3 + 0.6 * done / max(total, 1))
    return report


def instance_paths(session: Session, tenant_id: str, series_instance_uid: str) -> list[str]:
    """The stored files of a series (absolute paths)."""
    root = storage_root()
    relative = session.scalars(select(Instance.path).where(
        Instance.tenant_id == tenant_id, Instance.series_instance_uid == series_instance_uid)
        .order_by(Instance.id)).all()
    return [str(root / path) for path in relative]


def describe_errors(errors: Sequence[SeriesError]) -> str:
    """One line per error: ``code: message`` (stack label first when the series was split)."""
    return "; ".join(f"{error.stack_label + ': ' if error.stack_label else ''}{error.code.value}: {error.message}"
                     for error in errors)


def _error_code(exc: Exception) -> str:
    if isinstance(exc, DetectorNotInstalled):
        return "detector_not_installed"
    return "detection_refused" if isinstance(exc, DetectionRefusedError) else "not_analysable"


def _set_state_now(tenant_id: str, series_uid: str, study_uid: str, state: str) -> None:
    """Show a state at once (own transaction), e.g. ``analysing`` while the job runs."""
    with session_scope() as session:
        session.execute(update(Series).where(Series.tenant_id == tenant_id,
                                             Series.series_instance_uid == series_uid,
                                             Series.state.in_((COMPLETE, ANALYSING, FAILED, DONE)))
                        .values(state=state).execution_options(synchronize_session=False))
        refresh_study_state(session, tenant_id, study_uid)


def _record_failure_now(tenant_id: str, series_uid: str, study_uid: str, code: str, message: str) -> None:
    """Record why a series failed, in its own transaction (the job's rolls back)."""
    with session_scope() as session:
        session.execute(update(Series).where(Series.tenant_id == tenant_id, Series.series_instance_uid == series_uid,
                                             Series.state == ANALYSING)
                        .values(state=FAILED, error_code=code[:32], error_message=message)
                        .execution_options(synchronize_session=False))
        refresh_study_state(session, tenant_id, study_uid)


def _finish_series(session: Session, tenant_id: str, series_uid: str, study_uid: str,
                   errors: Sequence[SeriesError]) -> None:
    """Done, keeping what could not be used of it as its error (unless new instances came meanwhile)."""
    session.execute(update(Series).where(Series.tenant_id == tenant_id, Series.series_instance_uid == series_uid,
                                         Series.state == ANALYSING)
                    .values(state=DONE, error_code=errors[0].code.value if errors else None,
                            error_message=describe_errors(errors) or None)
                    .execution_options(synchronize_session=False))
    refresh_study_state(session, tenant_id, study_uid)


def _save_findings(session: Session, job_id: str, tenant_id: str, study_uid: str,
                   findings: Sequence[SeriesFindings], volumes: Sequence[SeriesVolume]) -> list[SeriesFinding]:
    """Replace the series' earlier findings (an analysis of fewer instances) with these; each nodule
    row also says whether it lies in an upper lobe (:func:`services.nodule.fusion.in_upper_lobe`)."""
    for series_uid in {found.series_instance_uid for found in findings}:
        session.execute(delete(SeriesFinding).where(SeriesFinding.tenant_id == tenant_id,
                                                    SeriesFinding.series_instance_uid == series_uid))
    rows = []
    for index, (found, volume) in enumerate(zip(findings, volumes, strict=True)):
        extent = lung_z_extent(volume)
        row = SeriesFinding(
            tenant_id=tenant_id, study_instance_uid=study_uid, series_instance_uid=found.series_instance_uid,
            stack_label=volume.stack_label[:64], job_id=job_id, model_version=found.model_version[:64],
            nodules=[{**_nodule_row(asdict(nodule)), "upper_lobe": in_upper_lobe(nodule.centre_lps_mm[2], extent)}
                     for nodule in found.nodules],
            labels_path=_save_labels(found, tenant_id, study_uid, f"labels-{job_id}-{index}.npy"))
        session.add(row)
        rows.append(row)
    session.flush()
    return rows


def _save_labels(found: SeriesFindings, tenant_id: str, study_uid: str, name: str) -> str:
    """Write the label volume beside the series' instances (temp + rename); its relative path."""
    relative = f"{tenant_id}/{study_uid}/{found.series_instance_uid}/{name}"
    final = storage_root() / relative
    partial = final.with_suffix(".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("wb") as handle:
        np.save(handle, np.asarray(found.labels, dtype=np.uint16))
    os.replace(partial, final)
    return relative


def _nodule_row(nodule: dict[str, Any]) -> dict[str, Any]:
    """A DetectedNodule as JSON (enums as their values, tuples as lists)."""
    return {key: (value.value if hasattr(value, "value") else list(value) if isinstance(value, tuple) else value)
            for key, value in nodule.items()}


# --- risk fusion -------------------------------------------------------------------------------------


def _record_study_date(session: Session, tenant_id: str, study_uid: str, volume: SeriesVolume) -> None:
    """Keep the study's StudyDate (from its first analysed file) to order the patient's studies."""
    study = session.get(Study, (tenant_id, study_uid))
    path = next((path for path in volume.source_paths if path), None)
    if study is None or study.study_date is not None or path is None:
        return
    study.study_date = read_study_date(path)


def read_study_date(path: str) -> date | None:
    """StudyDate (DA, ``YYYYMMDD``) of a stored instance, or None when absent or malformed."""
    try:
        value = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate"]).get("StudyDate", ""))
        return datetime.strptime(value.strip()[:8], "%Y%m%d").date() if value.strip() else None
    except (ValueError, OSError, pydicom.errors.InvalidDicomError):
        return None


def patient_context(session: Session, tenant_id: str, study_uid: str) -> PatientContext:
    """Age and sex from the study's header, family history and emphysema from its clinical data."""
    study = session.get(Study, (tenant_id, study_uid))
    clinical = session.get(ClinicalData, (tenant_id, study_uid))
    return PatientContext(age_years=study.patient_age_years if study else None,
                          sex=study.patient_sex if study else None,
                          family_history_lung_cancer=clinical.family_history_lung_cancer if clinical else None,
                          emphysema=clinical.emphysema if clinical else None)


def prior_series(session: Session, tenant_id: str, study_uid: str) -> PriorSeries | None:
    """The patient's most recent earlier analysed study (same tenant and PatientID, earlier StudyDate):
    its first analysed series' nodules. None for a baseline (no PatientID, no date, no earlier study)."""
    study = session.get(Study, (tenant_id, study_uid))
    if study is None or not study.patient_id or study.study_date is None:
        return None
    earlier = session.scalars(select(Study).where(Study.tenant_id == tenant_id, Study.patient_id == study.patient_id,
                                                  Study.study_date < study.study_date)
                              .order_by(Study.study_date.desc())).all()
    for candidate in earlier:
        row = session.scalars(select(SeriesFinding).where(
            SeriesFinding.tenant_id == tenant_id, SeriesFinding.study_instance_uid == candidate.study_instance_uid)
            .order_by(SeriesFinding.id).limit(1)).first()
        if row is not None and candidate.study_date is not None:
            return PriorSeries(study_instance_uid=candidate.study_instance_uid,
                               interval_days=float((study.study_date - candidate.study_date).days), nodules=row.nodules)
    return None


def assess_finding(session: Session, row: SeriesFinding) -> SeriesRisk:
    """Risk of one analysed series with what is known now (clinical data posted later counts)."""
    return assess_series(row.nodules, patient_context(session, row.tenant_id, row.study_instance_uid),
                         prior_series(session, row.tenant_id, row.study_instance_uid))


def _assess_and_store(session: Session, row: SeriesFinding) -> SeriesRisk:
    risk = assess_finding(session, row)
    row.risk = risk.as_json()
    return risk


# --- study state ------------------------------------------------------------------------------------


def study_state(series_states: Sequence[tuple[str, str, str | None]]) -> tuple[str, str | None]:
    """A study's (state, failure reason) from its series' (uid, state, error message).

    Analysing while any series is queued or analysed; received while any still receives; done when
    at least one series is done (failed ones keep their errors); failed, with every series' reason,
    when all failed.
    """
    states = {state for _uid, state, _error in series_states}
    if states & {COMPLETE, ANALYSING}:
        return ANALYSING, None
    if RECEIVING in states or not states:
        return RECEIVED, None
    if DONE in states:
        return DONE, None
    reasons = "; ".join(f"series {uid}: {error or 'failed'}" for uid, state, error in series_states if state == FAILED)
    return FAILED, reasons


def refresh_study_state(session: Session, tenant_id: str, study_instance_uid: str) -> None:
    """Recompute and store a study's state from its series."""
    rows = session.execute(select(Series.series_instance_uid, Series.state, Series.error_message).where(
        Series.tenant_id == tenant_id, Series.study_instance_uid == study_instance_uid)).all()
    state, reason = study_state([(row[0], row[1], row[2]) for row in rows])
    session.execute(update(Study).where(Study.tenant_id == tenant_id, Study.study_instance_uid == study_instance_uid)
                    .values(state=state, failure_reason=reason).execution_options(synchronize_session=False))


# --- reading studies (tenant-scoped) -------------------------------------------------------------------


def list_studies(session: Session, tenant_id: str, *, limit: int = 100, offset: int = 0) -> list[Study]:
    """The tenant's studies, newest first."""
    return list(session.scalars(select(Study).where(Study.tenant_id == tenant_id)
                                .order_by(Study.created_at.desc(), Study.study_instance_uid)
                                .limit(limit).offset(offset)))


def get_study(session: Session, tenant_id: str, study_instance_uid: str) -> Study:
    """The tenant's study, or :class:`NotFound` (also for another tenant's)."""
    study = session.get(Study, (tenant_id, study_instance_uid))
    if study is None:
        raise NotFound(f"study {study_instance_uid} does not exist")
    return study


def study_series(session: Session, tenant_id: str, study_instance_uid: str) -> list[Series]:
    """A study's series, oldest first."""
    return list(session.scalars(select(Series).where(Series.tenant_id == tenant_id,
                                                     Series.study_instance_uid == study_instance_uid)
                                .order_by(Series.created_at, Series.series_instance_uid)))


def study_findings(session: Session, tenant_id: str, study_instance_uid: str) -> list[SeriesFinding]:
    """The detector's answers for the study's series (none until a detector ran)."""
    return list(session.scalars(select(SeriesFinding).where(SeriesFinding.tenant_id == tenant_id,
                                                            SeriesFinding.study_instance_uid == study_instance_uid)
                                .order_by(SeriesFinding.id)))


def save_clinical_data(session: Session, tenant_id: str, study_instance_uid: str,
                       values: dict[str, Any]) -> ClinicalData:
    """Store (replace) the clinical data of one of the tenant's studies (404 for an unknown study)."""
    get_study(session, tenant_id, study_instance_uid)
    clinical = session.get(ClinicalData, (tenant_id, study_instance_uid))
    if clinical is None:
        clinical = ClinicalData(tenant_id=tenant_id, study_instance_uid=study_instance_uid)
        session.add(clinical)
    for key, value in values.items():
        setattr(clinical, key, value)
    session.flush()
    return clinical


def get_clinical_data(session: Session, tenant_id: str, study_instance_uid: str) -> ClinicalData | None:
    """The clinical data posted for a study, if any."""
    return session.get(ClinicalData, (tenant_id, study_instance_uid))



def stored_lung_rads(session: Session, tenant_id: str, study_uids: Sequence[str]) -> dict[str, str | None]:
    """Each study's Lung-RADS category as computed at analysis time (the most suspicious series')."""
    by_study: dict[str, list[str | None]] = {}
    rows = session.execute(select(SeriesFinding.study_instance_uid, SeriesFinding.risk).where(
        SeriesFinding.tenant_id == tenant_id, SeriesFinding.study_instance_uid.in_(list(study_uids)))).all()
    for study_uid, risk in rows:
        by_study.setdefault(study_uid, []).append((risk or {}).get("lung_rads"))
    return {study_uid: highest_category(categories) for study_uid, categories in by_study.items()}
