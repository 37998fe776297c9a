"""Streamed uploads (shared/uploads.py): a real uvicorn serving tests/shared/upload_app.py on loopback,
real HTTP clients, and the server's own memory and upload directory watched from outside."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.shared.upload_app import MAX_FILE_BYTES
from tests.support import ManagedProcess, free_port, python_argv, wait_until

BOUNDARY = "tessera-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
CHUNK = 64 << 10
MEMORY_HEADROOM = 16 << 20
"""How much a server's peak RSS may grow while it takes a body several times larger."""


@dataclass
class UploadServer:
    base_url: str
    port: int
    uploads: Path
    process: ManagedProcess

    def stored(self) -> list[str]:
        return sorted(path.name for path in self.uploads.iterdir()) if self.uploads.exists() else []

    def partial_files(self) -> list[Path]:
        return sorted(self.uploads.glob(".incoming-*.part")) if self.uploads.exists() else []

    def peak_memory_growth(self, action: Callable[[], None]) -> int:
        """Bytes the server's peak RSS rose above its RSS before ``action`` (Linux /proc)."""
        proc = Path(f"/proc/{self.process.process.pid}")
        before = _status_bytes(proc, "VmRSS")
        (proc / "clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        action()
        return _status_bytes(proc, "VmHWM") - before


def _status_bytes(proc: Path, field: str) -> int:
    for line in (proc / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in {proc}/status")


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UploadServer]:
    data_dir = tmp_path_factory.mktemp("upload-server")
    port = free_port()
    env = {"TESSERA_DATA_DIR": str(data_dir), "TESSERA_ENVIRONMENT": "test", "TESSERA_LOG_JSON": "false"}
    server = ManagedProcess(python_argv("-m", "uvicorn", "tests.shared.upload_app:app", "--host", "127.0.0.1",
                                        "--port", str(port)), env, "upload-app")
    try:
        server.wait_for_output(r"Uvicorn running on", timeout_s=120)
        yield UploadServer(f"http://127.0.0.1:{port}", port, data_dir / "uploads", server)
    finally:
        server.stop()


@pytest.fixture
def client(upload_server: UploadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upload_server.base_url, timeout=60) as http:
        yield http


def file_part(data: bytes, *, name: str = "file", filename: str | None = "data.csv",
              content_type: str | None = "text/csv") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    headers = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    headers += f"Content-Type: {content_type}\r\n" if content_type else ""
    return (headers + "\r\n").encode() + data + b"\r\n"


CLOSING = f"--{BOUNDARY}--\r\n".encode()


def random_chunks(total: int, digest: hashlib._Hash) -> Iterator[bytes]:
    """``total`` random bytes in 64 KiB chunks, fed to ``digest`` as they are sent."""
    for start in range(0, total, CHUNK):
        chunk = os.urandom(min(CHUNK, total - start))
        digest.update(chunk)
        yield chunk


def assert_problem(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert detail in response.json()["detail"], response.json()


def test_a_multipart_file_is_stored_under_its_checksum(upload_server: UploadServer, client: httpx.Client) -> None:
    data = os.urandom(600_000)
    response = client.post("/v1/files", files={"file": ("../../etc/passwd", data, "text/csv")},
                           data={"note": "a form field besides the file is read and dropped"})
    assert response.status_code == 201, response.text
    record = response.json()
    sha256 = hashlib.sha256(data).hexdigest()
    assert record == {"name": f"file-{sha256}.bin", "size": len(data), "sha256": sha256,
                      "filename": "../../etc/passwd", "content_type": "text/csv"}
    assert (upload_server.uploads / record["name"]).read_bytes() == data, "the name the client gave is not a path"
    again = client.post("/v1/files", files={"file": ("copy.csv", data, "text/csv")})
    assert again.json()["name"] == record["name"], "the same content is stored once"
    assert not upload_server.partial_files()


def test_a_large_raw_body_streams_to_disk_in_bounded_memory(upload_server: UploadServer,
                                                            client: httpx.Client) -> None:
    size, sent = 48 << 20, hashlib.sha256()
    responses: list[httpx.Response] = []

    def upload() -> None:
        responses.append(client.put("/v1/blobs", content=random_chunks(size, sent),
                                    headers={"Content-Type": "application/octet-stream"}))

    growth = upload_server.peak_memory_growth(upload)
    assert responses[0].status_code == 201, responses[0].text
    record = responses[0].json()
    assert (record["size"], record["sha256"]) == (size, sent.hexdigest())
    stored = upload_server.uploads / record["name"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sent.hexdigest()
    assert growth < MEMORY_HEADROOM, f"peak RSS rose {growth >> 20} MiB for a 48 MiB body"
    stored.unlink()


def test_a_file_over_the_limit_is_refused_while_it_streams(upload_server: UploadServer,
                                                          client: httpx.Client) -> None:
    before = upload_server.stored()

    def oversize_body() -> Iterator[bytes]:  # chunked, no Content-Length: only the stream can tell
        yield file_part(b"")[:-2]
        yield from random_chunks(96 << 20, hashlib.sha256())
        yield b"\r\n" + CLOSING

    responses: list[httpx.Response] = []
    growth = upload_server.peak_memory_growth(lambda: responses.append(
        client.post("/v1/files", content=oversize_body(), headers={"Content-Type": MULTIPART})))
    assert_problem(responses[0], 413, f"larger than the {MAX_FILE_BYTES} bytes")
    assert responses[0].json()["max_bytes"] == MAX_FILE_BYTES
    assert growth < MEMORY_HEADROOM, f"peak RSS rose {growth >> 20} MiB for a refused 96 MiB body"
    assert upload_server.stored() == before, "the partial file is deleted"


def test_a_declared_oversize_body_is_refused_before_it_is_sent(upload_server: UploadServer) -> None:
    with socket.create_connection(("127.0.0.1", upload_server.port), timeout=10) as connection:
        connection.sendall(b"PUT /v1/blobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/octet-stream\r\nContent-Length: 10737418240\r\n"
                           b"Expect: 100-continue\r\n\r\n")
        answer = read_http_answer(connection)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"Content-Length 10737418240 is larger" in answer


def read_http_answer(connection: socket.socket) -> bytes:
    """Headers and the whole body (by its Content-Length): they may arrive in separate segments."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = connection.recv(4096)
        if not chunk:
            return answer
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    declared = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    length = int(declared.group(1)) if declared else 0
    while len(body) < length:
        chunk = connection.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_the_file_is_written_while_it_arrives(upload_server: UploadServer, client: httpx.Client) -> None:
    sent = hashlib.sha256()

    def body_that_waits_for_the_disk() -> Iterator[bytes]:
        yield from random_chunks(3 << 20, sent)
        wait_until(lambda: any(path.stat().st_size >= 1 << 20 for path in upload_server.partial_files()),
                   20, "the first MiB on disk before the body ends")
        yield from random_chunks(3 << 20, sent)

    response = client.put("/v1/blobs", content=body_that_waits_for_the_disk(),
                          headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == sent.hexdigest()
    assert not upload_server.partial_files()


def test_a_client_gone_mid_upload_leaves_no_file(upload_server: UploadServer) -> None:
    before = upload_server.stored()
    with socket.create_connection(("127.0.0.1", upload_server.port), timeout=10) as connection:
        connection.sendall(b"PUT /v1/blobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/octet-stream\r\nContent-Length: 8388608\r\n\r\n")
        connection.sendall(os.urandom(3 << 20))
        wait_until(lambda: bool(upload_server.partial_files()), 20, "the upload under way")
    wait_until(lambda: upload_server.stored() == before, 20, "the partial file deleted")


@pytest.mark.parametrize(("body", "content_type", "status", "detail"), [
    (b'{"file": "x"}', "application/json", 415, "send the file as multipart/form-data"),
    (file_part(b"abc", content_type="image/png") + CLOSING, MULTIPART, 415, "'file' is image/png"),
    (file_part(b"abc", content_type=None) + CLOSING, MULTIPART, 415, "'file' is text/plain"),
    (file_part(b"abc", name="other") + CLOSING, MULTIPART, 422, "body.file: Field required"),
    (file_part(b"a,b\n1,2\n" * 1000), MULTIPART, 400, "ended before its closing boundary"),
    (file_part(b"a,b\n1,2\n")[:-40], MULTIPART, 400, "ended before its closing boundary"),
    (b"no boundary here at all" * 10, MULTIPART, 400, "malformed multipart body"),
    (file_part(b"abc") + CLOSING, "multipart/form-data", 400, "without a boundary"),
    (file_part(b"abc") + file_part(b"def") + CLOSING, MULTIPART, 400, "more than one 'file' part"),
    (file_part(b"REFUSE: a head check refuses this") + CLOSING, MULTIPART, 422, "starts with REFUSE"),
])
def test_bad_uploads_are_refused_precisely_and_leave_no_file(
        upload_server: UploadServer, client: httpx.Client, body: bytes, content_type: str, status: int,
        detail: str) -> None:
    before = upload_server.stored()
    assert_problem(client.post("/v1/files", content=body, headers={"Content-Type": content_type}), status, detail)
    assert upload_server.stored() == before


def test_a_raw_upload_of_another_type_is_refused(upload_server: UploadServer, client: httpx.Client) -> None:
    assert_problem(client.put("/v1/blobs", content=b"a,b\n", headers={"Content-Type": "text/csv"}), 415,
                   "Content-Type text/csv is not accepted")


def test_the_upload_routes_document_their_bodies(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    multipart = paths["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["required"] == ["file"] and "contentMediaType" in multipart["properties"]["file"]
    assert "application/octet-stream" in paths["/v1/blobs"]["put"]["requestBody"]["content"]
    assert {"413", "415"} <= set(paths["/v1/files"]["post"]["responses"])
