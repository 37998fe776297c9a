"""Callback URLs that point inside the deployment (SSRF) are refused when set and again at delivery.

The fraud test server allow-lists 127.0.0.1 only (``CALLBACKS_TO_LOOPBACK``, so other tests can
receive callbacks); the worker here has no allow-list at all, the default.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.security import Tenant
from tests.fraud.conftest import FraudServer, FraudTenant, transaction
from tests.fraud.test_webhook_api import assert_problem, post
from tests.support import ManagedProcess, python_argv, wait_until


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.2:8080/hooks", "loopback"),
    ("http://[::1]:8080/hooks", "loopback"),
    ("http://[::ffff:127.0.0.2]/hooks", "IPv4-mapped loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.8/hooks", "private"),
    ("http://192.168.1.20/hooks", "private"),
    ("http://0.0.0.0:8000/hooks", "unspecified"),
    ("http://2130706434/hooks", "loopback"),  # 127.0.0.2 spelt as one number
])
def test_internal_callback_urls_are_refused_when_set(fraud_server: FraudServer, url: str, reason: str) -> None:
    tenant = fraud_server.new_tenant()
    with tenant.client() as client:
        problem = assert_problem(client.put("/settings", json={"callback_url": url}), 422, "callback_url refused")
        assert problem["reason"] == reason and f"a {reason} address" in problem["detail"]
        assert client.get("/settings").json()["callback_url"] is None


def test_public_and_allow_listed_callback_urls_are_accepted(fraud_server: FraudServer) -> None:
    tenant = fraud_server.new_tenant()
    with tenant.client() as client:
        for url in ("https://93.184.216.34/hooks", "http://127.0.0.1:9/hooks"):  # public; allow-listed here
            assert client.put("/settings", json={"callback_url": url}).status_code == 200
            assert client.get("/settings").json()["callback_url"] == url
        assert_problem(client.put("/settings", json={"callback_url": "https://no-such-host.invalid/"}), 422,
                       "does not resolve")


class _Receiver(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        type(self).received.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def loopback_receiver() -> Iterator[str]:
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fraud-callbacks"
    server.shutdown()


def store_settings_directly(server: FraudServer, tenant: FraudTenant, settings: dict[str, object]) -> None:
    """What an older release, or a database edit, may have stored: no PUT check in between."""
    with Session(server.engine) as session:
        row = session.get(Tenant, tenant.tenant_id)
        assert row is not None
        row.settings = {**(row.settings or {}), "fraud": settings}
        session.commit()


def test_a_stored_loopback_callback_url_is_refused_at_delivery(fraud_server: FraudServer,
                                                               loopback_receiver: str) -> None:
    tenant = fraud_server.new_tenant()
    store_settings_directly(fraud_server, tenant, {"review_threshold": 0.0, "decline_threshold": 1.0,
                                                   "callback_url": loopback_receiver})
    worker = ManagedProcess(python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "fraud",
                                        "--concurrency", "1", "--without-gossip", "--without-mingle",
                                        "--loglevel", "INFO", "--hostname", f"ssrf-{uuid.uuid4().hex[:6]}@%h"),
                            fraud_server.stack.env, "fraud-worker-default-policy")
    try:
        worker.wait_for_output(r"ready\.", timeout_s=60)
        payload = transaction()
        assert post(tenant, payload).json()["decision"] == "review"

        def job() -> tuple[str, str | None] | None:
            with fraud_server.engine.connect() as connection:
                row = connection.execute(text("SELECT status, error FROM platform_jobs WHERE idempotency_key = :k"),
                                         {"k": f"webhook:fraud:{tenant.tenant_id}:{payload['id']}"}).first()
            return None if row is None else (row[0], row[1])

        wait_until(lambda: (job() or ("", None))[0] == "failed", 60, "the callback job to fail")
        status, error = job()  # type: ignore[misc]
        assert error is not None and "refused" in error and "loopback" in error, error
        with fraud_server.engine.connect() as connection:
            log = connection.execute(text("SELECT attempt, status_code, error FROM platform_webhook_deliveries "
                                          "WHERE subject_id = :i"), {"i": payload["id"]}).all()
        assert len(log) == 1 and log[0][1] is None and log[0][2].startswith("refused: 127.0.0.1 is a loopback")
        assert _Receiver.received == []  # never reached
    finally:
        worker.stop()
