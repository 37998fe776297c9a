"""The embedded default: one ASGI app mounting the four verticals under their prefixes.

``uvicorn services.gateway:app`` serves ``/fraud``, ``/cs``, ``/nodule`` and ``/iiot``, plus the
gateway's own ``/healthz``, ``/readyz`` and ``/metrics``. Each vertical's lifespan (model loading,
listeners) runs inside the gateway's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from services.customer_service.api import app as customer_service_app
from services.fraud.api import app as fraud_app
from services.iiot.api import app as iiot_app
from services.nodule.api import app as nodule_app
from shared.app import create_service_app, lifespan_of_children
from shared.observability import Readiness, configure_logging

VERTICAL_APPS: dict[str, FastAPI] = {
    "/fraud": fraud_app,
    "/cs": customer_service_app,
    "/nodule": nodule_app,
    "/iiot": iiot_app,
}


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


def create_gateway() -> FastAPI:
    """The gateway app with every vertical mounted; its /readyz covers every vertical's checks."""
    configure_logging()
    readiness = Readiness()
    for prefix, vertical_app in VERTICAL_APPS.items():
        readiness.add(prefix.strip("/"), _vertical_ready(vertical_app))
    gateway = create_service_app("gateway", title="Tessera", lifespan=lifespan_of_children(VERTICAL_APPS),
                                 readiness=readiness)
    for prefix, vertical_app in VERTICAL_APPS.items():
        gateway.mount(prefix, vertical_app)
    return gateway


app = create_gateway()
