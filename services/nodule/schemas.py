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


class PriorComparison(BaseModel):
    """How a nodule compares with the patient's prior study."""

    matched: bool = Field(description="false: a new nodule (no counterpart in the prior)")
    prior_label: int | None = Field(default=None, description="its label in the prior study's findings")
    distance_mm: float | None = Field(default=None, description="centre distance after the study offset, mm")
    diameter_change_mm: float | None = Field(default=None, description="mean diameter now minus then, mm")
    volume_change_percent: float | None = None
    growth: str | None = Field(default=None, description="growing, stable or shrinking")
    volume_doubling_time_days: float | None = Field(default=None, description="while growing")


class NoduleFinding(BaseModel):
    """One detected nodule with its measurements and risk."""

    series_instance_uid: str | None = Field(default=None, description="the analysed series")
    label: int | None = Field(default=None, description="its number in that series (key image, SEG segment)")
    centre_lps_mm: tuple[float, float, float] = Field(description="centre in patient coordinates (DICOM LPS), mm")
    long_axis_mm: float = Field(ge=0, description="long-axis diameter, mm")
    short_axis_mm: float = Field(ge=0, description="short-axis diameter, mm")
    volume_mm3: float = Field(ge=0, description="volume, mm³")
    mean_hu: float = Field(description="mean attenuation, Hounsfield units")
    nodule_type: NoduleType
    solid_component_mm: float | None = Field(default=None, description="solid core of a part-solid nodule, mm")
    confidence: float = Field(ge=0, le=1, description="detector confidence")
    upper_lobe: bool | None = Field(default=None, description="estimated from the lung extent; null: unknown")
    malignancy_probability: float | None = Field(default=None, ge=0, le=1,
                                                 description="Brock (PanCan) model, when the inputs are known")
    brock_model: str | None = Field(default=None, description="2a (spiculation is not measured)")
    malignancy_note: str | None = Field(default=None, description="why there is no probability")
    lung_rads_category: str | None = Field(default=None, description="this nodule's Lung-RADS v2022 category")
    prior: PriorComparison | None = Field(default=None, description="against the prior study, when there is one")


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
    """What the referring side knows of the patient (inputs of the Brock model); unknown stays null.

    Strict: a JSON number (integer or not, finite) for pack-years and JSON true/false for the rest;
    a string such as "3" or "yes", or 1 for true, is a 422 rather than a guess.
    """

    model_config = ConfigDict(extra="forbid")

    pack_years: float | None = Field(default=None, ge=0, le=300, strict=True, allow_inf_nan=False,
                                     description="smoking history, pack-years")
    current_smoker: bool | None = Field(default=None, strict=True)
    family_history_lung_cancer: bool | None = Field(default=None, strict=True)
    emphysema: bool | None = Field(default=None, strict=True)


class ClinicalDataOut(ClinicalDataIn):
    """Clinical data stored for a study."""

    study_instance_uid: str
    updated_at: datetime


class StudyDetail(StudyFindings):
    """A study's status, its series with their states and errors, findings with risk, and clinical data.

    Risk is computed when read, with the clinical data and prior studies known then."""

    series: list[SeriesStatus] = Field(default_factory=list)
    clinical: ClinicalDataIn | None = None
    lung_rads_note: str | None = Field(default=None, description="why no Lung-RADS category was given")
    baseline: bool | None = Field(default=None, description="true: no prior study of the patient was analysed")
    prior_study_instance_uid: str | None = Field(default=None, description="the prior study compared against")
    interval_days: float | None = Field(default=None, description="days since the prior study")


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


class ResultObject(BaseModel):
    """A DICOM object made from the analysis (SR, SEG or key image), retrievable over WADO-RS."""

    kind: str = Field(description="sr, seg or key_image")
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    source_series_instance_uid: str = Field(description="the analysed CT series")
    retrieve_url: str = Field(description="WADO-RS URL of the instance")
