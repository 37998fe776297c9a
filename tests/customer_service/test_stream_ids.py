"""Bad ids and cursors on the cs WebSockets under a real uvicorn: each closes with a precise code and
reason (1007, invalid data), never an unhandled exception, a dropped socket or 1011, and the server
keeps serving. The server is :mod:`tests.customer_service.test_streams`'s (production, signed)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.customer_service.stream_clients import AUTH_TOKEN, TENANT, Closed, CsServer, TwilioClient, call_events_path
from tests.customer_service.test_streams import server  # noqa: F401  (the module's server fixture)

VONAGE_PATH = "/v1/streams/vonage"
LONG_ID = "CA" + "f" * 127


def twilio_closes(server: CsServer, call_sid: str, stream_sid: str | None = None) -> Closed:  # noqa: F811
    """Connect, send ``connected`` and ``start`` with these ids; how the server closed the stream."""

    async def scenario() -> Closed:
        async with TwilioClient(server.twilio_url, call_sid=call_sid, tenant=TENANT, auth_token=AUTH_TOKEN,
                                stream_sid=stream_sid) as client:
            await client.send_connected()
            await client.send_start()
            return await client.server_close(10)

    return asyncio.run(scenario())


@pytest.mark.parametrize(("call_sid", "stream_sid", "words"), [
    (LONG_ID, None, "start.callSid: 129 characters"),
    ("CA" + "0" * 16 + "\0" + "0" * 15, None, "start.callSid: control character U+0000"),
    ("CA" + "1" * 32, "MZ" + "e" * 127, "start.streamSid: 129 characters"),  # fixed ids: pytest-xdist's workers
    ("CA" + "2" * 32, "MZ\n" + "e" * 31, "start.streamSid: control character U+000A"),  # must collect the same
])
def test_a_twilio_start_with_a_bad_id_closes_1007(server: CsServer, call_sid: str,  # noqa: F811
                                                   stream_sid: str | None, words: str) -> None:
    closed = twilio_closes(server, call_sid, stream_sid)
    assert closed.code == 1007 and words in closed.reason, closed
    assert server.call_record(call_sid[:128].replace("\0", ""))["status"] is None


def test_a_twilio_sid_of_128_characters_is_accepted(server: CsServer) -> None:  # noqa: F811
    call_sid = "CA" + uuid.uuid4().hex + "a" * 94

    async def scenario() -> Closed:
        async with TwilioClient(server.twilio_url, call_sid=call_sid, tenant=TENANT, auth_token=AUTH_TOKEN,
                                stream_sid="MZ" + "d" * 126) as client:
            await client.send_connected()
            await client.send_start()
            await client.send_stop()
            return await client.server_close(10)

    assert asyncio.run(scenario()).code == 1000
    assert server.call_record(call_sid)["status"] == "ended"


async def vonage_close(server: CsServer, metadata: dict[str, Any], query: str = "") -> Closed:  # noqa: F811
    """Send the Vonage metadata message; how the server closed the socket."""
    url = server.ws(VONAGE_PATH) + query
    async with connect(url, additional_headers={"X-API-Key": server.api_key}, proxy=None, open_timeout=10) as socket:
        await socket.send(orjson.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=16000",
                                        **metadata}).decode())
        await asyncio.wait_for(socket.wait_closed(), 10)
        return Closed(socket.close_code, socket.close_reason or "")


@pytest.mark.parametrize(("metadata", "query", "words"), [
    ({"call_id": "v" * 129}, "", "call_id: 129 characters"),
    ({}, "?call_id=" + "v" * 129, "?call_id=: 129 characters"),
    ({"call_id": {"nested": "object"}}, "", "call_id: expected a string, got dict"),
    ({"call_id": "call\u0000id"}, "", "call_id: control character U+0000"),
    ({"uuid": ["a"]}, "", "uuid: expected a string, got list"),
])
def test_a_vonage_call_id_that_is_no_id_closes_1007(server: CsServer, metadata: dict[str, Any],  # noqa: F811
                                                     query: str, words: str) -> None:
    closed = asyncio.run(vonage_close(server, metadata, query))
    assert closed.code == 1007 and words in closed.reason, closed


@pytest.mark.parametrize("after", ["abc", "1-0", "-1", "99999999999999999999999"])
def test_a_feed_cursor_that_is_no_feed_id_closes_1007(server: CsServer, after: str) -> None:  # noqa: F811
    call_sid = "CA" + uuid.uuid4().hex

    async def scenario() -> tuple[Closed, Closed]:
        async with TwilioClient(server.twilio_url, call_sid=call_sid, tenant=TENANT, auth_token=AUTH_TOKEN) as client:
            await client.send_connected()
            await client.send_start()
            for _ in range(100):  # the call row (and its call.started event) exists once the feed knows it
                if (await asyncio.to_thread(server.call_record, call_sid))["status"] == "live":
                    break
                await asyncio.sleep(0.05)
            closed = await feed_close(server, call_sid, after)
            valid = await feed_close(server, call_sid, "0", stop=client)
            return closed, valid

    closed, valid = asyncio.run(scenario())
    assert closed.code == 1007 and "is not a feed_id: expected a decimal integer" in closed.reason, closed
    assert valid.code == 1000, valid


async def feed_close(server: CsServer, call_id: str, after: str,  # noqa: F811
                     stop: TwilioClient | None = None) -> Closed:
    """Subscribe with ``?after=``, read until the server closes (stopping ``stop``'s call first)."""
    url = server.ws(call_events_path(call_id)) + f"?after={after}"
    async with connect(url, additional_headers={"X-API-Key": server.api_key}, proxy=None, open_timeout=10) as socket:
        if stop is not None:
            await stop.send_stop()
        await asyncio.wait_for(socket.wait_closed(), 15)
        return Closed(socket.close_code, socket.close_reason or "")


def test_server_stays_healthy(server: CsServer) -> None:  # noqa: F811
    """Nothing above crashed the server or logged a traceback."""
    assert server.process.process.poll() is None
    assert "Traceback" not in server.process.output, server.process.output[-4000:]
