"""Links an app builds for itself keep its mount prefix behind the gateway (``request.base_url``
is the outermost app's root and drops it)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI, Request

from shared.app import PrefixDispatcher, mounted_base_url
from tests.support import served_in_thread


def test_the_base_url_keeps_the_prefix_the_request_came_through() -> None:
    child = FastAPI()

    @child.get("/v1/where")
    def where(request: Request) -> dict[str, str]:
        return {"mounted": mounted_base_url(request), "starlette": str(request.base_url)}

    with served_in_thread(child) as alone, served_in_thread(PrefixDispatcher(FastAPI(), {"/nodule": child})) as gateway:
        assert httpx.get(f"{alone}/v1/where?x=1").json()["mounted"] == alone
        behind = httpx.get(f"{gateway}/nodule/v1/where?x=1").json()
    assert behind == {"mounted": f"{gateway}/nodule", "starlette": f"{gateway}/"}
