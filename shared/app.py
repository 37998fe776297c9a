"""The one way to build a FastAPI app in Tessera: problem+json errors, request ids, metrics, health.

Each vertical's ``api.py`` calls :func:`create_service_app` with its routers and readiness checks;
the gateway calls it too and puts every registered vertical's app under its prefix
(:class:`PrefixDispatcher`), running their lifespans.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, params
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette._utils import get_route_path
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.config import get_settings
from shared.db import check_database
from shared.errors import Problem, install_problem_handlers, is_json_media_type, problem_responses, require_json_body
from shared.hot_routes import HotRoute, HotRouter
from shared.observability import Readiness, RequestContextMiddleware, health_router, observe_gc_pauses
from shared.security import SIGNATURE_HEADER

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


async def database_ready() -> None:
    """Readiness check: the configured database answers."""
    await asyncio.to_thread(check_database)


async def broker_ready() -> None:
    """Readiness check: the Celery broker accepts a connection."""
    from shared.queue import celery_app

    def _connect() -> None:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    await asyncio.to_thread(_connect)


async def json_request_bodies(connection: HTTPConnection) -> None:
    """App-wide dependency: a request body must be JSON (415 otherwise), except on form routes.

    Form routes (``UploadFile``/``Form`` parameters) keep their multipart type, and a route that
    documents a body of its own non-JSON types in ``openapi_extra`` reads and checks it itself
    (streamed uploads, :mod:`shared.uploads`); hot routes make the same check themselves
    (:mod:`shared.hot_routes`). WebSocket routes have no body (:mod:`shared.websockets`).
    """
    if connection.scope["type"] != "http":
        return
    route = connection.scope.get("route")
    body_field = getattr(route, "body_field", None)
    if body_field is not None and isinstance(body_field.field_info, params.Form):
        return
    declared_types = (getattr(route, "openapi_extra", None) or {}).get("requestBody", {}).get("content", {})
    if declared_types and not any(is_json_media_type(media_type) for media_type in declared_types):
        return
    require_json_body(connection.headers)


class ServiceApp(FastAPI):
    """A FastAPI app whose request context (request id, metrics) wraps everything, hot routes included.

    Order, outermost first: :class:`RequestContextMiddleware`, :class:`HotRouter` (when the app has
    hot routes and ``TESSERA_HOT_ROUTES`` is on), then FastAPI's own stack.
    """

    def __init__(self, *, service_name: str, hot_routes: Sequence[HotRoute] = (),
                 documented_models: Sequence[type[BaseModel]] = (), **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.service_name = service_name
        self.hot_routes = tuple(hot_routes)
        self.documented_models = tuple(documented_models)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's OpenAPI, finished with Tessera's error shape and the models of bodies read raw."""
        if self.openapi_schema is None:
            finish_openapi(super().openapi(), self.documented_models)
        return self.openapi_schema  # type: ignore[return-value]

    def build_middleware_stack(self) -> ASGIApp:
        """FastAPI's stack behind the hot routes, all inside the request context."""
        stack = super().build_middleware_stack()
        if self.hot_routes and get_settings().hot_routes:
            stack = HotRouter(stack, self.hot_routes)
        return RequestContextMiddleware(stack, app_name=self.service_name)


COMPONENT_REF = "#/components/schemas/{model}"


def raw_json_body(model: type[BaseModel], example: dict[str, Any], *, signed: bool = False) -> dict[str, Any]:
    """A route's ``openapi_extra`` documenting a JSON body that the route reads raw, e.g. to check
    its ``Tessera-Signature`` over the exact bytes before parsing them (``signed``).

    Name ``model`` in :func:`create_service_app`'s ``documented_models`` so its schema is published.
    """
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": COMPONENT_REF.format(model=model.__name__)}, "example": example}}}}
    if signed:
        extra["parameters"] = [{
            "name": SIGNATURE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
            "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.\" + the exact body bytes, keyed with "
                           "the tenant's webhook secret> (several v1= while rotating secrets); at most 300 s old",
            "example": "t=1764583200,v1=" + "0" * 64}]
    return extra


UNDECODABLE_JSON_BODY = problem_responses(400, notes={400: "The body is not JSON (or not UTF-8 text)."})[400]


def _takes_json(operation: dict[str, Any]) -> bool:
    content = operation.get("requestBody", {}).get("content", {})
    return any(is_json_media_type(media_type) for media_type in content)


def finish_openapi(schema: dict[str, Any], documented_models: Sequence[type[BaseModel]]) -> None:
    """Publish the ``Problem`` schema and ``documented_models``; every 422 is a problem, as served, and
    every operation with a JSON body documents the 400 its undecodable bodies get.

    FastAPI documents its own validation-error body for a route that lists no 422; Tessera answers
    those with a problem document (:mod:`shared.errors`).
    """
    models: list[type[BaseModel]] = [Problem, *documented_models]
    _, definitions = models_json_schema([(model, "validation") for model in models], ref_template=COMPONENT_REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in definitions.get("$defs", {}).items():
        components.setdefault(name, definition)
    for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
        if "HTTPValidationError" in str(operation.get("responses", {}).get("422", "")):
            operation["responses"]["422"] = problem_responses(422)[422]
        if _takes_json(operation):  # FastAPI answers a body it cannot decode with 400
            operation.setdefault("responses", {}).setdefault("400", UNDECODABLE_JSON_BODY)
    if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def create_service_app(name: str, *, title: str, routers: Sequence[APIRouter] = (),
                       lifespan: Lifespan | None = None, readiness: Readiness | None = None,
                       check_broker: bool = True, version: str = "0.1.0",
                       hot_routes: Sequence[HotRoute] = (),
                       documented_models: Sequence[type[BaseModel]] = ()) -> FastAPI:
    """Build an app with Tessera's error shape, middleware and operations endpoints.

    ``app.state.readiness`` holds the checks; a vertical adds e.g. ``models`` at start-up.
    ``hot_routes`` (:mod:`shared.hot_routes`) serve a latency-critical endpoint without FastAPI's
    per-request machinery; each should shadow a documented FastAPI route of the same path.
    ``documented_models`` are published in the OpenAPI components though no route parses them
    (bodies read raw: :func:`raw_json_body`).
    """
    readiness = readiness or Readiness()
    readiness.add("database", database_ready)
    if check_broker:
        readiness.add("broker", broker_ready)
    app = ServiceApp(service_name=name, hot_routes=hot_routes, documented_models=documented_models, title=title,
                     version=version, lifespan=_with_gc_tuning(lifespan),
                     dependencies=[Depends(json_request_bodies)],
                     # a body without a Content-Type is JSON, as on the hot and raw routes; every other declared
                     # type is refused by ``json_request_bodies`` with a 415 (FastAPI's own default answered such a
                     # body with a misleading 422, "Input should be a valid dictionary")
                     strict_content_type=False)
    app.state.readiness = readiness
    app.state.service_name = name
    install_problem_handlers(app)
    app.include_router(health_router(readiness))
    for router in routers:
        app.include_router(router)
    return app


GC_THRESHOLDS = (50_000, 50, 1_000)


def tune_garbage_collector() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    Measured on this box (performance.md): default GC set a webhook's p99 at 33-36 ms; with
    ``gc.freeze()`` after start-up and these thresholds it was 7-8 ms at the same throughput.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    observe_gc_pauses()


def _with_gc_tuning(lifespan: Lifespan | None) -> Lifespan:
    @asynccontextmanager
    async def tuned(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app) if lifespan else _nothing():
            tune_garbage_collector()
            yield

    return tuned


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


def lifespan_of_children(children: dict[str, FastAPI]) -> Lifespan:
    """A lifespan that runs each mounted child app's own lifespan.

    Starlette does not run a mounted app's lifespan, so the parent enters each child's in turn.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with _enter_all(list(children.values())):
            yield

    return lifespan


@asynccontextmanager
async def _enter_all(apps: list[FastAPI]) -> AsyncIterator[None]:
    if not apps:
        yield
        return
    first, rest = apps[0], apps[1:]
    async with first.router.lifespan_context(first), _enter_all(rest):
        yield


class PrefixDispatcher:
    """ASGI: a request under a child's prefix goes straight to that child app, the rest to ``parent``.

    The child sees the scope Starlette's ``Mount`` would give it (``root_path`` extended, the path
    kept whole), but the parent's FastAPI stack (error and exception middleware, exit stack, router)
    is not run first: on the fraud webhook that stack cost as much CPU as the route's own framing.
    Each child app has its own request context (request id, metrics, access log, problem
    handlers), so nothing is lost. Lifespan events and paths outside every prefix (the gateway's
    ``/healthz``, ``/metrics``, ``/docs``) go to ``parent``.
    """

    def __init__(self, parent: ASGIApp, children: Mapping[str, ASGIApp]) -> None:
        for prefix in children:
            if not prefix.startswith("/") or prefix.endswith("/") or prefix.count("/") != 1:
                raise ValueError(f"a prefix is one path segment like '/fraud', got {prefix!r}")
        self.parent = parent
        self.children = dict(children)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path = get_route_path(scope)
            prefix = path[:path.find("/", 1)] if path.find("/", 1) > 0 else None
            child = self.children.get(prefix) if prefix else None
            if child is not None:
                root_path = scope.get("root_path", "")
                scope["app_root_path"] = scope.get("app_root_path", root_path)
                scope["root_path"] = root_path + prefix  # type: ignore[operator]
                await child(scope, receive, send)
                return
        await self.parent(scope, receive, send)


def mounted_base_url(connection: HTTPConnection) -> str:
    """The URL of the app that serves ``connection``, its mount prefix kept (no trailing slash).

    Starlette's ``request.base_url`` is the outermost application's root: behind the gateway it
    drops ``/nodule`` or ``/cs``, so links built on it (RetrieveURL, Location) would point outside
    the vertical. ``root_path`` holds the prefixes of every mount on the way.
    """
    return str(connection.url.replace(path=connection.scope.get("root_path", ""), query=None,
                                      fragment=None)).rstrip("/")
