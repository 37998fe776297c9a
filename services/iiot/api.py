"""HTTP app of the IIoT failure-prediction vertical, mounted at ``/iiot``.

The routes live by area, each module with its own router: the asset registry
(:mod:`services.iiot.registry_api`), ingestion (:mod:`services.iiot.ingest_api`), alerts and
maintenance (:mod:`services.iiot.alerts_api`) and risk views (:mod:`services.iiot.risk_api`).
"""

from __future__ import annotations

from fastapi import APIRouter

from services.iiot import alerts_api, ingest_api, registry_api, risk_api
from services.iiot.schemas import ReadingsBatch
from shared.app import create_service_app

about = APIRouter(prefix="/v1", tags=["status"])


@about.get("/status")
async def status() -> dict[str, object]:
    """What this vertical offers: built (issue 19)."""
    return {"vertical": "iiot", "state": "built", "tracking_issue": 19}


app = create_service_app("iiot", title="Tessera — IIoT failure prediction",
                         routers=[about, registry_api.router, ingest_api.router, alerts_api.router, risk_api.router],
                         documented_models=[ReadingsBatch])
