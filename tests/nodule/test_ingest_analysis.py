"""Completeness and analysis: the quiet-period sweep submits exactly one durable job per series (and
one more only when the series grows), the index holds on SQLite and PostgreSQL alike, and a series
that cannot be assembled fails alone, with its reason on the series, the job and the study."""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from services.nodule import analysis, dicom_io
from services.nodule.db import Series, Study
from services.nodule.tasks import analyse_series_job
from shared.db import session_scope, utcnow
from shared.jobs import FAILED, Job
from tests.conftest import Stack
from tests.nodule.conftest import part10_bytes, small_series
from tests.nodule.dicom_factory import SeriesIdentity


def store(datasets: list[Dataset], tmp_path: Path, tenant_id: str) -> None:
    for dataset in datasets:
        stored = dicom_io.store_bytes(part10_bytes(dataset, tmp_path), tenant_id=tenant_id, source="stow-rs")
        assert not stored.duplicate


def sweep(quiet_period_s: float = 0.0, after_s: float = 1.0) -> list[Job]:
    """One sweep, as beat runs it, with the clock ``after_s`` ahead."""
    with session_scope() as session:
        jobs = analysis.queue_complete_series(session, analyse_series_job, now=utcnow() + timedelta(seconds=after_s),
                                              quiet_period_s=quiet_period_s)
        return [session.merge(job) for job in jobs]


def series_of(tenant_id: str, series_uid: str) -> Series:
    with session_scope() as session:
        series = session.get(Series, (tenant_id, series_uid))
        assert series is not None
        return series


def study_of(tenant_id: str, study_uid: str) -> Study:
    with session_scope() as session:
        study = session.get(Study, (tenant_id, study_uid))
        assert study is not None
        return study


def job_of(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_index_upserts_series_and_study_on_each_database(stack: Stack, tmp_path: Path) -> None:
    from services.cli import db_upgrade

    db_upgrade()
    identity = SeriesIdentity.new()
    datasets = small_series(slices=3, identity=identity)
    store(datasets, tmp_path, "idx")
    again = dicom_io.store_bytes(part10_bytes(datasets[0], tmp_path), tenant_id="idx", source="c-store")
    assert again.duplicate
    series = series_of("idx", identity.series_instance_uid)
    assert (series.instance_count, series.state) == (3, "receiving")
    assert series.study_instance_uid == identity.study_instance_uid
    study = study_of("idx", identity.study_instance_uid)
    assert (study.state, study.patient_sex, study.patient_age_years) == ("received", "F", 64.0)
    other_tenant = dicom_io.store_bytes(part10_bytes(datasets[0], tmp_path), tenant_id="idx-2", source="c-store")
    assert not other_tenant.duplicate  # a tenant wall: the same SOP instance is another tenant's own copy


def test_the_sweep_submits_one_job_per_quiet_series_and_never_twice(nodule_env: Stack, tmp_path: Path) -> None:
    first, second = SeriesIdentity.new(), SeriesIdentity.new()
    second = SeriesIdentity(first.study_instance_uid, second.series_instance_uid, first.frame_of_reference_uid,
                            series_number=2)
    store(small_series(slices=3, identity=first), tmp_path, "sweep")
    store(small_series(slices=3, identity=second), tmp_path, "sweep")

    assert sweep(quiet_period_s=60.0) == []  # not quiet long enough yet
    jobs = sweep()
    mine = {job.payload["series_instance_uid"]: job for job in jobs if job.tenant_id == "sweep"}
    assert set(mine) == {first.series_instance_uid, second.series_instance_uid}
    assert all(job.task_name == "nodule.analyse_series" and job.queue == "nodule" for job in mine.values())
    assert sweep() == []  # a second sweep adds nothing
    series = series_of("sweep", first.series_instance_uid)
    assert (series.state, series.job_id, series.analysed_count) == ("complete", mine[first.series_instance_uid].id, 3)
    assert study_of("sweep", first.study_instance_uid).state == "analysing"
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == "sweep")) == 2

    # The same job again (a second sweeper with the same key) is the same job, not a new one.
    with session_scope() as session:
        digest = analysis.sop_digest(session, "sweep", first.series_instance_uid)
        key = analysis.analysis_key("sweep", first.series_instance_uid, 3, digest)
    assert mine[first.series_instance_uid].idempotency_key == key

    # A late instance reopens the series: exactly one new job, with a new key.
    store(small_series(slices=1, identity=first), tmp_path, "sweep")
    assert series_of("sweep", first.series_instance_uid).state == "receiving"
    later = [job for job in sweep() if job.tenant_id == "sweep"]
    assert len(later) == 1 and later[0].idempotency_key != key
    assert later[0].payload["instance_count"] == 4
    assert sweep() == []


def run_job(job_id: str) -> None:
    """Run one analysis job in this process, through the platform's claim/lease/fencing path."""
    analyse_series_job.apply(args=[job_id])


def test_a_series_with_missing_slices_fails_alone_with_its_reason(nodule_env: Stack, tmp_path: Path) -> None:
    good = SeriesIdentity.new()
    gappy = SeriesIdentity(good.study_instance_uid, SeriesIdentity.new().series_instance_uid,
                           good.frame_of_reference_uid, series_number=2)
    store(small_series(slices=10, identity=good), tmp_path, "gaps")
    gappy_slices = small_series(slices=10, identity=gappy)
    store(gappy_slices[:4] + gappy_slices[6:], tmp_path, "gaps")  # two slices never arrived
    jobs = {job.payload["series_instance_uid"]: job for job in sweep() if job.tenant_id == "gaps"}

    run_job(jobs[gappy.series_instance_uid].id)
    failed = series_of("gaps", gappy.series_instance_uid)
    assert (failed.state, failed.error_code) == ("failed", "missing_slices")
    assert failed.error_message and "missing" in failed.error_message
    job = job_of(jobs[gappy.series_instance_uid].id)
    assert job.status == FAILED and job.error and job.error.startswith("SeriesNotAnalysable: ")
    assert "missing_slices" in job.error
    assert series_of("gaps", good.series_instance_uid).state == "complete"  # the other series is untouched
    assert study_of("gaps", good.study_instance_uid).state == "analysing"

    run_job(jobs[good.series_instance_uid].id)
    analysed = series_of("gaps", good.series_instance_uid)
    assert analysed.error_code != "missing_slices"
    if importlib.util.find_spec("services.nodule.detect") is None:
        assert (analysed.state, analysed.error_code) == ("failed", "detector_not_installed")
        assert job_of(jobs[good.series_instance_uid].id).error == "DetectorNotInstalled: detector not installed"
        study = study_of("gaps", good.study_instance_uid)
        assert study.state == "failed" and study.failure_reason
        assert "missing" in study.failure_reason and "detector not installed" in study.failure_reason
    else:  # the detector exists: the good series is analysed (or refused by it with a reason)
        assert analysed.state in ("done", "failed")
        assert analysed.state == "done" or analysed.error_code in ("detector_not_installed", "detection_refused")


def test_without_a_detector_module_the_job_fails_with_detector_not_installed(
        nodule_env: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import services.nodule

    monkeypatch.setitem(sys.modules, "services.nodule.detect", None)  # as in a build without detect.py
    monkeypatch.delattr(services.nodule, "detect", raising=False)
    identity = SeriesIdentity.new()
    store(small_series(slices=8, identity=identity), tmp_path, "nodetector")
    job = next(job for job in sweep() if job.tenant_id == "nodetector")
    run_job(job.id)
    assert job_of(job.id).error == "DetectorNotInstalled: detector not installed"
    series = series_of("nodetector", identity.series_instance_uid)
    assert (series.state, series.error_code, series.error_message) == ("failed", "detector_not_installed",
                                                                       "detector not installed")


def test_study_state_is_derived_from_its_series() -> None:
    assert analysis.study_state([("1", "receiving", None), ("2", "done", None)]) == ("received", None)
    assert analysis.study_state([("1", "analysing", None), ("2", "receiving", None)]) == ("analysing", None)
    assert analysis.study_state([("1", "failed", "tilt"), ("2", "done", None)]) == ("done", None)
    assert analysis.study_state([("1", "failed", "tilt"), ("2", "failed", None)]) == (
        "failed", "series 1: tilt; series 2: failed")


def test_a_detector_answer_is_stored_with_the_job_and_the_series_is_done(
        nodule_env: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The persistence path, with a stand-in for the detector's answer (the detector has its own tests)."""
    import numpy as np

    from services.nodule.db import SeriesFinding
    from services.nodule.findings import DetectedNodule, SeriesFindings
    from services.nodule.schemas import NoduleType

    def answer(volume, on_progress=None):  # type: ignore[no-untyped-def]
        nodule = DetectedNodule(label=1, centre_voxel=(4.0, 10.0, 12.0), centre_lps_mm=(-91.6, -93.0, -46.0),
                                long_axis_mm=6.5, short_axis_mm=5.0, volume_mm3=98.0, mean_hu=21.0,
                                nodule_type=NoduleType.SOLID, confidence=0.93)
        return SeriesFindings(volume.series_instance_uid, volume.study_instance_uid, (nodule,),
                              np.zeros(volume.shape, np.uint16), "stand-in 1")

    monkeypatch.setattr(analysis, "run_detector", answer)
    identity = SeriesIdentity.new()
    store(small_series(slices=8, identity=identity), tmp_path, "found")
    job = next(job for job in sweep() if job.tenant_id == "found")
    run_job(job.id)
    finished = job_of(job.id)
    assert (finished.status, finished.progress, finished.result) == (
        "succeeded", 1.0, {"series_instance_uid": identity.series_instance_uid, "volumes": 1, "nodules": 1,
                           "errors": [], "results": {"sr": 1, "seg": 1, "key_image": 1}, "send_job_ids": []})
    assert series_of("found", identity.series_instance_uid).state == "done"
    assert study_of("found", identity.study_instance_uid).state == "done"
    with session_scope() as session:
        row = session.scalars(select(SeriesFinding).where(SeriesFinding.tenant_id == "found")).one()
    assert row.job_id == job.id and row.model_version == "stand-in 1"
    assert row.nodules[0]["nodule_type"] == "solid" and row.nodules[0]["centre_lps_mm"] == [-91.6, -93.0, -46.0]
    assert row.labels_path and np.load(dicom_io.storage_root() / row.labels_path).shape == (8, 32, 32)
    # Risk at analysis time: a baseline solid nodule of mean diameter 5.8 mm is Lung-RADS 2 (< 6 mm);
    # Brock needs the clinical data, not posted here.
    assert row.risk is not None and row.risk["baseline"] is True
    assert row.risk["lung_rads"] == "2" and row.risk["nodules"][0]["lung_rads"] == "2"
    assert row.risk["nodules"][0]["malignancy_probability"] is None
    assert "family history" in row.risk["nodules"][0]["malignancy_note"]
