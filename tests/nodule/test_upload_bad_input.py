"""Bad input to the nodule API under a real uvicorn, each answered by a precise 4xx or a failed item:
zip members that cannot be read (corrupt deflate data, a CRC error, encryption, a compression method
that is unsupported or wrong for the bytes) fail alone while the other members are stored; a zip
with no file and one whose central directory cannot be read are 422s; a STOW-RS study path that is
not a DICOM UID is a 400; clinical data is not coerced from strings or integers. No upload leaves
a partial file behind."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.nodule import dicom_io
from tests.nodule.conftest import NoduleServer, new_key, part10_bytes, small_series
from tests.nodule.test_api import dicom_parts, related, stow

PROBLEM = "application/problem+json"
LOCAL_HEADER_BYTES, CENTRAL_HEADER_BYTES = 30, 46
INVALID_DEFLATE_BLOCK = b"\x07"
"""BFINAL set and block type 3, which RFC 1951 reserves: inflate fails at the first byte."""


@pytest.fixture(scope="module")
def tenant(nodule_server: NoduleServer) -> tuple[str, str]:
    return new_key(nodule_server.stack.database_url)


@dataclass
class ZipBytes:
    """A zip being patched: its bytes and where a member's headers and data start."""

    data: bytearray

    def info(self, name: str) -> zipfile.ZipInfo:
        with zipfile.ZipFile(io.BytesIO(bytes(self.data))) as archive:
            return archive.getinfo(name)

    def local_header(self, name: str) -> int:
        return self.info(name).header_offset

    def central_header(self, name: str) -> int:
        """The central directory entry: the last copy of the name (it follows every local entry)."""
        return self.data.rindex(name.encode()) - CENTRAL_HEADER_BYTES

    def data_offset(self, name: str) -> int:
        header = self.local_header(name)
        name_length, extra_length = struct.unpack_from("<HH", self.data, header + 26)
        return header + LOCAL_HEADER_BYTES + name_length + extra_length

    def set_flags(self, name: str, bits: int) -> None:
        for offset in (self.local_header(name) + 6, self.central_header(name) + 8):
            struct.pack_into("<H", self.data, offset, struct.unpack_from("<H", self.data, offset)[0] | bits)

    def set_method(self, name: str, method: int) -> None:
        for offset in (self.local_header(name) + 8, self.central_header(name) + 10):
            struct.pack_into("<H", self.data, offset, method)


def zip_of(members: list[tuple[str, bytes, int]]) -> ZipBytes:
    """A zip of (name, bytes, compression method) members, ready to patch."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, method in members:
            archive.writestr(name, data, compress_type=method)
    return ZipBytes(bytearray(buffer.getvalue()))


def corrupt_deflate(archive: ZipBytes, name: str) -> None:
    archive.data[archive.data_offset(name)] = INVALID_DEFLATE_BLOCK[0]


def flip_a_data_byte(archive: ZipBytes, name: str) -> None:
    archive.data[archive.data_offset(name) + archive.info(name).compress_size // 2] ^= 0xFF


def encrypt_flag(archive: ZipBytes, name: str) -> None:
    archive.set_flags(name, 0x0001)


def method(number: int) -> Callable[[ZipBytes, str], None]:
    def patch(archive: ZipBytes, name: str) -> None:
        archive.set_method(name, number)
    return patch


def upload(server: NoduleServer, key: str, data: bytes) -> httpx.Response:
    with server.client(key) as client:
        return client.post("/v1/uploads", files={"file": ("series.zip", data, "application/zip")})


def leftovers(server: NoduleServer) -> list[Path]:
    """What an upload left in the incoming directory (partial members, the zip itself)."""
    incoming = Path(server.stack.data_dir) / "nodule" / ".incoming"
    return list(incoming.iterdir()) if incoming.exists() else []


@pytest.mark.parametrize(("patch", "bad_method", "reason"), [
    (corrupt_deflate, zipfile.ZIP_DEFLATED, "deflate data is corrupt"),
    (flip_a_data_byte, zipfile.ZIP_STORED, "CRC-32"),
    (encrypt_flag, zipfile.ZIP_STORED, "encrypted"),
    (method(99), zipfile.ZIP_STORED, "compression method 99 is not supported"),
    (method(zipfile.ZIP_BZIP2), zipfile.ZIP_STORED, "bzip2 data is corrupt"),
    (method(zipfile.ZIP_LZMA), zipfile.ZIP_STORED, "LZMA data is corrupt"),
], ids=["corrupt-deflate", "crc-error", "encrypted", "method-99", "bzip2-on-stored-data", "lzma-on-stored-data"])
def test_a_member_that_cannot_be_read_fails_alone_and_the_others_are_stored(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path,
        patch: Callable[[ZipBytes, str], None], bad_method: int, reason: str) -> None:
    """Was a 500 (zlib.error, RuntimeError, OSError, LZMAError) or a 422 after the first member was
    stored, with a .part file left behind each time."""
    datasets = small_series(slices=3)
    first, bad, last = (part10_bytes(dataset, tmp_path) for dataset in datasets)
    archive = zip_of([("1.dcm", first, zipfile.ZIP_DEFLATED), ("2.dcm", bad, bad_method),
                      ("3.dcm", last, zipfile.ZIP_STORED)])
    patch(archive, "2.dcm")
    response = upload(nodule_server, tenant[1], bytes(archive.data))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["stored"], answer["failed"]) == (2, 1)
    assert [(item["member"], item["stored"]) for item in answer["items"]] == [
        ("1.dcm", True), ("2.dcm", False), ("3.dcm", True)]
    failed = answer["items"][1]
    assert failed["status"] == dicom_io.CANNOT_UNDERSTAND and reason in failed["reason"]
    with nodule_server.client(tenant[1]) as client:
        study = client.get(f"/v1/studies/{datasets[0].StudyInstanceUID}").json()
    assert study["series"][0]["instance_count"] == 2
    assert leftovers(nodule_server) == []


def test_a_zip_that_holds_no_file_is_a_422(nodule_server: NoduleServer, tenant: tuple[str, str]) -> None:
    """An end-of-central-directory record alone was a 200 that stored nothing."""
    directory_only = zip_of([])
    with zipfile.ZipFile(buffer := io.BytesIO(), "w") as archive:
        archive.mkdir("series")
        archive.writestr("__MACOSX/._1.dcm", b"resource fork")
    for data in (bytes(directory_only.data), buffer.getvalue()):
        response = upload(nodule_server, tenant[1], data)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["detail"].startswith("the zip holds no files")
    assert leftovers(nodule_server) == []


def test_a_zip_whose_central_directory_cannot_be_read_is_a_422(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path) -> None:
    """A name flagged UTF-8 that is not UTF-8 made zipfile raise UnicodeDecodeError: a 500."""
    archive = zip_of([("a.dcm", part10_bytes(small_series(slices=1)[0], tmp_path), zipfile.ZIP_STORED)])
    central = archive.central_header("a.dcm")
    archive.set_flags("a.dcm", 0x0800)
    archive.data[central + CENTRAL_HEADER_BYTES] = 0xFF
    truncated = bytes(zip_of([("a.dcm", b"x" * 100, zipfile.ZIP_STORED)]).data)[:-30]
    for data in (bytes(archive.data), truncated):
        response = upload(nodule_server, tenant[1], data)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["detail"].startswith("the upload is not a readable zip archive")
    assert leftovers(nodule_server) == []


@pytest.mark.parametrize(("path", "why"), [
    ("not-a-uid%00x", "digits and dots"),
    ("1.02.3", "leading zero"),
    ("1..2", "none empty"),
    ("1.2.3%0A", "digits and dots"),
    ("1." + "2" * 63, "65 characters long"),
])
def test_a_study_scoped_stow_to_a_path_that_is_not_a_uid_is_a_400(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path, path: str, why: str) -> None:
    """Was stored against the path as given: a 409 whose RetrieveURL held a NUL."""
    body, headers = related(dicom_parts(small_series(slices=1), tmp_path))
    response = stow(nodule_server, tenant[1], body, headers, study=path)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == PROBLEM
    detail = response.json()["detail"]
    assert detail.startswith("the study instance UID in the path is not a DICOM UID") and why in detail
    assert leftovers(nodule_server) == []


@pytest.mark.parametrize("body", [
    b'{"pack_years": "3"}', b'{"pack_years": true}', b'{"pack_years": NaN}', b'{"pack_years": Infinity}',
    b'{"current_smoker": "yes"}', b'{"current_smoker": 1}', b'{"emphysema": "true"}',
    b'{"family_history_lung_cancer": 0}',
])
def test_clinical_data_is_not_coerced_from_strings_or_integers(
        nodule_server: NoduleServer, tenant: tuple[str, str], tmp_path: Path, body: bytes) -> None:
    """ "3" was stored as 3.0 and "yes" or 1 as true."""
    datasets = small_series(slices=1)
    study = str(datasets[0].StudyInstanceUID)
    stow_body, headers = related(dicom_parts(datasets, tmp_path))
    assert stow(nodule_server, tenant[1], stow_body, headers).status_code == 200
    with nodule_server.client(tenant[1]) as client:
        refused = client.post(f"/v1/studies/{study}/clinical", content=body,
                              headers={"Content-Type": "application/json"})
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == PROBLEM
        assert client.get(f"/v1/studies/{study}").json()["clinical"] is None
        accepted = client.post(f"/v1/studies/{study}/clinical", json={"pack_years": 3, "current_smoker": False})
        assert accepted.status_code == 200, accepted.text
        assert (accepted.json()["pack_years"], accepted.json()["current_smoker"]) == (3.0, False)
