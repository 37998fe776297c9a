"""HTTP app of the emotion-aware customer service vertical, mounted at ``/cs``.

The vertical itself is not built yet (held back until the platform and fraud scoring are verified;
see issue 6). The app exists so the gateway, health checks and deployment already include it.
"""

from __future__ import annotations

from fastapi import APIRouter

from shared.app import create_service_app

router = APIRouter(prefix="/v1", tags=["cs"])


@router.get("/status")
async def status() -> dict[str, str]:
    """What this vertical offers today."""
    return {"vertical": "cs", "state": "not yet built", "tracking_issue": "6"}


app = create_service_app("cs", title="Tessera — Emotion-aware customer service", routers=[router])
