"""A C-STORE whose text values hold a NUL character, or whose image has no pixels, is refused as malformed
(0xA900): a NUL was answered 0x0110 (processing failure, which a PACS retries forever: PostgreSQL refuses NUL
in text), a 0 x 0 image stored; neither the refusal's reason nor any log line carries the value (PHI)."""

from __future__ import annotations

import logging

import pytest

from services.nodule import dicom_io
from tests.nodule.conftest import small_series
from tests.nodule.dicom_factory import SeriesIdentity
from tests.nodule.test_ingest_scp import instance_count, push

PATIENT_ID = "PHI-NUL-4711"


@pytest.mark.parametrize("keyword", ["PatientID", "PatientName", "SeriesDescription"])
def test_a_nul_in_a_kept_text_value_is_refused_with_a900(scp: int, keyword: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    dataset = small_series(slices=1, identity=SeriesIdentity.new(patient_id=PATIENT_ID))[0]
    setattr(dataset, keyword, "PHI\0NUL")
    with caplog.at_level(logging.DEBUG):
        assert push(scp, [dataset]) == [dicom_io.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    assert instance_count(sop_instance_uid=str(dataset.SOPInstanceUID)) == 0
    refusals = [record for record in caplog.records if record.getMessage() == "C-STORE refused"]
    assert [getattr(record, "reason", "") for record in refusals] == [f"{keyword} contains a NUL character"]
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(value) for value in record.__dict__.values())
        assert "PHI" not in text


def test_the_same_instance_without_the_nul_is_stored(scp: int) -> None:
    dataset = small_series(slices=1)[0]
    assert push(scp, [dataset]) == [dicom_io.SUCCESS]
    assert instance_count(sop_instance_uid=str(dataset.SOPInstanceUID)) == 1


@pytest.mark.parametrize(("keyword", "value"), [("Rows", 0), ("Columns", 0), ("BitsAllocated", 0)])
def test_an_image_without_pixels_is_refused_with_a900(scp: int, keyword: str, value: int) -> None:
    """A 0 x 0 image was stored with 0x0000 and only failed at assembly; a CT image has pixels."""
    dataset = small_series(slices=1)[0]
    setattr(dataset, keyword, value)
    assert push(scp, [dataset]) == [dicom_io.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    assert instance_count(sop_instance_uid=str(dataset.SOPInstanceUID)) == 0
