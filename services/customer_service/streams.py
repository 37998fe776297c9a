"""The WebSocket endpoints of the customer-service vertical: call audio in (Twilio Media Streams,
Genesys AudioHook v2, Vonage), agent-assist and supervisor feeds out.

Each stream endpoint drives one protocol session (:mod:`.protocols`) and one call pipeline
(:mod:`.pipeline`); the feeds serve :mod:`shared.feeds` topics of the caller's tenant.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from shared.errors import NotBuilt
from shared.websockets import AuthorizedWebSocket, authorized_websocket, close_code_for, close_quietly

TRACKING_ISSUE = 18

streams = APIRouter(prefix="/v1")


@streams.websocket("/streams/twilio")
async def twilio_media_stream(websocket: WebSocket) -> None:
    """Twilio Media Streams: call audio in (module docstring: accepted, then closed as not built)."""
    await websocket.accept()
    not_built = NotBuilt(TRACKING_ISSUE)
    await close_quietly(websocket, close_code_for(not_built), not_built.detail)


@streams.websocket("/streams/audiohook")
@authorized_websocket("cs")
async def audiohook_stream(connection: AuthorizedWebSocket) -> None:
    """Genesys AudioHook v2: call audio in, transcript events back."""
    raise NotBuilt(TRACKING_ISSUE)


@streams.websocket("/calls/{call_id}/events")
@authorized_websocket("cs")
async def call_assist_events(connection: AuthorizedWebSocket) -> None:
    """The agent-assist feed of one call: transcript, emotion, escalations, suggested replies."""
    raise NotBuilt(TRACKING_ISSUE)
