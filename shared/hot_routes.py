"""Hot routes: a service's few latency-critical endpoints served as plain ASGI, in front of FastAPI.

FastAPI's middleware stack, routing, dependency resolution and response validation cost ~0.3 ms
of CPU a request on the 2-core box (measured in-process: 320 us against 9 us for the same endpoint
as plain ASGI), as much as the fraud model's share of a request. A hot route keeps the contract of
a FastAPI route — API key and scope (:func:`shared.security.authorize`), problem+json errors with
the request id, a body limit, request metrics (the app's :class:`RequestContextMiddleware` wraps
both) — and skips the rest. Everything else, the same paths with other methods included, goes
to FastAPI, which keeps the hot endpoint's documented twin route (``TESSERA_HOT_ROUTES=false``
serves it from there, for comparison).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.errors import (
    PROBLEM_CONTENT_TYPE,
    EdgeMappedError,
    PayloadTooLarge,
    ProblemError,
    as_problem,
    failure_document,
    require_json_body,
)
from shared.security import Principal, authorize, presented_api_key

logger = logging.getLogger("tessera.hot_routes")

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class HotRequest:
    """What a hot handler gets: the authorized caller, the headers (lower-case names) and the body."""

    principal: Principal
    headers: Mapping[str, str]
    body: bytes


HotHandler = Callable[[HotRequest], Awaitable[BaseModel]]


@dataclass(frozen=True, slots=True)
class HotRoute:
    """``method path`` (relative to the app's mount point) answered by ``handler`` with a JSON model.

    The caller needs an API key with ``scope``; a body over ``max_body_bytes`` gets 413, one declared
    as anything but JSON 415 (:func:`shared.errors.require_json_body`).
    """

    method: str
    path: str
    scope: str
    handler: HotHandler
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class HotRouter:
    """ASGI app: hot routes by exact method and path, everything else to ``app``."""

    def __init__(self, app: ASGIApp, routes: Sequence[HotRoute]) -> None:
        self.app = app
        self.routes = {(route.method, route.path): route for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get((scope.get("method", ""), route_path(scope))) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            require_json_body(headers)
            principal = await authorize(presented_api_key(headers), route.scope)
            scope.setdefault("state", {})["principal"] = principal  # for the access log, as FastAPI routes do
            body = await read_body(receive, route.max_body_bytes)
            answer = await route.handler(HotRequest(principal, headers, body))
            status, content, extra = 200, answer.__pydantic_serializer__.to_json(answer), {}
        except ClientDisconnected:
            return  # nobody to answer; nothing was done
        except (ProblemError, EdgeMappedError) as exc:
            problem = as_problem(exc)  # EdgeMappedError: e.g. the model runtime's overload or deadline
            if problem is None:
                logger.error("unhandled error", exc_info=exc, extra={"path": scope["path"]})
            status = problem.status if problem else 500
            content, extra = problem_json(scope, problem), problem.headers if problem else {}
        except Exception:
            logger.exception("unhandled error", extra={"path": scope["path"]})
            status, content, extra = 500, problem_json(scope, None), {}
        await send_answer(send, status, content, extra)


async def send_answer(send: Send, status: int, content: bytes, headers: Mapping[str, str]) -> None:
    """Send a whole JSON answer (problem+json from 400 on) with ``headers`` as plain ASGI."""
    media_type = "application/json" if status < 400 else PROBLEM_CONTENT_TYPE
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type.encode()),
                            (b"content-length", str(len(content)).encode()),
                            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]})
    await send({"type": "http.response.body", "body": content})


class ClientDisconnected(Exception):
    """The client went away before its request body arrived."""


def route_path(scope: Scope) -> str:
    """The request path below the app's mount point (``root_path``), as Starlette routes it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):] or "/"
    return path


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; 413 as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def problem_json(scope: Scope, exc: ProblemError | None) -> bytes:
    """The problem document of a failed hot request (``None``: an unexpected error, 500)."""
    return orjson.dumps(failure_document(exc, scope["path"], scope.get("state", {}).get("request_id")))
