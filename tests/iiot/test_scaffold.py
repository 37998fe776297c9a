"""The IIoT scaffold served by uvicorn: each endpoint issue 19 names is declared, keyed and
answers 501 problem+json until it is built, and the OpenAPI lists them."""

from __future__ import annotations

from typing import ClassVar

from tests.scaffold import Endpoint, ScaffoldContract


class TestIiotScaffold(ScaffoldContract):
    app_path, scope, tracking_issue = "services.iiot.api:app", "iiot", 19
    endpoints: ClassVar[list[Endpoint]] = []
