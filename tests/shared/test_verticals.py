"""The vertical registry: discovery, clashes refused, and a new vertical added without touching the
platform (its app, queue, scope, command and listener picked up by `tessera up`)."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest

from shared.verticals import RegistryError, discover_verticals, verticals
from tests.support import REPO_ROOT, ManagedProcess, free_port, python_argv, wait_until


def write_package(root: Path, files: dict[str, str]) -> None:
    """Write ``files`` (relative path -> source) under ``root``, with every package's ``__init__``."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            if parent != Path("."):
                (root / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))


def test_the_four_verticals_declare_themselves() -> None:
    by_name = {vertical.name: vertical for vertical in verticals()}
    assert set(by_name) == {"fraud", "cs", "nodule", "iiot"}
    assert by_name["cs"].package == "services.customer_service" and by_name["cs"].prefix == "/cs"
    assert by_name["fraud"].module_name(by_name["fraud"].task_module or "") == "services.fraud.tasks"
    assert by_name["fraud"].commands["train"] == "training:main"


def test_shared_and_the_runtime_import_no_vertical() -> None:
    for folder in ("shared", "model_runtime"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(name.split(".")[0] == "services" for name in names), f"{path} imports {names}"


@pytest.mark.parametrize(("declarations", "message"), [
    ({"a": 'Vertical(name="same", title="A")', "b": 'Vertical(name="same", title="B")'}, "is taken"),
    ({"a": 'Vertical(name="admin", title="A")'}, "is taken"),
    ({"a": 'Vertical(name="Bad-Name", title="A")'}, "must match"),
    ({"a": 'Vertical(name="a", title="A", commands={"deploy": "x:main"})'}, "unknown commands"),
    ({"a": "None"}, "must define VERTICAL"),
])
def test_a_bad_or_clashing_declaration_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  declarations: dict[str, str], message: str) -> None:
    root_package = f"bad_verticals_{abs(hash(message)) % 10_000}"
    write_package(tmp_path, {f"{root_package}/{name}/vertical.py":
                             f"from shared.verticals import Vertical\nVERTICAL = {source}\n"
                             for name, source in declarations.items()})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError, match=message):
        discover_verticals(root_package)


ECHO_VERTICAL = {
    "extra_verticals/echo/vertical.py": """
        from shared.verticals import Listener, Vertical
        VERTICAL = Vertical(name="echo", title="Echo", tables_module=None,
                            listeners=(Listener("tcp", "listener:serve", description="line echo"),),
                            commands={"simulate": "simulate:main"})
        """,
    "extra_verticals/echo/api.py": """
        from fastapi import APIRouter
        from shared.app import create_service_app
        router = APIRouter(prefix="/v1")
        @router.get("/ping")
        async def ping() -> dict[str, bool]:
            return {"pong": True}
        app = create_service_app("echo", title="Echo", routers=[router])
        """,
    "extra_verticals/echo/tasks.py": """
        from shared.queue import celery_app
        @celery_app.task(name="echo.ping", queue="echo")
        def ping() -> str:
            return "pong"
        """,
    "extra_verticals/echo/simulate.py": """
        def main(argv: list[str]) -> int:
            print("echo simulate", *argv)
            return 0
        """,
    "extra_verticals/echo/listener.py": """
        import os, socket, threading
        def serve(stop: threading.Event) -> None:
            server = socket.create_server(("127.0.0.1", int(os.environ["ECHO_PORT"])))
            server.settimeout(0.1)
            while not stop.is_set():
                try:
                    connection, _ = server.accept()
                except TimeoutError:
                    continue
                with connection:
                    connection.sendall(connection.recv(1024))
            server.close()
        """,
}


def echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(payload)
        return connection.recv(1024)


def listening(port: int) -> bool:
    try:
        return echo(port, b"hello") == b"hello"
    except OSError:
        return False


def answers_ready(client: httpx.Client) -> bool:
    """``GET /readyz`` answers 200; the gateway may not listen yet (``tessera up`` starts it beside the worker)."""
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_a_new_vertical_is_served_queued_scoped_and_listened_for_without_platform_changes(tmp_path: Path) -> None:
    write_package(tmp_path / "code", ECHO_VERTICAL)
    api_port, echo_port = free_port(), free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "code"), str(REPO_ROOT)]),
           "TESSERA_VERTICALS_PACKAGE": "extra_verticals", "TESSERA_DATA_DIR": str(tmp_path / "data"),
           "TESSERA_PORT": str(api_port), "TESSERA_LOG_JSON": "false", "ECHO_PORT": str(echo_port),
           "PYTHONUNBUFFERED": "1"}
    tessera = python_argv("-m", "services.cli")
    listed = subprocess.run([*tessera, "verticals", "--json"], env={**os.environ, **env}, cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    assert [row["name"] for row in json.loads(listed.stdout)] == ["echo"]
    up = ManagedProcess([*tessera, "up"], env, "tessera-up")
    try:
        up.wait_for_output(r"ready\.", timeout_s=120)
        wait_until(lambda: listening(echo_port), 60, "the echo listener to answer")
        assert ".> echo " in up.output  # the worker consumes the new vertical's queue
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as client:
            wait_until(lambda: answers_ready(client), 60, "the gateway to be ready")
            assert client.get("/readyz").json()["checks"]["echo"] == "ok"
            assert client.get("/echo/v1/ping").json() == {"pong": True}
            assert client.get("/fraud/healthz").status_code == 404  # only registered verticals are served
        keys = subprocess.run([*tessera, "keys", "create", "--tenant", "t1", "--scope", "echo"],
                              env={**os.environ, **env}, cwd=REPO_ROOT, capture_output=True, text=True)
        assert keys.returncode == 0 and "export API_KEY=" in keys.stdout, keys.stderr
        simulate = subprocess.run([*tessera, "simulate", "echo", "--days", "2"], env={**os.environ, **env},
                                  cwd=REPO_ROOT, capture_output=True, text=True)
        assert simulate.stdout.strip() == "echo simulate --days 2"
        os.killpg(up.process.pid, signal.SIGTERM)
        assert up.process.wait(timeout=60) == 0, up.output[-3000:]
        assert "listener stopped" in up.output and "tessera up: all stopped" in up.output
        assert not listening(echo_port)
    finally:
        up.stop()


def test_a_listener_that_fails_stops_tessera_up(tmp_path: Path) -> None:
    files = dict(ECHO_VERTICAL)
    files["extra_verticals/echo/listener.py"] = "def serve(stop):\n    raise OSError('port in use')\n"
    write_package(tmp_path / "code", files)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "code"), str(REPO_ROOT)]),
           "TESSERA_VERTICALS_PACKAGE": "extra_verticals", "TESSERA_DATA_DIR": str(tmp_path / "data"),
           "TESSERA_PORT": str(free_port()), "TESSERA_LOG_JSON": "false", "PYTHONUNBUFFERED": "1"}
    up = ManagedProcess([*python_argv("-m", "services.cli"), "up", "--no-worker"], env, "tessera-up")
    try:
        assert up.process.wait(timeout=120) != 0
        assert "listener failed" in up.output and "echo:tcp exited with 1; stopping the rest" in up.output
    finally:
        up.stop()

