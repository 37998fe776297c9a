"""Tables of the nodule vertical (names prefixed ``nodule_``), every row owned by a tenant.

- :class:`Instance`: the index of stored DICOM instances (one file each); a SOP instance UID is
  stored once per tenant, a second copy is ignored.
- :class:`Series`: a series' receiving and analysis state, its instance count and the time of its
  last instance (the quiet period runs from it), its analysis job and error.
- :class:`Study`: a study's state (received, analysing, done, failed with a reason) and the header
  demographics the risk model needs.
- :class:`ClinicalData`: smoking and family history, emphysema, posted for a study.
- :class:`SeriesFinding`: the detector's nodules of one analysed series, with the risk computed
  when it was analysed.
- :class:`Result`: the DICOM objects made from an analysis (SR, SEG, key images), stored on disk.

The PatientID is kept (a prior study is found by it) but never logged.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import Boolean, Date, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, utcnow

UID_LENGTH = 64
"""DICOM UIDs are at most 64 characters (PS3.5 9.1)."""

RECEIVING, COMPLETE, ANALYSING, DONE, FAILED = "receiving", "complete", "analysing", "done", "failed"
SERIES_STATES = (RECEIVING, COMPLETE, ANALYSING, DONE, FAILED)
"""A series receives instances until it is quiet, is complete (its job queued), analysing, done or failed."""
RECEIVED = "received"
STUDY_STATES = (RECEIVED, ANALYSING, DONE, FAILED)
"""A study's state, derived from its series' (see :func:`services.nodule.analysis.study_state`)."""


class Instance(Base):
    """One stored DICOM instance: where its file is and what it is."""

    __tablename__ = "nodule_instances"
    __table_args__ = (
        Index("ix_nodule_instances_tenant_sop", "tenant_id", "sop_instance_uid", unique=True),
        Index("ix_nodule_instances_tenant_series", "tenant_id", "series_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None, doc="PatientID (never logged)")
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(Text, doc="relative to the nodule storage directory")
    size_bytes: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16), doc="c-store, stow-rs or upload")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Series(Base):
    """A series of a study: receiving, then analysed once quiet."""

    __tablename__ = "nodule_series"
    __table_args__ = (
        Index("ix_nodule_series_tenant_study", "tenant_id", "study_instance_uid"),
        Index("ix_nodule_series_state_last", "state", "last_instance_at"),
    )

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    modality: Mapped[str | None] = mapped_column(String(16), default=None)
    state: Mapped[str] = mapped_column(String(16), default=RECEIVING)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_instance_at: Mapped[datetime] = mapped_column(default=utcnow)
    job_id: Mapped[str | None] = mapped_column(String(32), default=None, doc="its latest analysis job")
    analysed_count: Mapped[int | None] = mapped_column(Integer, default=None,
                                                       doc="instances the latest job analyses")
    error_code: Mapped[str | None] = mapped_column(String(32), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Study(Base):
    """A study: its state and the demographics of its header (for risk fusion)."""

    __tablename__ = "nodule_studies"
    __table_args__ = (Index("ix_nodule_studies_tenant_created", "tenant_id", "created_at"),)

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None, doc="PatientID (never logged)")
    patient_age_years: Mapped[float | None] = mapped_column(Float, default=None)
    patient_sex: Mapped[str | None] = mapped_column(String(1), default=None)
    study_date: Mapped[date | None] = mapped_column(Date, default=None,
                                                    doc="StudyDate of the header, read when a series is analysed "
                                                        "(orders a patient's studies for prior comparison)")
    state: Mapped[str] = mapped_column(String(16), default=RECEIVED)
    failure_reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ClinicalData(Base):
    """What the referring side knows of the patient, posted for a study (Brock model inputs)."""

    __tablename__ = "nodule_clinical_data"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True)
    pack_years: Mapped[float | None] = mapped_column(Float, default=None)
    current_smoker: Mapped[bool | None] = mapped_column(Boolean, default=None)
    family_history_lung_cancer: Mapped[bool | None] = mapped_column(Boolean, default=None)
    emphysema: Mapped[bool | None] = mapped_column(Boolean, default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SeriesFinding(Base):
    """The detector's answer for one analysed series (or one stack of it)."""

    __tablename__ = "nodule_series_findings"
    __table_args__ = (Index("ix_nodule_findings_tenant_study", "tenant_id", "study_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    stack_label: Mapped[str] = mapped_column(String(64), default="")
    job_id: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(64))
    nodules: Mapped[list[dict[str, Any]]] = mapped_column(default=list)
    labels_path: Mapped[str | None] = mapped_column(Text, default=None,
                                                    doc="the label volume (.npy, uint16, z/y/x), relative "
                                                        "to the nodule storage directory")
    risk: Mapped[dict[str, Any] | None] = mapped_column(default=None,
                                                        doc="risk fusion at analysis time "
                                                            "(services.nodule.fusion.SeriesRisk as JSON)")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


SR, SEG, KEY_IMAGE = "sr", "seg", "key_image"
RESULT_KINDS = (SR, SEG, KEY_IMAGE)


class Result(Base):
    """One DICOM object made from an analysis (SR, SEG or key image), stored as a file."""

    __tablename__ = "nodule_results"
    __table_args__ = (
        Index("ix_nodule_results_tenant_sop", "tenant_id", "sop_instance_uid", unique=True),
        Index("ix_nodule_results_tenant_study", "tenant_id", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), doc="the result's own series")
    source_series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), doc="the analysed CT series")
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    kind: Mapped[str] = mapped_column(String(16), doc="sr, seg or key_image")
    path: Mapped[str] = mapped_column(Text, doc="relative to the nodule storage directory")
    job_id: Mapped[str] = mapped_column(String(32), doc="the analysis job that made it")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
