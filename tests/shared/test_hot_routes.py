"""Pure logic of the hot router: which path a mounted app sees, which bodies count as JSON (the
HTTP behaviour is tested on real servers in tests/fraud/test_webhook_api.py,
tests/fraud/test_webhook_contract.py and tests/e2e/test_server.py)."""

from __future__ import annotations

import pytest

from shared.hot_routes import route_path


@pytest.mark.parametrize(("path", "root_path", "expected"), [
    ("/v1/transactions", "", "/v1/transactions"),
    ("/fraud/v1/transactions", "/fraud", "/v1/transactions"),
    ("/fraud", "/fraud", "/"),
    ("/fraudulent/v1/transactions", "/fraud", "/fraudulent/v1/transactions"),
    ("/v1/transactions", "/fraud", "/v1/transactions"),  # a server that strips the prefix itself
])
def test_route_path_is_relative_to_the_mount_point(path: str, root_path: str, expected: str) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root_path}) == expected


@pytest.mark.parametrize(("headers", "refused"), [
    ({"content-type": "application/json", "content-length": "9"}, False),
    ({"content-type": "application/json; charset=utf-8", "content-length": "9"}, False),
    ({"content-type": "application/problem+json", "content-length": "9"}, False),
    ({"content-length": "9"}, False),  # no Content-Type: read as JSON
    ({"content-type": "text/plain", "content-length": "0"}, False),  # no body: nothing to misread
    ({"content-type": "text/plain"}, False),
    ({"content-type": "text/plain", "content-length": "9"}, True),
    ({"content-type": "application/x-www-form-urlencoded", "transfer-encoding": "chunked"}, True),
    ({"content-type": "application/jsonp", "content-length": "9"}, True),
    ({"content-type": "text/json+xml", "content-length": "9"}, True),
    ({"content-type": "", "content-length": "9"}, True),
])
def test_a_body_is_json_or_refused_by_its_headers(headers: dict[str, str], refused: bool) -> None:
    from shared.errors import UnsupportedMediaType, require_json_body

    if refused:
        with pytest.raises(UnsupportedMediaType):
            require_json_body(headers)
    else:
        require_json_body(headers)
