"""The public contract of the nodule API: study status and findings, analysis jobs.

Provisional: issue 17 builds the endpoints and may still change these shapes; until then every
endpoint answers 501 and nothing returns them. DICOMweb (STOW-RS) bodies and answers are DICOM's own
(PS3.18), not models here.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


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
