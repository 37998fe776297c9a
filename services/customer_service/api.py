"""HTTP app of the emotion-aware customer-service vertical, mounted at ``/cs`` (issue 18).

Every HTTP route needs an API key with the ``cs`` scope and sees the caller's tenant only
(another tenant's article or call is a 404, as one that does not exist). Bad input is a 4xx
problem+json saying what is wrong.

- Knowledge base: ``/v1/knowledge/articles`` (create, list by tag, read, replace, delete). After
  each change is committed this process's retrieval index is brought up to date; other replicas
  catch up when their next call or upload syncs the tenant (:meth:`AssistServices.sync_knowledge`).
- ``/v1/settings``: the tenant's escalation policy and retrieval settings (a call reads them when it
  starts). ``/v1/integrations``: its Twilio account and AudioHook client secret, write-only.
- ``/v1/calls``: the tenant's calls, newest first; ``/v1/calls/{id}``: a call's summary (emotion
  timeline, escalations, redacted transcript); ``/v1/calls/{id}/timeline.png``: its timeline drawn.
- ``POST /v1/utterances``: one uploaded utterance analysed (not stored): redacted transcript,
  emotion, suggested reply.

WebSocket routes (stream audio in, assist feeds out) are in :mod:`.streams`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Protocol

import anyio.from_thread
import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from python_multipart.multipart import parse_options_header
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from services.customer_service import store
from services.customer_service.assist import assist_lifespan, assist_services, check_assist_ready, process_knowledge
from services.customer_service.assist_schemas import (
    ARTICLE_ID_PATTERN,
    ArticleIn,
    ArticleOut,
    AssistSettings,
    AssistSettingsPatch,
    EscalationOut,
    IntegrationsIn,
    IntegrationsOut,
    RedactionSpanOut,
    SuggestedReply,
)
from services.customer_service.audio import Audio, InvalidAudio, read_audio
from services.customer_service.db import CALL_ID_LENGTH, Call, Escalation, Utterance
from services.customer_service.escalation import TREND_STEADY_BAND, TrendDirection, valence_of
from services.customer_service.knowledge import KnowledgeIndex
from services.customer_service.pipeline import EmotionReading, UtteranceAnalyzers
from services.customer_service.redaction import redact
from services.customer_service.schemas import (
    CallCounts,
    CallListItem,
    CallSummary,
    EmotionAtTime,
    ParticipantOut,
    TranscriptLine,
    UtteranceAnalysis,
)
from services.customer_service.streams import streams
from services.customer_service.timeline import TimelineMark, TimelinePoint, render_timeline
from shared.app import create_service_app
from shared.db import SessionDep
from shared.errors import (
    BadRequest,
    PayloadTooLarge,
    UnprocessableContent,
    problem_responses,
)
from shared.observability import Readiness
from shared.paging import Offset, row_id_in_range
from shared.security import Principal, require_scope
from shared.uploads import (
    MAX_MULTIPART_OVERHEAD_BYTES,
    MultipartFileReader,
    multipart_boundary,
    multipart_upload_body,
    refuse_declared_size,
)

TRACKING_ISSUE = 18
CsPrincipal = Annotated[Principal, Depends(require_scope("cs"))]
KEYED = problem_responses(401, 403)
JSON_BODY = problem_responses(415, 422)
ArticleId = Annotated[str, Path(pattern=ARTICLE_ID_PATTERN, description="the article's id")]
CallId = Annotated[str, Path(min_length=1, max_length=CALL_ID_LENGTH,
                             description="Twilio's callSid or AudioHook's conversationId")]

MAX_UTTERANCE_BYTES = 16 << 20
"""An uploaded utterance: a minute of 48 kHz stereo 16-bit WAV is 11.5 MB."""
MAX_UTTERANCE_S = 60.0
MAX_TRANSCRIPT_CHARS = 5000


# --- the process's assist services ---------------------------------------------------------------

class KnowledgeBase(Protocol):
    """What the routes need of the process's assist services (``AssistServices`` has both)."""

    knowledge: KnowledgeIndex

    async def sync_knowledge(self, tenant_id: str) -> None:
        """Bring the tenant's articles in :attr:`knowledge` up to date with the database."""
        ...


def _knowledge_index() -> KnowledgeBase:
    """The process's knowledge index and its sync, shared with the call pipelines."""
    return process_knowledge()


def utterance_analyzers() -> UtteranceAnalyzers:
    """The process's speech-to-text and emotion models (a dependency: tests override it).

    503 until the models are loaded.
    """
    return assist_services().analyzers


Analyzers = Annotated[UtteranceAnalyzers, Depends(utterance_analyzers)]
Knowledge = Annotated[KnowledgeBase, Depends(_knowledge_index)]


# --- status ----------------------------------------------------------------------------------------

about = APIRouter(prefix="/v1", tags=["status"])


@about.get("/status")
async def status() -> dict[str, object]:
    """What this vertical offers today: built (issue 18)."""
    return {"vertical": "cs", "state": "built", "tracking_issue": TRACKING_ISSUE}


# --- knowledge base --------------------------------------------------------------------------------

knowledge = APIRouter(prefix="/v1/knowledge/articles", tags=["knowledge"], responses=KEYED)
NO_SUCH_ARTICLE = problem_responses(404, notes={404: "No article with this id for this tenant (or it was deleted)."})


def _committed_article_change(session: Session, tenant_id: str, kb: KnowledgeBase) -> None:
    """Commit, then bring this process's index up to date (from the worker thread the route runs in)."""
    session.commit()
    anyio.from_thread.run(kb.sync_knowledge, tenant_id)


@knowledge.post("", status_code=201, summary="Add an article", response_model=ArticleOut, responses={
    201: {"headers": {"Location": {"description": "the article's URL", "schema": {"type": "string"}}}},
    **JSON_BODY, **problem_responses(409, notes={409: "An article with this id exists (PUT replaces it)."})})
def create_article(article: ArticleIn, request: Request, response: Response, principal: CsPrincipal,
                   session: SessionDep, kb: Knowledge) -> ArticleOut:
    """Add an article to the tenant's knowledge base (its id generated when none is given); suggested
    replies use it from the next utterance on."""
    row = store.create_article(session, principal.tenant_id, article)
    out = ArticleOut.model_validate(row)
    _committed_article_change(session, principal.tenant_id, kb)
    # From the request's own URL: behind the gateway (shared.app.PrefixDispatcher) url_for would drop "/cs"
    response.headers["Location"] = str(request.url.replace(path=f"{request.url.path.rstrip('/')}/{out.id}",
                                                           query=""))
    return out


@knowledge.get("", summary="List articles", response_model=list[ArticleOut])
def list_articles(principal: CsPrincipal, session: SessionDep,
                  tag: Annotated[str | None, Query(max_length=40, description="only articles with this tag")] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 100,
                  offset: Offset = 0) -> list[ArticleOut]:
    """The tenant's articles by id, a page at a time."""
    rows = store.list_articles(session, principal.tenant_id, tag=tag, limit=limit, offset=offset)
    return [ArticleOut.model_validate(row) for row in rows]


@knowledge.get("/{article_id}", summary="An article", response_model=ArticleOut, responses=NO_SUCH_ARTICLE)
def get_article(article_id: ArticleId, principal: CsPrincipal, session: SessionDep) -> ArticleOut:
    """One of the tenant's articles."""
    return ArticleOut.model_validate(store.get_article(session, principal.tenant_id, article_id))


@knowledge.put("/{article_id}", summary="Replace an article", response_model=ArticleOut,
               responses={**NO_SUCH_ARTICLE, **JSON_BODY})
def replace_article(article_id: ArticleId, article: ArticleIn, principal: CsPrincipal, session: SessionDep,
                    kb: Knowledge) -> ArticleOut:
    """Replace an article's content (its version goes up by one); an id in the body must be the path's."""
    row = store.replace_article(session, principal.tenant_id, article_id, article)
    out = ArticleOut.model_validate(row)
    _committed_article_change(session, principal.tenant_id, kb)
    return out


@knowledge.delete("/{article_id}", status_code=204, summary="Delete an article", response_class=Response,
                  responses=NO_SUCH_ARTICLE)
def delete_article(article_id: ArticleId, principal: CsPrincipal, session: SessionDep, kb: Knowledge) -> Response:
    """Delete an article: no reply is suggested from it any more."""
    store.delete_article(session, principal.tenant_id, article_id)
    _committed_article_change(session, principal.tenant_id, kb)
    return Response(status_code=204)


# --- settings and integrations -----------------------------------------------------------------------

settings = APIRouter(prefix="/v1", tags=["settings"], responses=KEYED)


@settings.get("/settings", summary="Agent-assist settings", response_model=AssistSettings)
def get_assist_settings(principal: CsPrincipal, session: SessionDep) -> AssistSettings:
    """The escalation policy and retrieval settings in force: the defaults with the tenant's overrides."""
    return store.assist_settings(session, principal.tenant_id)


@settings.patch("/settings", summary="Change agent-assist settings", response_model=AssistSettings, responses={
    **JSON_BODY, **problem_responses(422, notes={422: "Also overrides that make the policy or retrieval invalid "
                                                      "as a whole (e.g. a release threshold above its threshold)."})})
def patch_assist_settings(patch: AssistSettingsPatch, principal: CsPrincipal, session: SessionDep) -> AssistSettings:
    """Override fields of the escalation policy (``escalation``) or of retrieval (``retrieval``): a
    section sent replaces that section's overrides, ``null`` returns it to the defaults, one left
    out stays. Calls that start afterwards use them."""
    saved = store.set_assist_settings(session, principal.tenant_id, patch)
    session.commit()
    return saved


@settings.get("/integrations", summary="Stream integrations", response_model=IntegrationsOut)
def get_integrations(principal: CsPrincipal, session: SessionDep) -> IntegrationsOut:
    """Which stream credentials the tenant has set (the Twilio account SID; secrets never)."""
    return store.integrations(session, principal.tenant_id)


@settings.put("/integrations", summary="Set stream integrations", response_model=IntegrationsOut, responses={
    **JSON_BODY, **problem_responses(422, notes={422: "Also an account SID that is not AC + 32 hex digits, or an "
                                                      "AudioHook client secret that is not base64 of 16+ bytes."})})
def put_integrations(change: IntegrationsIn, principal: CsPrincipal, session: SessionDep) -> IntegrationsOut:
    """Set the Twilio account (SID and auth token, which checks ``X-Twilio-Signature``) and the
    AudioHook client secret (which checks its RFC 9421 signature). A section sent replaces it,
    ``null`` removes it, one left out stays; secrets are write-only."""
    saved = store.set_integrations(session, principal.tenant_id, change)
    session.commit()
    return saved


# --- calls -----------------------------------------------------------------------------------------

calls = APIRouter(prefix="/v1/calls", tags=["calls"], responses=KEYED)
NO_SUCH_CALL = problem_responses(404, notes={404: "No call with this id for this tenant."})
PNG_CACHE_LIVE, PNG_CACHE_CLOSED = "private, no-cache", "private, max-age=60"


def _encode_cursor(call: Call) -> str:
    raw = orjson.dumps([call.started_at.isoformat(), call.id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> store.CallPosition:
    """The position a cursor names; one this API did not issue is a 422."""
    try:
        started_at, row_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if type(row_id) is not int or not row_id_in_range(row_id) or not isinstance(started_at, str):
            raise ValueError
        return store.CallPosition(datetime.fromisoformat(started_at), row_id)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise UnprocessableContent("cursor: not a cursor this API issued (take it from the Link header)",
                                   errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor",
                                            "type": "value_error"}]) from None


@calls.get("", summary="List calls", response_model=list[CallListItem], responses={
    200: {"headers": {"Link": {"description": "<url of the next page>; rel=\"next\", on a full page",
                               "schema": {"type": "string"}}}},
    **problem_responses(422, notes={422: "Also a cursor this API did not issue."})})
def list_calls(principal: CsPrincipal, session: SessionDep, request: Request, response: Response,
               status: Annotated[str | None, Query(pattern="^(live|ended|partial)$",
                                                   description="only calls in this state")] = None,
               limit: Annotated[int, Query(ge=1, le=500)] = 100,
               cursor: Annotated[str | None, Query(max_length=200, description=(
                   "where the previous page ended: take it from that page's `Link: <…>; rel=\"next\"` "
                   "header"))] = None) -> list[CallListItem]:
    """The tenant's calls, newest first, with what the supervisor's list shows (current emotion,
    sentiment trend, escalations). A full page carries an RFC 8288 ``Link`` header to the next one
    (keyset paging: calls that start meanwhile never shift a page)."""
    after = _decode_cursor(cursor) if cursor is not None else None
    rows = store.list_calls(session, principal.tenant_id, status=status, limit=limit, after=after)
    if len(rows) == limit:
        next_url = request.url.include_query_params(cursor=_encode_cursor(rows[-1]))
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return [CallListItem.model_validate(row) for row in rows]


@calls.get("/{call_id}", summary="A call's summary", response_model=CallSummary, responses=NO_SUCH_CALL)
def get_call(call_id: CallId, principal: CsPrincipal, session: SessionDep) -> CallSummary:
    """A call's status and times, participants (roles and tracks, no personal data), its emotion
    timeline (per utterance: speaker, offsets, emotion and probabilities, valence, the speaker's
    trend), escalations, the transcript with PII redacted, and counts."""
    call = store.get_call(session, principal.tenant_id, call_id)
    utterances = store.call_utterances(session, call)
    escalations = store.call_escalations(session, call)
    return _summary(call, store.call_participants(session, call), utterances, escalations)


@calls.get("/{call_id}/timeline.png", summary="A call's emotion timeline (PNG)", response_class=Response,
           responses={200: {"description": "PNG", "content": {"image/png": {}}},
                      304: {"description": "The ETag sent in If-None-Match is current."}, **NO_SUCH_CALL})
def get_call_timeline(call_id: CallId, request: Request, principal: CsPrincipal, session: SessionDep) -> Response:
    """The customer's valence over the call (points coloured by emotion), the agent's beside it, and
    each escalation as a red line. The ETag changes with each utterance, escalation and status."""
    call = store.get_call(session, principal.tenant_id, call_id)
    etag = f'"{call.utterance_count}-{call.escalation_count}-{call.status}"'
    headers = {"ETag": etag, "Cache-Control": PNG_CACHE_LIVE if call.status == "live" else PNG_CACHE_CLOSED}
    if {etag, "*"} & _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    points = [TimelinePoint(u.speaker, u.start_ms, u.end_ms, u.valence, u.emotion)
              for u in store.call_utterances(session, call)]
    marks = [TimelineMark(e.at_ms, e.rule) for e in store.call_escalations(session, call)]
    png = render_timeline(points, marks, title=f"call {call.call_id} ({call.protocol}, {call.status})")
    return Response(png, media_type="image/png", headers=headers)


def _etags(if_none_match: str | None) -> set[str]:
    """The entity tags of an If-None-Match header, weak ones compared as strong (RFC 9110 13.1.2)."""
    return {tag.strip().removeprefix("W/") for tag in (if_none_match or "").split(",") if tag.strip()}


def _summary(call: Call, participants: Sequence[Any], utterances: Sequence[Utterance],
             escalations: Sequence[Escalation]) -> CallSummary:
    duration = None if call.ended_at is None else round((call.ended_at - call.started_at).total_seconds() * 1000)
    return CallSummary(
        call_id=call.call_id, status=call.status, protocol=call.protocol, started_at=call.started_at,
        ended_at=call.ended_at, end_reason=call.end_reason, duration_ms=duration,
        current_emotion=call.current_emotion, sentiment_trend=call.sentiment_trend,
        participants=[ParticipantOut(role=p.role, track=p.track, joined_at=p.joined_at) for p in participants],
        emotion_timeline=_timeline(utterances),
        escalations=[EscalationOut.model_validate(escalation) for escalation in escalations],
        transcript=[TranscriptLine(seq=u.seq, speaker=u.speaker, start_ms=u.start_ms, end_ms=u.end_ms,
                                   text=u.transcript, redacted=sorted({span["kind"] for span in u.redactions}))
                    for u in utterances],
        counts=CallCounts(utterances=len(utterances),
                          customer_utterances=sum(u.speaker == "customer" for u in utterances),
                          agent_utterances=sum(u.speaker == "agent" for u in utterances),
                          escalations=len(escalations), redactions=sum(len(u.redactions) for u in utterances)))


def _timeline(utterances: Sequence[Utterance]) -> list[EmotionAtTime]:
    previous: dict[str, float] = {}
    timeline = []
    for u in utterances:
        timeline.append(EmotionAtTime(seq=u.seq, speaker=u.speaker, start_ms=u.start_ms, end_ms=u.end_ms,
                                      emotion=u.emotion, emotion_probabilities=u.emotion_probabilities,
                                      valence=u.valence, sentiment_trend=u.sentiment_trend,
                                      trend_direction=_direction(previous.get(u.speaker), u.sentiment_trend)))
        if u.sentiment_trend is not None:
            previous[u.speaker] = u.sentiment_trend
    return timeline


def _direction(previous: float | None, trend: float | None) -> str | None:
    """As the live feed reports it: steady within the band, else improving or worsening."""
    if trend is None:
        return None
    if previous is None or abs(trend - previous) < TREND_STEADY_BAND:
        return TrendDirection.STEADY.value
    return (TrendDirection.IMPROVING if trend > previous else TrendDirection.WORSENING).value


# --- one uploaded utterance -----------------------------------------------------------------------

utterances = APIRouter(prefix="/v1", tags=["utterances"], responses=KEYED)


def utterance_upload_body() -> dict[str, Any]:
    """The upload of one utterance: its audio and, optionally, its transcript."""
    body = multipart_upload_body("file", description="the utterance: WAV (PCM16 or μ-law), FLAC, Sun .au, or "
                                 "headerless μ-law sent as audio/basic or audio/PCMU;rate=8000",
                                 max_bytes=MAX_UTTERANCE_BYTES)
    form = body["requestBody"]["content"]["multipart/form-data"]["schema"]
    form["properties"]["transcript"] = {"type": "string", "maxLength": MAX_TRANSCRIPT_CHARS,
                                        "description": "its transcript, when already known (speech-to-text is "
                                                       "then skipped)"}
    return body


class UtteranceFormReader(MultipartFileReader):
    """The ``file`` part's bytes (as :class:`MultipartFileReader`) and the ``transcript`` field's text,
    which stays within the multipart overhead limit."""

    def __init__(self, boundary: bytes) -> None:
        super().__init__(boundary, "file", ())
        self.transcript: bytearray | None = None
        self._in_transcript = False

    def _on_headers_finished(self) -> None:
        super()._on_headers_finished()
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._in_transcript = options.get(b"name") == b"transcript"
        if self._in_transcript:
            if self.transcript is not None:
                raise BadRequest("more than one 'transcript' part")
            self.transcript = bytearray()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        super()._on_part_data(data, start, end)
        if self._in_transcript and self.transcript is not None:
            self.transcript += data[start:end]

    def _on_part_end(self) -> None:
        super()._on_part_end()
        self._in_transcript = False

    def transcript_text(self) -> str | None:
        """The transcript sent (None when absent or blank); 422 when not UTF-8 or too long."""
        if self.transcript is None:
            return None
        try:
            text = self.transcript.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UnprocessableContent("body.transcript: not UTF-8 text", errors=[
                {"loc": ["body", "transcript"], "msg": "not UTF-8 text", "type": "unicode_error"}]) from None
        if len(text) > MAX_TRANSCRIPT_CHARS:
            raise UnprocessableContent(f"body.transcript: longer than {MAX_TRANSCRIPT_CHARS} characters", errors=[
                {"loc": ["body", "transcript"], "msg": f"at most {MAX_TRANSCRIPT_CHARS} characters",
                 "type": "string_too_long"}])
        return text or None


async def receive_utterance(request: Request) -> tuple[bytes, str | None, str | None]:
    """The uploaded audio (in memory: an utterance is small), its part's content type and the transcript."""
    reader = UtteranceFormReader(multipart_boundary(request.headers.get("content-type")))
    refuse_declared_size(request, MAX_UTTERANCE_BYTES + MAX_MULTIPART_OVERHEAD_BYTES)
    audio = bytearray()
    try:
        async for chunk in request.stream():
            for data in reader.feed(chunk):
                audio += data
                if len(audio) > MAX_UTTERANCE_BYTES:
                    raise PayloadTooLarge(f"the file is larger than the {MAX_UTTERANCE_BYTES} bytes this route "
                                          "accepts", max_bytes=MAX_UTTERANCE_BYTES)
    except ClientDisconnect:
        raise BadRequest("the client closed the connection before the body ended") from None
    reader.check_complete()
    return bytes(audio), reader.content_type, reader.transcript_text()


def _decoded(data: bytes, content_type: str | None) -> Audio:
    audio = read_audio(data, content_type=content_type)
    if audio.duration_s > MAX_UTTERANCE_S:
        raise InvalidAudio(f"the audio lasts {audio.duration_s:.1f} s; an utterance is at most {MAX_UTTERANCE_S:g} s",
                           reason="too-long")
    return audio


@utterances.post("/utterances", summary="Analyse one utterance", response_model=UtteranceAnalysis,
                 openapi_extra=utterance_upload_body(), responses=problem_responses(400, 413, 415, 422, 503, notes={
                     400: "The multipart body is malformed or ends before its closing boundary.",
                     415: "Also audio in a format or encoding not read here (the problem's reason says which).",
                     422: "Also audio whose content is unusable: empty, truncated, a sample rate outside "
                          "8-48 kHz, longer than a minute (the problem's reason); a transcript that is not UTF-8.",
                     503: "Also the speech or emotion model is not loaded."}))
async def analyse_utterance(request: Request, principal: CsPrincipal, session: SessionDep, analyzers: Analyzers,
                            kb: Knowledge) -> UtteranceAnalysis:
    """Transcript (PII redacted), emotion and a suggested reply from the tenant's knowledge base for
    one uploaded utterance, for non-streaming use; nothing is stored."""
    data, content_type, sent_transcript = await receive_utterance(request)
    began = time.perf_counter()
    audio = await asyncio.to_thread(_decoded, data, content_type)
    tenant_id = principal.tenant_id
    text = sent_transcript
    await kb.sync_knowledge(tenant_id)  # also brings the tenant's language model up to date
    if text is None:
        text = (await analyzers.transcribe(audio.samples, audio.sample_rate, tenant_id)).text.strip() or None
    reading = await analyzers.emotion(audio.samples, audio.sample_rate, text)
    settings = await asyncio.to_thread(store.assist_settings, session, tenant_id)
    redaction = redact(text) if text else None
    suggestion = None
    if redaction is not None:
        suggestion = kb.knowledge.suggest(tenant_id, redaction.text, emotion=reading.label,
                                          settings=settings.retrieval)
    return UtteranceAnalysis(
        transcript=redaction.text if redaction else None,
        transcript_source="client" if sent_transcript is not None else "asr",
        redacted=sorted(kind.value for kind in redaction.kinds) if redaction else [],
        redactions=[RedactionSpanOut.model_validate(span.as_dict()) for span in redaction.spans] if redaction else [],
        **_emotion_fields(reading), valence=round(valence_of(reading.probabilities, settings.escalation.valence), 4),
        suggestion=None if suggestion is None else SuggestedReply(
            article_id=suggestion.article_id, title=suggestion.title, reply=suggestion.reply,
            score=round(suggestion.score, 3), boost=suggestion.boost),
        duration_ms=round(audio.duration_s * 1000), sample_rate=audio.sample_rate,
        latency_ms=round((time.perf_counter() - began) * 1000, 1))


def _emotion_fields(reading: EmotionReading) -> dict[str, Any]:
    return {"emotion": reading.label, "modalities": list(reading.modalities),
            "emotion_probabilities": {label: round(float(p), 4) for label, p in reading.probabilities.items()}}


readiness = Readiness()
readiness.add("models", check_assist_ready)
app = create_service_app("cs", title="Tessera — Emotion-aware customer service", lifespan=assist_lifespan,
                         readiness=readiness, routers=[about, knowledge, settings, calls, utterances, streams])
