"""HTTP app of the ct nodule detection with dicom fusion vertical, mounted at ``/nodule``.

The vertical itself is not built yet (held back until the platform and fraud scoring are verified;
see issue 5). The app exists so the gateway, health checks and deployment already include it.
"""

from __future__ import annotations

from fastapi import APIRouter

from shared.app import create_service_app

router = APIRouter(prefix="/v1", tags=["nodule"])


@router.get("/status")
async def status() -> dict[str, str]:
    """What this vertical offers today."""
    return {"vertical": "nodule", "state": "not yet built", "tracking_issue": "5"}


app = create_service_app("nodule", title="Tessera — CT nodule detection with DICOM fusion", routers=[router])
