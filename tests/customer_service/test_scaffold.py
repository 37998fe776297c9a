"""The customer-service app served by uvicorn: the HTTP endpoints of issue 18, now built, keep the
contract the scaffold published (each needs an API key, 401 without, holding the ``cs`` scope, 403
with another vertical's; each is in the OpenAPI with the key as its security; none answers 501);
keyed WebSockets refuse a handshake without a ``cs`` key as HTTP 401/403 problem+json."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import Stack
from tests.scaffold import (
    Endpoint,
    ScaffoldServer,
    assert_problem,
    documented_unbuilt_operations,
    multipart_file,
    serve_scaffold,
)

TRACKING_ISSUE = 18
WAV_BODY, WAV_HEADERS = multipart_file(b"RIFF\x24\x00\x00\x00WAVEfmt ", "utterance.wav")
JSON = {"Content-Type": "application/json"}
ENDPOINTS = [
    Endpoint("POST", "/v1/utterances", WAV_BODY, WAV_HEADERS),
    Endpoint("GET", "/v1/calls"),
    Endpoint("GET", "/v1/calls/{call_id}"),
    Endpoint("GET", "/v1/calls/{call_id}/timeline.png"),
    Endpoint("POST", "/v1/knowledge/articles", b"{}", JSON),
    Endpoint("GET", "/v1/knowledge/articles"),
    Endpoint("GET", "/v1/knowledge/articles/{article_id}"),
    Endpoint("PUT", "/v1/knowledge/articles/{article_id}", b"{}", JSON),
    Endpoint("DELETE", "/v1/knowledge/articles/{article_id}"),
    Endpoint("GET", "/v1/settings"),
    Endpoint("PATCH", "/v1/settings", b"{}", JSON),
    Endpoint("GET", "/v1/integrations"),
    Endpoint("PUT", "/v1/integrations", b"{}", JSON),
]


@pytest.fixture(scope="module")
def server(sqlite_stack: Stack) -> Iterator[ScaffoldServer]:
    with serve_scaffold("services.customer_service.api:app", sqlite_stack, "cs") as served:
        yield served


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_each_endpoint_needs_a_key_with_the_cs_scope(server: ScaffoldServer, endpoint: Endpoint) -> None:
    assert_problem(server.call(endpoint, None), 401, endpoint.concrete_path)
    assert_problem(server.call(endpoint, server.key_for("fraud")), 403, endpoint.concrete_path)


def test_the_openapi_lists_every_endpoint_keyed_and_none_is_unbuilt(server: ScaffoldServer) -> None:
    openapi = server.openapi()
    assert documented_unbuilt_operations(openapi) == set()
    for endpoint in ENDPOINTS:
        operation = openapi["paths"][endpoint.path][endpoint.method.lower()]
        assert operation["summary"] and operation["description"]
        assert {"ApiKey": []} in operation["security"]
    status = httpx.get(f"{server.base_url}/v1/status", timeout=10).json()
    assert status == {"vertical": "cs", "state": "built", "tracking_issue": TRACKING_ISSUE}


def close_received(server: ScaffoldServer, path: str, key: str | None) -> tuple[int, str]:
    """Connect (with ``key`` as X-API-Key), wait for the server to close, return its code and reason."""
    url = server.base_url.replace("http://", "ws://") + path
    headers = {"X-API-Key": key} if key else {}
    with connect(url, additional_headers=headers, proxy=None, open_timeout=10) as connection:
        with contextlib.suppress(ConnectionClosed):
            connection.recv(timeout=10)
        close = connection.protocol.close_rcvd
    assert close is not None, "the server closed without a close frame"
    return close.code, close.reason


def refused_status(server: ScaffoldServer, path: str, key: str | None) -> int:
    """The HTTP status of a refused handshake, checked to carry a problem document."""
    with pytest.raises(InvalidStatus) as refused:
        close_received(server, path, key)
    response = refused.value.response
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(bytes(response.body or b""))
    assert problem["status"] == response.status_code and problem["instance"] == path
    return response.status_code


@pytest.mark.parametrize("path", ["/v1/streams/audiohook", "/v1/streams/vonage", "/v1/calls/CA123/events",
                                  "/v1/supervisor/events"])
def test_each_keyed_websocket_needs_a_cs_key(server: ScaffoldServer, path: str) -> None:
    assert refused_status(server, path, None) == 401
    assert refused_status(server, path, server.key_for("fraud")) == 403


def test_the_feed_of_an_unknown_call_is_refused_with_its_reason(server: ScaffoldServer) -> None:
    assert close_received(server, "/v1/calls/CA123/events", server.key_for("cs")) == (1008, "no call 'CA123'")
