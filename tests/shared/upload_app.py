"""A service app with streamed upload routes for tests/shared/test_uploads.py, served by a real
uvicorn: ``uvicorn tests.shared.upload_app:app`` (files go to ``$TESSERA_DATA_DIR/uploads``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from shared.app import create_service_app
from shared.config import get_settings
from shared.errors import UnprocessableContent, problem_responses
from shared.uploads import (
    StoredUpload,
    multipart_upload_body,
    raw_upload_body,
    receive_body_upload,
    receive_multipart_upload,
)

MAX_FILE_BYTES = 1 << 20
MAX_BLOB_BYTES = 256 << 20
router = APIRouter()


def uploads_dir() -> Path:
    return get_settings().data_dir / "uploads"


def refuse_marked_files(head: bytes) -> None:
    """A head check: a file starting with ``REFUSE`` is refused before the rest is stored."""
    if head.startswith(b"REFUSE"):
        raise UnprocessableContent("the file starts with REFUSE")


def described(upload: StoredUpload) -> dict[str, Any]:
    return {"name": upload.path.name, "size": upload.size, "sha256": upload.sha256, "filename": upload.filename,
            "content_type": upload.content_type}


@router.post("/v1/files", status_code=201, responses=problem_responses(400, 413, 415, 422),
             openapi_extra=multipart_upload_body("file", max_bytes=MAX_FILE_BYTES))
async def post_file(request: Request) -> dict[str, Any]:
    """A CSV or binary file as the multipart field ``file``."""
    upload = await receive_multipart_upload(request, uploads_dir(), max_bytes=MAX_FILE_BYTES,
                                            part_types=("text/csv", "application/octet-stream"),
                                            name_prefix="file-", name_suffix=".bin", check_head=refuse_marked_files)
    return described(upload)


@router.put("/v1/blobs", status_code=201, responses=problem_responses(400, 413, 415),
            openapi_extra=raw_upload_body(["application/octet-stream"], max_bytes=MAX_BLOB_BYTES))
async def put_blob(request: Request) -> dict[str, Any]:
    """A file as the raw body."""
    upload = await receive_body_upload(request, uploads_dir(), max_bytes=MAX_BLOB_BYTES,
                                       content_types=("application/octet-stream",), name_prefix="blob-")
    return described(upload)


app = create_service_app("upload-test", title="Upload test app", routers=[router], check_broker=False)
