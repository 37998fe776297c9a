"""The public contract of the IIoT API: readings in, ingestion jobs and their progress.

Provisional: issue 19 builds the endpoints and may still change these shapes; until then every
endpoint answers 501 and nothing reads or returns them.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class Reading(BaseModel):
    """One sensor value, in the long format of the ingestion files (provisional)."""

    timestamp: datetime = Field(description="when it was measured, with a time zone")
    asset: str = Field(description="the asset's id in the registry")
    sensor: str = Field(description="the sensor's id on that asset")
    value: float
    unit: str | None = Field(default=None, description="converted when it differs from the sensor's unit")


class ReadingsBatch(BaseModel):
    """A gateway's small batch of readings (provisional)."""

    readings: list[Reading] = Field(min_length=1)


READINGS_EXAMPLE = {"readings": [{"timestamp": "2025-03-01T08:00:00Z", "asset": "pump-7", "sensor": "bearing-temp",
                                  "value": 71.5, "unit": "degC"}]}


class ReadingsAccepted(BaseModel):
    """What became of a batch: rows kept, rows quarantined with their reasons (provisional)."""

    kept: int = Field(ge=0)
    quarantined: int = Field(ge=0)


class IngestAccepted(BaseModel):
    """An ingestion file accepted as a durable job (provisional)."""

    job_id: str


class IngestJob(BaseModel):
    """An ingestion job's progress (provisional)."""

    id: str
    status: str = Field(description="the platform job status (shared.jobs)")
    rows_read: int = Field(ge=0)
    rows_kept: int = Field(ge=0)
    rows_quarantined: int = Field(ge=0)
    rows_per_s: float | None = Field(default=None, ge=0)
    eta_s: float | None = Field(default=None, ge=0, description="estimated seconds to the end of the file")
    error: str | None = None
