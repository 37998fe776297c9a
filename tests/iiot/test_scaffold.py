"""The IIoT scaffold served by uvicorn: each endpoint issue 19 names is declared, keyed and
answers 501 problem+json until it is built, and the OpenAPI lists them."""

from __future__ import annotations

import json

from services.iiot.schemas import READINGS_EXAMPLE
from tests.scaffold import Endpoint, ScaffoldContract, multipart_file

CSV_BODY, CSV_HEADERS = multipart_file(b"timestamp,asset,sensor,value\n2025-03-01T08:00:00Z,pump-7,temp,71.5\n",
                                       "readings.csv")


class TestIiotScaffold(ScaffoldContract):
    app_path, scope, tracking_issue = "services.iiot.api:app", "iiot", 19
    endpoints = [
        Endpoint("POST", "/v1/ingest", CSV_BODY, CSV_HEADERS),
        Endpoint("GET", "/v1/jobs/{job_id}"),
        Endpoint("POST", "/v1/readings", json.dumps(READINGS_EXAMPLE).encode(), {"Content-Type": "application/json"}),
        Endpoint("GET", "/v1/assets/{asset_id}/risk.png"),
        Endpoint("GET", "/v1/lines/{line_id}/risk.png"),
    ]
