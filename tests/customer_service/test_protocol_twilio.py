"""Twilio Media Streams protocol layer: message validation, the stream state machine and the
X-Twilio-Signature check (pure logic, messages shaped as in Twilio's WebSocket-messages page)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import numpy as np
import pytest

from services.customer_service.audio import mulaw_decode, mulaw_encode
from services.customer_service.protocols.base import (
    AudioChunk,
    AudioGap,
    CallEnded,
    CallStarted,
    Dtmf,
    MalformedMessage,
    MarkPlayed,
    ProtocolError,
    SignatureRejected,
    TenantRefused,
    UnexpectedMessage,
    UnsupportedFormat,
)
from services.customer_service.protocols.twilio import (
    TwilioCredentials,
    TwilioSession,
    clear_message,
    compute_signature,
    is_valid_signature,
    mark_message,
    media_message,
    signed_stream_url,
    stream_tenant,
    url_with_port,
    url_without_port,
)

TOKEN = "a1b2c3d4e5f6a1b2c3d4e5f6a1b2c3d4"
ACCOUNT = "AC" + "0" * 32
CALL = "CA" + "1" * 32
STREAM = "MZ" + "2" * 32
URL = "wss://cs.example.com/cs/v1/streams/twilio"

# twilio-python's own test vectors (tests/unit/test_request_validator.py)
TWILIO_TOKEN = "12345"
TWILIO_URI = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {"CallSid": "CA1234567890ABCDE", "Digits": "1234", "From": "+14158675309", "To": "+18005551212",
                 "Caller": "+14158675309"}


def hmac_sha1_b64(token: str, text: str) -> str:
    """The algorithm written out independently of the module: base64(HMAC-SHA1(token, text))."""
    return base64.b64encode(hmac.new(token.encode(), text.encode(), hashlib.sha1).digest()).decode()


def credentials(tenant: str) -> TwilioCredentials | None:
    return {"acme": TwilioCredentials(TOKEN, ACCOUNT), "globex": TwilioCredentials("other-token")}.get(tenant)


def session(url: str = URL + "?tenant=acme", *, signature: str | None = "sign", **options: Any) -> TwilioSession:
    """A session for ``url``, signed correctly unless ``signature`` is given otherwise."""
    signed = hmac_sha1_b64(TOKEN, url) if signature == "sign" else signature
    return TwilioSession(url=url, signature=signed, credentials_for=credentials, **options)


def connected() -> str:
    return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start(seq: int = 1, tracks: tuple[str, ...] = ("inbound", "outbound"), parameters: dict[str, str] | None = None,
          media_format: dict[str, Any] | None = None, account: str = ACCOUNT) -> str:
    return json.dumps({"event": "start", "sequenceNumber": str(seq), "streamSid": STREAM, "start": {
        "accountSid": account, "streamSid": STREAM, "callSid": CALL, "tracks": list(tracks),
        "customParameters": parameters or {},
        "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


def media(seq: int, chunk: int, payload: bytes = b"\xff" * 160, track: str = "inbound", timestamp: int | None = None,
          stream: str = STREAM) -> str:
    return json.dumps({"event": "media", "sequenceNumber": str(seq), "streamSid": stream, "media": {
        "track": track, "chunk": str(chunk), "timestamp": str((chunk - 1) * 20 if timestamp is None else timestamp),
        "payload": base64.b64encode(payload).decode()}})


def stop(seq: int) -> str:
    return json.dumps({"event": "stop", "sequenceNumber": str(seq), "streamSid": STREAM,
                       "stop": {"accountSid": ACCOUNT, "callSid": CALL}})


def started(**options: Any) -> TwilioSession:
    stream = session(**options)
    stream.receive(connected())
    stream.receive(start())
    return stream


def refused(stream: TwilioSession, message: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        stream.receive(message)
    return caught.value


# --- signatures ------------------------------------------------------------------------------------------

def test_twilio_published_vector_with_parameters() -> None:
    assert compute_signature(TWILIO_TOKEN, TWILIO_URI, TWILIO_PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert is_valid_signature(TWILIO_TOKEN, TWILIO_URI, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", TWILIO_PARAMS)


@pytest.mark.parametrize(("uri", "signature"), [
    (TWILIO_URI.replace(".com", ".com:1234"), "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # port removed (https)
    (TWILIO_URI.replace(".com", ".com:1234").replace("https", "http"), "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),  # kept
    (TWILIO_URI, "kvajT1Ptam85bY51eRf/AJRuM3w="),  # :443 added to https
    (TWILIO_URI.replace("https", "http"), "0ZXoZLH/DfblKGATFgpif+LLRf4="),  # :80 added to http
])
def test_twilio_published_port_vectors(uri: str, signature: str) -> None:
    """The with/without-port cases of twilio-python's tests, with their expected signatures."""
    assert is_valid_signature(TWILIO_TOKEN, uri, signature, TWILIO_PARAMS)


def test_duplicate_and_multi_valued_parameters_are_sorted_and_deduplicated() -> None:
    """twilio-python's MultiDict vector: names sorted, a name's distinct values sorted."""
    params = {"Sid": "CA123", "SidAccount": "AC123", "Digits": ["5678", "1234", "1234"]}
    assert compute_signature(TWILIO_TOKEN, TWILIO_URI, params) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_websocket_url_signature_is_hmac_sha1_of_the_url_alone() -> None:
    url = URL + "?tenant=acme"
    expected = hmac_sha1_b64(TOKEN, url)
    assert compute_signature(TOKEN, url) == expected
    assert is_valid_signature(TOKEN, url, expected)
    assert not is_valid_signature("another-token", url, expected)
    assert not is_valid_signature(TOKEN, url + "&x=1", expected)
    assert not is_valid_signature(TOKEN, url, expected[:-2] + "==")
    assert not is_valid_signature(TOKEN, url, "é" * 28)  # non-ASCII header: refused, not a TypeError


def test_port_handling_of_websocket_urls() -> None:
    """Signed without the port, the URL with a port still validates; ``wss`` gets :80 like any non-https."""
    assert url_without_port("wss://cs.example.com:8443/cs/v1/streams/twilio?tenant=acme") == URL + "?tenant=acme"
    assert url_with_port(URL) == "wss://cs.example.com:80/cs/v1/streams/twilio"
    assert url_with_port("https://cs.example.com/x") == "https://cs.example.com:443/x"
    assert url_without_port("wss://[::1]:8443/x") == "wss://[::1]/x"
    signed_without_port = hmac_sha1_b64(TOKEN, URL)
    assert is_valid_signature(TOKEN, "wss://cs.example.com:8443/cs/v1/streams/twilio", signed_without_port)


def test_signed_url_of_an_asgi_connection() -> None:
    """The path and query as sent (a mount prefix included), under the public origin or the Host."""
    scope = {"type": "websocket", "path": "/v1/streams/twilio", "raw_path": b"/cs/v1/streams/twilio",
             "query_string": b"tenant=acme", "headers": [(b"host", b"cs.example.com")]}
    assert signed_stream_url(scope) == URL + "?tenant=acme"
    assert signed_stream_url(scope, "wss://public.example.com/") == (
        "wss://public.example.com/cs/v1/streams/twilio?tenant=acme")


def test_tenant_from_the_url_query() -> None:
    assert stream_tenant(URL + "?tenant=acme&x=1") == "acme"
    assert stream_tenant(URL) is None


# --- a whole stream --------------------------------------------------------------------------------------

def test_both_tracks_stream_from_connected_to_stop() -> None:
    stream = session()
    assert stream.receive(connected()).events == []
    call = stream.receive(start()).events[0]
    assert isinstance(call, CallStarted)
    assert (call.protocol, call.call_id, call.tenant_id, call.stream_id) == ("twilio", CALL, "acme", STREAM)
    assert [(t.track, t.name, t.encoding, t.sample_rate) for t in call.tracks] == [
        ("customer", "inbound", "mulaw", 8000), ("agent", "outbound", "mulaw", 8000)]
    assert call.authenticated

    tone = (3000 * np.sin(np.arange(160) * 2 * np.pi * 440 / 8000)).astype(np.int16)
    inbound = stream.receive(media(2, 1, mulaw_encode(tone))).events
    outbound = stream.receive(media(3, 1, b"\x7f" * 160, track="outbound")).events
    later = stream.receive(media(4, 2, mulaw_encode(tone))).events
    chunk, agent, second = inbound[0], outbound[0], later[0]
    assert isinstance(chunk, AudioChunk) and isinstance(agent, AudioChunk) and isinstance(second, AudioChunk)
    assert (chunk.track, chunk.sample_rate, chunk.start_sample, chunk.duration_s) == ("customer", 8000, 0, 0.02)
    assert chunk.samples.dtype == np.int16
    np.testing.assert_array_equal(chunk.samples, mulaw_decode(mulaw_encode(tone)))
    assert np.max(np.abs(chunk.samples.astype(int) - tone)) < 200  # μ-law quantisation only
    assert (agent.track, agent.channel) == ("agent", 1)
    assert (second.start_sample, second.position_s) == (160, 0.02)

    dtmf = stream.receive(json.dumps({"event": "dtmf", "sequenceNumber": "5", "streamSid": STREAM,
                                      "dtmf": {"track": "inbound_track", "digit": "1"}})).events
    assert dtmf == [Dtmf("1", "customer", 0.04)]
    mark = stream.receive(json.dumps({"event": "mark", "sequenceNumber": "6", "streamSid": STREAM,
                                      "mark": {"name": "reply-1"}})).events
    assert mark == [MarkPlayed("reply-1")]
    end = stream.receive(stop(7))
    assert end.events == [CallEnded("completed", "stop", 0.04)]
    assert end.close == (1000, "stream stopped")
    assert stream.finish(1000) == []


def test_inbound_only_stream_refuses_outbound_media() -> None:
    stream = session()
    stream.receive(start(tracks=("inbound",)))  # connected is optional
    error = refused(stream, media(2, 1, track="outbound"))
    assert isinstance(error, UnexpectedMessage) and error.close_code == 1008
    assert "media.track 'outbound' is not one of start.tracks ['inbound']" in error.detail


def test_messages_to_twilio() -> None:
    assert json.loads(media_message(STREAM, b"\x00\xff")) == {"event": "media", "streamSid": STREAM,
                                                              "media": {"payload": "AP8="}}
    assert json.loads(mark_message(STREAM, "m1")) == {"event": "mark", "streamSid": STREAM, "mark": {"name": "m1"}}
    assert json.loads(clear_message(STREAM)) == {"event": "clear", "streamSid": STREAM}


# --- order and sequence ----------------------------------------------------------------------------------

def test_media_before_start_is_refused() -> None:
    stream = session()
    stream.receive(connected())
    error = refused(stream, media(1, 1))
    assert isinstance(error, UnexpectedMessage) and error.close_code == 1008
    assert error.detail == "media before start: a stream must begin with connected, start"
    assert stream.finish() == []  # no call started, nothing to keep


@pytest.mark.parametrize(("second", "detail"), [
    (media(2, 1), "duplicate sequenceNumber 2 (media)"),
    (media(1, 2), "sequenceNumber 1 (media) after 2: out of order, or a duplicate of an earlier message"),
    (media(5, 2), "sequenceNumber 5 (media) after 2: 2 message(s) missing (3-4)"),
    (media(4, 2), "sequenceNumber 4 (media) after 2: 1 message(s) missing (3)"),
])
def test_sequence_duplicates_reordering_and_gaps_are_named(second: str, detail: str) -> None:
    stream = started()
    stream.receive(media(2, 1))
    error = refused(stream, second)
    assert isinstance(error, UnexpectedMessage) and error.close_code == 1008
    assert error.detail == detail


def test_gaps_can_be_tolerated_and_reported() -> None:
    stream = started(allow_gaps=True)
    stream.receive(media(2, 1))
    events = stream.receive(media(5, 4, timestamp=60)).events
    assert isinstance(events[0], AudioGap) and events[0].missing_messages == 2
    assert events[0].reason == "sequence-gap"
    assert isinstance(events[1], AudioChunk) and events[1].start_sample == 480
    assert isinstance(refused(stream, media(5, 5)), UnexpectedMessage)  # duplicates stay refused


def test_first_sequence_number_must_be_one() -> None:
    error = refused(session(), start(seq=2))
    assert error.detail == "sequenceNumber 2 (start) after 0: 1 message(s) missing (1)"


def test_repeated_chunk_on_a_track_is_refused() -> None:
    stream = started()
    stream.receive(media(2, 1))
    error = refused(stream, media(3, 1))
    assert error.detail == "media.chunk 1 on track inbound after chunk 1: a duplicate or out of order"


@pytest.mark.parametrize(("first", "then", "detail"), [
    (start(), start(2), "a second start on stream " + STREAM),
    (start(), connected(), "connected must be the first message, and only once"),
])
def test_start_and_connected_only_once(first: str, then: str, detail: str) -> None:
    stream = session()
    stream.receive(first)
    assert refused(stream, then).detail == detail


def test_nothing_after_stop() -> None:
    stream = started()
    stream.receive(stop(2))
    assert refused(stream, media(3, 1)).detail == "media after stop: the stream has ended"


def test_stream_sid_must_stay_the_same() -> None:
    error = refused(started(), media(2, 1, stream="MZ" + "9" * 32))
    assert isinstance(error, UnexpectedMessage) and "media.streamSid" in error.detail


# --- malformed input -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "detail_part"), [
    ("not json", "Twilio message is not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    (json.dumps({"event": "hangup", "sequenceNumber": "2"}), "'hangup' is not a Twilio Media Streams event"),
    (json.dumps({"event": "media", "sequenceNumber": 2, "streamSid": STREAM}), "media.sequenceNumber: expected a "
                                                                               "string of digits, got 2"),
    (json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": STREAM,
                 "media": {"track": "inbound", "chunk": "1", "timestamp": "0"}}),
     "media: media.payload: Field required"),
    (json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": STREAM,
                 "media": {"track": "inbound", "chunk": 1, "timestamp": "0", "payload": ""}}),
     "media: media.chunk: Input should be a valid string"),
    (media(2, 1).replace(base64.b64encode(b"\xff" * 160).decode(), "!!notbase64!!"), "media.payload (chunk 1) is "
                                                                                       "not valid base64"),
    (media(2, 1, b""), "media.payload (chunk 1) is empty"),
    (json.dumps({"event": "dtmf", "sequenceNumber": "2", "streamSid": STREAM,
                 "dtmf": {"track": "inbound_track", "digit": "12"}}), "dtmf: dtmf.digit: String should match"),
])
def test_malformed_messages_close_with_1007(message: str, detail_part: str) -> None:
    error = refused(started(), message)
    assert isinstance(error, MalformedMessage) and error.close_code == 1007
    assert detail_part in error.detail


def test_binary_frame_closes_with_1003() -> None:
    error = refused(started(), b"\xff" * 160)
    assert isinstance(error, UnsupportedFormat) and error.close_code == 1003
    assert error.detail == "Twilio stream: expected a text frame, got a binary one (160 bytes)"


@pytest.mark.parametrize("media_format", [
    {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1},
    {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1},
    {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2},
])
def test_wrong_encoding_or_rate_closes_with_1003(media_format: dict[str, Any]) -> None:
    error = refused(session(), start(media_format=media_format))
    assert isinstance(error, UnsupportedFormat) and error.close_code == 1003
    assert "start.mediaFormat" in error.detail and "audio/x-mulaw at 8000 Hz, mono" in error.detail


# --- tenant and signature --------------------------------------------------------------------------------

def test_tenant_from_a_parameter_is_proved_by_its_token() -> None:
    stream = session(URL)  # signed URL without a query: the tenant comes as <Parameter name="tenant">
    call = stream.receive(start(parameters={"tenant": "acme", "agent": "7"})).events[0]
    assert isinstance(call, CallStarted) and call.tenant_id == "acme" and call.authenticated
    assert call.custom_parameters == {"tenant": "acme", "agent": "7"}


def test_a_signature_under_another_tenants_token_is_refused() -> None:
    stream = session(URL)
    error = refused(stream, start(parameters={"tenant": "globex"}))  # signed with acme's token
    assert isinstance(error, SignatureRejected) and error.close_code == 1008
    assert error.detail == "X-Twilio-Signature does not sign this stream URL under tenant 'globex''s auth token"


@pytest.mark.parametrize(("url", "parameters", "signature", "error_type", "detail_part"), [
    (URL + "?tenant=acme", {}, "bm90IGEgc2lnbmF0dXJlIGF0IGFsbA==", SignatureRejected, "does not sign this stream"),
    (URL + "?tenant=acme", {}, None, SignatureRejected, "no X-Twilio-Signature header"),
    (URL + "?tenant=initech", {}, "sign", SignatureRejected, "no Twilio auth token is configured for tenant "
                                                             "'initech'"),
    (URL + "?tenant=acme", {"tenant": "globex"}, "sign", TenantRefused, "the stream names two tenants"),
    (URL, {}, "sign", TenantRefused, "no tenant"),
    (URL + "?tenant=ACME!", {}, "sign", MalformedMessage, "is not a tenant id"),
])
def test_refused_tenants_and_signatures(url: str, parameters: dict[str, str], signature: str | None,
                                        error_type: type[ProtocolError], detail_part: str) -> None:
    error = refused(session(url, signature=signature), start(parameters=parameters))
    assert isinstance(error, error_type) and detail_part in error.detail
    assert error.close_code == (1007 if error_type is MalformedMessage else 1008)


def test_account_sid_must_be_the_tenants() -> None:
    error = refused(session(), start(account="AC" + "f" * 32))
    assert isinstance(error, TenantRefused) and "is not tenant 'acme''s Twilio account" in error.detail


def test_unsigned_stream_accepted_when_signatures_are_not_required() -> None:
    stream = session(URL, signature=None, require_signature=False, default_tenant="dev")
    call = stream.receive(start()).events[0]
    assert isinstance(call, CallStarted) and (call.tenant_id, call.authenticated) == ("dev", False)


def test_a_wrong_signature_is_refused_even_when_signatures_are_optional() -> None:
    stream = session(signature="bm90IGEgc2lnbmF0dXJlIGF0IGFsbA==", require_signature=False)
    assert isinstance(refused(stream, start()), SignatureRejected)


# --- the end of a stream ---------------------------------------------------------------------------------

def test_a_socket_lost_mid_call_ends_the_call_as_disconnected() -> None:
    stream = started()
    stream.receive(media(2, 1))
    assert stream.finish(1006) == [CallEnded("disconnected", "the socket closed before the end of the stream "
                                                             "(code 1006)", 0.02)]
    assert stream.finish(1006) == []  # only once


def test_a_protocol_error_ends_the_call_with_its_reason() -> None:
    stream = started()
    refused(stream, media(2, 1, b""))
    ended = stream.finish()
    assert len(ended) == 1 and isinstance(ended[0], CallEnded)
    assert (ended[0].reason, ended[0].detail) == ("protocol-error", "media.payload (chunk 1) is empty")
    later = refused(stream, media(3, 2))
    assert later.detail == "the stream has already failed: media.payload (chunk 1) is empty"
