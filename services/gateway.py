"""The embedded default: one ASGI app serving every registered vertical under its prefix.

``uvicorn services.gateway:app`` serves each vertical of :mod:`shared.verticals` under
``/<name>`` (``/fraud``, ``/cs``, ``/nodule``, ``/iiot``), plus the gateway's own ``/healthz``,
``/readyz`` and ``/metrics``. Each vertical's lifespan (model loading) runs inside the gateway's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from shared.app import PrefixDispatcher, create_service_app, lifespan_of_children
from shared.observability import Readiness, configure_logging
from shared.verticals import verticals

GATEWAY_OWN_CHECKS = frozenset({"database", "broker"})
"""Checked once by the gateway itself, not again per vertical."""


def _vertical_ready(vertical_app: FastAPI) -> Callable[[], Awaitable[None]]:
    """A gateway readiness check that passes when the vertical's own checks (e.g. models) pass."""

    async def check() -> None:
        results = await vertical_app.state.readiness.run(skip=GATEWAY_OWN_CHECKS)
        failing = [f"{name}: {result}" for name, result in results.items() if result != "ok"]
        if failing:
            raise RuntimeError("; ".join(failing))

    return check


def vertical_apps() -> dict[str, FastAPI]:
    """Every registered vertical's app by its prefix (importing the apps)."""
    return {vertical.prefix: vertical.load_app() for vertical in verticals()}


def create_gateway() -> PrefixDispatcher:
    """The gateway: its own app (health, metrics, docs) and every vertical's under its prefix;
    its /readyz covers every vertical's checks."""
    configure_logging()
    children = vertical_apps()
    readiness = Readiness()
    for prefix, vertical_app in children.items():
        readiness.add(prefix.strip("/"), _vertical_ready(vertical_app))
    gateway = create_service_app("gateway", title="Tessera", lifespan=lifespan_of_children(children),
                                 readiness=readiness)
    return PrefixDispatcher(gateway, children)


app = create_gateway()
