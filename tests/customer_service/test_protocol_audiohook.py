"""Genesys AudioHook v2 protocol layer: the upgrade's RFC 9421 signature, message checks in the
reference server's order, media negotiation, de-interleaving, the probe and the messages we send
(pure logic; messages from the Azure sample and the reference implementation's tests)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import numpy as np
import pytest
from starlette.datastructures import Headers

from services.customer_service.audio import mulaw_decode, mulaw_encode
from services.customer_service.protocols.audiohook import (
    NULL_UUID,
    AudioHookSession,
    MediaParameter,
    choose_media,
    format_duration,
    parse_duration,
    verify_upgrade,
)
from services.customer_service.protocols.base import (
    AudioChunk,
    AudioGap,
    CallEnded,
    CallStarted,
    LanguageChanged,
    MalformedMessage,
    MessageTooLarge,
    Paused,
    PeerError,
    ProtocolError,
    Resumed,
    SignatureRejected,
    TenantRefused,
    UnexpectedMessage,
    request_target,
)
from services.customer_service.protocols.http_signature import (
    SignedRequest,
    parse_dictionary,
    serialize_inner_list,
    verify_signature,
)

SESSION = "e160e428-53e2-487c-977d-96989bf5c99d"
ORGANIZATION = "d7934305-0972-4844-938e-9060eef73d05"
CONVERSATION = "090eaa2f-72fa-480a-83e0-8667ff89c0ec"
BOTH = {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}
EXTERNAL = {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}

# The AudioHook documentation's signature example, as the reference implementation tests it
DOC_API_KEY = "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh"
DOC_SECRET = base64.b64decode("TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU=")
DOC_TARGET = "/api/v1/voicebiometrics/ws"
DOC_INPUT = ('sig1=("@request-target" "@authority" "audiohook-organization-id" "audiohook-session-id" '
             '"audiohook-correlation-id" "x-api-key");keyid="SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh";'
             'nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";alg="hmac-sha256";created=1641013200;expires=3282026430')
DOC_HEADERS = {"host": "audiohook.example.com", "audiohook-organization-id": ORGANIZATION,
               "audiohook-session-id": "30b0e395-84d3-4570-ac13-9a62d8f514c0", "audiohook-correlation-id": SESSION,
               "x-api-key": DOC_API_KEY, "signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
               "signature-input": DOC_INPUT}


def secrets(api_key: str) -> bytes | None:
    return {DOC_API_KEY: DOC_SECRET, "open-key": b""}.get(api_key)


# --- the upgrade signature -------------------------------------------------------------------------------

def test_audiohook_documentation_example_verifies() -> None:
    identity = verify_upgrade(DOC_HEADERS, request_target=DOC_TARGET, client_secret_for=secrets, now=1641013205)
    assert identity.api_key == DOC_API_KEY and identity.organization_id == ORGANIZATION
    assert identity.signature is not None and identity.signature.keyid == DOC_API_KEY


def test_starlette_headers_and_the_scope_request_target_work_as_they_are() -> None:
    """What an endpoint has at hand: ``websocket.headers`` and the ASGI scope."""
    scope = {"type": "websocket", "raw_path": DOC_TARGET.encode(), "query_string": b"",
             "headers": [(name.encode(), value.encode()) for name, value in DOC_HEADERS.items()]}
    identity = verify_upgrade(Headers(scope=scope), request_target=request_target(scope),
                              client_secret_for=secrets, now=1641013205)
    assert identity.signature is not None
    repeated = Headers(raw=[(b"x-api-key", b"a"), (b"x-api-key", b" b ")])
    assert SignedRequest(repeated, "/").header("x-api-key") == "a, b"


def test_rfc_9421_hmac_test_vector_verifies() -> None:
    """RFC 9421 (draft 11) B.2.5: hmac-sha256 over date, @authority and content-type."""
    headers = {"date": "Tue, 20 Apr 2021 02:07:55 GMT", "host": "example.com", "content-type": "application/json",
               "signature-input": 'sig-b25=("date" "@authority" "content-type");created=1618884473;'
                                  'keyid="test-shared-secret"',
               "signature": "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:"}
    key = base64.b64decode("uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==")
    verified = verify_signature(SignedRequest(headers, "/foo"), lambda keyid: key, now=1618884473)
    assert verified.label == "sig-b25" and verified.components == ("date", "@authority", "content-type")


def signed_headers(*, created: int = 1_700_000_000, nonce: str = "bm9uY2Utb2YtMjItY2hhcmFjdGVycw",
                   keyid: str = "api-key-1", secret: bytes = b"client secret bytes",
                   components: tuple[str, ...] = ("@request-target", "@authority", "audiohook-organization-id",
                                                  "audiohook-session-id", "audiohook-correlation-id", "x-api-key"),
                   ) -> dict[str, str]:
    """An upgrade signed with the algorithm written out in the test, independently of the module."""
    headers = {"host": "cs.example.com", "audiohook-organization-id": ORGANIZATION, "audiohook-session-id": SESSION,
               "audiohook-correlation-id": CONVERSATION, "x-api-key": "api-key-1"}
    values = {"@request-target": "/cs/v1/streams/audiohook", "@authority": "cs.example.com", **headers}
    params = f'keyid="{keyid}";nonce="{nonce}";alg="hmac-sha256";created={created};expires={created + 30}'
    inner = "(" + " ".join(f'"{name}"' for name in components) + ")" + ";" + params
    base = "\n".join([*(f'"{name}": {values[name]}' for name in components), f'"@signature-params": {inner}'])
    signature = base64.b64encode(hmac.new(secret, base.encode(), hashlib.sha256).digest()).decode()
    return {**headers, "signature-input": f"sig1={inner}", "signature": f"sig1=:{signature}:"}


def check(headers: dict[str, str], *, now: float = 1_700_000_002, **options: Any) -> None:
    def secret_for(api_key: str) -> bytes | None:
        return {"api-key-1": b"client secret bytes", "open-key": b""}.get(api_key)

    verify_upgrade(headers, request_target="/cs/v1/streams/audiohook", client_secret_for=secret_for, now=now,
                   **options)


def test_independently_signed_upgrade_verifies() -> None:
    check(signed_headers())


@pytest.mark.parametrize(("tamper", "now", "detail"), [
    ({"audiohook-session-id": "30b0e395-84d3-4570-ac13-9a62d8f514c0"}, 1_700_000_002,
     "the signature does not match the request"),
    ({"host": "evil.example.com"}, 1_700_000_002, "the signature does not match the request"),
    ({}, 1_700_000_020, "signature created 20 s ago (at most 10 s)"),
    ({}, 1_699_999_990, "signature created 10 s in the future"),
    ({}, 1_700_000_040, "signature expired 10 s ago"),
    ({"signature": "sig1=:AAAA:"}, 1_700_000_002, "the signature does not match the request"),
    ({"signature": "sig1=AAAA"}, 1_700_000_002, "Signature sig1: must be a byte sequence"),
    ({"signature-input": "sig1=(\"x-api-key\""}, 1_700_000_002, "malformed Signature or Signature-Input header"),
    ({"signature": "sig2=:AAAA:"}, 1_700_000_002, "Signature has no sig1= entry"),
])
def test_tampered_or_stale_upgrades_are_refused(tamper: dict[str, str], now: float, detail: str) -> None:
    with pytest.raises(SignatureRejected) as refused:
        check({**signed_headers(), **tamper}, now=now)
    assert detail in refused.value.detail
    assert refused.value.close_code == 1008


@pytest.mark.parametrize(("options", "detail"), [
    ({"keyid": "another-key"}, "the signature's keyid is not the X-API-KEY"),
    ({"nonce": "short"}, "nonce is missing or shorter than 22 characters"),
    ({"components": ("@request-target", "@authority", "x-api-key")}, "the signature does not cover "
                                                                     "audiohook-organization-id"),
    ({"secret": b"wrong secret"}, "the signature does not match the request"),
])
def test_signature_preconditions_of_the_reference(options: dict[str, Any], detail: str) -> None:
    with pytest.raises(SignatureRejected) as refused:
        check(signed_headers(**options))
    assert detail in refused.value.detail


def test_unsigned_upgrades() -> None:
    unsigned = {"x-api-key": "api-key-1", "audiohook-session-id": SESSION}
    with pytest.raises(SignatureRejected, match="unsigned upgrade"):
        check(unsigned)
    check(unsigned, require_signature=False)
    check({**unsigned, "x-api-key": "open-key"})  # a key whose client secret is empty, as the reference allows
    with pytest.raises(SignatureRejected, match="no X-API-KEY header"):
        check({"audiohook-session-id": SESSION})


def test_structured_field_round_trip_keeps_the_signed_parameters() -> None:
    inner = parse_dictionary(DOC_INPUT)["sig1"]
    assert serialize_inner_list(inner) == DOC_INPUT.removeprefix("sig1=")  # type: ignore[arg-type]


# --- messages ---------------------------------------------------------------------------------------------

class Client:
    """Builds client messages with the counters a well-behaved client keeps."""

    def __init__(self, session: AudioHookSession, session_id: str = SESSION) -> None:
        self.session, self.id, self.seq, self.serverseq = session, session_id, 0, 0

    def message(self, kind: str, parameters: dict[str, Any] | None = None, *, position: str = "PT0S",
                **override: Any) -> str:
        self.seq += 1
        return json.dumps({"version": "2", "type": kind, "seq": self.seq, "serverseq": self.serverseq, "id": self.id,
                           "position": position, "parameters": parameters or {}, **override})

    def send(self, kind: str, parameters: dict[str, Any] | None = None, **options: Any) -> Any:
        step = self.session.receive(self.message(kind, parameters, **options))
        replies = [json.loads(reply) for reply in step.replies]
        if replies:
            self.serverseq = replies[-1]["seq"]
        return step, replies


def open_parameters(media: list[dict[str, Any]] | None = None, conversation: str = CONVERSATION,
                    **extra: Any) -> dict[str, Any]:
    """The ``open`` parameters of the Azure sample's example."""
    return {"organizationId": ORGANIZATION, "conversationId": conversation,
            "participant": {"id": "883efee8-3d6c-4537-b500-6d7ca4b92fa0", "ani": "+1-555-555-1234",
                            "aniName": "John Doe", "dnis": "+1-800-555-6789"},
            "media": [BOTH, EXTERNAL] if media is None else media, "language": "en-US", **extra}


def opened(**options: Any) -> Client:
    client = Client(AudioHookSession(session_id=SESSION, organization_id=ORGANIZATION, tenant_id="acme", **options))
    client.send("open", open_parameters())
    return client


def refused(client: Client, message: str | bytes) -> tuple[ProtocolError, dict[str, Any]]:
    with pytest.raises(ProtocolError) as caught:
        client.session.receive(message)
    error = caught.value
    assert len(error.replies) == 1
    return error, json.loads(error.replies[0])


def test_open_negotiates_both_channels_and_starts_the_call() -> None:
    client = Client(AudioHookSession(session_id=SESSION, organization_id=ORGANIZATION, tenant_id="acme"))
    step, replies = client.send("open", open_parameters(supportedLanguages=True))
    assert replies == [{"version": "2", "type": "opened", "seq": 1, "clientseq": 1, "id": SESSION,
                        "parameters": {"media": [BOTH], "startPaused": False, "supportedLanguages": ["en-US"]}}]
    call = step.events[0]
    assert isinstance(call, CallStarted)
    assert (call.protocol, call.call_id, call.tenant_id, call.stream_id, call.language) == (
        "audiohook", CONVERSATION, "acme", SESSION, "en-US")
    assert [(t.track, t.name, t.encoding, t.channel) for t in call.tracks] == [
        ("customer", "external", "mulaw", 0), ("agent", "internal", "mulaw", 1)]
    assert call.participants[0].phone == "+1-555-555-1234" and call.participants[0].name == "John Doe"


@pytest.mark.parametrize(("offered", "chosen"), [
    ([EXTERNAL, {**BOTH, "format": "L16"}, BOTH], BOTH),
    ([{**EXTERNAL, "format": "L16"}, EXTERNAL], EXTERNAL),
    ([{**BOTH, "channels": ["internal", "external"]}, BOTH], {**BOTH, "channels": ["internal", "external"]}),
    ([{**BOTH, "format": "L16"}, EXTERNAL], {**BOTH, "format": "L16"}),
])
def test_media_choice_prefers_both_channels_then_pcmu(offered: list[dict[str, Any]], chosen: dict[str, Any]) -> None:
    choice = choose_media([MediaParameter.model_validate(entry) for entry in offered])
    assert choice is not None and choice.model_dump() == chosen


def test_l16_can_be_declined() -> None:
    assert choose_media([MediaParameter.model_validate({**BOTH, "format": "L16"})], allow_l16=False) is None


def test_interleaved_pcmu_frames_become_one_chunk_per_channel() -> None:
    client = opened()
    customer = (2000 * np.sin(np.arange(800) / 5)).astype(np.int16)
    agent = (-1000 * np.ones(800)).astype(np.int16)
    frame = bytes(np.column_stack([np.frombuffer(mulaw_encode(customer), np.uint8),
                                   np.frombuffer(mulaw_encode(agent), np.uint8)]).reshape(-1))
    first = client.session.receive(frame).events
    second = client.session.receive(frame).events
    assert [(c.track, c.channel, c.start_sample) for c in first if isinstance(c, AudioChunk)] == [
        ("customer", 0, 0), ("agent", 1, 0)]
    assert isinstance(first[0], AudioChunk) and isinstance(first[1], AudioChunk)
    np.testing.assert_array_equal(first[0].samples, mulaw_decode(mulaw_encode(customer)))
    np.testing.assert_array_equal(first[1].samples, mulaw_decode(mulaw_encode(agent)))
    assert isinstance(second[0], AudioChunk) and second[0].position_s == 0.1
    assert client.session.position_s == 0.2


def test_l16_frames_are_little_endian() -> None:
    client = Client(AudioHookSession(session_id=SESSION))
    client.send("open", open_parameters([{**EXTERNAL, "format": "L16"}]))
    events = client.session.receive(np.array([1, -2, 300], dtype="<i2").tobytes()).events
    assert isinstance(events[0], AudioChunk) and events[0].samples.tolist() == [1, -2, 300]


def test_ping_pause_resume_discard_update_error_and_close() -> None:
    client = opened()
    _, replies = client.send("ping", {"rtt": "PT0.05S"})
    assert replies[0]["type"] == "pong" and replies[0]["parameters"] == {} and replies[0]["seq"] == 2
    client.session.receive(b"\xff\xff" * 800)  # 0.1 s
    step, _ = client.send("paused", position="PT0.1S")
    assert step.events == [Paused(0.1)]
    step, _ = client.send("resumed", {"start": "PT0.1S", "discarded": "PT2.5S"}, position="PT2.6S")
    assert step.events == [Resumed(2.6, 2.5)]
    chunk = client.session.receive(b"\xff\xff" * 8).events[0]
    assert isinstance(chunk, AudioChunk) and chunk.start_sample == 2.6 * 8000
    step, _ = client.send("discarded", {"start": "PT2.601S", "discarded": "PT1S"})
    assert step.events == [AudioGap(2.601, 1.0, "discarded")]
    step, _ = client.send("update", {"language": "fr-FR"})
    assert step.events == [LanguageChanged("fr-FR")]
    step, _ = client.send("error", {"code": 429, "message": "rate limited", "retryAfter": "PT2S"})
    assert step.events == [PeerError(429, "rate limited")]
    step, replies = client.send("close", {"reason": "end"}, position="PT3.601S")
    assert replies[0]["type"] == "closed" and replies[0]["clientseq"] == client.seq
    assert step.events == [CallEnded("completed", "close (end)", 3.601)]
    assert step.close == (1000, "closed (end)")
    assert client.session.finish(1000) == []


def test_messages_in_the_wrong_state_are_ignored_as_the_reference_does() -> None:
    client = opened()
    step, replies = client.send("resumed", {"start": "PT0S", "discarded": "PT0S"})  # not paused
    assert (step.events, replies) == ([], [])
    step, replies = client.send("open", open_parameters())  # a second open
    assert (step.events, replies) == ([], [])


def test_transcript_event_and_server_messages() -> None:
    client = opened()
    event = client.session.transcript_message("agent", "how can I help", offset_s=1.25, duration_s=0.8,
                                              confidence=0.91, language="en-US", transcript_id="t-1")
    assert event is not None
    assert json.loads(event) == {"version": "2", "type": "event", "seq": 2, "clientseq": 1, "id": SESSION,
                                 "parameters": {"entities": [{"type": "transcript", "data": {
                                     "id": "t-1", "channelId": 1, "isFinal": True, "offset": "PT1.25S",
                                     "duration": "PT0.8S", "alternatives": [{
                                         "confidence": 0.91, "languages": ["en-US"],
                                         "interpretations": [{"type": "display", "transcript": "how can I help"}]}]}}]}}
    pause = client.session.pause_message()
    assert pause is not None and json.loads(pause)["type"] == "pause"
    disconnect = client.session.disconnect_message("completed", "call summary sent")
    assert disconnect is not None and json.loads(disconnect)["parameters"] == {"reason": "completed",
                                                                               "info": "call summary sent"}
    assert [json.loads(m)["seq"] for m in (event, pause, disconnect)] == [2, 3, 4]


def test_no_transcript_for_a_track_not_negotiated() -> None:
    client = Client(AudioHookSession(session_id=SESSION))
    client.send("open", open_parameters([EXTERNAL]))
    assert client.session.transcript_message("agent", "x", offset_s=0, duration_s=1, confidence=1) is None


def test_durations() -> None:
    assert parse_duration("PT3.2S") == 3.2 and parse_duration("PT.5S") == 0.5 and parse_duration("PT0S") == 0
    assert [format_duration(s) for s in (0, 3.2, 1.25, 0.0004)] == ["PT0S", "PT3.2S", "PT1.25S", "PT0S"]
    with pytest.raises(ValueError):
        parse_duration("P1D")


# --- the connection probe ----------------------------------------------------------------------------------

def test_connection_probe_opens_without_media_and_stores_nothing() -> None:
    client = Client(AudioHookSession(session_id=SESSION, organization_id=ORGANIZATION))
    step, replies = client.send("open", open_parameters(conversation=NULL_UUID))
    assert replies[0]["type"] == "opened" and replies[0]["parameters"]["media"] == []
    assert step.events == [] and client.session.call is None
    step, replies = client.send("close", {"reason": "end"})
    assert replies[0]["type"] == "closed" and step.events == [] and step.close == (1000, "closed (end)")
    assert client.session.finish(1000) == []


# --- checks, in the reference server's order -------------------------------------------------------------

def test_seq_must_be_clientseq_plus_one() -> None:
    client = opened()
    error, disconnect = refused(client, client.message("ping", seq=5))
    assert isinstance(error, UnexpectedMessage) and error.close_code == 1008
    assert error.detail == "invalid seq 5 (ping): expected 2, one more than the last (1)"
    assert disconnect["type"] == "disconnect" and disconnect["parameters"] == {
        "reason": "error", "info": "Client Error: invalid seq 5 (ping): expected 2, one more than the last (1)"}


def test_a_repeated_seq_is_refused() -> None:
    client = opened()
    error, _ = refused(client, client.message("ping", seq=1))
    assert error.detail.startswith("invalid seq 1 (ping): expected 2")


def test_serverseq_above_ours_is_refused() -> None:
    client = opened()
    error, _ = refused(client, client.message("ping", serverseq=7))
    assert error.detail == "invalid serverseq 7: the server has sent 1 message(s)"


def test_session_id_must_match() -> None:
    client = opened()
    error, _ = refused(client, client.message("ping", id="30b0e395-84d3-4570-ac13-9a62d8f514c0"))
    assert error.detail == f"session id mismatch: 30b0e395-84d3-4570-ac13-9a62d8f514c0 is not {SESSION}"


def test_session_id_taken_from_the_first_message_without_the_header() -> None:
    client = Client(AudioHookSession(session_id=None))
    _, replies = client.send("open", open_parameters())
    assert replies[0]["id"] == SESSION


@pytest.mark.parametrize(("make", "error_type", "detail_part"), [
    (lambda c: "x" * 65536, MessageTooLarge, "text message too large (>64K): 65536 characters"),
    (lambda c: "{not json", MalformedMessage, "text message not valid JSON"),
    (lambda c: c.message("ping", version="1"), MalformedMessage, "not a well-formed client message: version"),
    (lambda c: c.message("ping", position="3.2s"), MalformedMessage, "not a well-formed client message: position"),
    (lambda c: c.message("ping", id="not-a-uuid"), MalformedMessage, "not a well-formed client message: id"),
    (lambda c: c.message("ping", seq=-1), MalformedMessage, "not a well-formed client message: seq"),
    (lambda c: c.message("dance"), MalformedMessage, "'dance' is not a supported client message"),
    (lambda c: c.message("close", {"reason": "bored"}), MalformedMessage, "invalid close parameters: reason"),
    (lambda c: b"\xff" * 3, MalformedMessage, "binary frame of 3 bytes is not whole samples of 2 PCMU channel(s)"),
])
def test_invalid_messages_are_signalled_with_disconnect(make: Any, error_type: type[ProtocolError],
                                                        detail_part: str) -> None:
    client = opened()
    error, disconnect = refused(client, make(client))
    assert isinstance(error, error_type) and detail_part in error.detail
    assert error.close_code == (1009 if error_type is MessageTooLarge else 1007)
    assert disconnect["type"] == "disconnect" and disconnect["parameters"]["reason"] == "error"


def test_open_with_an_unsupported_rate_is_invalid() -> None:
    client = Client(AudioHookSession(session_id=SESSION))
    error, _ = refused(client, client.message("open", open_parameters([{**BOTH, "rate": 16000}])))
    assert isinstance(error, MalformedMessage) and "invalid open parameters: media.0.rate" in error.detail


def test_audio_before_open_is_refused() -> None:
    client = Client(AudioHookSession(session_id=SESSION))
    error, _ = refused(client, b"\xff" * 160)
    assert isinstance(error, UnexpectedMessage) and error.detail == "received audio before open"


def test_audio_while_paused_is_refused_as_the_reference_does() -> None:
    client = opened()
    client.send("paused")
    error, _ = refused(client, b"\xff\xff" * 80)
    assert error.detail == "received audio while paused"


def test_organization_mismatch_is_unauthorized() -> None:
    client = Client(AudioHookSession(session_id=SESSION, organization_id="11111111-2222-4333-8444-555555555555"))
    error, disconnect = refused(client, client.message("open", open_parameters()))
    assert isinstance(error, TenantRefused) and error.close_code == 1008
    assert disconnect["parameters"]["reason"] == "unauthorized"


def test_after_an_error_only_close_is_answered() -> None:
    client = opened()
    client.session.receive(b"\xff\xff" * 80)
    refused(client, b"\xff" * 3)
    assert client.session.receive(b"\xff\xff" * 80).events == []  # audio ignored now
    step = client.session.receive(client.message("close", {"reason": "error"}))
    assert json.loads(step.replies[0])["type"] == "closed"
    assert step.close is not None and step.close[0] == 1007
    ended = client.session.finish()
    assert len(ended) == 1 and isinstance(ended[0], CallEnded) and ended[0].reason == "protocol-error"
    assert ended[0].position_s == 0.01  # 80 stereo samples before the error


def test_a_socket_lost_mid_call_keeps_the_partial_call() -> None:
    client = opened()
    client.session.receive(b"\xff\xff" * 800)
    assert client.session.finish(1006) == [CallEnded("disconnected", "the socket closed before the end of the "
                                                                     "stream (code 1006)", 0.1)]
