"""A real PACS for tests: Debian's Orthanc on free loopback ports with its own config and storage.

``run_orthanc(directory)`` starts ``Orthanc`` (the binary from the ``orthanc`` package) with a
temporary configuration, storage and index under ``directory``, DICOM and HTTP servers on free
ports, no plugins and no authentication (HTTP answers loopback only), waits until both listen,
yields an :class:`OrthancServer` and stops the process afterwards. :func:`require_orthanc` skips
the calling test when the binary is absent, and fails it under ``CI=true`` (as
:func:`tests.conftest.require_listening` does for the other servers); ``scripts/ensure_services.sh``
installs the package.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import running_in_ci
from tests.support import free_port

ORTHANC_BINARY_NAMES = ("Orthanc", "orthanc")
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def orthanc_binary() -> str | None:
    """The Orthanc executable on PATH (Debian installs ``/usr/sbin/Orthanc``), or ``None``."""
    for name in ORTHANC_BINARY_NAMES:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if found:
            return found
    return None


def require_orthanc() -> str:
    """The Orthanc executable; skip the calling test without it (fail it under CI)."""
    binary = orthanc_binary()
    if binary:
        return binary
    message = ("Orthanc is not installed: the real-PACS tests cannot run "
               "(`apt-get install -y orthanc`, or run scripts/ensure_services.sh)")
    if running_in_ci():
        pytest.fail(f"{message}; CI=true: a skipped variant fails the run", pytrace=False)
    pytest.skip(message)


@dataclass
class OrthancServer:
    """A running Orthanc: where to send DICOM and how to read it back over its REST API."""

    ae_title: str
    dicom_port: int
    http_port: int
    directory: Path
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    def get(self, path: str) -> httpx.Response:
        """GET a REST path (``/instances``, ``/system`` ...), raising for an error status."""
        response = httpx.get(self.url + path, timeout=10.0)
        response.raise_for_status()
        return response

    def instance_id(self, sop_instance_uid: str) -> str | None:
        """Orthanc's identifier of the instance with this SOP Instance UID, or ``None`` if not stored."""
        response = httpx.post(f"{self.url}/tools/lookup", content=sop_instance_uid, timeout=10.0)
        response.raise_for_status()
        matches: list[dict[str, Any]] = response.json()
        return next((match["ID"] for match in matches if match.get("Type") == "Instance"), None)

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file (``GET /instances/{id}/file``)."""
        identifier = self.instance_id(sop_instance_uid)
        if identifier is None:
            raise KeyError(f"Orthanc holds no instance {sop_instance_uid}")
        return self.get(f"/instances/{identifier}/file").content

    def log_tail(self, characters: int = 2000) -> str:
        """The end of Orthanc's log (for failure messages)."""
        log = self.directory / "orthanc.log"
        return log.read_text(errors="replace")[-characters:] if log.exists() else ""


def _config(directory: Path, ae_title: str, dicom_port: int, http_port: int, check_called_aet: bool) -> dict[str, Any]:
    return {
        "Name": "tessera-test-pacs", "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"), "StorageCompression": False,
        "Plugins": [], "LuaScripts": [], "ConcurrentJobs": 1, "SaveJobs": False,
        "HttpServerEnabled": True, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "WebDavEnabled": False, "OrthancExplorerEnabled": False,
        "DicomServerEnabled": True, "DicomAet": ae_title, "DicomPort": dicom_port,
        "DicomCheckCalledAet": check_called_aet, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": False, "DicomScpTimeout": 30, "StableAge": 60,
    }


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def _wait_until_ready(server: OrthancServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/system", timeout=1.0).status_code == 200 and _listening(
                    server.host, server.dicom_port):
                return
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def run_orthanc(directory: Path, *, ae_title: str = "ORTHANC", check_called_aet: bool = True,
                startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[OrthancServer]:
    """Run Orthanc with everything under ``directory``; stop it on exit.

    Parameters
    ----------
    directory : Path
        Holds ``orthanc.json``, the storage, the index and ``orthanc.log``.
    ae_title : str
        Orthanc's AE title.
    check_called_aet : bool
        Refuse associations whose called AE title is not ``ae_title`` (as a real PACS would).
    startup_timeout_s : float
    """
    binary = require_orthanc()
    directory.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = directory / "orthanc.json"
    config.write_text(json.dumps(_config(directory, ae_title, dicom_port, http_port, check_called_aet), indent=2))
    with (directory / "orthanc.log").open("wb") as log:
        process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=directory)
    server = OrthancServer(ae_title=ae_title, dicom_port=dicom_port, http_port=http_port, directory=directory,
                           process=process)
    try:
        _wait_until_ready(server, startup_timeout_s)
        yield server
    finally:
        _stop(process)
