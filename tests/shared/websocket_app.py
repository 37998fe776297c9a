"""A service app with WebSocket routes for tests/shared/test_websockets.py, served by a real uvicorn:
``uvicorn tests.shared.websocket_app:app``."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, Field

from shared.app import create_service_app
from shared.errors import ServiceOverloaded
from shared.observability import configure_logging
from shared.websockets import AuthorizedWebSocket, authorized_websocket

MAX_ECHO_MESSAGE_BYTES = 1024
router = APIRouter()


class Greeting(BaseModel):
    name: str = Field(min_length=1, max_length=40)


@router.websocket("/v1/echo")
@authorized_websocket("cs", max_message_bytes=MAX_ECHO_MESSAGE_BYTES)
async def echo(connection: AuthorizedWebSocket) -> None:
    """Says who is connected, then echoes text messages."""
    await connection.send_json({"request_id": connection.request_id, "tenant": connection.principal.tenant_id})
    async for text in connection.iter_text():
        await connection.send_text(text)


@router.websocket("/v1/greetings")
@authorized_websocket("cs")
async def greetings(connection: AuthorizedWebSocket) -> None:
    """Answers each ``{"name": ...}`` with a greeting."""
    while True:
        greeting = await connection.receive_model(Greeting)
        await connection.send_json({"hello": greeting.name})


@router.websocket("/v1/failing")
@authorized_websocket("cs")
async def failing(connection: AuthorizedWebSocket) -> None:
    """Fails unexpectedly at the first message."""
    await connection.receive_text()
    raise RuntimeError("database password is hunter2")


@router.websocket("/v1/overloaded")
@authorized_websocket("cs")
async def overloaded(connection: AuthorizedWebSocket) -> None:
    """Is overloaded at the first message."""
    await connection.receive_text()
    raise ServiceOverloaded("the model's queue is full", retry_after_s=2)


@router.websocket("/v1/closed-before-accept")
async def closed_before_accept(websocket: WebSocket) -> None:
    """Starlette without this module: a close before accept, to show what clients see."""
    await websocket.close(1008, "this reason never reaches the client")


configure_logging()
app = create_service_app("websocket-test", title="WebSocket test app", routers=[router], check_broker=False)
