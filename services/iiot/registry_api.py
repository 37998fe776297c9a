"""Asset registry endpoints of the IIoT vertical: plants, lines, assets, sensors (issue 19)."""

from __future__ import annotations

from fastapi import APIRouter

from shared.errors import problem_responses

router = APIRouter(prefix="/v1", tags=["registry"], responses=problem_responses(401, 403))
