"""Fixtures for the nodule ingest and API tests: a migrated database, small CT series, our SCP on
loopback, the nodule app under a real uvicorn, API keys per tenant."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.transport import ThreadedAssociationServer

from shared.db import session_factory
from shared.security import create_api_key
from tests.conftest import Stack, apply_stack_in_process, sqlite_stack_at
from tests.nodule.dicom_factory import CtOptions, SeriesIdentity, ct_series, write_instances
from tests.scaffold import migrate
from tests.support import ManagedProcess, free_port, python_argv


@pytest.fixture(scope="module")
def nodule_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A fresh migrated SQLite stack per module (sweeps see only this module's series)."""
    stack = sqlite_stack_at(tmp_path_factory.mktemp("nodule-stack"))
    stack.extra_env.update({"TESSERA_LOG_LEVEL": "WARNING", "TESSERA_NODULE_QUIET_PERIOD_S": "0.5"})
    migrate(stack.database_url)
    return stack


@pytest.fixture
def nodule_env(nodule_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """This process pointed at :func:`nodule_stack` (settings, engine, Celery broker)."""
    apply_stack_in_process(nodule_stack, monkeypatch)
    return nodule_stack


def small_series(*, slices: int = 6, size: int = 32, identity: SeriesIdentity | None = None,
                 transfer_syntax: str = ExplicitVRLittleEndian, slice_spacing: float = 1.0) -> list[Dataset]:
    """A tiny axial CT series (stored values of a gradient), fresh UIDs unless ``identity`` is given."""
    identity = identity or SeriesIdentity.new()
    stored = (np.arange(slices * size * size, dtype=np.int32).reshape(slices, size, size) % 2000).astype(np.int16)
    return ct_series(stored, identity=identity, slice_spacing=slice_spacing,
                     options=CtOptions(transfer_syntax=transfer_syntax))


def part10_bytes(dataset: Dataset, directory: Path) -> bytes:
    """``dataset`` as the bytes of a DICOM Part 10 file."""
    path = write_instances([dataset], directory / uuid.uuid4().hex)[0]
    return path.read_bytes()


@pytest.fixture
def scp(nodule_env: Stack) -> Iterator[int]:
    """Our C-STORE SCP on a free loopback port (in this process); yields the port."""
    from services.nodule.dicom_io import start_scp

    server: ThreadedAssociationServer = start_scp(host="127.0.0.1", port=free_port())
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def new_key(database_url: str, tenant_id: str | None = None, scopes: tuple[str, ...] = ("nodule",)) -> tuple[str, str]:
    """(tenant id, API key) of a new key of ``tenant_id`` (a fresh tenant unless given)."""
    tenant_id = tenant_id or f"h-{uuid.uuid4().hex[:8]}"
    with session_factory(database_url)() as session:
        key = create_api_key(session, tenant_id=tenant_id, name="test", scopes=list(scopes))
        session.commit()
    return tenant_id, key


@dataclass
class NoduleServer:
    """The nodule app alone under uvicorn on :func:`nodule_stack`."""

    stack: Stack
    base_url: str
    process: ManagedProcess

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"X-API-Key": key}, timeout=30)


@contextlib.contextmanager
def serve_nodule(stack: Stack) -> Iterator[NoduleServer]:
    """Serve ``services.nodule.api:app`` on a free loopback port until the block ends."""
    port = free_port()
    process = ManagedProcess(python_argv("-m", "uvicorn", "services.nodule.api:app", "--host", "127.0.0.1",
                                         "--port", str(port)), stack.env, "nodule-api")
    try:
        process.wait_for_output(r"Uvicorn running on", timeout_s=120)
        yield NoduleServer(stack, f"http://127.0.0.1:{port}", process)
    finally:
        process.stop()
        if "Traceback" in process.output:
            print(f"--- nodule server log with errors ---\n{process.output[-6000:]}")


@pytest.fixture(scope="module")
def nodule_server(nodule_stack: Stack) -> Iterator[NoduleServer]:
    with serve_nodule(nodule_stack) as server:
        yield server


@pytest.fixture(autouse=True, scope="module")
def _detector_closed_after_module() -> Iterator[None]:
    """A module that ran an analysis in this process leaves no detector loaded in the shared runtime."""
    yield
    from services.nodule.analysis import close_detector

    close_detector()
