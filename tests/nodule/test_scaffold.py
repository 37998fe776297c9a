"""The nodule scaffold served by uvicorn: each endpoint issue 17 names is declared, keyed and
answers 501 problem+json until it is built, and the OpenAPI lists them."""

from __future__ import annotations

from tests.scaffold import Endpoint, ScaffoldContract, multipart_file

STOW_RS = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}
STOW_BODY = b"--x\r\nContent-Type: application/dicom\r\n\r\n" + bytes(132) + b"\r\n--x--\r\n"
ZIP_BODY, ZIP_HEADERS = multipart_file(b"PK\x05\x06" + bytes(18), "series.zip")


class TestNoduleScaffold(ScaffoldContract):
    app_path, scope, tracking_issue = "services.nodule.api:app", "nodule", 17
    endpoints = [
        Endpoint("POST", "/dicomweb/studies", STOW_BODY, STOW_RS),
        Endpoint("POST", "/dicomweb/studies/{study_instance_uid}", STOW_BODY, STOW_RS),
        Endpoint("POST", "/v1/uploads", ZIP_BODY, ZIP_HEADERS),
        Endpoint("GET", "/v1/jobs/{job_id}"),
        Endpoint("GET", "/v1/studies"),
        Endpoint("GET", "/v1/studies/{study_instance_uid}"),
    ]
