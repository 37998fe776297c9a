"""HTTP and WebSocket app of the emotion-aware customer-service vertical, mounted at ``/cs``: a
scaffold (issue 18).

Every endpoint issue 18 names is declared at its real path and method. HTTP routes publish their
provisional contract in the OpenAPI and answer ``501`` problem+json (``tracking_issue: 18``) to a
caller whose API key holds the ``cs`` scope (401 or 403 otherwise, as the built endpoint will).

WebSocket routes (not in the OpenAPI, which has no WebSockets):

- ``/v1/streams/audiohook`` and ``/v1/calls/{call_id}/events`` take an API key with the ``cs`` scope
  (:mod:`shared.websockets`: refused as HTTP 401/403 problem+json without one); a keyed connection
  is accepted, then closed with ``1011`` and the reason ``not built yet: tracked in issue 18``
  (the platform's close code for a 5xx, :func:`shared.websockets.close_code_for`).
- ``/v1/streams/twilio?tenant=ID``: Twilio sends no API key (the tenant is proved by
  ``X-Twilio-Signature``, which issue 18 checks), so every connection is accepted and closed the
  same way.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from services.customer_service.schemas import CallSummary, UtteranceAnalysis
from services.customer_service.streams import streams
from shared.app import create_service_app
from shared.errors import NotBuilt, problem_responses
from shared.security import Principal, require_scope
from shared.uploads import multipart_upload_body

TRACKING_ISSUE = 18
CsPrincipal = Annotated[Principal, Depends(require_scope("cs"))]
KEYED = problem_responses(401, 403, 501)


def utterance_upload_body() -> dict[str, Any]:
    """The upload of one utterance: its audio and, optionally, its transcript (provisional)."""
    body = multipart_upload_body("file", description="the utterance: WAV, FLAC or μ-law audio")
    form = body["requestBody"]["content"]["multipart/form-data"]["schema"]
    form["properties"]["transcript"] = {"type": "string", "description": "its transcript, when already known"}
    return body


about = APIRouter(prefix="/v1", tags=["status"])


@about.get("/status")
async def status() -> dict[str, object]:
    """What this vertical offers today: a scaffold whose endpoints answer 501 until its issue is built."""
    return {"vertical": "cs", "state": "scaffold", "tracking_issue": TRACKING_ISSUE}


router = APIRouter(prefix="/v1", tags=["cs"], responses=KEYED)


@router.post("/utterances", summary="Analyse one utterance", openapi_extra=utterance_upload_body())
async def analyse_utterance(request: Request, principal: CsPrincipal) -> UtteranceAnalysis:
    """Transcript (PII redacted) and emotion of one uploaded utterance, for non-streaming use."""
    raise NotBuilt(TRACKING_ISSUE)


@router.get("/calls/{call_id}", summary="A call's summary")
async def get_call(call_id: str, principal: CsPrincipal) -> CallSummary:
    """A call's emotion timeline, escalations and redacted transcript."""
    raise NotBuilt(TRACKING_ISSUE)


app = create_service_app("cs", title="Tessera — Emotion-aware customer service", routers=[about, router, streams])
