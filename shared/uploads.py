"""Large uploads streamed to a file under the data directory, with a size limit and a sha256.

A route that takes a file declares no ``UploadFile`` parameter: FastAPI would parse the whole
multipart body before the route (and its API-key dependency) runs, and Starlette's parser spools
each file to a ``SpooledTemporaryFile`` (1 MiB in memory, then an anonymous file in the system
temp directory) with no size limit of its own; only a route's ``max_body_size`` would cap it.
Instead the route reads the request itself, after its dependencies have authorized the caller::

    @router.post("/v1/backtests", status_code=202, openapi_extra=multipart_upload_body("file"),
                 responses=problem_responses(400, 413, 415, 422))
    async def post_backtest(request: Request, principal: FraudPrincipal) -> ...:
        upload = await receive_multipart_upload(request, uploads_dir(), max_bytes=MAX_BACKTEST_BYTES,
                                                name_prefix="backtest-", name_suffix=".csv")

The body is fed to python-multipart's streaming parser chunk by chunk as it arrives; the file's
bytes are hashed and written to ``<directory>/.incoming-<random>.part`` (at most
:data:`WRITE_BATCH_BYTES` held in memory, written and hashed in a worker thread) and, once the
closing boundary has come, renamed to ``<directory>/<name_prefix><sha256><name_suffix>``: the
same content is stored once, and a reader never sees a partial file under a final name.

Answers, all problem+json, and the partial file deleted with each:

- 413 as soon as the file passes ``max_bytes`` (or a declared ``Content-Length`` says it will,
  before a byte is read), or the multipart parts besides the file pass
  :data:`MAX_MULTIPART_OVERHEAD_BYTES`;
- 415 for a request that is not ``multipart/form-data`` (or, raw, not one of the route's types),
  or a file part whose type the route does not take;
- 400 for a malformed multipart body, or one that ends before its closing boundary (a client
  that disconnects mid-upload; python-multipart's ``finalize()`` does not check this, so a
  truncated file would otherwise pass as complete), or a second part with the file's name;
- 422 when the file field is missing, or what ``check_head`` raises for the file's first bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from shared.errors import BadRequest, PayloadTooLarge, UnprocessableContent, UnsupportedMediaType

WRITE_BATCH_BYTES = 1 << 20
"""Received bytes are written (and hashed) in batches of this size, off the event loop."""
MAX_MULTIPART_OVERHEAD_BYTES = 64 << 10
"""Room for boundaries, part headers and small form fields besides the file."""
MAX_DECOMPRESSION_RATIO = 100
"""Decompressed bytes allowed per compressed byte of an upload (CSV compresses 5-20x, CT slices 2-5x;
a zero-filled bomb ~1000x)."""
DECOMPRESSION_RATIO_FLOOR = 256 << 20
"""Below this many decompressed bytes the ratio is not checked (a small, very regular file is fine)."""


def decompression_limit(compressed_bytes: int, max_bytes: int | None = None) -> int:
    """The most bytes an upload of ``compressed_bytes`` (gzip, zip) may decompress to, at most ``max_bytes``."""
    limit = max(DECOMPRESSION_RATIO_FLOOR, compressed_bytes * MAX_DECOMPRESSION_RATIO)
    return limit if max_bytes is None else min(max_bytes, limit)
DEFAULT_HEAD_BYTES = 64 << 10
PARTIAL_SUFFIX = ".part"
MAX_FILENAME_CHARS = 255

HeadCheck = Callable[[bytes], None]
"""Called once with the file's first ``head_bytes`` (all of it when shorter); raises to refuse it."""


@dataclass(frozen=True, slots=True)
class StoredUpload:
    """A complete upload on disk: where, how large (bytes), its hex sha256, and what the client said
    its name and type were (never used to build the path)."""

    path: Path
    size: int
    sha256: str
    filename: str | None
    content_type: str | None


class UploadSink:
    """The file being received: written under a partial name, hashed, limited, renamed when complete."""

    def __init__(self, directory: Path, *, max_bytes: int, check_head: HeadCheck | None = None,
                 head_bytes: int = DEFAULT_HEAD_BYTES) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.max_bytes = max_bytes
        self.size = 0
        self.partial_path = directory / f".incoming-{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
        self._file: IO[bytes] | None = self.partial_path.open("xb")
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._check_head = check_head
        self._head_bytes = head_bytes
        self._head = bytearray()

    async def write(self, data: bytes) -> None:
        """Take the next bytes of the file; 413 once past ``max_bytes``."""
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"the file is larger than the {self.max_bytes} bytes this route accepts",
                                  max_bytes=self.max_bytes)
        self._feed_head(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= WRITE_BATCH_BYTES:
            await self._flush()

    async def finish(self, name_prefix: str, name_suffix: str, filename: str | None,
                     content_type: str | None) -> StoredUpload:
        """Write what is left, check the head if not yet done, rename to the content's name."""
        self._run_head_check()
        await self._flush()
        assert self._file is not None
        await asyncio.to_thread(self._file.close)
        self._file = None
        digest = self._hash.hexdigest()
        path = self.directory / f"{name_prefix}{digest}{name_suffix}"
        os.replace(self.partial_path, path)
        return StoredUpload(path=path, size=self.size, sha256=digest, filename=filename, content_type=content_type)

    @contextlib.contextmanager
    def deleted_unless_complete(self) -> Iterator[None]:
        """Delete the partial file when the block raises: a refusal, a failure, a client gone (a 400)."""
        try:
            yield
        except ClientDisconnect:
            self.discard()
            raise BadRequest("the client closed the connection before the body ended") from None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Close and delete the partial file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.partial_path.unlink(missing_ok=True)

    def _feed_head(self, data: bytes) -> None:
        if self._check_head is None:
            return
        self._head += data[:self._head_bytes - len(self._head)]
        if len(self._head) >= self._head_bytes:
            self._run_head_check()

    def _run_head_check(self) -> None:
        check, self._check_head = self._check_head, None
        if check is not None:
            check(bytes(self._head))

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        await asyncio.to_thread(self._write_and_hash, batch)

    def _write_and_hash(self, batch: bytes) -> None:
        assert self._file is not None
        self._hash.update(batch)  # hashlib releases the GIL on large buffers
        self._file.write(batch)


def media_type_of(content_type: str | None) -> str:
    """``text/csv`` of ``text/CSV; charset=utf-8``; empty for none."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def refuse_declared_size(request: Request, limit: int) -> None:
    """413 before reading a byte when ``Content-Length`` already says the body is over ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Content-Length {declared} is larger than the {limit} bytes this route accepts",
                              max_bytes=limit)


async def receive_body_upload(request: Request, directory: Path, *, max_bytes: int, content_types: Sequence[str],
                              name_prefix: str = "", name_suffix: str = "", check_head: HeadCheck | None = None,
                              head_bytes: int = DEFAULT_HEAD_BYTES) -> StoredUpload:
    """Stream a raw request body (``PUT`` of a file) to ``directory``; its type must be one of ``content_types``."""
    content_type = request.headers.get("content-type")
    if media_type_of(content_type) not in content_types:
        raise UnsupportedMediaType(f"Content-Type {media_type_of(content_type) or '(none)'} is not accepted here; "
                                   f"send one of {', '.join(content_types)}", supported=list(content_types))
    refuse_declared_size(request, max_bytes)
    sink = UploadSink(directory, max_bytes=max_bytes, check_head=check_head, head_bytes=head_bytes)
    with sink.deleted_unless_complete():
        async for chunk in request.stream():
            await sink.write(chunk)
        return await sink.finish(name_prefix, name_suffix, None, content_type)


async def receive_multipart_upload(request: Request, directory: Path, *, max_bytes: int, field: str = "file",
                                   part_types: Sequence[str] = (), name_prefix: str = "", name_suffix: str = "",
                                   check_head: HeadCheck | None = None,
                                   head_bytes: int = DEFAULT_HEAD_BYTES) -> StoredUpload:
    """Stream the ``field`` file of a ``multipart/form-data`` body to ``directory`` (module docstring).

    ``part_types``: the file part's accepted media types (any when empty). Other parts are read
    and dropped, within :data:`MAX_MULTIPART_OVERHEAD_BYTES`.
    """
    boundary = multipart_boundary(request.headers.get("content-type"))
    refuse_declared_size(request, max_bytes + MAX_MULTIPART_OVERHEAD_BYTES)
    sink = UploadSink(directory, max_bytes=max_bytes, check_head=check_head, head_bytes=head_bytes)
    reader = MultipartFileReader(boundary, field, part_types)
    with sink.deleted_unless_complete():
        async for chunk in request.stream():
            for data in reader.feed(chunk):
                await sink.write(data)
        reader.check_complete()
        return await sink.finish(name_prefix, name_suffix, reader.filename, reader.content_type)


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type: 415 for another type, 400 without one."""
    if media_type_of(content_type) != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type {media_type_of(content_type) or '(none)'} is not accepted here; "
                                   "send the file as multipart/form-data (curl: -F file=@FILE)",
                                   supported=["multipart/form-data"])
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")
    return boundary


class MultipartFileReader:
    """python-multipart's streaming parser, keeping one file field's bytes and dropping the rest.

    :meth:`feed` returns the file's bytes found in a chunk; the parser's callbacks only record
    (they cannot await), as Starlette's own parser does.
    """

    def __init__(self, boundary: bytes, field: str, part_types: Sequence[str]) -> None:
        self.field = field
        self.part_types = part_types
        self.filename: str | None = None
        self.content_type: str | None = None
        self.file_seen = False
        self.file_complete = False
        self.body_complete = False
        self.overhead_bytes = 0
        self._in_file = False
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._file_data: list[bytes] = []
        try:
            self._parser = MultipartParser(boundary, callbacks={
                "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end, "on_end": self._on_end})
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from None

    def feed(self, chunk: bytes) -> list[bytes]:
        """Parse the next chunk of the body; the file's bytes in it."""
        self._file_data = []
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from None
        self.overhead_bytes += len(chunk) - sum(map(len, self._file_data))
        if self.overhead_bytes > MAX_MULTIPART_OVERHEAD_BYTES:
            raise PayloadTooLarge(f"the parts besides '{self.field}' are larger than "
                                  f"{MAX_MULTIPART_OVERHEAD_BYTES} bytes")
        return self._file_data

    def check_complete(self) -> None:
        """After the last chunk: 400 for a body cut short, 422 for one without the file field."""
        if not self.body_complete:
            raise BadRequest("truncated multipart body: it ended before its closing boundary")
        if not self.file_complete:
            raise UnprocessableContent(f"body.{self.field}: Field required", errors=[
                {"loc": ["body", self.field], "msg": "Field required", "type": "missing"}])

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if options.get(b"name", b"").decode("utf-8", errors="replace") != self.field:
            self._in_file = False
            return
        if self.file_seen:
            raise BadRequest(f"more than one '{self.field}' part")
        content_type = self._headers.get(b"content-type", b"").decode("latin-1") or None
        media_type = media_type_of(content_type) or "text/plain"  # an untyped part's type (RFC 7578 4.4)
        if self.part_types and media_type not in self.part_types:
            raise UnsupportedMediaType(f"'{self.field}' is {media_type}; send one of {', '.join(self.part_types)}",
                                       supported=list(self.part_types))
        filename = options.get(b"filename")
        self.filename = filename.decode("utf-8", errors="replace")[:MAX_FILENAME_CHARS] if filename else None
        self.content_type = content_type
        self.file_seen = self._in_file = True

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._file_data.append(data[start:end])

    def _on_part_end(self) -> None:
        if self._in_file:
            self.file_complete = True
        self._in_file = False

    def _on_end(self) -> None:
        self.body_complete = True


def multipart_upload_body(field: str = "file", *, description: str = "the file", media_type: str | None = None,
                          max_bytes: int | None = None) -> dict[str, Any]:
    """A route's ``openapi_extra`` documenting a ``multipart/form-data`` body with one file field,
    read by :func:`receive_multipart_upload` (the route declares no ``UploadFile`` parameter)."""
    file_schema = binary_schema(media_type or "application/octet-stream", description, max_bytes)
    content: dict[str, Any] = {"schema": {"type": "object", "required": [field], "properties": {field: file_schema}}}
    if media_type:
        content["encoding"] = {field: {"contentType": media_type}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": content}}}


def raw_upload_body(content_types: Sequence[str], *, description: str = "the file",
                    max_bytes: int | None = None) -> dict[str, Any]:
    """A route's ``openapi_extra`` documenting a raw file body read by :func:`receive_body_upload`."""
    content = {media_type: {"schema": binary_schema(media_type, description, max_bytes)}
               for media_type in content_types}
    return {"requestBody": {"required": True, "content": content}}


def binary_schema(media_type: str, description: str, max_bytes: int | None) -> dict[str, Any]:
    """OpenAPI 3.1's schema of a file's bytes (``contentMediaType``, as FastAPI writes an ``UploadFile``)."""
    limit = f" (at most {max_bytes} bytes)" if max_bytes else ""
    return {"type": "string", "contentMediaType": media_type, "description": description + limit}
