"""Malformed ``Tessera-Signature`` headers through the real webhook: a 401 problem each, never a 500.

Both ways the webhook is served: the hot route (``TESSERA_HOT_ROUTES=true``, the default) and its
FastAPI route (``false``); ``:batch`` is always a FastAPI route.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from tests.conftest import Stack
from tests.fraud.conftest import FraudServer, FraudTenant, run_cli, serve_fraud, transaction
from tests.fraud.test_webhook_api import assert_problem

GOOD_HEX = "0" * 64
MALFORMED = {
    "t-5000-digits": ("t=" + "9" * 5000 + ",v1=" + GOOD_HEX, "t must be 1-12 ASCII digits"),
    "t-superscript-two": ("t=\u00b2,v1=" + GOOD_HEX, "t must be 1-12 ASCII digits"),
    "v1-non-ascii": ("t=1700000000,v1=" + "\u00e9" * 64, "v1 must be 64 hex characters"),
    "v1-not-hex": ("t=1700000000,v1=xyz", "v1 must be 64 hex characters"),
    "t-twice": ("t=1,t=2,v1=" + GOOD_HEX, "more than one t="),
}


@pytest.fixture(scope="module", params=[("sqlite", "true"), ("sqlite", "false"), ("postgres", "true"),
                                        ("postgres", "false")], ids=lambda p: f"{p[0]}-hot-{p[1]}")
def server(request: pytest.FixtureRequest) -> Iterator[FraudServer]:
    stack: Stack = request.getfixturevalue(f"{request.param[0]}_stack")
    run_cli(stack, "db", "upgrade")
    with serve_fraud(stack, {"TESSERA_HOT_ROUTES": request.param[1]}, name="fraud-signatures") as started:
        yield started


@pytest.mark.parametrize("path", ["/transactions", "/transactions:batch"])
def test_malformed_signature_headers_are_401_problems(server: FraudServer, path: str) -> None:
    tenant: FraudTenant = server.new_tenant()
    body = orjson.dumps({"transactions": [transaction()]} if path.endswith("batch") else transaction())
    with tenant.client() as client:
        for case, (header, detail) in MALFORMED.items():
            # httpx sends str headers as ASCII; latin-1 bytes are what a client can put on the wire.
            answer = client.post(path, content=body, headers={b"Tessera-Signature": header.encode("latin-1"),
                                                              b"Content-Type": b"application/json"})
            problem = assert_problem(answer, 401, detail)
            assert problem["type"].endswith("/invalid-signature"), (case, problem)
