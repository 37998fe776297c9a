"""Support for the tests of a vertical's HTTP app alone: served by a real uvicorn on loopback with keys
for every scope (:func:`serve_scaffold`), problem checks, and the check that no operation is still
documented as not built (``501``)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from alembic import command
from alembic.config import Config

from shared.db import session_factory
from shared.errors import PROBLEM_CONTENT_TYPE
from shared.security import create_api_key
from tests.conftest import Stack
from tests.support import REPO_ROOT, ManagedProcess, free_port, python_argv

PATH_PARAMETER = re.compile(r"\{[^}]+\}")


@dataclass(frozen=True)
class Endpoint:
    """One declared HTTP endpoint: method, path as the app serves it alone (``/v1/jobs/{job_id}``),
    and a request body of the type it documents (its content is not read before it is built)."""

    method: str
    path: str
    content: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def concrete_path(self) -> str:
        """The path with each parameter filled in."""
        return PATH_PARAMETER.sub("example-1", self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def multipart_file(content: bytes, filename: str = "upload.bin") -> tuple[bytes, dict[str, str]]:
    """A ``multipart/form-data`` body with one ``file`` part, and its Content-Type header."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@dataclass
class ScaffoldServer:
    """A vertical's app served alone on loopback, on a migrated database."""

    base_url: str
    database_url: str
    process: ManagedProcess
    keys: dict[str, str] = field(default_factory=dict)

    def key_for(self, scope: str) -> str:
        """An API key holding ``scope`` alone, of a tenant of its own (made once per server)."""
        if scope not in self.keys:
            with session_factory(self.database_url)() as session:
                self.keys[scope] = create_api_key(session, tenant_id=f"t-{uuid.uuid4().hex[:8]}", name="scaffold",
                                                  scopes=[scope])
                session.commit()
        return self.keys[scope]

    def call(self, endpoint: Endpoint, key: str | None) -> httpx.Response:
        """Send ``endpoint`` its request, with ``key`` as X-API-Key when given."""
        headers = {**endpoint.headers, **({"X-API-Key": key} if key else {})}
        return httpx.request(endpoint.method, self.base_url + endpoint.concrete_path, content=endpoint.content or None,
                             headers=headers, timeout=10)

    def openapi(self) -> dict[str, Any]:
        """The app's OpenAPI document, as served."""
        document: dict[str, Any] = httpx.get(f"{self.base_url}/openapi.json", timeout=10).json()
        return document


def migrate(database_url: str) -> None:
    """Apply every migration to ``database_url`` (in this process: a child would start Python again)."""
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url)
    command.upgrade(config, "head")


@contextmanager
def serve_scaffold(app_path: str, stack: Stack, name: str) -> Iterator[ScaffoldServer]:
    """Migrate ``stack``'s database and serve ``app_path`` (``services.nodule.api:app``) on it."""
    migrate(stack.database_url)
    port = free_port()
    process = ManagedProcess(python_argv("-m", "uvicorn", app_path, "--host", "127.0.0.1", "--port", str(port)),
                             stack.env, name)
    try:
        process.wait_for_output(r"Uvicorn running on", timeout_s=120)
        yield ScaffoldServer(f"http://127.0.0.1:{port}", stack.database_url, process)
    finally:
        process.stop()


def assert_problem(response: httpx.Response, status: int, path: str) -> dict[str, Any]:
    """``response`` is a problem+json document of ``status`` about ``path``; returns it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status and problem["instance"] == path
    return problem








def documented_unbuilt_operations(openapi: dict[str, Any]) -> set[str]:
    """``"METHOD /path"`` of every operation documenting a 501 answer."""
    return {f"{method.upper()} {path}" for path, operations in openapi["paths"].items()
            for method, operation in operations.items() if "501" in operation.get("responses", {})}

