"""Alert, maintenance and alert-policy endpoints of the IIoT vertical (issue 19)."""

from __future__ import annotations

from fastapi import APIRouter

from shared.errors import problem_responses

router = APIRouter(prefix="/v1", tags=["alerts"], responses=problem_responses(401, 403))
