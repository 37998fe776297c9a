"""The embedded default: one ASGI app mounting the four verticals under their prefixes.

``uvicorn services.gateway:app`` serves ``/fraud``, ``/cs``, ``/nodule`` and ``/iiot``, plus the
gateway's own ``/healthz``, ``/readyz`` and ``/metrics``. Each vertical's lifespan (model loading,
listeners) runs inside the gateway's.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.customer_service.api import app as customer_service_app
from services.fraud.api import app as fraud_app
from services.iiot.api import app as iiot_app
from services.nodule.api import app as nodule_app
from shared.app import create_service_app, lifespan_of_children
from shared.observability import configure_logging

VERTICAL_APPS: dict[str, FastAPI] = {
    "/fraud": fraud_app,
    "/cs": customer_service_app,
    "/nodule": nodule_app,
    "/iiot": iiot_app,
}


def create_gateway() -> FastAPI:
    """The gateway app with every vertical mounted."""
    configure_logging()
    gateway = create_service_app("gateway", title="Tessera", lifespan=lifespan_of_children(VERTICAL_APPS))
    for prefix, vertical_app in VERTICAL_APPS.items():
        gateway.mount(prefix, vertical_app)
    return gateway


app = create_gateway()
