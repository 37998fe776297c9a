"""The public contract of the IIoT ingestion API: readings in, ingestion jobs, their progress and quarantine."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

MAX_BATCH_READINGS = 10_000
"""Readings one ``POST /readings`` may carry (larger sets go as a file to ``POST /ingest``)."""
MAX_BATCH_BYTES = 2 << 20
"""Largest ``POST /readings`` body (413 past it)."""


class Reading(BaseModel):
    """One sensor value, in the long format of the ingestion files. Strict types: a value sent as text
    or an id sent as a number is refused (422); NaN, inf and semantic problems are quarantined."""

    model_config = ConfigDict(extra="forbid", strict=True)

    timestamp: datetime = Field(description="when it was measured: ISO 8601 with an offset; without one it is "
                                            "read in the asset's plant time zone")
    asset: str = Field(min_length=1, max_length=64, description="the asset's id in the registry")
    sensor: str = Field(min_length=1, max_length=64, description="the sensor's id on that asset")
    value: float
    unit: str | None = Field(default=None, max_length=32,
                             description="converted to the sensor's unit when it differs (°F → degC, psi → bar, ...)")


class ReadingsBatch(BaseModel):
    """A gateway's small batch of readings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    readings: list[Reading] = Field(min_length=1, max_length=MAX_BATCH_READINGS)


READINGS_EXAMPLE = {"readings": [{"timestamp": "2025-03-01T08:00:00Z", "asset": "pump-7", "sensor": "bearing-temp",
                                  "value": 71.5, "unit": "degC"}]}


class ReadingsAccepted(BaseModel):
    """What became of a batch: readings kept, readings quarantined and how many per reason."""

    ingest_id: int
    kept: int = Field(ge=0)
    quarantined: int = Field(ge=0)
    reasons: dict[str, int] = Field(default_factory=dict, description="quarantined readings per reason code")
    replayed: bool = Field(default=False, description="the same batch was accepted before: nothing was written "
                                                      "again, this is its first outcome")


class IngestAccepted(BaseModel):
    """An ingestion file accepted as a durable job (202), or the job of the same file sent before (200)."""

    job_id: str
    ingest_id: int
    status: str = Field(description="the job's status: pending, running, succeeded or failed")


class IngestJob(BaseModel):
    """An ingestion job's progress."""

    id: str
    ingest_id: int
    status: str = Field(description="the platform job status: pending, running, succeeded or failed")
    filename: str | None = None
    file_format: str | None = Field(default=None, description="csv, jsonl or parquet (known once it started)")
    layout: str | None = Field(default=None, description="long or wide")
    size_bytes: int = Field(ge=0)
    rows_read: int = Field(ge=0, description="source rows read: lines of a text file, rows of a Parquet file")
    rows_kept: int = Field(ge=0, description="readings stored (a wide row holds one per sensor column)")
    rows_quarantined: int = Field(ge=0, description="readings or rows refused, each with a reason")
    gaps: int = Field(ge=0, description="silences longer than twice a sensor's sampling interval")
    progress: float = Field(ge=0, le=1, description="fraction of the file read")
    rows_per_s: float | None = Field(default=None, ge=0)
    eta_s: float | None = Field(default=None, ge=0, description="estimated seconds to the end of the file")
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class QuarantinedRowOut(BaseModel):
    """A refused row with its reason code (see the quarantine reasons in the README) and raw text."""

    id: int
    ingest_id: int | None
    source: str
    row_number: int | None = Field(description="1-based line of its file (the header is line 1), Parquet row, "
                                               "or item of its batch")
    reason: str
    detail: str | None
    raw: str | None
    asset_id: str | None
    sensor_id: str | None
    received_at: datetime


class QuarantinePage(BaseModel):
    """One page of quarantined rows, oldest first; pass ``next_cursor`` as ``cursor`` for the next."""

    items: list[QuarantinedRowOut]
    next_cursor: str | None = None
