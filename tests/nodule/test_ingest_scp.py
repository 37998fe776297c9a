"""Our C-STORE SCP on loopback, fed by a pynetdicom SCU and by dcmtk's storescu: CT stored and
indexed in each decodable transfer syntax, C-ECHO, other SOP classes refused at the presentation
context, bad datasets answered with an error status and not stored, duplicates ignored, the calling
AE allow-list and the AE -> tenant map, and no patient name or id in any log line."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from services.nodule import dicom_io
from services.nodule.db import Instance, Series, Study
from services.nodule.simulate import SimulationConfig, simulate_study, write_dicom_series
from shared.db import session_scope
from tests.conftest import Stack
from tests.nodule.conftest import small_series
from tests.nodule.dicom_factory import SeriesIdentity, write_instances
from tests.support import free_port

EXPLICIT = "1.2.840.10008.1.2.1"
PATIENT_ID = "PHI-PATIENT-4711"
PATIENT_NAME = "Doe^Jane"


def scu(calling_aet: str = "PACS1", syntaxes: tuple[str, ...] = (EXPLICIT,),
        sop_classes: tuple[str, ...] = (CTImageStorage,)) -> AE:
    """An SCU proposing each SOP class in each transfer syntax (one presentation context each)."""
    ae = AE(ae_title=calling_aet)
    for sop_class in sop_classes:
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(Verification)
    return ae


def push(port: int, datasets: list[Dataset], **scu_options: object) -> list[int]:
    """C-STORE each dataset over one association; the statuses."""
    assoc = scu(**scu_options).associate("127.0.0.1", port, ae_title="TESSERA")  # type: ignore[arg-type]
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(dataset).Status) for dataset in datasets]
    finally:
        assoc.release()


def series_row(tenant_id: str, series_uid: str) -> Series | None:
    with session_scope() as session:
        return session.get(Series, (tenant_id, series_uid))


def instance_count(**where: str) -> int:
    with session_scope() as session:
        query = select(func.count()).select_from(Instance)
        for column, value in where.items():
            query = query.where(getattr(Instance, column) == value)
        return int(session.scalar(query) or 0)


def test_a_simulated_series_pushed_by_pynetdicom_is_stored_and_indexed_and_echo_answers(
        scp: int, tmp_path: Path) -> None:
    study = simulate_study(SimulationConfig(seed=7, shape=(16, 64, 64), nodule_count=(1, 1), no_nodule_probability=0))
    paths = write_dicom_series(study, tmp_path / "sim", patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    from pydicom import dcmread

    datasets = [dcmread(path) for path in paths]
    assoc = scu().associate("127.0.0.1", scp, ae_title="TESSERA")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0x0000
    statuses = [int(assoc.send_c_store(dataset).Status) for dataset in datasets]
    assoc.release()

    assert statuses == [0x0000] * 16
    uids = study.uids()
    series = series_row("default", uids["SeriesInstanceUID"])
    assert series is not None and series.instance_count == 16 and series.state == "receiving"
    with session_scope() as session:
        stored = session.get(Study, ("default", uids["StudyInstanceUID"]))
        rows = session.scalars(select(Instance).where(Instance.series_instance_uid == uids["SeriesInstanceUID"])).all()
    assert stored is not None and stored.state == "received"
    assert stored.patient_sex == study.patient_sex and stored.patient_age_years == study.patient_age_years
    assert {row.source for row in rows} == {"c-store"}
    root = dicom_io.storage_root()
    for row in rows:
        file = root / row.path
        assert file.is_file() and file.stat().st_size == row.size_bytes
        assert row.path == f"default/{uids['StudyInstanceUID']}/{uids['SeriesInstanceUID']}/{row.sop_instance_uid}.dcm"
    assert not list((root / ".incoming").iterdir())


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless,
                                    JPEG2000Lossless, JPEGLSLossless], ids=str)
def test_other_transfer_syntaxes_are_accepted_and_decoded(scp: int, syntax: str) -> None:
    if syntax not in dicom_io.decodable_transfer_syntaxes():
        pytest.skip(f"no decoder for {syntax} here")
    datasets = small_series(slices=3, transfer_syntax=syntax)
    assert push(scp, datasets, syntaxes=(syntax,)) == [0x0000] * 3
    assert instance_count(series_instance_uid=str(datasets[0].SeriesInstanceUID), transfer_syntax_uid=syntax) == 3


def test_storescu_pushes_a_series_into_our_scp(scp: int, tmp_path: Path) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed (scripts/ensure_services.sh installs it)")
    datasets = small_series(slices=5)
    write_instances(datasets, tmp_path / "series")
    done = subprocess.run([storescu, "-aet", "MODALITY1", "-aec", "TESSERA", "+sd", "+r", "127.0.0.1", str(scp),
                           str(tmp_path / "series")], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    series = series_row("default", str(datasets[0].SeriesInstanceUID))
    assert series is not None and series.instance_count == 5


def test_another_sop_class_is_refused_at_the_presentation_context(scp: int) -> None:
    assoc = scu(sop_classes=(CTImageStorage, MRImageStorage)).associate("127.0.0.1", scp, ae_title="TESSERA")
    assert assoc.is_established
    accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
    rejected = {str(context.abstract_syntax) for context in assoc.rejected_contexts}
    assoc.release()
    assert CTImageStorage in accepted and MRImageStorage in rejected


def test_a_ct_dataset_that_is_not_ct_fails_with_a900_and_nothing_is_stored(scp: int) -> None:
    dataset = small_series(slices=1)[0]
    dataset.Modality = "MR"
    assert push(scp, [dataset]) == [dicom_io.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    assert instance_count(sop_instance_uid=str(dataset.SOPInstanceUID)) == 0


def test_truncated_pixel_data_fails_with_c000_and_nothing_is_stored(scp: int) -> None:
    native, compressed = small_series(slices=1)[0], small_series(slices=1, transfer_syntax=RLELossless)[0]
    native.PixelData = native.PixelData[: len(native.PixelData) // 2]
    compressed.PixelData = compressed.PixelData[: len(compressed.PixelData) - 40]
    assert push(scp, [native]) == [dicom_io.CANNOT_UNDERSTAND]
    assert push(scp, [compressed], syntaxes=(RLELossless,)) == [dicom_io.CANNOT_UNDERSTAND]
    for dataset in (native, compressed):
        assert instance_count(sop_instance_uid=str(dataset.SOPInstanceUID)) == 0
        assert series_row("default", str(dataset.SeriesInstanceUID)) is None
    assert not list((dicom_io.storage_root() / ".incoming").iterdir())


def test_a_duplicate_sop_instance_is_a_success_that_stores_nothing(scp: int) -> None:
    datasets = small_series(slices=2)
    assert push(scp, [datasets[0], datasets[0], datasets[1]]) == [0x0000] * 3
    assert push(scp, [datasets[0]]) == [0x0000]
    series = series_row("default", str(datasets[0].SeriesInstanceUID))
    assert series is not None and series.instance_count == 2
    assert instance_count(sop_instance_uid=str(datasets[0].SOPInstanceUID)) == 1


def test_allow_list_refuses_unknown_calling_aets_and_the_aet_names_the_tenant(
        nodule_env: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("TESSERA_NODULE_ALLOWED_CALLING_AETS", "PACS1,PACS2")
    monkeypatch.setenv("TESSERA_NODULE_CALLING_AET_TENANTS", "PACS2=hospital-b")
    get_settings.cache_clear()
    server = dicom_io.start_scp(host="127.0.0.1", port=free_port())
    port = int(server.server_address[1])
    try:
        stranger = scu("STRANGER").associate("127.0.0.1", port, ae_title="TESSERA")
        assert stranger.is_rejected
        wrong_called = scu("PACS1").associate("127.0.0.1", port, ae_title="NOT-US")
        assert wrong_called.is_rejected
        datasets = small_series(slices=1)
        assert push(port, datasets, calling_aet="PACS2") == [0x0000]
    finally:
        server.shutdown()
    assert series_row("hospital-b", str(datasets[0].SeriesInstanceUID)) is not None
    assert series_row("default", str(datasets[0].SeriesInstanceUID)) is None


def test_production_refuses_to_listen_without_an_allow_list(nodule_env: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("TESSERA_ENVIRONMENT", "production")
    monkeypatch.setenv("TESSERA_SECRET_KEY", "a-real-secret-for-this-test")
    get_settings.cache_clear()
    with pytest.raises(RuntimeError, match="ALLOWED_CALLING_AETS"):
        dicom_io.start_scp(host="127.0.0.1", port=free_port())


def test_no_patient_name_or_id_in_any_log_line(scp: int, caplog: pytest.LogCaptureFixture) -> None:
    identity = SeriesIdentity.new(patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    good = small_series(slices=2, identity=identity)
    bad = small_series(slices=1, identity=identity)[0]
    bad.Modality = "MR"
    with caplog.at_level(logging.DEBUG):
        push(scp, [*good, good[0], bad])
    assert caplog.records, "the SCP logs what it refuses"
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(value) for value in record.__dict__.values())
        assert PATIENT_ID not in text and "Doe" not in text


def test_stored_files_are_the_part10_file_pynetdicom_would_write(scp: int) -> None:
    from pydicom import dcmread
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    for sop_instance in ("1.2.3.4", "1.2.3.45"):  # an odd and an even length (padded)
        expected = b"\x00" * 128 + b"DICM" + encode_file_meta(create_file_meta(
            sop_class_uid=UID(CTImageStorage), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(EXPLICIT)))
        assert dicom_io.part10_header(CTImageStorage, sop_instance, EXPLICIT) == expected
    datasets = small_series(slices=2)
    assert push(scp, datasets) == [0x0000] * 2
    with session_scope() as session:
        rows = session.scalars(select(Instance).where(
            Instance.series_instance_uid == str(datasets[0].SeriesInstanceUID))).all()
    sent = {str(dataset.SOPInstanceUID): dataset for dataset in datasets}
    for row in rows:
        stored = dcmread(dicom_io.storage_root() / row.path)
        assert stored.file_meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        assert stored.file_meta.TransferSyntaxUID == EXPLICIT
        assert stored.PixelData == sent[row.sop_instance_uid].PixelData


@pytest.mark.parametrize("syntax", [EXPLICIT, ImplicitVRLittleEndian], ids=str)
def test_a_received_dataset_is_checked_up_to_its_pixel_data_and_by_its_length(syntax: str) -> None:
    from pynetdicom.dsutils import encode

    dataset = small_series(slices=1)[0]
    encoded = encode(dataset, syntax == ImplicitVRLittleEndian, True)
    assert encoded is not None
    meta = dicom_io.part10_header(CTImageStorage, str(dataset.SOPInstanceUID), syntax)
    parsed = dicom_io.parse_received(encoded, syntax, CTImageStorage, meta)
    assert parsed.sop_instance_uid == str(dataset.SOPInstanceUID) and parsed.transfer_syntax_uid == syntax
    with pytest.raises(dicom_io.InstanceRefused) as cut:  # the stream ends inside the pixel data
        dicom_io.parse_received(encoded[:-100], syntax, CTImageStorage, meta)
    assert cut.value.status == dicom_io.CANNOT_UNDERSTAND
    del dataset.PixelData
    without_pixels = encode(dataset, syntax == ImplicitVRLittleEndian, True)
    assert without_pixels is not None
    with pytest.raises(dicom_io.InstanceRefused) as none:
        dicom_io.parse_received(without_pixels, syntax, CTImageStorage, meta)
    assert none.value.status == dicom_io.DATASET_DOES_NOT_MATCH_SOP_CLASS



def test_an_archive_that_inflates_past_its_ratio_has_the_rest_refused(
        nodule_env: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zip bomb of many small, very compressible members: the archive's inflated bytes are bounded
    (shared.uploads.decompression_limit), each member past the budget refused, nothing extracted for it."""
    import zipfile

    import shared.uploads

    monkeypatch.setattr(shared.uploads, "DECOMPRESSION_RATIO_FLOOR", 1 << 20)  # a budget of 1 MiB for this zip
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bomb:
        for index in range(3):
            bomb.writestr(f"{index}.dcm", b"\0" * (600 << 10))
    outcomes = []
    for name, outcome in dicom_io.extract_zip_members(archive):
        outcomes.append((name, outcome if isinstance(outcome, dicom_io.InstanceRefused) else None))
        if isinstance(outcome, Path):
            outcome.unlink()
    assert [name for name, _ in outcomes] == ["0.dcm", "1.dcm", "2.dcm"]
    assert outcomes[0][1] is None
    for _, refused in outcomes[1:]:
        assert refused is not None and refused.status == dicom_io.OUT_OF_RESOURCES
        assert "inflates to more than" in refused.reason
    assert not list(dicom_io.incoming_dir().iterdir())
