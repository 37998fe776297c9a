"""The public contract of the nodule API: study status and findings with risk, series states,
clinical data, uploads, analysis jobs and result objects. DICOMweb (STOW-RS, WADO-RS) bodies and
answers are DICOM's own (PS3.18), not models here.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class StudyState(StrEnum):
    """Where a study is: instances received, analysis running, findings done, or failed (with a reason)."""

    RECEIVED = "received"
    ANALYSING = "analysing"
    DONE = "done"
    FAILED = "failed"


class NoduleType(StrEnum):
    """Attenuation class of a nodule, as Lung-RADS and the Brock model use it."""

    SOLID = "solid"
    PART_SOLID = "part-solid"
    GROUND_GLASS = "ground-glass"


class NoduleFinding(BaseModel):
    """One detected nodule with its measurements and risk (provisional)."""

    centre_lps_mm: tuple[float, float, float] = Field(description="centre in patient coordinates (DICOM LPS), mm")
    long_axis_mm: float = Field(ge=0, description="long-axis diameter, mm")
    short_axis_mm: float = Field(ge=0, description="short-axis diameter, mm")
    volume_mm3: float = Field(ge=0, description="volume, mm³")
    mean_hu: float = Field(description="mean attenuation, Hounsfield units")
    nodule_type: NoduleType
    confidence: float = Field(ge=0, le=1, description="detector confidence")
    malignancy_probability: float | None = Field(default=None, ge=0, le=1,
                                                 description="Brock (PanCan) model, when the inputs are known")


class StudySummary(BaseModel):
    """A study's analysis status (provisional)."""

    study_instance_uid: str
    status: StudyState
    failure_reason: str | None = Field(default=None, description="why the analysis failed (status failed)")
    lung_rads_category: str | None = Field(default=None, description="Lung-RADS v2022 category, e.g. 4A")


class StudyFindings(StudySummary):
    """A study's status and its findings (provisional)."""

    findings: list[NoduleFinding] = Field(default_factory=list)


class AnalysisJob(BaseModel):
    """A series analysis as a durable job (provisional)."""

    id: str
    status: str = Field(description="the platform job status (shared.jobs)")
    progress: float = Field(ge=0, le=1)
    error: str | None = None


class SeriesStatus(BaseModel):
    """One series of a study: its receiving/analysis state and, if it failed, why."""

    series_instance_uid: str
    state: str = Field(description="receiving, complete (analysis queued), analysing, done or failed")
    instance_count: int
    last_instance_at: datetime
    job_id: str | None = Field(default=None, description="its latest analysis job (GET /v1/jobs/{id})")
    error_code: str | None = Field(default=None, description="e.g. missing_slices, gantry_tilt, not_ct")
    error_message: str | None = None


class ClinicalDataIn(BaseModel):
    """What the referring side knows of the patient (inputs of the Brock model); unknown stays null."""

    model_config = ConfigDict(extra="forbid")

    pack_years: float | None = Field(default=None, ge=0, le=300, description="smoking history, pack-years")
    current_smoker: bool | None = None
    family_history_lung_cancer: bool | None = None
    emphysema: bool | None = None


class ClinicalDataOut(ClinicalDataIn):
    """Clinical data stored for a study."""

    study_instance_uid: str
    updated_at: datetime


class StudyDetail(StudyFindings):
    """A study's status, its series with their states and errors, findings, and clinical data."""

    series: list[SeriesStatus] = Field(default_factory=list)
    clinical: ClinicalDataIn | None = None


class UploadItem(BaseModel):
    """One member of an uploaded zip: stored (status 0) or not, with the DICOM failure status and why."""

    member: str
    stored: bool
    duplicate: bool = Field(default=False, description="already held: nothing new was stored")
    status: int = Field(description="0 stored, else a DICOM failure status (0xA700, 0xA900, 0xC000, 0x0122...)")
    reason: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None


class UploadResult(BaseModel):
    """What an upload stored and what it did not."""

    stored: int
    failed: int
    items: list[UploadItem]
