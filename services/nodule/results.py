"""The DICOM results of an analysis: built, stored, indexed, and queued for the PACS.

:func:`make_results` runs inside the analysis job's transaction, after the findings are saved: per
analysed volume it builds the SEG (when there are nodules), the SR and one key image per nodule
(:func:`services.nodule.report.build_results`, with the risk fusion's answer), writes them under
``<storage>/<tenant>/<study>/results/<source series>/`` (:func:`services.nodule.report.save_results`),
indexes them in ``nodule_results`` and, when a PACS destination is configured
(``TESSERA_NODULE_PACS_HOST``), submits the durable ``nodule.send_results`` job in the same
transaction (key ``nodule-send:{tenant}:{series}:{model version}``, 12 attempts). Without a
destination the results are still stored and served (WADO-RS, ``GET /v1/studies/{uid}/results``).

A failure to build results is logged and reported in the job's result; it does not undo the
findings, which are the analysis' main product.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from services.nodule import report
from services.nodule.db import KEY_IMAGE, SEG, SR, Instance, Result, SeriesFinding
from services.nodule.dicom_io import storage_root
from services.nodule.findings import DetectedNodule, SeriesFindings
from services.nodule.fusion import SeriesRisk
from services.nodule.pacs import load_destination
from services.nodule.risk import LungRadsCategory
from services.nodule.schemas import NoduleType
from services.nodule.volume import SeriesVolume, assemble_series
from shared.errors import NotFound
from shared.jobs import Job, submit_job

logger = logging.getLogger("tessera.nodule.results")

SEND_MAX_ATTEMPTS = 12
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
MAX_KEY_LENGTH = 200
Analysed = tuple[SeriesFindings, SeriesVolume, SeriesRisk]


def result_kind(sop_class_uid: str) -> str:
    """``seg``, ``key_image`` (Secondary Capture) or ``sr`` (any other class we write)."""
    if sop_class_uid == SEGMENTATION_STORAGE:
        return SEG
    return KEY_IMAGE if sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX) else SR


def report_risk(findings: SeriesFindings, risk: SeriesRisk) -> report.StudyRisk:
    """The fusion's answer in the shape the SR writer takes."""
    by_label = risk.by_label()
    nodules = {}
    for nodule in findings.nodules:
        known = by_label.get(nodule.label)
        if known is not None:
            nodules[nodule.label] = report.NoduleRisk(
                malignancy_probability=known.malignancy_probability, brock_model=known.brock_model,
                lung_rads=LungRadsCategory(known.lung_rads) if known.lung_rads else None)
    return report.StudyRisk(nodules=nodules, lung_rads=LungRadsCategory(risk.lung_rads) if risk.lung_rads else None)


def results_directory(tenant_id: str, study_uid: str, source_series_uid: str) -> Path:
    """Where the results of one analysed series are written."""
    return storage_root() / tenant_id / study_uid / "results" / source_series_uid


def send_key(tenant_id: str, series_uid: str, model_version: str) -> str:
    """The send job's idempotency key (the model version hashed if the key would pass 200 characters)."""
    key = f"nodule-send:{tenant_id}:{series_uid}:{model_version}"
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return f"nodule-send:{tenant_id}:{series_uid}:{hashlib.sha256(model_version.encode()).hexdigest()[:16]}"


def make_results(session: Session, job_id: str, tenant_id: str, analysed: Sequence[Analysed]) -> dict[str, Any]:
    """Build, store and index the results of each analysed volume; queue their sending.

    Each volume's results are indexed (and their send job submitted) in a savepoint: a volume whose
    results cannot be built leaves no rows behind, and the findings are kept.

    Returns
    -------
    dict
        For the job's result: ``results`` (objects per kind), ``send_job_ids``, and
        ``results_error`` when building failed.
    """
    counts = {SR: 0, SEG: 0, KEY_IMAGE: 0}
    send_jobs: list[str] = []
    sources = {findings.series_instance_uid for findings, _volume, _risk in analysed}
    session.execute(delete(Result).where(Result.tenant_id == tenant_id,
                                         Result.source_series_instance_uid.in_(sources)))
    for findings, volume, risk in analysed:
        try:
            with session.begin_nested():
                rows = _store_results(session, job_id, tenant_id, findings, volume, risk)
                job = _submit_send(session, tenant_id, findings, rows)
        except Exception as exc:
            logger.warning("results not built: %s", type(exc).__name__, extra={"job_id": job_id})
            return {"results": counts, "send_job_ids": send_jobs,
                    "results_error": f"results not built ({type(exc).__name__}); see the worker log for job {job_id}"}
        for row in rows:
            counts[row.kind] += 1
        if job is not None:
            send_jobs.append(job.id)
    return {"results": counts, "send_job_ids": send_jobs}


def _source_datasets(volume: SeriesVolume) -> list[Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in volume.source_paths if path]


def _store_results(session: Session, job_id: str, tenant_id: str, findings: SeriesFindings, volume: SeriesVolume,
                   risk: SeriesRisk) -> list[Result]:
    datasets = report.build_results(findings, volume, _source_datasets(volume), risk=report_risk(findings, risk))
    directory = results_directory(tenant_id, findings.study_instance_uid, findings.series_instance_uid)
    paths = report.save_results(datasets, directory)
    for nodule in findings.nodules:  # the JSON API's PNGs, made while the volume is at hand
        key_image_path(directory, nodule.label).write_bytes(report.key_image_png(findings, volume, nodule))
    root = storage_root()
    uids = [str(dataset.SOPInstanceUID) for dataset in datasets]
    session.execute(delete(Result).where(Result.tenant_id == tenant_id, Result.sop_instance_uid.in_(uids)))
    rows = [Result(tenant_id=tenant_id, study_instance_uid=findings.study_instance_uid,
                   series_instance_uid=str(dataset.SeriesInstanceUID),
                   source_series_instance_uid=findings.series_instance_uid,
                   sop_instance_uid=str(dataset.SOPInstanceUID), sop_class_uid=str(dataset.SOPClassUID),
                   kind=result_kind(str(dataset.SOPClassUID)), path=str(path.relative_to(root)), job_id=job_id)
            for dataset, path in zip(datasets, paths, strict=True)]
    session.add_all(rows)
    session.flush()
    return rows


def _submit_send(session: Session, tenant_id: str, findings: SeriesFindings, rows: Sequence[Result]) -> Job | None:
    """The durable send job, in the caller's transaction; None when no PACS is configured."""
    if load_destination() is None or not rows:
        return None
    from services.nodule.tasks import send_results_job

    return submit_job(session, send_results_job,
                      key=send_key(tenant_id, findings.series_instance_uid, findings.model_version),
                      payload={"paths": [row.path for row in rows], "study_instance_uid": findings.study_instance_uid,
                               "series_instance_uid": findings.series_instance_uid},
                      tenant_id=tenant_id, max_attempts=SEND_MAX_ATTEMPTS)


# --- reading (tenant-scoped) --------------------------------------------------------------------------


def study_results(session: Session, tenant_id: str, study_uid: str) -> list[Result]:
    """The result objects of one of the tenant's studies."""
    return list(session.scalars(select(Result).where(Result.tenant_id == tenant_id,
                                                     Result.study_instance_uid == study_uid)
                                .order_by(Result.source_series_instance_uid, Result.kind, Result.id)))


def instance_path(session: Session, tenant_id: str, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """The file of a received instance or of a result object of the tenant, or :class:`NotFound`."""
    received = session.scalar(select(Instance.path).where(
        Instance.tenant_id == tenant_id, Instance.sop_instance_uid == sop_uid,
        Instance.study_instance_uid == study_uid, Instance.series_instance_uid == series_uid))
    made = received or session.scalar(select(Result.path).where(
        Result.tenant_id == tenant_id, Result.sop_instance_uid == sop_uid,
        Result.study_instance_uid == study_uid, Result.series_instance_uid == series_uid))
    path = storage_root() / made if made else None
    if path is None or not path.is_file():
        raise NotFound(f"instance {sop_uid} of series {series_uid} in study {study_uid} does not exist")
    return path


def series_paths(session: Session, tenant_id: str, study_uid: str, series_uid: str) -> list[Path]:
    """The files of a received series or of one of our result series of the tenant, or :class:`NotFound`."""
    relative = session.scalars(select(Instance.path).where(
        Instance.tenant_id == tenant_id, Instance.study_instance_uid == study_uid,
        Instance.series_instance_uid == series_uid).order_by(Instance.id)).all()
    relative = relative or session.scalars(select(Result.path).where(
        Result.tenant_id == tenant_id, Result.study_instance_uid == study_uid,
        Result.series_instance_uid == series_uid).order_by(Result.id)).all()
    paths = [storage_root() / path for path in relative if (storage_root() / path).is_file()]
    if not paths:
        raise NotFound(f"series {series_uid} in study {study_uid} does not exist")
    return paths


def find_nodule(session: Session, tenant_id: str, study_uid: str, label: int,
                series_uid: str | None = None) -> tuple[SeriesFinding, dict[str, Any]]:
    """The analysed series and stored nodule with this label (in ``series_uid`` when given), or NotFound."""
    query = select(SeriesFinding).where(SeriesFinding.tenant_id == tenant_id,
                                        SeriesFinding.study_instance_uid == study_uid)
    if series_uid is not None:
        query = query.where(SeriesFinding.series_instance_uid == series_uid)
    for row in session.scalars(query.order_by(SeriesFinding.id)):
        for nodule in row.nodules:
            if int(nodule["label"]) == label:
                return row, nodule
    raise NotFound(f"no nodule {label} in study {study_uid}")


def stored_findings(row: SeriesFinding) -> SeriesFindings:
    """A findings row with its label volume, as the report writers take it."""
    if row.labels_path is None:
        raise NotFound("the label volume of this analysis is not stored")
    labels = np.load(storage_root() / row.labels_path)
    fields = {name for name in DetectedNodule.__dataclass_fields__}
    nodules = tuple(DetectedNodule(**{**{key: value for key, value in nodule.items() if key in fields},
                                      "centre_voxel": tuple(nodule["centre_voxel"]),
                                      "centre_lps_mm": tuple(nodule["centre_lps_mm"]),
                                      "nodule_type": NoduleType(nodule["nodule_type"])})
                    for nodule in row.nodules)
    return SeriesFindings(row.series_instance_uid, row.study_instance_uid, nodules, labels, row.model_version)


def key_image_path(directory: Path, label: int) -> Path:
    """Where the PNG key image of nodule ``label`` is kept among its series' results."""
    return directory / f"key-image-{label}.png"


def key_image(row: SeriesFinding, label: int, paths: Callable[[], Sequence[str]]) -> bytes:
    """PNG key image of one nodule: the one made with the results, else (results of an earlier
    version) its series re-assembled from ``paths()``, outline from the label volume."""
    made = key_image_path(results_directory(row.tenant_id, row.study_instance_uid, row.series_instance_uid), label)
    if made.is_file():
        return made.read_bytes()
    findings = stored_findings(row)
    volume = next((result for result in assemble_series(paths())
                   if isinstance(result, SeriesVolume) and result.stack_label[:64] == row.stack_label
                   and result.shape == findings.labels.shape), None)
    if volume is None:
        raise NotFound("the analysed series can no longer be assembled")
    nodule = next(n for n in findings.nodules if n.label == label)
    return report.key_image_png(findings, volume, nodule)
