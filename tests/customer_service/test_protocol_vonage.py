"""Vonage's L16 WebSocket protocol layer (pure logic; the first message as Vonage's WebSockets
guide shows it, the headers of the NCCO's websocket endpoint merged in)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.customer_service.protocols.base import (
    AudioChunk,
    CallEnded,
    CallStarted,
    Dtmf,
    MalformedMessage,
    ProtocolError,
    TenantRefused,
    UnexpectedMessage,
    UnsupportedFormat,
)
from services.customer_service.protocols.vonage import VonageSession, l16_rate


def metadata(content_type: str = "audio/l16;rate=16000", **headers: str) -> str:
    return json.dumps({"event": "websocket:connected", "content-type": content_type, **headers})


def refused(session: VonageSession, message: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        session.receive(message)
    return caught.value


def test_metadata_then_little_endian_frames_then_a_normal_close() -> None:
    session = VonageSession(tenant_id="acme")
    call = session.receive(metadata(call_id="call-42", agent="7")).events[0]
    assert isinstance(call, CallStarted)
    assert (call.protocol, call.call_id, call.tenant_id) == ("vonage", "call-42", "acme")
    assert [(t.track, t.encoding, t.sample_rate) for t in call.tracks] == [("customer", "l16", 16000)]
    assert call.custom_parameters == {"call_id": "call-42", "agent": "7"}

    samples = (1000 * np.sin(np.arange(320) / 7)).astype(np.int16)
    first = session.receive(samples.astype("<i2").tobytes()).events[0]
    second = session.receive(samples.astype("<i2").tobytes()).events[0]
    assert isinstance(first, AudioChunk) and isinstance(second, AudioChunk)
    np.testing.assert_array_equal(first.samples, samples)
    assert (first.sample_rate, first.start_sample, second.start_sample, second.position_s) == (16000, 0, 320, 0.02)

    assert session.receive(json.dumps({"event": "websocket:dtmf", "digit": "5", "duration": 260})).events == [
        Dtmf("5", "customer", 0.04)]
    assert session.receive(json.dumps({"event": "websocket:notify", "payload": {}})).events == []
    assert session.finish(1000) == [CallEnded("completed", "socket closed (code 1000)", 0.04)]


def test_eight_kilohertz_and_tenant_from_the_metadata() -> None:
    session = VonageSession()
    call = session.receive(metadata("audio/l16;rate=8000", tenant="acme")).events[0]
    assert isinstance(call, CallStarted) and call.tenant_id == "acme" and call.tracks[0].sample_rate == 8000


def test_audio_before_metadata_is_refused() -> None:
    error = refused(VonageSession(), b"\x00\x00" * 320)
    assert isinstance(error, UnexpectedMessage) and error.close_code == 1008
    assert error.detail == "binary audio (640 bytes) before the metadata message"


@pytest.mark.parametrize("content_type", ["audio/l16;rate=44100", "audio/pcmu;rate=8000", "audio/l16"])
def test_unsupported_content_types_close_with_1003(content_type: str) -> None:
    error = refused(VonageSession(), metadata(content_type))
    assert isinstance(error, UnsupportedFormat) and error.close_code == 1003
    assert l16_rate("Audio/L16; rate=16000") == 16000


@pytest.mark.parametrize(("message", "detail_part"), [
    ("{}", "the first message must be websocket:connected"),
    ("not json", "the metadata message is not valid JSON"),
    (json.dumps({"event": "websocket:connected", "content-type": 16000}), "content-type: expected a string"),
])
def test_malformed_metadata_closes_with_1007(message: str, detail_part: str) -> None:
    error = refused(VonageSession(), message)
    assert isinstance(error, MalformedMessage) and error.close_code == 1007 and detail_part in error.detail


def test_odd_frames_and_bad_dtmf_close_with_1007() -> None:
    session = VonageSession()
    session.receive(metadata())
    assert isinstance(refused(session, b"\x00" * 641), MalformedMessage)
    session = VonageSession()
    session.receive(metadata())
    error = refused(session, json.dumps({"event": "websocket:dtmf", "digit": "55"}))
    assert isinstance(error, MalformedMessage) and "websocket:dtmf.digit" in error.detail


def test_metadata_cannot_contradict_the_endpoints_tenant() -> None:
    error = refused(VonageSession(tenant_id="acme"), metadata(tenant="globex"))
    assert isinstance(error, TenantRefused) and error.close_code == 1008


def test_an_abnormal_close_keeps_the_partial_call_as_disconnected() -> None:
    session = VonageSession()
    session.receive(metadata())
    session.receive(b"\x00\x00" * 320)
    ended = session.finish(1006)
    assert len(ended) == 1 and isinstance(ended[0], CallEnded) and ended[0].reason == "disconnected"
