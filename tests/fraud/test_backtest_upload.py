"""``POST /fraud/v1/backtests`` streams its CSV to disk (shared/uploads.py): stored under its sha256,
refused by its declared size or type before the body is read, and only after the API key is checked."""

from __future__ import annotations

import hashlib
import socket
from urllib.parse import urlsplit

from services.fraud.api import MAX_BACKTEST_BYTES
from tests.fraud.conftest import FraudServer, FraudTenant
from tests.fraud.test_webhook_api import assert_problem

CSV = b"id,timestamp,customer_id,terminal_id,amount\ntx-upload-1,2026-11-23T10:00:00Z,c-1,t-1,10.5\n"


def raw_request(server: FraudServer, head: bytes) -> bytes:
    """Send a request's head alone (no body) and return the start of the answer."""
    address = urlsplit(server.base_url)
    with socket.create_connection((address.hostname or "127.0.0.1", address.port or 80), timeout=10) as connection:
        connection.sendall(head)
        return connection.recv(4096)


def test_the_csv_is_stored_under_its_checksum(fraud_server: FraudServer, tenant: FraudTenant) -> None:
    with tenant.client() as client:
        response = client.post("/backtests", files={"file": ("past.csv", CSV, "text/csv")})
    assert response.status_code == 202, response.text
    stored = fraud_server.stack.data_dir / "uploads" / f"backtest-{hashlib.sha256(CSV).hexdigest()}.csv"
    assert stored.read_bytes() == CSV
    assert not list(stored.parent.glob(".incoming-*")), "no partial file is left behind"


def test_an_oversize_csv_is_refused_by_its_declared_size_before_it_is_sent(
        fraud_server: FraudServer, tenant: FraudTenant) -> None:
    answer = raw_request(fraud_server, (
        f"POST /v1/backtests HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {tenant.api_key}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {MAX_BACKTEST_BYTES * 2}\r\n"
        "Expect: 100-continue\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"application/problem+json" in answer


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(fraud_server: FraudServer) -> None:
    answer = raw_request(fraud_server, (
        b"POST /v1/backtests HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1073741824\r\n"
        b"Expect: 100-continue\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]


def test_bad_multipart_bodies_are_4xx_problems(tenant: FraudTenant) -> None:
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
            b"Content-Type: text/csv\r\n\r\n" + CSV)
    with tenant.client() as client:
        truncated = client.post("/backtests", content=part, headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert_problem(truncated, 400, "ended before its closing boundary")
        assert_problem(client.post("/backtests", content=CSV, headers={"Content-Type": "text/csv"}), 415,
                       "multipart/form-data")
        assert_problem(client.post("/backtests", files={"other": ("a.csv", CSV, "text/csv")}), 422, "body.file")
