"""The customer-service HTTP API under a real uvicorn on loopback, on SQLite: the knowledge base
(201 + Location, tag filter and paging, 404/409/422), settings, write-only integration secrets,
calls (list with status filter and keyset paging, summary, timeline PNG with ETag), tenant walls
(another tenant's article or call is a 404), and problem+json for bad input.

``POST /v1/utterances`` is tested against an in-process uvicorn whose analyzers are a small fake
of the :class:`~services.customer_service.pipeline.UtteranceAnalyzers` protocol (the models' own
end-to-end test is the pipeline's); its knowledge index is the process's real one, so the
suggestions show the index following the API's changes."""

from __future__ import annotations

import io
import json
import math
import struct
import time
import uuid
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from fastapi import FastAPI
from PIL import Image

from services.customer_service import store
from services.customer_service.escalation import EscalationEvent, Rule
from services.customer_service.pipeline import EmotionReading, Transcription
from shared.app import PrefixDispatcher
from shared.db import session_factory
from shared.errors import PROBLEM_CONTENT_TYPE
from shared.security import create_api_key
from tests.conftest import Stack, apply_stack_in_process, sqlite_stack_at
from tests.scaffold import migrate
from tests.support import ManagedProcess, free_port, python_argv, served_in_thread

TWILIO_SID = "AC" + "0123456789abcdef" * 2
AUDIOHOOK_SECRET = "TXlTdXBlclNlY3JldEtleVRlbGxOby0xMjM0NTY3ODkwMTIzNDU2Nzg5MA=="


# --- servers and keys ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cs_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A migrated SQLite stack for this module."""
    stack = sqlite_stack_at(tmp_path_factory.mktemp("cs-api"))
    stack.extra_env["TESSERA_LOG_LEVEL"] = "WARNING"
    migrate(stack.database_url)
    return stack


@dataclass
class Tenant:
    id: str
    client: httpx.Client


@dataclass
class CsServer:
    stack: Stack
    base_url: str

    def tenant(self) -> Tenant:
        """A new tenant with a ``cs`` key, and a client sending it."""
        tenant_id = f"cs-{uuid.uuid4().hex[:8]}"
        with session_factory(self.stack.database_url)() as session:
            key = create_api_key(session, tenant_id=tenant_id, name="test", scopes=["cs"])
            session.commit()
        return Tenant(tenant_id, httpx.Client(base_url=self.base_url, headers={"X-API-Key": key}, timeout=30))


@pytest.fixture(scope="module")
def cs_server(cs_stack: Stack) -> Iterator[CsServer]:
    """``services.customer_service.api:app`` under uvicorn in a child process."""
    port = free_port()
    process = ManagedProcess(python_argv("-m", "uvicorn", "services.customer_service.api:app", "--host",
                                         "127.0.0.1", "--port", str(port)), cs_stack.env, "cs-api")
    try:
        process.wait_for_output(r"Uvicorn running on", timeout_s=120)
        yield CsServer(cs_stack, f"http://127.0.0.1:{port}")
    finally:
        process.stop()
        assert "Traceback" not in process.output, process.output[-6000:]


@pytest.fixture
def tenant_a(cs_server: CsServer) -> Iterator[Tenant]:
    tenant = cs_server.tenant()
    with tenant.client:
        yield tenant


@pytest.fixture
def tenant_b(cs_server: CsServer) -> Iterator[Tenant]:
    tenant = cs_server.tenant()
    with tenant.client:
        yield tenant


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is a problem+json of ``status``; its document."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    document: dict[str, Any] = response.json()
    assert document["status"] == status
    return document


ARTICLE = {"id": "refund-policy", "title": "Refund policy", "tags": ["billing", "refund"],
           "body": "Refunds are issued to the original card within five business days. Ask for the order number.",
           "reply": "I can refund that to your original card; it arrives within five business days."}


# --- knowledge base ------------------------------------------------------------------------------

def test_an_article_is_created_read_listed_replaced_and_deleted(tenant_a: Tenant) -> None:
    client = tenant_a.client
    created = client.post("/v1/knowledge/articles", json=ARTICLE)
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "refund-policy" and created.json()["version"] == 1
    location = created.headers["location"]
    assert location.endswith("/v1/knowledge/articles/refund-policy")
    assert client.get(location).json() == created.json()
    problem(client.post("/v1/knowledge/articles", json=ARTICLE), 409)

    generated = client.post("/v1/knowledge/articles", json={"title": "Opening hours", "body": "We are open 9-5.",
                                                             "tags": ["Hours"]})
    assert generated.status_code == 201 and len(generated.json()["id"]) == 32
    assert generated.json()["tags"] == ["hours"]

    assert [a["id"] for a in client.get("/v1/knowledge/articles", params={"tag": "refund"}).json()] == \
        ["refund-policy"]
    everything = [a["id"] for a in client.get("/v1/knowledge/articles").json()]
    assert sorted(everything) == everything and len(everything) == 2
    assert [a["id"] for a in client.get("/v1/knowledge/articles", params={"limit": 1, "offset": 1}).json()] == \
        everything[1:]
    problem(client.get("/v1/knowledge/articles", params={"offset": 2**63}), 422)  # was a 500 (SQLite overflow)

    replaced = client.put("/v1/knowledge/articles/refund-policy", json={**ARTICLE, "title": "Refunds"})
    assert replaced.status_code == 200 and replaced.json()["version"] == 2 and replaced.json()["title"] == "Refunds"
    problem(client.put("/v1/knowledge/articles/refund-policy", json={**ARTICLE, "id": "other"}), 422)
    problem(client.put("/v1/knowledge/articles/nothing-here", json={**ARTICLE, "id": None}), 404)

    deleted = client.delete("/v1/knowledge/articles/refund-policy")
    assert deleted.status_code == 204 and deleted.content == b""
    problem(client.get("/v1/knowledge/articles/refund-policy"), 404)
    problem(client.delete("/v1/knowledge/articles/refund-policy"), 404)
    again = client.post("/v1/knowledge/articles", json=ARTICLE)  # a deleted id can be used again
    assert again.status_code == 201


@pytest.mark.parametrize(("body", "where"), [
    ({"body": "no title"}, "title"),
    ({**ARTICLE, "tags": ["Not A Tag!"]}, "tags"),
    ({**ARTICLE, "id": "spaces are not ids"}, "id"),
    ({**ARTICLE, "colour": "blue"}, "colour"),
])
def test_an_invalid_article_is_a_422_naming_the_field(tenant_a: Tenant, body: dict[str, Any], where: str) -> None:
    document = problem(tenant_a.client.post("/v1/knowledge/articles", json=body), 422)
    assert any(where in [str(part) for part in error["loc"]] for error in document["errors"])


def test_bad_requests_are_problems_never_500(tenant_a: Tenant) -> None:
    client = tenant_a.client
    problem(client.post("/v1/knowledge/articles", content=b"title=x", headers={"Content-Type": "text/plain"}), 415)
    problem(client.post("/v1/knowledge/articles", content=b"{not json", headers={"Content-Type": "application/json"}),
            422)
    problem(client.get("/v1/knowledge/articles/bad%20id"), 422)
    problem(client.get("/v1/knowledge/articles", params={"limit": 0}), 422)
    problem(client.get("/v1/calls", params={"status": "sideways"}), 422)
    problem(client.get("/v1/calls", params={"cursor": "not-a-cursor"}), 422)
    problem(client.get("/v1/calls/" + "x" * 129), 422)
    problem(client.patch("/v1/settings", json={"volume": 11}), 422)
    problem(httpx.get(f"{client.base_url}/v1/calls", timeout=10), 401)


def test_another_tenants_articles_are_not_found(tenant_a: Tenant, tenant_b: Tenant) -> None:
    assert tenant_a.client.post("/v1/knowledge/articles", json=ARTICLE).status_code == 201
    path = "/v1/knowledge/articles/refund-policy"
    problem(tenant_b.client.get(path), 404)
    problem(tenant_b.client.put(path, json={**ARTICLE, "title": "Hijacked"}), 404)
    problem(tenant_b.client.delete(path), 404)
    assert tenant_b.client.get("/v1/knowledge/articles").json() == []
    created = tenant_b.client.post("/v1/knowledge/articles", json={**ARTICLE, "title": "B's own"})
    assert created.status_code == 201  # the same id in another tenant is another article
    assert tenant_a.client.get(path).json()["title"] == "Refund policy"


# --- settings and integrations -----------------------------------------------------------------------

def test_settings_are_overridden_validated_whole_and_reset(tenant_a: Tenant, tenant_b: Tenant) -> None:
    client = tenant_a.client
    defaults = client.get("/v1/settings").json()
    assert defaults["escalation"]["anger_threshold"] == 0.6 and defaults["retrieval"]["min_score"] == 1.0
    changed = client.patch("/v1/settings", json={"escalation": {"anger_threshold": 0.8, "keywords": ["refund now"]},
                                                 "retrieval": {"min_score": 2.5}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["escalation"]["anger_threshold"] == 0.8
    assert changed.json()["escalation"]["keywords"] == ["refund now"]
    assert client.get("/v1/settings").json() == changed.json()
    assert tenant_b.client.get("/v1/settings").json() == defaults
    problem(client.patch("/v1/settings", json={"escalation": {"anger_threshold": 0.3,
                                                              "anger_release_threshold": 0.5}}), 422)
    refused = problem(client.patch("/v1/settings", json={"retrieval": {"k1": -1}}), 422)
    assert refused["errors"][0]["loc"] == ["body", "retrieval", "k1"]
    assert client.get("/v1/settings").json() == changed.json()  # a refused change changes nothing
    reset = client.patch("/v1/settings", json={"escalation": None})
    assert reset.json()["escalation"] == defaults["escalation"]
    assert reset.json()["retrieval"]["min_score"] == 2.5  # the section left out stays


@pytest.mark.parametrize("body", [
    '{"retrieval": {"k1": "1"}}', '{"retrieval": {"min_score": "2"}}', '{"retrieval": {"min_score": Infinity}}',
    '{"retrieval": {"min_score": 1e6}}', '{"retrieval": {"title_weight": 2.0}}',
    '{"retrieval": {"emotion_boosts": {"angry": {"apology": NaN}}}}',
    '{"retrieval": {"emotion_boosts": {"angry": {"apology": -5}}}}',
    '{"retrieval": {"emotion_boosts": {"angry": {"apology": Infinity}}}}',
    '{"escalation": {"anger_consecutive": "3"}}', '{"escalation": {"anger_consecutive": true}}',
    '{"escalation": {"anger_threshold": NaN}}', '{"escalation": {"valence": {"angry": "-1"}}}',
])
def test_settings_numbers_are_finite_json_numbers(tenant_a: Tenant, body: str) -> None:
    client = tenant_a.client
    before = client.get("/v1/settings").json()
    problem(client.patch("/v1/settings", content=body, headers={"Content-Type": "application/json"}), 422)
    assert client.get("/v1/settings").json() == before
    accepted = client.patch("/v1/settings", json={"retrieval": {"k1": 1, "emotion_boosts": {"angry": {"apology": 2}}}})
    assert accepted.status_code == 200, accepted.text  # an integer is fine where a decimal is expected


def test_a_json_body_without_a_content_type_is_read_as_json(tenant_a: Tenant) -> None:
    article = {**ARTICLE, "id": "no-content-type"}
    created = tenant_a.client.post("/v1/knowledge/articles", content=json_bytes(article))
    assert created.status_code == 201, created.text
    assert created.json()["title"] == ARTICLE["title"]
    problem(tenant_a.client.post("/v1/knowledge/articles", content=json_bytes({**article, "id": "plain-text"}),
                                 headers={"Content-Type": "text/plain"}), 415)


@pytest.mark.parametrize(("body", "detail"), [
    (b'{"title": "\xff"}', "not UTF-8 text"), (b"[" * 100_000 + b"]" * 100_000, "nests"),
    (b'{"title": ' + b"9" * 5000 + b"}", "too many digits"),
])
def test_an_undecodable_json_body_is_a_precise_400(tenant_a: Tenant, body: bytes, detail: str) -> None:
    document = problem(tenant_a.client.post("/v1/knowledge/articles", content=body,
                                            headers={"Content-Type": "application/json"}), 400)
    assert document["type"].endswith("/undecodable-body") and detail in document["detail"]


def json_bytes(document: dict[str, Any]) -> bytes:
    """``document`` as a JSON body, sent without any Content-Type header."""
    return json.dumps(document).encode()


def test_integration_secrets_are_write_only(cs_server: CsServer, tenant_a: Tenant, tenant_b: Tenant) -> None:
    client = tenant_a.client
    assert client.get("/v1/integrations").json() == {"twilio_account_sid": None, "twilio_auth_token_set": False,
                                                     "audiohook_client_secret_set": False, "updated_at": None}
    token = uuid.uuid4().hex
    saved = client.put("/v1/integrations", json={"twilio": {"account_sid": TWILIO_SID, "auth_token": token}})
    assert saved.status_code == 200, saved.text
    assert token not in saved.text
    assert saved.json()["twilio_account_sid"] == TWILIO_SID and saved.json()["twilio_auth_token_set"]
    problem(client.put("/v1/integrations", json={"audiohook": {"client_secret": "not base64!"}}), 422)
    problem(client.put("/v1/integrations", json={"twilio": {"account_sid": "AC123", "auth_token": token}}), 422)
    both = client.put("/v1/integrations", json={"audiohook": {"client_secret": AUDIOHOOK_SECRET}})
    assert both.json()["twilio_auth_token_set"] and both.json()["audiohook_client_secret_set"]
    assert AUDIOHOOK_SECRET not in client.get("/v1/integrations").text
    with session_factory(cs_server.stack.database_url)() as session:
        stored = store.integration_credentials(session, tenant_a.id)
        assert stored is not None
        assert (stored.twilio_account_sid, stored.twilio_auth_token, stored.audiohook_client_secret) == (
            TWILIO_SID, token, AUDIOHOOK_SECRET)
        assert store.integration_credentials(session, tenant_b.id) is None
    removed = client.put("/v1/integrations", json={"twilio": None})
    assert removed.json()["twilio_account_sid"] is None and not removed.json()["twilio_auth_token_set"]
    assert removed.json()["audiohook_client_secret_set"]
    assert not tenant_b.client.get("/v1/integrations").json()["audiohook_client_secret_set"]


# --- calls ----------------------------------------------------------------------------------------

def seed_call(database_url: str, tenant_id: str, call_id: str, *, end: str | None = "completed") -> None:
    """A call as the pipeline stores it: two parties, three utterances (a card number redacted), one
    escalation; ended as ``end`` says (None: still live)."""
    probabilities = [{"angry": 0.1, "neutral": 0.8, "happy": 0.1}, {"neutral": 0.6, "happy": 0.4},
                     {"angry": 0.85, "neutral": 0.15}]
    with session_factory(database_url)() as session:
        call = store.open_call(session, tenant_id, call_id, protocol="twilio", stream_id="MZ1")
        store.add_participant(session, call, role="customer", track="inbound", external_id="+15551234567")
        store.add_participant(session, call, role="agent", track="outbound")
        store.add_utterance(session, call, speaker="customer", start_ms=0, end_ms=1800,
                            transcript="my card is [CARD]", emotion="neutral", emotion_probabilities=probabilities[0],
                            valence=-0.05, sentiment_trend=-0.05,
                            redactions=[{"kind": "card_number", "start": 11, "end": 30, "redacted_start": 11,
                                         "redacted_end": 17}])
        store.add_utterance(session, call, speaker="agent", start_ms=2000, end_ms=3500,
                            transcript="let me check that", emotion="neutral", emotion_probabilities=probabilities[1],
                            valence=0.4, sentiment_trend=0.4)
        store.add_utterance(session, call, speaker="customer", start_ms=4000, end_ms=6200,
                            transcript="this is unacceptable", emotion="angry", emotion_probabilities=probabilities[2],
                            valence=-0.85, sentiment_trend=-0.3)
        store.add_escalation(session, call, EscalationEvent(Rule.KEYWORD, 2, 6200, {"keyword": "unacceptable"}))
        if end is not None:
            store.close_call(session, tenant_id, call_id, reason=end)
        session.commit()


def test_a_calls_summary_has_its_timeline_escalations_and_redacted_transcript(cs_server: CsServer,
                                                                               tenant_a: Tenant) -> None:
    seed_call(cs_server.stack.database_url, tenant_a.id, "CA-summary")
    summary = tenant_a.client.get("/v1/calls/CA-summary")
    assert summary.status_code == 200, summary.text
    body = summary.json()
    assert (body["call_id"], body["status"], body["protocol"], body["end_reason"]) == (
        "CA-summary", "ended", "twilio", "completed")
    assert body["duration_ms"] >= 0 and body["current_emotion"] == "angry"
    assert body["participants"][0].keys() == {"role", "track", "joined_at"}
    assert "+15551234567" not in summary.text
    timeline = body["emotion_timeline"]
    assert [(u["seq"], u["speaker"], u["emotion"]) for u in timeline] == [
        (0, "customer", "neutral"), (1, "agent", "neutral"), (2, "customer", "angry")]
    assert timeline[2]["emotion_probabilities"] == {"angry": 0.85, "neutral": 0.15}
    assert [u["trend_direction"] for u in timeline] == ["steady", "steady", "worsening"]
    assert [(e["rule"], e["at_ms"], e["utterance_seq"]) for e in body["escalations"]] == [("keyword", 6200, 2)]
    assert body["transcript"][0]["text"] == "my card is [CARD]" and body["transcript"][0]["redacted"] == \
        ["card_number"]
    assert body["counts"] == {"utterances": 3, "customer_utterances": 2, "agent_utterances": 1, "escalations": 1,
                              "redactions": 1}


def test_calls_are_listed_newest_first_by_status_a_page_at_a_time(cs_server: CsServer, tenant_a: Tenant) -> None:
    for index, end in enumerate(["completed", None, "disconnected", None]):
        seed_call(cs_server.stack.database_url, tenant_a.id, f"CA-{index}", end=end)
        time.sleep(0.01)  # distinct start times
    client = tenant_a.client
    everything = client.get("/v1/calls").json()
    assert [c["call_id"] for c in everything] == ["CA-3", "CA-2", "CA-1", "CA-0"]
    assert [c["status"] for c in everything] == ["live", "partial", "live", "ended"]
    live = client.get("/v1/calls", params={"status": "live"}).json()
    assert [c["call_id"] for c in live] == ["CA-3", "CA-1"]
    assert live[0]["current_emotion"] == "angry" and live[0]["escalation_count"] == 1
    first = client.get("/v1/calls", params={"limit": 3})
    assert [c["call_id"] for c in first.json()] == ["CA-3", "CA-2", "CA-1"]
    seed_call(cs_server.stack.database_url, tenant_a.id, "CA-new")  # starts meanwhile: no page shifts
    second = client.get(first.links["next"]["url"])
    assert [c["call_id"] for c in second.json()] == ["CA-0"] and "link" not in second.headers


def test_the_timeline_png_decodes_and_is_cached_by_etag(cs_server: CsServer, tenant_a: Tenant) -> None:
    seed_call(cs_server.stack.database_url, tenant_a.id, "CA-png", end=None)
    client = tenant_a.client
    response = client.get("/v1/calls/CA-png/timeline.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == "PNG" and image.size == (900, 320)
    pixels = np.asarray(image.convert("RGB"))
    assert ((pixels[..., 0] > 180) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)).any()  # the escalation line
    etag = response.headers["etag"]
    assert etag == '"3-1-live"' and response.headers["cache-control"] == "private, no-cache"
    unchanged = client.get("/v1/calls/CA-png/timeline.png", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    with session_factory(cs_server.stack.database_url)() as session:
        call = store.get_call(session, tenant_a.id, "CA-png")
        store.add_utterance(session, call, speaker="customer", start_ms=7000, end_ms=8000, emotion="happy",
                            emotion_probabilities={"happy": 1.0}, valence=1.0, sentiment_trend=0.1)
        session.commit()
    changed = client.get("/v1/calls/CA-png/timeline.png", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] == '"4-1-live"'
    empty_call = tenant_a.id
    with session_factory(cs_server.stack.database_url)() as session:
        store.open_call(session, empty_call, "CA-silent", protocol="audiohook")
        session.commit()
    silent = client.get("/v1/calls/CA-silent/timeline.png")
    assert silent.status_code == 200 and Image.open(io.BytesIO(silent.content)).size == (900, 320)


def test_another_tenants_calls_are_not_found(cs_server: CsServer, tenant_a: Tenant, tenant_b: Tenant) -> None:
    seed_call(cs_server.stack.database_url, tenant_a.id, "CA-walled")
    problem(tenant_b.client.get("/v1/calls/CA-walled"), 404)
    problem(tenant_b.client.get("/v1/calls/CA-walled/timeline.png"), 404)
    assert tenant_b.client.get("/v1/calls").json() == []
    assert tenant_a.client.get("/v1/calls/CA-walled").status_code == 200


# --- one uploaded utterance (in-process uvicorn, fake analyzers) ---------------------------------------

class FakeAnalyzers:
    """The UtteranceAnalyzers protocol: a fixed transcript; angry when the text says so."""

    def __init__(self, transcript: str = "") -> None:
        self.transcript = transcript
        self.transcribed = 0

    async def transcribe(self, samples: npt.NDArray[np.int16], sample_rate: int,
                         tenant_id: str | None = None) -> Transcription:
        self.transcribed += 1
        return Transcription(self.transcript)

    async def emotion(self, samples: npt.NDArray[np.int16] | None, sample_rate: int,
                      text: str | None) -> EmotionReading:
        assert samples is not None and samples.dtype == np.int16 and sample_rate > 0
        angry = text is not None and "ridiculous" in text
        probabilities = {"angry": 0.9, "neutral": 0.1} if angry else {"angry": 0.1, "neutral": 0.9}
        return EmotionReading("angry" if angry else "neutral", probabilities,
                              ("audio", "text") if text else ("audio",))


@dataclass
class InProcessServer:
    base_url: str
    analyzers: FakeAnalyzers
    tenant: Tenant


@pytest.fixture
def utterance_server(cs_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessServer]:
    """The cs app under uvicorn in this process, the analyzers replaced by a fake."""
    from services.customer_service.api import app, utterance_analyzers

    apply_stack_in_process(cs_stack, monkeypatch)
    analyzers = FakeAnalyzers()
    app.dependency_overrides[utterance_analyzers] = lambda: analyzers
    try:
        with served_in_thread(app) as base_url:
            tenant = CsServer(cs_stack, base_url).tenant()
            with tenant.client:
                yield InProcessServer(base_url, analyzers, tenant)
    finally:
        app.dependency_overrides.pop(utterance_analyzers, None)


def test_behind_the_gateway_prefix_location_and_link_keep_it(cs_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.customer_service.api import app

    apply_stack_in_process(cs_stack, monkeypatch)
    with served_in_thread(PrefixDispatcher(FastAPI(), {"/cs": app})) as gateway:
        tenant = CsServer(cs_stack, gateway + "/cs").tenant()
        seed_call(cs_stack.database_url, tenant.id, "CA-1")
        seed_call(cs_stack.database_url, tenant.id, "CA-2")
        with tenant.client as client:
            created = client.post("/v1/knowledge/articles", json=ARTICLE)
            assert created.headers["location"] == f"{gateway}/cs/v1/knowledge/articles/refund-policy"
            assert client.get(created.headers["location"]).status_code == 200
            page = client.get("/v1/calls", params={"limit": 1})
            assert page.links["next"]["url"].startswith(f"{gateway}/cs/v1/calls?")
            assert [c["call_id"] for c in client.get(page.links["next"]["url"]).json()] == ["CA-1"]


def wav_bytes(seconds: float = 1.0, rate: int = 8000) -> bytes:
    """A mono PCM16 WAV of a 440 Hz tone."""
    samples = [round(8000 * math.sin(2 * math.pi * 440 * n / rate)) for n in range(round(seconds * rate))]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return buffer.getvalue()


def upload(server: InProcessServer, audio: bytes, *, transcript: str | None = None,
           content_type: str = "audio/wav") -> httpx.Response:
    files = {"file": ("utterance.wav", audio, content_type)}
    data = {"transcript": transcript} if transcript is not None else None
    return server.tenant.client.post("/v1/utterances", files=files, data=data)


def test_an_utterance_is_transcribed_redacted_read_for_emotion_and_answered_from_the_kb(
        utterance_server: InProcessServer) -> None:
    server, client = utterance_server, utterance_server.tenant.client
    assert client.post("/v1/knowledge/articles", json=ARTICLE).status_code == 201
    server.analyzers.transcript = "this is ridiculous I want a refund to my card 4111 1111 1111 1111"
    answer = upload(server, wav_bytes(1.5))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["transcript_source"] == "asr" and server.analyzers.transcribed == 1
    assert "4111" not in body["transcript"] and "[CARD]" in body["transcript"]
    assert body["redacted"] == ["card_number"] and body["redactions"][0]["kind"] == "card_number"
    assert (body["emotion"], body["modalities"]) == ("angry", ["audio", "text"])
    assert body["emotion_probabilities"] == {"angry": 0.9, "neutral": 0.1} and body["valence"] < -0.5
    assert body["suggestion"]["article_id"] == "refund-policy"
    assert body["suggestion"]["reply"] == ARTICLE["reply"]
    assert (body["duration_ms"], body["sample_rate"]) == (1500, 8000) and body["latency_ms"] >= 0

    sent = upload(server, wav_bytes(), transcript="call me on 415 555 0132 about opening hours")
    assert sent.status_code == 200 and server.analyzers.transcribed == 1  # a transcript sent skips ASR
    assert sent.json()["transcript_source"] == "client" and sent.json()["redacted"] == ["phone"]
    assert sent.json()["suggestion"] is None and sent.json()["emotion"] == "neutral"


def test_the_process_index_follows_the_knowledge_api(utterance_server: InProcessServer) -> None:
    server, client = utterance_server, utterance_server.tenant.client
    question = "how many business days until the refund reaches my original card"
    assert upload(server, wav_bytes(), transcript=question).json()["suggestion"] is None
    assert client.post("/v1/knowledge/articles", json=ARTICLE).status_code == 201
    assert upload(server, wav_bytes(), transcript=question).json()["suggestion"]["reply"] == ARTICLE["reply"]
    new_reply = "Refunds take five business days to reach your card."
    assert client.put("/v1/knowledge/articles/refund-policy", json={**ARTICLE, "reply": new_reply}).status_code == 200
    assert upload(server, wav_bytes(), transcript=question).json()["suggestion"]["reply"] == new_reply
    assert client.delete("/v1/knowledge/articles/refund-policy").status_code == 204
    assert upload(server, wav_bytes(), transcript=question).json()["suggestion"] is None


def test_bad_uploads_are_precise_problems(utterance_server: InProcessServer) -> None:
    server, client = utterance_server, utterance_server.tenant.client
    assert problem(upload(server, b"ID3\x04\x00" + bytes(600), content_type="audio/mpeg"), 415)["reason"] == \
        "unknown-format"
    truncated = wav_bytes()[:30]
    assert problem(upload(server, truncated), 422)["reason"]
    assert problem(upload(server, b""), 422)["reason"] == "empty"
    assert problem(upload(server, wav_bytes(61.0, rate=8000)), 422)["reason"] == "too-long"
    mulaw = upload(server, bytes([0xFF, 0x7F] * 4000), transcript="hello", content_type="audio/PCMU;rate=8000")
    assert mulaw.status_code == 200 and mulaw.json()["duration_ms"] == 1000
    problem(client.post("/v1/utterances", json={"file": "nope"}), 415)
    problem(client.post("/v1/utterances", files={"transcript": (None, "only words")}), 422)
    problem(upload(server, wav_bytes(), transcript="x" * 6000), 422)
    problem(client.post("/v1/utterances", content=b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                        headers={"Content-Type": "multipart/form-data; boundary=b"}), 400)

    def oversize_body() -> Iterator[bytes]:  # chunked, no Content-Length: only the stream can tell
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(17):
            yield bytes(1 << 20)
        yield b"\r\n--b--\r\n"

    too_large = client.post("/v1/utterances", content=oversize_body(),
                            headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert problem(too_large, 413)["max_bytes"] == 16 << 20
