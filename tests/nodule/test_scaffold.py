"""The nodule endpoints issue 17 named, now built, keep the contract the scaffold published: each needs an
API key (401 without) holding the ``nodule`` scope (403 with another vertical's), is in the OpenAPI with
the key as its security, and none answers 501 any more."""

from __future__ import annotations

import httpx
import pytest

from tests.nodule.conftest import NoduleServer, new_key
from tests.scaffold import Endpoint, assert_problem, documented_unbuilt_operations, multipart_file

STOW_RS = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}
STOW_BODY = b"--x\r\nContent-Type: application/dicom\r\n\r\n" + bytes(132) + b"\r\n--x--\r\n"
ZIP_BODY, ZIP_HEADERS = multipart_file(b"PK\x05\x06" + bytes(18), "series.zip")
JSON = {"Content-Type": "application/json"}

ENDPOINTS = [
    Endpoint("POST", "/dicomweb/studies", STOW_BODY, STOW_RS),
    Endpoint("POST", "/dicomweb/studies/{study_instance_uid}", STOW_BODY, STOW_RS),
    Endpoint("POST", "/v1/uploads", ZIP_BODY, ZIP_HEADERS),
    Endpoint("GET", "/v1/jobs/{job_id}"),
    Endpoint("GET", "/v1/studies"),
    Endpoint("GET", "/v1/studies/{study_instance_uid}"),
    Endpoint("POST", "/v1/studies/{study_instance_uid}/clinical", b"{}", JSON),
    Endpoint("GET", "/v1/studies/{study_instance_uid}/results"),
    Endpoint("GET", "/v1/studies/{study_instance_uid}/nodules/{label}/key-image.png"),
    Endpoint("GET", "/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}"),
    Endpoint("GET", "/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}"),
]


def call(server: NoduleServer, endpoint: Endpoint, key: str | None) -> httpx.Response:
    headers = {**endpoint.headers, **({"X-API-Key": key} if key else {})}
    return httpx.request(endpoint.method, server.base_url + endpoint.concrete_path, content=endpoint.content or None,
                         headers=headers, timeout=10)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_each_endpoint_needs_a_key_with_the_nodule_scope(nodule_server: NoduleServer, endpoint: Endpoint) -> None:
    _, fraud_key = new_key(nodule_server.stack.database_url, scopes=("fraud",))
    assert_problem(call(nodule_server, endpoint, None), 401, endpoint.concrete_path)
    assert_problem(call(nodule_server, endpoint, fraud_key), 403, endpoint.concrete_path)


def test_the_openapi_lists_every_endpoint_keyed_and_none_is_unbuilt(nodule_server: NoduleServer) -> None:
    openapi = httpx.get(f"{nodule_server.base_url}/openapi.json", timeout=10).json()
    assert documented_unbuilt_operations(openapi) == set()
    for endpoint in ENDPOINTS:
        operation = openapi["paths"][endpoint.path][endpoint.method.lower()]
        assert operation["summary"] and operation["description"]
        assert {"ApiKey": []} in operation["security"]
    status = httpx.get(f"{nodule_server.base_url}/v1/status", timeout=10).json()
    assert status == {"vertical": "nodule", "state": "in progress", "tracking_issue": 17}
