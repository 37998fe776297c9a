"""Pure logic of the hot router: which path a mounted app sees (the HTTP behaviour is tested on
real servers in tests/fraud/test_webhook_api.py and tests/e2e/test_server.py)."""

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
