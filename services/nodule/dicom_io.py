"""Reading, checking and storing the DICOM instances a PACS sends: C-STORE, STOW-RS parts, zip members.

Every way in ends in :func:`store_file`: the instance is parsed (:func:`parse_instance`), checked
(CT Image Storage, the UIDs a series needs, pixel data present and decodable) and, if good, moved
atomically to ``<storage>/<tenant>/<study>/<series>/<sop>.dcm`` and indexed
(:mod:`services.nodule.db`). A refusal is an :class:`InstanceRefused` carrying the DICOM status
(the C-STORE response status, the STOW-RS FailureReason) and a reason without patient data; nothing
is stored then. A SOP instance UID the tenant already has is a success that stores nothing.

The C-STORE SCP (:func:`start_scp`, :func:`serve` for ``tessera up``) accepts CT Image Storage in
every transfer syntax pydicom can decode here (:func:`decodable_transfer_syntaxes`) and
Verification; other SOP classes are refused at the presentation context. On embedded defaults any
calling AE title is accepted; elsewhere only ``TESSERA_NODULE_ALLOWED_CALLING_AETS``. An
association's instances belong to the tenant its calling AE title maps to
(``TESSERA_NODULE_CALLING_AET_TENANTS``, else ``TESSERA_NODULE_DEFAULT_TENANT``).

No patient name or id is ever logged: log lines carry AE titles, UIDs, statuses and counts.
"""

from __future__ import annotations

import functools
import io
import logging
import lzma
import os
import re
import struct
import threading
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from services.nodule.db import DONE, FAILED, RECEIVED, RECEIVING, Instance, Series, Study
from services.nodule.dicom_reactor import make_event_driven_server
from services.nodule.volume import age_in_years
from shared.config import Settings, get_settings
from shared.db import get_engine, utcnow
from shared.errors import BadRequest, UnprocessableContent, UnsupportedMediaType
from shared.uploads import MAX_DECOMPRESSION_RATIO, MultipartFileReader, decompression_limit

logger = logging.getLogger("tessera.nodule.dicom")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STUDY_UID_MISMATCH = 0xA901
"""A STOW-RS instance outside the study its request names: PS3.18 defines no code of its own, so an
A9xx one (the instance does not fit what was asked), as Microsoft's DICOM server answers it."""
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110

ACCEPTED_SOP_CLASSES = (CTImageStorage,)
NATIVE_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                            ExplicitVRBigEndian)
HEADER_ONLY_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
"""Native syntaxes whose C-STORE datasets are read up to the pixel data only: its element header gives
its length, which is checked against the image size and the bytes actually received."""
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
"""Pixel Data, Double Float and Float Pixel Data: where pydicom's ``stop_before_pixels`` stops too."""
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
PART10_PREAMBLE = b"\x00" * 128 + b"DICM"
MAX_PDU_BYTES = 1 << 20
"""The largest P-DATA PDU the SCP accepts (pynetdicom's default is 16 KiB). Each PDU costs a pass of
pynetdicom's reader loop in Python: dcmtk's storescu, which sends at most 128 KiB, needs 4 instead of
32 for a 512 x 512 slice. The dataset is held in memory whole whatever the PDU size."""
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_UID_CHARS = 64
Source = Literal["c-store", "stow-rs", "upload"]


class InstanceRefused(Exception):
    """An instance that is not stored: its DICOM failure status and a reason free of patient data."""

    def __init__(self, status: int, reason: str, *, sop_class_uid: str | None = None,
                 sop_instance_uid: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class ParsedInstance:
    """What indexing needs from a checked instance (the patient fields are never logged)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    patient_id: str | None
    patient_age_years: float | None
    patient_sex: str | None


@dataclass(frozen=True)
class StoredInstance:
    """An instance now held for the tenant; ``duplicate`` when it was already there (nothing written)."""

    instance: ParsedInstance
    duplicate: bool


@functools.cache
def decodable_transfer_syntaxes() -> tuple[UID, ...]:
    """The native transfer syntaxes and every compressed one a pydicom decoder plug-in here can decode."""
    compressed = []
    for syntax in AllTransferSyntaxes:
        uid = UID(syntax)
        if not uid.is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                compressed.append(uid)
        except NotImplementedError:
            continue
    return (*NATIVE_TRANSFER_SYNTAXES, *compressed)


# --- parsing and checking ---------------------------------------------------------------------------


def parse_instance(source: Path | bytes, *, expected_study_uid: str | None = None) -> ParsedInstance:
    """Read a DICOM Part 10 file and check it is a CT instance this node can store and decode.

    Parameters
    ----------
    source:
        The file, or its bytes.
    expected_study_uid:
        When set (a study-scoped STOW-RS), an instance of another study is refused.

    Raises
    ------
    InstanceRefused
        0xC000 unreadable or undecodable, 0x0122 another SOP class, 0xC122 a transfer syntax with
        no decoder, 0xA900 missing or malformed identifiers, a kept text value holding a NUL, or an
        image without pixels (Rows, Columns or BitsAllocated 0), 0xA901 another study than expected.
    """
    dataset = _read_part10(source)
    return _checked(dataset, UID(str(dataset.file_meta.TransferSyntaxUID)),
                    _text(dataset.file_meta, "MediaStorageSOPClassUID"), expected_study_uid)


@dataclass(frozen=True)
class _PixelHeader:
    """The top-level pixel data element of a dataset read up to it: its tag, declared and received length."""

    tag: int
    length: int
    received: int


NO_PIXELS = _PixelHeader(tag=0, length=0, received=0)


def parse_received(encoded: bytes, transfer_syntax: str, sop_class_uid: str, file_meta: bytes) -> ParsedInstance:
    """Check a C-STORE dataset as received (no file meta) in the presentation context's transfer syntax.

    In a :data:`HEADER_ONLY_SYNTAXES` syntax only the elements before the pixel data are parsed and
    the pixel data's length is checked from its element header (the image needs ``Rows x Columns x
    SamplesPerPixel x Frames x BitsAllocated / 8`` bytes, and that many must have been received);
    otherwise ``file_meta`` (preamble and file meta information) and the dataset are parsed as a
    Part 10 file by :func:`parse_instance` (a compressed image is decoded: decoding is the check).
    ``sop_class_uid`` (the request's) stands in for a dataset without a SOP Class UID. Raises
    :class:`InstanceRefused` as :func:`parse_instance` does.
    """
    syntax = UID(transfer_syntax)
    if syntax not in HEADER_ONLY_SYNTAXES:
        return parse_instance(b"".join((file_meta, encoded)))
    try:
        dataset, pixels = _read_header(encoded, syntax)
    except Exception as exc:  # whatever a malformed dataset makes pydicom raise
        raise InstanceRefused(CANNOT_UNDERSTAND, f"not a readable DICOM dataset ({type(exc).__name__})") from None
    return _checked(dataset, syntax, sop_class_uid, None, pixels)


def _read_header(encoded: bytes, syntax: UID) -> tuple[Dataset, _PixelHeader]:
    """The dataset's elements before its top-level pixel data, and that element's header (or NO_PIXELS)."""
    stream = io.BytesIO(encoded)  # shares ``encoded``'s buffer: nothing is copied
    found: list[_PixelHeader] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag >> 16 != 0x7FE0 or tag not in PIXEL_DATA_TAGS:  # the shift first: BaseTag's == is Python code
            return False
        # pydicom calls this positioned at the element's value
        found.append(_PixelHeader(int(tag), length, len(encoded) - stream.tell()))
        return True

    dataset = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=at_pixels)
    return dataset, (found[0] if found else NO_PIXELS)


def _checked(dataset: Dataset, syntax: UID, fallback_sop_class: str | None, expected_study_uid: str | None,
             pixels: _PixelHeader | None = None) -> ParsedInstance:
    try:
        return _check(dataset, syntax, fallback_sop_class, expected_study_uid, pixels)
    except InstanceRefused:
        raise
    except Exception as exc:  # pydicom parses elements lazily: a malformed one raises when first read
        raise InstanceRefused(CANNOT_UNDERSTAND, f"a data element cannot be read ({type(exc).__name__})") from None


def _check(dataset: Dataset, syntax: UID, fallback_sop_class: str | None, expected_study_uid: str | None,
           pixels: _PixelHeader | None) -> ParsedInstance:
    """``pixels``: the pixel data's element header when only the elements before it were read."""
    sop_class = _text(dataset, "SOPClassUID") or fallback_sop_class
    sop_instance = _text(dataset, "SOPInstanceUID")

    def refuse(status: int, reason: str) -> InstanceRefused:
        return InstanceRefused(status, reason, sop_class_uid=sop_class, sop_instance_uid=sop_instance)

    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise refuse(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class or '(none)'} is not CT Image Storage")
    parsed = _identify(dataset, syntax, refuse)
    if expected_study_uid is not None and parsed.study_instance_uid != expected_study_uid:
        raise refuse(STUDY_UID_MISMATCH, "the instance belongs to another study than the request names")
    if pixels is None:
        _check_pixels(dataset, syntax, refuse)
    else:
        _check_pixel_header(dataset, pixels, refuse)
    return parsed


def _read_part10(source: Path | bytes) -> Dataset:
    try:
        try:
            dataset = pydicom.dcmread(_readable(source), force=False)
        except InvalidDicomError:
            # No 128-byte preamble and "DICM" prefix: pydicom.dcmwrite writes a dataset so unless asked
            # (dicomweb-client sends them so). Accepted when the file meta information follows.
            dataset = pydicom.dcmread(_readable(source), force=True)
    except Exception as exc:  # whatever a malformed file makes pydicom raise
        raise InstanceRefused(CANNOT_UNDERSTAND, f"not a readable DICOM Part 10 file ({type(exc).__name__})") from None
    if "TransferSyntaxUID" not in getattr(dataset, "file_meta", Dataset()):
        raise InstanceRefused(CANNOT_UNDERSTAND, "no transfer syntax in the file meta information")
    return dataset


def _readable(source: Path | bytes) -> Any:
    return io.BytesIO(source) if isinstance(source, bytes) else source


TEXT_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                 "PatientID", "PatientName", "PatientAge", "PatientSex", "Modality", "StudyDescription",
                 "SeriesDescription", "ConvolutionKernel", "AccessionNumber", "StudyID")
"""Text values the node keeps or indexes (the database takes no NUL: PostgreSQL refuses it in text)."""


def _refuse_nul_text(dataset: Dataset, refuse: Any) -> None:
    """An instance whose text values (:data:`TEXT_KEYWORDS`) hold a NUL character is refused with 0xA900:
    malformed input a PACS must not retry. The reason names the keyword only, never the value (PHI)."""
    for keyword in TEXT_KEYWORDS:
        if "\0" in str(getattr(dataset, keyword, None) or ""):
            raise refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} contains a NUL character")


def _identify(dataset: Dataset, syntax: UID, refuse: Any) -> ParsedInstance:
    _refuse_nul_text(dataset, refuse)
    uids = {keyword: _text(dataset, keyword) for keyword in
            ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    for keyword, value in uids.items():
        if not value or uid_problem(value):
            raise refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is missing or not a valid UID")
    modality = _text(dataset, "Modality")
    if modality is not None and modality != "CT":
        raise refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Modality {modality} in a CT Image Storage instance")
    if syntax not in decodable_transfer_syntaxes():
        raise refuse(TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {syntax} cannot be decoded here")
    sex = _text(dataset, "PatientSex")
    return ParsedInstance(
        sop_class_uid=str(dataset.SOPClassUID), sop_instance_uid=str(uids["SOPInstanceUID"]),
        study_instance_uid=str(uids["StudyInstanceUID"]), series_instance_uid=str(uids["SeriesInstanceUID"]),
        transfer_syntax_uid=str(syntax), modality=modality, patient_id=(_text(dataset, "PatientID") or "")[:64] or None,
        patient_age_years=age_in_years(_text(dataset, "PatientAge")),
        patient_sex=sex if sex in ("M", "F", "O") else None)


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a DICOM UID (PS3.5 9.1), or None when it is one.

    A UID is at most 64 characters of digits and dots: components of digits, separated by single
    dots, none with a leading zero unless it is ``0`` itself.
    """
    if not value:
        return "it is empty"
    if len(value) > MAX_UID_CHARS:
        return f"it is {len(value)} characters long; a UID has at most {MAX_UID_CHARS}"
    if not UID_PATTERN.fullmatch(value):  # fullmatch: ``$`` alone would let a trailing newline through
        return ("a UID is digits and dots only: components separated by single dots, none empty and none "
                "with a leading zero (except 0)")
    return None


def _check_pixels(dataset: Dataset, syntax: UID, refuse: Any) -> None:
    """Pixel data complete (native) or decodable (compressed): what assembly will need later."""
    if "PixelData" not in dataset:
        raise refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "no pixel data")
    _check_image_size(dataset, refuse)
    try:
        if syntax.is_compressed:
            dataset.pixel_array  # noqa: B018  (decoding is the check)
        else:
            _check_native_length(dataset, len(dataset.PixelData), refuse)
    except InstanceRefused:
        raise
    except Exception as exc:  # a decoder plug-in raises whatever its library raises
        raise refuse(CANNOT_UNDERSTAND, f"pixel data cannot be decoded ({type(exc).__name__})") from None


def _check_pixel_header(dataset: Dataset, pixels: _PixelHeader, refuse: Any) -> None:
    """The native pixel data's length from its element header: declared, received and the image's size."""
    if pixels.tag != PIXEL_DATA:
        raise refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "no pixel data")
    _check_image_size(dataset, refuse)
    if pixels.length == UNDEFINED_LENGTH:
        raise refuse(CANNOT_UNDERSTAND, "encapsulated pixel data in a native transfer syntax")
    _check_native_length(dataset, min(pixels.length, pixels.received), refuse)


def _check_image_size(dataset: Dataset, refuse: Any) -> None:
    """An image of at least one pixel: Rows, Columns and BitsAllocated present and positive (a CT image's
    are; one of 0 x 0 pixels was stored and only failed at assembly)."""
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        value = dataset.get(keyword)
        if not isinstance(value, int) or value < 1:
            raise refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is missing or not positive: the image has "
                         "no pixels")


def _check_native_length(dataset: Dataset, length: int, refuse: Any) -> None:
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.BitsAllocated)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    expected = rows * columns * samples * frames * bits // 8
    if length < expected:
        raise refuse(CANNOT_UNDERSTAND, f"pixel data is {length} bytes, {expected} expected: "
                     "the instance is truncated")


def _text(dataset: Any, keyword: str) -> str | None:
    value = getattr(dataset, keyword, None) if dataset is not None else None
    text = str(value).strip() if value is not None else ""
    return text or None


# --- storage and index ------------------------------------------------------------------------------


def storage_root(settings: Settings | None = None) -> Path:
    """Where instances are kept: ``TESSERA_NODULE_STORAGE_DIR``, else ``<data_dir>/nodule``."""
    settings = settings or get_settings()
    return settings.nodule_storage_dir or settings.data_dir / "nodule"


def incoming_dir(settings: Settings | None = None) -> Path:
    """Where files are received before they are checked (same file system: a move is a rename)."""
    directory = storage_root(settings) / ".incoming"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def new_incoming_path(settings: Settings | None = None) -> Path:
    """A fresh partial-file name under :func:`incoming_dir`."""
    return incoming_dir(settings) / f"{uuid.uuid4().hex}.part"


def instance_relative_path(tenant_id: str, instance: ParsedInstance) -> str:
    """``<tenant>/<study>/<series>/<sop>.dcm`` (UIDs are digits and dots: checked before)."""
    return "/".join((tenant_id, instance.study_instance_uid, instance.series_instance_uid,
                     f"{instance.sop_instance_uid}.dcm"))


def store_bytes(data: bytes | Sequence[bytes], *, tenant_id: str, source: Source,
                expected_study_uid: str | None = None, parsed: ParsedInstance | None = None) -> StoredInstance:
    """Check and store one Part 10 instance held in memory (a C-STORE dataset with its meta).

    ``data`` may come in pieces written one after the other (the SCP's preamble and file meta, then
    the dataset as received: no joined copy). ``parsed`` is the caller's own check of ``data`` (the
    SCP has already parsed it to compare it with the C-STORE request): it is not parsed again.
    """
    pieces = (data,) if isinstance(data, bytes) else tuple(data)
    parsed = parsed or parse_instance(b"".join(pieces), expected_study_uid=expected_study_uid)
    partial = new_incoming_path()
    try:
        with partial.open("xb") as handle:
            for piece in pieces:
                handle.write(piece)
        return _keep(partial, parsed, tenant_id=tenant_id, source=source, size=sum(map(len, pieces)))
    finally:
        partial.unlink(missing_ok=True)


def store_file(path: Path, *, tenant_id: str, source: Source, expected_study_uid: str | None = None) -> StoredInstance:
    """Check and store one received file (under :func:`incoming_dir`); it is moved or deleted."""
    try:
        parsed = parse_instance(path, expected_study_uid=expected_study_uid)
        return _keep(path, parsed, tenant_id=tenant_id, source=source, size=path.stat().st_size)
    finally:
        path.unlink(missing_ok=True)


def _keep(partial: Path, parsed: ParsedInstance, *, tenant_id: str, source: Source, size: int) -> StoredInstance:
    """Index ``partial`` and move it into place, unless the tenant already holds the SOP instance.

    The row is inserted first (``ON CONFLICT DO NOTHING`` tells a duplicate in the same round trip),
    the file is moved before the commit: a failed move rolls the row back, and a crash between the
    move and the commit leaves only a file that the next copy of the instance replaces.
    """
    relative = instance_relative_path(tenant_id, parsed)
    # A Core connection, not an ORM session: this runs once per C-STORE and needs no ORM (-0.13 ms)
    with get_engine().begin() as connection:
        if not index_instance(connection, tenant_id, parsed, relative, size, source):
            return StoredInstance(parsed, duplicate=True)
        _move_into_place(partial, storage_root() / relative, parsed)
    return StoredInstance(parsed, duplicate=False)


def _move_into_place(partial: Path, final: Path, parsed: ParsedInstance) -> None:
    """Rename the received file to its final name (atomic: a reader sees all of it or nothing)."""
    try:
        try:
            os.replace(partial, final)
        except FileNotFoundError:  # the series' first instance: its directory is made then (not every time)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
    except OSError as exc:
        raise InstanceRefused(OUT_OF_RESOURCES, f"the instance could not be written ({type(exc).__name__})",
                              sop_class_uid=parsed.sop_class_uid, sop_instance_uid=parsed.sop_instance_uid) from None


def index_instance(connection: Connection, tenant_id: str, parsed: ParsedInstance, relative_path: str,
                   size: int, source: Source) -> bool:
    """Index a stored file: its instance row, its series (one more instance, receiving again) and study.

    Returns False when the tenant already holds the SOP instance (nothing changes). Three statements,
    each compiled once per dialect (:func:`_index_statements`): this runs once per C-STORE.
    """
    now = utcnow()
    statements = _index_statements(connection.dialect.name)
    instance_id = connection.execute(statements.instance, {
        "tenant_id": tenant_id, "patient_id": parsed.patient_id, "study_instance_uid": parsed.study_instance_uid,
        "series_instance_uid": parsed.series_instance_uid, "sop_instance_uid": parsed.sop_instance_uid,
        "sop_class_uid": parsed.sop_class_uid, "transfer_syntax_uid": parsed.transfer_syntax_uid,
        "path": relative_path, "size_bytes": size, "source": source, "received_at": now}).scalar()
    if instance_id is None:
        return False
    connection.execute(statements.series, {
        "tenant_id": tenant_id, "series_instance_uid": parsed.series_instance_uid,
        "study_instance_uid": parsed.study_instance_uid, "modality": parsed.modality, "state": RECEIVING,
        "instance_count": 1, "last_instance_at": now, "created_at": now, "updated_at": now})
    connection.execute(statements.study, {
        "tenant_id": tenant_id, "study_instance_uid": parsed.study_instance_uid, "patient_id": parsed.patient_id,
        "patient_age_years": parsed.patient_age_years, "patient_sex": parsed.patient_sex, "state": RECEIVED,
        "created_at": now, "updated_at": now})
    return True


@dataclass(frozen=True)
class _IndexStatements:
    instance: Any
    series: Any
    study: Any


@functools.cache
def _index_statements(dialect_name: str) -> _IndexStatements:
    """The indexing upserts for PostgreSQL or SQLite, as Core statements with bound parameters.

    - instance: insert, nothing on a duplicate SOP instance UID, the new row's id returned;
    - series: created receiving, or one more instance (receiving again);
    - study: created received, or a finished one (done/failed) brought back to received.
    """
    # Any: the two dialects' Insert classes share the ON CONFLICT API but no type declares it.
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite_dialect.insert}[dialect_name]
    instances, series, studies = (Instance.__table__, Series.__table__, Study.__table__)
    instance = insert(instances).on_conflict_do_nothing(
        index_elements=["tenant_id", "sop_instance_uid"]).returning(instances.c.id)
    series_insert = insert(series)
    series_upsert = series_insert.on_conflict_do_update(
        index_elements=["tenant_id", "series_instance_uid"],
        set_={"instance_count": series.c.instance_count + 1, "state": RECEIVING,
              "last_instance_at": series_insert.excluded.last_instance_at,
              "updated_at": series_insert.excluded.updated_at})
    study_insert = insert(studies)
    study_upsert = study_insert.on_conflict_do_update(
        index_elements=["tenant_id", "study_instance_uid"],
        set_={"state": RECEIVED, "failure_reason": None, "updated_at": study_insert.excluded.updated_at},
        where=studies.c.state.in_((DONE, FAILED)))
    return _IndexStatements(instance=instance, series=series_upsert, study=study_upsert)


# --- the C-STORE SCP --------------------------------------------------------------------------------


def tenant_of_calling_aet(calling_aet: str, settings: Settings | None = None) -> str:
    """The tenant whose studies an association from ``calling_aet`` stores."""
    settings = settings or get_settings()
    return settings.nodule_calling_aet_tenants.get(calling_aet.strip(), settings.nodule_default_tenant)


def check_listener_settings(settings: Settings) -> None:
    """Refuse to listen in production without an allow-list of calling AE titles."""
    if settings.environment == "production" and not settings.nodule_allowed_calling_aets:
        raise RuntimeError("TESSERA_NODULE_ALLOWED_CALLING_AETS is empty: in production the DICOM listener "
                           "accepts only listed calling AE titles")


def build_ae(settings: Settings) -> AE:
    """The application entity: CT Image Storage in every decodable transfer syntax, and Verification."""
    ae = AE(ae_title=settings.nodule_ae_title)
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, decodable_transfer_syntaxes())
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(settings.nodule_allowed_calling_aets)
    ae.require_called_aet = True
    ae.maximum_associations = 32
    ae.maximum_pdu_size = MAX_PDU_BYTES
    return ae


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The preamble, prefix and File Meta Information of a received C-STORE dataset.

    Byte for byte what pynetdicom's ``Event.encoded_dataset(include_meta=True)`` puts before the
    dataset (its ``Event.file_meta``: group length, version, the request's SOP class and instance,
    the context's transfer syntax, pynetdicom's implementation UID and version), written here
    directly: pydicom's writer took ~0.5 ms an instance for these seven elements.
    """
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return PART10_PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """A (0002,xxxx) element in explicit VR little endian (OB has a 4-byte length after 2 reserved bytes)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    # A non-ASCII UID is replaced, not an error: such an instance is refused by its checks before it is stored
    value = text.encode("ascii", "replace")
    return value + pad if len(value) % 2 else value


def handle_store(event: Event) -> int:
    """C-STORE: check and store the instance; the DICOM status of the outcome."""
    calling_aet = str(event.assoc.requestor.ae_title)
    tenant_id = tenant_of_calling_aet(calling_aet)
    request: Any = event.request  # a C-STORE request
    affected_class = str(request.AffectedSOPClassUID)
    affected_instance = str(request.AffectedSOPInstanceUID)
    try:
        # The dataset as received (BytesIO.getvalue shares its buffer) after our preamble and file
        # meta: the file holds what Event.encoded_dataset(include_meta=True) would, uncopied.
        encoded = request.DataSet.getvalue()
        syntax = str(event.context.transfer_syntax)
        file_meta = part10_header(affected_class, affected_instance, syntax)
        parsed = parse_received(encoded, syntax, affected_class, file_meta)
        if parsed.sop_class_uid != affected_class or parsed.sop_instance_uid != affected_instance:
            raise InstanceRefused(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                  "the dataset's SOP class or instance differs from the C-STORE request")
        stored = store_bytes((file_meta, encoded), tenant_id=tenant_id, source="c-store", parsed=parsed)
    except InstanceRefused as refused:
        logger.warning("C-STORE refused", extra={"calling_aet": calling_aet, "status": f"0x{refused.status:04X}",
                                                 "reason": refused.reason, "sop_instance_uid": affected_instance})
        return refused.status
    except Exception as exc:
        # No traceback: a database error's text carries the statement's parameters (the PatientID).
        logger.error("C-STORE failed: %s", type(exc).__name__,
                     extra={"calling_aet": calling_aet, "sop_instance_uid": affected_instance})
        return PROCESSING_FAILURE
    if stored.duplicate:
        logger.info("C-STORE duplicate ignored", extra={"calling_aet": calling_aet,
                                                        "sop_instance_uid": affected_instance})
    return SUCCESS


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is up."""
    return SUCCESS


def start_scp(settings: Settings | None = None, *, host: str | None = None,
              port: int | None = None) -> ThreadedAssociationServer:
    """Start the SCP in background threads; ``shutdown()`` the returned server to stop it."""
    settings = settings or get_settings()
    check_listener_settings(settings)
    _quiet_pynetdicom()
    ae = build_ae(settings)
    address = (host or settings.nodule_dicom_host, settings.nodule_dicom_port if port is None else port)
    handlers: list[Any] = [(evt.EVT_C_STORE, handle_store), (evt.EVT_C_ECHO, handle_echo)]
    server = make_event_driven_server(ae, address, handlers)
    logger.info("DICOM listener up", extra={"ae_title": settings.nodule_ae_title, "host": address[0],
                                            "port": server.server_address[1]})
    return server


def _quiet_pynetdicom() -> None:
    """pynetdicom's INFO/DEBUG lines can dump dataset summaries: keep them out of our logs.

    Its standard event handlers, which write those lines, are not bound either
    (``_config.LOG_HANDLER_LEVEL = "none"``; warnings and errors are still logged): they ran on
    every PDU and DIMSE message and formatted lines the WARNING level then dropped (~7 % of the
    reader thread's CPU in the ingest bench).
    """
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def serve(stop: threading.Event) -> None:
    """The ``dicom`` listener (``tessera listen nodule dicom``): serve until ``stop`` is set."""
    server = start_scp()
    try:
        stop.wait()
    finally:
        server.shutdown()


MAX_ZIP_MEMBER_BYTES = 512 << 20
"""A zip member larger than this is not a CT slice: refused unread (a zip bomb's member)."""
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "LZMA"}
"""The compression methods zipfile inflates (by their number in the zip's headers)."""
ZIP_ENCRYPTED_FLAGS = 0x0041
"""General purpose flag bits 0 (encrypted) and 6 (strong encryption): no password is ever asked for."""
ZIP_COPY_BYTES = 1 << 20
ZIP_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError)
"""What zipfile raises for a central directory it cannot read (ValueError: a name that is not UTF-8)."""
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, NotImplementedError,
                     RuntimeError, ValueError, struct.error)
"""What zipfile and its decompressors raise for one member's damaged header or data (bz2: OSError)."""


def open_zip(path: Path) -> zipfile.ZipFile:
    """The archive at ``path``, its central directory read.

    Raises
    ------
    UnprocessableContent
        When there is no readable central directory: the file is not a zip archive.
    """
    try:
        return zipfile.ZipFile(path)
    except ZIP_ARCHIVE_ERRORS as exc:
        raise UnprocessableContent(f"the upload is not a readable zip archive ({type(exc).__name__})") from None


def extract_zip_members(path: Path) -> Iterator[tuple[str, Path | InstanceRefused]]:
    """Each file of a zip, extracted to its own incoming file; directories and ``__MACOSX`` skipped.

    Yields (member name, incoming path) or (member name, the refusal of a member that cannot be
    read: too large to be an instance, encrypted, compressed by an unsupported method, or damaged).
    The caller stores or deletes each path before asking for the next; an extracted file left
    over (the caller stopped early) is deleted when the generator resumes or is closed. Raises
    :class:`UnprocessableContent` (from :func:`open_zip`) when the file is not a zip archive.
    """
    # zipfile inflates a member no further than its declared size (a lie is a BadZipFile), so the
    # declared sizes bound the work: per member, and for the archive by its compression ratio.
    budget = decompression_limit(path.stat().st_size)
    with open_zip(path) as archive:
        for info in archive.infolist():
            if info.is_dir() or info.filename.startswith("__MACOSX/"):
                continue
            refused = _unopened_member_refusal(info, budget)
            if refused is not None:
                yield info.filename, refused
                continue
            budget -= info.file_size
            target = new_incoming_path()
            try:
                yield info.filename, _extract_member(archive, info, target) or target
            finally:
                target.unlink(missing_ok=True)


def _unopened_member_refusal(info: zipfile.ZipInfo, budget: int) -> InstanceRefused | None:
    """Why a member is refused from its central directory entry alone (nothing read), or None."""
    if info.file_size > MAX_ZIP_MEMBER_BYTES:
        return InstanceRefused(OUT_OF_RESOURCES, "the member is too large for one instance")
    if info.file_size > budget:
        return InstanceRefused(OUT_OF_RESOURCES, f"the archive inflates to more than {MAX_DECOMPRESSION_RATIO}x "
                               "its size")
    if info.flag_bits & ZIP_ENCRYPTED_FLAGS:
        return InstanceRefused(CANNOT_UNDERSTAND, "the member is encrypted: password-protected members are not "
                               "accepted")
    if info.compress_type not in ZIP_METHODS:
        return InstanceRefused(CANNOT_UNDERSTAND, f"the member's compression method {info.compress_type} is not "
                               f"supported ({', '.join(ZIP_METHODS.values())} are)")
    return None


def _extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> InstanceRefused | None:
    """Inflate one member into ``target`` (a new file); None when done, else why it cannot be read or kept."""
    try:
        member = archive.open(info)
    except ZIP_MEMBER_ERRORS as exc:
        return _unreadable_member(info, exc)
    with member, target.open("xb") as handle:
        while True:
            try:
                chunk = member.read(ZIP_COPY_BYTES)
            except ZIP_MEMBER_ERRORS as exc:
                return _unreadable_member(info, exc)
            if not chunk:
                return None
            try:
                handle.write(chunk)
            except OSError as exc:
                return InstanceRefused(OUT_OF_RESOURCES, f"the member could not be written ({type(exc).__name__})")


def _unreadable_member(info: zipfile.ZipInfo, exc: Exception) -> InstanceRefused:
    """The refusal of a member whose header or data zipfile could not read (no exception text: it names files)."""
    if isinstance(exc, zipfile.BadZipFile) and str(exc).startswith("Bad CRC-32"):
        reason = "the member's data does not match its CRC-32: the archive is corrupt"
    elif isinstance(exc, zipfile.BadZipFile | UnicodeDecodeError) or getattr(exc, "errno", None) is not None:
        reason = "the member's local header is damaged or disagrees with the central directory"
    elif isinstance(exc, NotImplementedError | RuntimeError):
        reason = f"the member needs a zip feature not supported here ({type(exc).__name__})"
    else:  # zlib.error, LZMAError, bz2's OSError, EOFError: what the decompressor makes of the bytes
        reason = f"the member's {ZIP_METHODS[info.compress_type]} data is corrupt or truncated ({type(exc).__name__})"
    return InstanceRefused(CANNOT_UNDERSTAND, reason)


# --- STOW-RS and zip uploads ---------------------------------------------------------------------------

DICOM_MEDIA_TYPE = "application/dicom"


@dataclass(frozen=True)
class PartOutcome:
    """What became of one STOW-RS part or zip member: stored (status 0) or refused with a DICOM status."""

    name: str
    status: int
    reason: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    duplicate: bool = False

    @property
    def stored(self) -> bool:
        """Whether the tenant holds the instance now (a duplicate counts: it was already there)."""
        return self.status == SUCCESS


def stow_boundary(content_type: str | None) -> bytes:
    """The boundary of a STOW-RS body: 415 unless ``multipart/related`` of ``application/dicom``, 400 without one."""
    media_type, options = parse_options_header(content_type or "")
    media = media_type.decode("latin-1").strip().lower()
    related_type = options.get(b"type", DICOM_MEDIA_TYPE.encode()).decode("latin-1").strip().lower()
    if media != "multipart/related" or related_type != DICOM_MEDIA_TYPE:
        raise UnsupportedMediaType(f'send multipart/related; type="{DICOM_MEDIA_TYPE}" (got {media or "(none)"}'
                                   f"{'; type=' + related_type if media == 'multipart/related' else ''})",
                                   supported=[f'multipart/related; type="{DICOM_MEDIA_TYPE}"'])
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/related without a boundary parameter")
    return boundary


class RelatedPartsReader(MultipartFileReader):
    """A streaming parser of a ``multipart/related`` body whose parts are DICOM files.

    Each part's bytes go to their own file under :func:`incoming_dir` as they arrive (nothing is
    held in memory beyond the chunk being parsed). A part of another type than
    ``application/dicom`` is a 415, a malformed or truncated body a 400. Call :meth:`feed` (from a
    worker thread: it writes files) with each chunk, then :meth:`finish`; :meth:`discard` deletes
    every file when the request fails. Part headers are collected as
    :class:`shared.uploads.MultipartFileReader` collects them; there is no per-body overhead limit
    (a study has one part per slice).
    """

    def __init__(self, boundary: bytes) -> None:
        super().__init__(boundary, field="", part_types=(DICOM_MEDIA_TYPE,))
        self.paths: list[Path] = []
        self._file: IO[bytes] | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        """Parse (and write out) the next bytes of the body; nothing is returned (parts go to files)."""
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from None
        return []

    def finish(self) -> list[Path]:
        """The part files, once the closing boundary came (400 otherwise, or when there is no part)."""
        if not self.body_complete or self._file is not None:
            raise BadRequest("truncated multipart body: it ended before its closing boundary")
        if not self.paths:
            raise BadRequest("the body holds no application/dicom part")
        return list(self.paths)

    def discard(self) -> None:
        """Close and delete every part file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self.paths:
            path.unlink(missing_ok=True)

    def _on_headers_finished(self) -> None:
        media_type, _ = parse_options_header(self._headers.get(b"content-type", b""))
        media = media_type.decode("latin-1").strip().lower()
        if media != DICOM_MEDIA_TYPE:
            raise UnsupportedMediaType(f"part {len(self.paths) + 1} is {media or '(untyped)'}; every part must be "
                                       f"{DICOM_MEDIA_TYPE}", supported=[DICOM_MEDIA_TYPE])
        path = new_incoming_path()
        self.paths.append(path)
        self._file = path.open("xb")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])

    def _on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def store_parts(paths: Sequence[Path], *, tenant_id: str, source: Source,
                expected_study_uid: str | None = None, names: Sequence[str] | None = None) -> list[PartOutcome]:
    """Check and store each received file (each is moved into place or deleted); one outcome each."""
    return [store_one(path, name=names[index] if names else f"part {index + 1}", tenant_id=tenant_id,
                      source=source, expected_study_uid=expected_study_uid)
            for index, path in enumerate(paths)]


def store_one(path: Path, *, name: str, tenant_id: str, source: Source,
              expected_study_uid: str | None = None) -> PartOutcome:
    """Store one received file; its outcome (a refusal is an outcome, not an exception)."""
    try:
        stored = store_file(path, tenant_id=tenant_id, source=source, expected_study_uid=expected_study_uid)
    except InstanceRefused as refused:
        logger.info("instance refused", extra={"source": source, "status": f"0x{refused.status:04X}",
                                               "reason": refused.reason})
        return PartOutcome(name, refused.status, refused.reason, refused.sop_class_uid, refused.sop_instance_uid)
    except Exception as exc:
        # No traceback: a database error's text carries the statement's parameters (the PatientID).
        logger.error("storing an instance failed: %s", type(exc).__name__, extra={"source": source})
        return PartOutcome(name, PROCESSING_FAILURE, "the instance could not be stored (processing failure)")
    parsed = stored.instance
    return PartOutcome(name, SUCCESS, None, parsed.sop_class_uid, parsed.sop_instance_uid,
                       parsed.study_instance_uid, parsed.series_instance_uid, stored.duplicate)


def store_zip(path: Path, *, tenant_id: str) -> list[PartOutcome]:
    """Store each member of an uploaded zip as a STOW-RS part; the zip is deleted afterwards.

    A member that cannot be read (damaged, encrypted, an unsupported compression method) is a
    failed outcome like a member that is not a CT instance; the other members are still stored.

    Raises
    ------
    UnprocessableContent
        When the file is not a readable zip archive (no central directory), or holds no file.
    """
    try:
        outcomes = [_store_member(name, item, tenant_id) for name, item in extract_zip_members(path)]
    finally:
        path.unlink(missing_ok=True)
    if not outcomes:
        raise UnprocessableContent("the zip holds no files (directories and __MACOSX entries are skipped)")
    return outcomes


def _store_member(name: str, item: Path | InstanceRefused, tenant_id: str) -> PartOutcome:
    if isinstance(item, InstanceRefused):
        return PartOutcome(name, item.status, item.reason)
    return store_one(item, name=name, tenant_id=tenant_id, source="upload")


def stow_status_code(outcomes: Sequence[PartOutcome]) -> int:
    """PS3.18 10.5.3: 200 when every instance is stored, 202 when some are, 409 when none is."""
    stored = sum(outcome.stored for outcome in outcomes)
    return 200 if stored == len(outcomes) else 202 if stored else 409


def stow_response(outcomes: Sequence[PartOutcome], base_url: str, study_uid: str | None = None) -> dict[str, Any]:
    """The Store Instances Response (PS3.18 Annex I) as DICOM JSON.

    ``base_url`` is the DICOMweb root (``.../nodule/dicomweb``): each stored instance's RetrieveURL
    is ``<base>/studies/<study>/series/<series>/instances/<sop>``; the top RetrieveURL names the study
    when the request was for one study or every stored instance is of one.
    """
    response = Dataset()
    studies = {outcome.study_instance_uid for outcome in outcomes if outcome.stored}
    study = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    response.RetrieveURL = f"{base_url}/studies/{study}" if study else None
    failed = [_failed_item(outcome) for outcome in outcomes if not outcome.stored]
    referenced = [_referenced_item(outcome, base_url) for outcome in outcomes if outcome.stored]
    if failed:
        response.FailedSOPSequence = failed
    if referenced:
        response.ReferencedSOPSequence = referenced
    return response.to_json_dict()


def _failed_item(outcome: PartOutcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid or ""
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or ""
    item.FailureReason = outcome.status
    return item


def _referenced_item(outcome: PartOutcome, base_url: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    item.RetrieveURL = (f"{base_url}/studies/{outcome.study_instance_uid}/series/{outcome.series_instance_uid}"
                        f"/instances/{outcome.sop_instance_uid}")
    return item
