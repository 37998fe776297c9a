"""HTTP app of the iiot failure prediction vertical, mounted at ``/iiot``.

The vertical itself is not built yet (held back until the platform and fraud scoring are verified;
see issue 4). The app exists so the gateway, health checks and deployment already include it.
"""

from __future__ import annotations

from fastapi import APIRouter

from shared.app import create_service_app

router = APIRouter(prefix="/v1", tags=["iiot"])


@router.get("/status")
async def status() -> dict[str, str]:
    """What this vertical offers today."""
    return {"vertical": "iiot", "state": "not yet built", "tracking_issue": "4"}


app = create_service_app("iiot", title="Tessera — IIoT failure prediction", routers=[router])
