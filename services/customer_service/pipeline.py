"""The live call pipeline: a protocol's neutral stream events in, analysed utterances and
agent-assist events out.

One :class:`CallPipeline` per connected stream (whatever the protocol, :mod:`.protocols`)::

    pipeline = CallPipeline(services, send_transcript=...)
    for event in step.events:
        await pipeline.handle(event)
    ...
    await pipeline.close()          # always, also when the socket died: the partial call is kept

What happens to a call
    ``CallStarted``  the call's row (live) and its participants are written before any audio is
                     analysed; ``call.started`` goes to the call's feed and the supervisor's.
    ``AudioChunk``   each track has its own VAD stream (:class:`~.vad.CallVad`; windows of every
                     call share the runtime's batches). An end of utterance starts its analysis.
    ``CallEnded``    open utterances are cut, pending analyses finish, the row is closed
                     (``ended`` when the protocol said so, ``partial`` otherwise).

One utterance's analysis
    Speech-to-text runs while the caller speaks: from the VAD's confirmed start, the track's audio
    goes to a decoder piece by piece (:class:`StreamedTranscripts`, ASR steps through the
    runtime), so at the end-of-utterance decision only the last piece is left to decode; a failed
    stream falls back to decoding the utterance whole. Each utterance is decoded with the tenant's
    domain language model as it is when the utterance begins (:mod:`.tenant_lm`; the shipped one
    until the tenant has one). Audio emotion runs at the decision (through
    the runtime, so utterances of concurrent calls share batches). The audio-only ``emotion`` event goes out as
    soon as it is known (``final: false``), the redacted ``transcript`` event when ASR is done; then
    the fused audio+text emotion (``final: true``) with the speaker's sentiment trend, any
    ``escalation`` the tenant's policy fires, and a ``suggestion`` from the tenant's knowledge base
    for a customer's utterance. Utterances are analysed concurrently but finalised (policy, row,
    final events) strictly in the order they were spoken, so the escalation hysteresis and the
    stored sequence numbers follow the call.

Latency figures in the events (``latency_ms``) are measured from the VAD's end-of-utterance
decision; ``hangover_ms`` (the silence waited for before deciding) is reported beside them.

Events go to the feed topics of :func:`call_topic` and :func:`live_topic` (:mod:`shared.feeds`);
the tenant is part of every topic, so a subscriber sees its own tenant's calls only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from model_runtime import StreamingSessions
from services.customer_service import store
from services.customer_service.asr import AsrStep, KeyedLm
from services.customer_service.escalation import Assessment, EscalationPolicy, EscalationTracker
from services.customer_service.escalation import Utterance as PolicyUtterance
from services.customer_service.knowledge import KnowledgeIndex, RetrievalSettings
from services.customer_service.protocols.base import (
    AudioChunk,
    AudioGap,
    CallEnded,
    CallStarted,
    Dtmf,
    Paused,
    PeerError,
    Resumed,
    StreamEvent,
    Track,
)
from services.customer_service.redaction import redact
from services.customer_service.vad import CallVad, EndpointConfig, vad_model_name
from services.customer_service.vad import Utterance as SpokenUtterance
from shared.db import session_scope, utcnow
from shared.feeds import EventFeed

logger = logging.getLogger("tessera.cs.pipeline")

Event = dict[str, Any]
TranscriptSender = Callable[[Track, str, float, float], Awaitable[None]]

ANALYSIS_TIMEOUT_S = 30.0
"""How long a call's end waits for its pending utterance analyses."""


def call_topic(tenant_id: str, call_id: str) -> str:
    """The feed topic of one call's assist events."""
    return f"cs:{tenant_id}:call:{call_id}"


def live_topic(tenant_id: str) -> str:
    """The feed topic of the tenant's supervisor view (calls started, updated, escalated, ended)."""
    return f"cs:{tenant_id}:live"


# --- what the pipeline needs from the models -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transcription:
    """Speech-to-text of one utterance (not yet redacted)."""

    text: str
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class EmotionReading:
    """The emotion model's answer for one utterance: the label, every label's probability and the
    modalities it used (``audio``, ``text``)."""

    label: str
    probabilities: Mapping[str, float]
    modalities: tuple[str, ...]


class UtteranceAnalyzers(Protocol):
    """The two models an utterance goes through (served by the shared runtime)."""

    async def transcribe(self, samples: npt.NDArray[np.int16], sample_rate: int,
                         tenant_id: str | None = None) -> Transcription:
        """Speech-to-text of the utterance's audio (with the tenant's domain language model when
        it has one)."""
        ...

    async def emotion(self, samples: npt.NDArray[np.int16] | None, sample_rate: int,
                      text: str | None) -> EmotionReading:
        """Emotion from the audio, the text, or both (either may be missing)."""
        ...


class TenantKnowledge:
    """The process's knowledge index, each tenant's articles synced from the database on use (the
    API of this process or another replica may have changed them)."""

    def __init__(self) -> None:
        self.knowledge = KnowledgeIndex()
        self._synced: dict[str, datetime | None] = {}
        self.on_synced: Callable[[str, KnowledgeIndex], None] | None = None
        """Called (in the event loop) after each sync of a tenant: its language model follows its articles."""

    async def sync_knowledge(self, tenant_id: str) -> None:
        """Bring the tenant's articles in the index up to date: all of them the first time, then
        those changed since the last sync."""
        since = self._synced.get(tenant_id)

        def sync() -> datetime | None:
            with session_scope() as session:
                return store.sync_index(session, self.knowledge, tenant_id, since)

        self._synced[tenant_id] = await asyncio.to_thread(sync)
        if self.on_synced is not None:
            self.on_synced(tenant_id, self.knowledge)


@dataclass
class AssistServices:
    """What every call pipeline of a process shares: the runtime's VAD sessions, the models, the
    knowledge base and the feed."""

    sessions: StreamingSessions
    analyzers: UtteranceAnalyzers
    knowledge_base: TenantKnowledge
    feed: EventFeed
    endpointing: EndpointConfig = field(default_factory=EndpointConfig)
    asr_step: AsrStepper | None = None
    """Decode utterances while they are spoken (steps through the runtime); without it each
    utterance is transcribed whole once its end is decided."""
    language_model: Callable[[str], KeyedLm | None] | None = None
    """The tenant's domain language model to decode its utterances with (None: the shipped one)."""


# --- speech-to-text while the caller speaks --------------------------------------------------------------

AsrStepper = Callable[[AsrStep], Awaitable[Any]]

STREAM_FEED_SAMPLES = 1600
"""Audio handed to the decoder in pieces of at least this many samples (200 ms at 8 kHz): fewer
hand-offs, and the decoder still keeps up with the caller."""


class StreamedTranscripts:
    """One track's utterances decoded while they are spoken (a :class:`~.vad.SpeechObserver`).

    Each confirmed utterance is begun in a decoder, fed as its audio comes, and ended when the VAD
    decides its end, so at that moment only the last piece is left to decode. The steps of one
    track go out strictly in order (each waits for the one before it). :meth:`take` hands the
    pipeline the transcript of the oldest ended utterance.
    """

    def __init__(self, step: AsrStepper, key_prefix: str, sample_rate: int,
                 language_model: Callable[[], KeyedLm | None] | None = None) -> None:
        self._step = step
        self._language_model = language_model
        self._prefix = key_prefix
        self._rate = sample_rate
        self._count = 0
        self._key: str | None = None
        self._buffer: list[npt.NDArray[np.int16]] = []
        self._buffered = 0
        self._last: asyncio.Task[Any] | None = None
        self._ended: list[asyncio.Task[Any]] = []

    def speech_started(self, start_sample: int, samples: npt.NDArray[np.int16]) -> None:
        """Begin decoding a new utterance with its audio so far."""
        self._count += 1
        self._key = f"{self._prefix}/{self._count}"
        lm = self._language_model() if self._language_model is not None else None  # the latest, per utterance
        self._send(AsrStep(self._key, "begin", sample_rate=self._rate, lm=lm))
        self.speech_continues(samples)

    def speech_continues(self, samples: npt.NDArray[np.int16]) -> None:
        """Feed the decoder once a piece of :data:`STREAM_FEED_SAMPLES` has gathered."""
        if self._key is None:
            return
        self._buffer.append(samples)
        self._buffered += len(samples)
        if self._buffered >= STREAM_FEED_SAMPLES:
            self._flush()

    def speech_ended(self) -> None:
        """Feed the rest and end the utterance; its transcript waits for :meth:`take`."""
        if self._key is None:
            return
        self._flush()
        self._ended.append(self._send(AsrStep(self._key, "end", sample_rate=self._rate)))
        self._key = None

    def take(self) -> asyncio.Task[Any] | None:
        """The transcript task of the oldest ended utterance not taken yet (None: none was streamed)."""
        return self._ended.pop(0) if self._ended else None

    def _flush(self) -> None:
        if self._key is None or not self._buffer:
            return
        piece = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        self._send(AsrStep(self._key, "feed", piece, self._rate))

    def _send(self, step: AsrStep) -> asyncio.Task[Any]:
        self._last = asyncio.create_task(self._after(self._last, step))
        return self._last

    async def _after(self, previous: asyncio.Task[Any] | None, step: AsrStep) -> Any:
        if previous is not None:
            with contextlib.suppress(Exception):  # a failed step fails its utterance's end, below
                await previous
        return await self._step(step)


# --- the pipeline -------------------------------------------------------------------------------------

@dataclass
class _Call:
    tenant_id: str
    call_id: str
    protocol: str
    policy: EscalationPolicy
    retrieval: RetrievalSettings
    tracker: EscalationTracker
    vads: dict[Track, CallVad] = field(default_factory=dict)
    streamed: dict[Track, StreamedTranscripts] = field(default_factory=dict)
    sessions: list[Any] = field(default_factory=list)
    last_text: str = ""
    """The latest transcript, the context of the next redaction (an agent asks for the CVV, the
    caller answers with bare digits)."""


class CallPipeline:
    """One connected stream's call, from its start to its end (see the module docstring)."""

    def __init__(self, services: AssistServices, *, send_transcript: TranscriptSender | None = None) -> None:
        self.services = services
        self.send_transcript = send_transcript
        self.call: _Call | None = None
        self._spoken = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._finalised: asyncio.Future[None] | None = None
        self._ended = False

    async def handle(self, event: StreamEvent) -> None:
        """Apply one neutral stream event."""
        if isinstance(event, CallStarted):
            await self._start(event)
        elif isinstance(event, AudioChunk):
            await self._audio(event)
        elif isinstance(event, CallEnded):
            await self._end(event)
        elif isinstance(event, Dtmf | Paused | Resumed | AudioGap):
            await self._notice(event)
        elif isinstance(event, PeerError):
            logger.warning("call %s: the sender reported error %s: %s", self._call_id(), event.code, event.message)

    async def close(self) -> None:
        """The connection is gone: end the call as ``disconnected`` if nothing ended it, and release
        its VAD sessions. Safe to call twice."""
        if self.call is not None and not self._ended:
            await self._end(CallEnded("disconnected", "the stream closed without ending the call"))
        self._release_sessions()

    def _tenant_lm(self, tenant_id: str) -> Callable[[], KeyedLm | None] | None:
        lookup = self.services.language_model
        return None if lookup is None else functools.partial(lookup, tenant_id)

    def _call_id(self) -> str:
        return self.call.call_id if self.call else "-"

    # -- start ----------------------------------------------------------------------------------

    async def _start(self, started: CallStarted) -> None:
        if self.call is not None:
            return
        tenant_id = started.tenant_id or "default"
        settings = await asyncio.to_thread(_open_call_row, tenant_id, started)
        call = _Call(tenant_id=tenant_id, call_id=started.call_id, protocol=started.protocol,
                     policy=settings.escalation, retrieval=settings.retrieval,
                     tracker=EscalationTracker(settings.escalation))
        for track in started.tracks:
            name = vad_model_name(track.sample_rate)
            session = self.services.sessions.open_session(name, f"{tenant_id}/{started.call_id}/{track.track}")
            call.sessions.append(session)
            observer = None
            if self.services.asr_step is not None:
                observer = call.streamed[track.track] = StreamedTranscripts(
                    self.services.asr_step, f"{tenant_id}/{started.call_id}/{track.track}", track.sample_rate,
                    language_model=self._tenant_lm(tenant_id))
            call.vads[track.track] = CallVad(session, track.sample_rate, self.services.endpointing, observer=observer)
        self.call = call
        await self.services.knowledge_base.sync_knowledge(tenant_id)
        summary = {"type": "call.started", "call_id": started.call_id, "protocol": started.protocol,
                   "tracks": [track.track for track in started.tracks], "authenticated": started.authenticated,
                   "at": utcnow().isoformat()}
        await self._publish(summary, live=True)

    # -- audio ----------------------------------------------------------------------------------

    async def _audio(self, chunk: AudioChunk) -> None:
        call = self.call
        if call is None or self._ended:
            return
        vad = call.vads.get(chunk.track)
        if vad is None:
            return
        for spoken in await vad.feed(chunk.samples):
            self._analyse(chunk.track, spoken)

    def _analyse(self, track: Track, spoken: SpokenUtterance) -> None:
        index, self._spoken = self._spoken, self._spoken + 1
        previous, finalised = self._finalised, asyncio.get_running_loop().create_future()
        self._finalised = finalised
        streamed = self.call.streamed.get(track) if self.call else None
        transcribed = asyncio.create_task(self._transcript(spoken, streamed.take() if streamed else None))
        task = asyncio.create_task(self._analyse_utterance(index, track, spoken, transcribed, previous, finalised))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _transcript(self, spoken: SpokenUtterance, streamed: asyncio.Task[Any] | None) -> Transcription:
        """The utterance's transcript: decoded while spoken when it was, else (or when that failed)
        decoded whole now."""
        if streamed is not None:
            try:
                return Transcription(text=(await streamed).text)
            except Exception as exc:
                logger.warning("call %s: streamed decoding failed (%r); decoding the utterance whole",
                               self._call_id(), exc)
        tenant_id = self.call.tenant_id if self.call else None
        return await self.services.analyzers.transcribe(spoken.samples, spoken.sample_rate, tenant_id)

    async def _analyse_utterance(self, index: int, track: Track, spoken: SpokenUtterance,
                                 transcribed: asyncio.Task[Transcription], previous: asyncio.Future[None] | None,
                                 finalised: asyncio.Future[None]) -> None:
        try:
            await self._run_analysis(index, track, spoken, transcribed, previous)
        except Exception:
            logger.exception("call %s: utterance %d could not be analysed", self._call_id(), index)
        finally:
            finalised.set_result(None)

    async def _run_analysis(self, index: int, track: Track, spoken: SpokenUtterance,
                            transcribed: asyncio.Task[Transcription], previous: asyncio.Future[None] | None) -> None:
        analyzers = self.services.analyzers
        timing = {"utterance": index, "speaker": track, "start_ms": round(spoken.start_s * 1000),
                  "end_ms": round(spoken.end_s * 1000), "hangover_ms": round(spoken.hangover_ms, 1)}
        heard = asyncio.create_task(analyzers.emotion(spoken.samples, spoken.sample_rate, None))
        audio_emotion = await heard
        await self._publish({"type": "emotion", **timing, **_emotion_fields(audio_emotion), "final": False,
                             "latency_ms": _since(spoken.decided_monotonic)})
        transcription = await transcribed
        call = self.call
        assert call is not None
        redaction = redact(transcription.text, context=call.last_text)
        call.last_text = transcription.text
        await self._publish({"type": "transcript", **timing, "text": redaction.text,
                             "redacted": sorted(kind.value for kind in redaction.kinds),
                             "confidence": transcription.confidence, "latency_ms": _since(spoken.decided_monotonic)})
        await self._send_transcript(track, redaction.text, spoken)
        fused = (await analyzers.emotion(spoken.samples, spoken.sample_rate, transcription.text)
                 if transcription.text.strip() else audio_emotion)
        if previous is not None:
            await previous
        await self._finalise(index, track, spoken, timing, redaction, fused)

    async def _finalise(self, index: int, track: Track, spoken: SpokenUtterance, timing: Event,
                        redaction: Any, fused: EmotionReading) -> None:
        call = self.call
        assert call is not None
        assessment = call.tracker.observe(PolicyUtterance(
            speaker=track, emotion_probabilities=fused.probabilities, text=redaction.text, index=index,
            at_ms=timing["end_ms"]))
        suggestion = None
        if track == "customer" and redaction.text.strip():
            articles = self.services.knowledge_base.knowledge
            suggestion = articles.suggest(call.tenant_id, redaction.text, emotion=fused.label, settings=call.retrieval)
        await asyncio.to_thread(_store_utterance, call, track, timing, redaction, fused, assessment,
                                None if suggestion is None else suggestion.article_id)
        await self._publish({"type": "emotion", **timing, **_emotion_fields(fused), "final": True,
                             "sentiment": _sentiment(assessment), "latency_ms": _since(spoken.decided_monotonic)})
        if track == "customer":
            await self._publish({"type": "call.updated", "call_id": call.call_id, "emotion": fused.label,
                                 "sentiment": _sentiment(assessment)}, live=True, call_feed=False)
        for escalation in assessment.events:
            await self._publish({"type": "escalation", "call_id": call.call_id, **escalation.as_dict()}, live=True)
        if suggestion is not None:
            await self._publish({"type": "suggestion", **timing, "article_id": suggestion.article_id,
                                 "title": suggestion.title, "reply": suggestion.reply,
                                 "score": round(suggestion.score, 3)})

    async def _send_transcript(self, track: Track, text: str, spoken: SpokenUtterance) -> None:
        if self.send_transcript is None or not text.strip():
            return
        try:
            await self.send_transcript(track, text, spoken.start_s, spoken.end_s - spoken.start_s)
        except Exception as exc:  # the connection is closing: the event is on the feed anyway
            logger.info("call %s: transcript not sent back: %r", self._call_id(), exc)

    # -- notices and end ------------------------------------------------------------------------

    async def _notice(self, event: Dtmf | Paused | Resumed | AudioGap) -> None:
        kind = {Dtmf: "dtmf", Paused: "paused", Resumed: "resumed", AudioGap: "audio.gap"}[type(event)]
        fields: Event = {"type": kind}
        if isinstance(event, Dtmf):
            fields.update(track=event.track)  # never the digit: key presses are card numbers and PINs
        elif isinstance(event, Paused | Resumed):
            fields.update(position_s=event.position_s)
        else:
            fields.update(position_s=event.position_s, duration_s=event.duration_s, reason=event.reason)
        await self._publish(fields)

    async def _end(self, ended: CallEnded) -> None:
        call = self.call
        if call is None or self._ended:
            return
        for track, vad in call.vads.items():
            spoken = vad.finish()
            if spoken is not None:
                self._analyse(track, spoken)
        if self._pending:
            done, still = await asyncio.wait(set(self._pending), timeout=ANALYSIS_TIMEOUT_S)
            for task in still:
                task.cancel()
            if still:
                logger.warning("call %s: %d utterance analyses did not finish in time", call.call_id, len(still))
        self._ended = True
        self._release_sessions()
        await asyncio.to_thread(_close_call_row, call, ended)
        await self._publish({"type": "call.ended", "call_id": call.call_id, "reason": ended.reason,
                             "detail": ended.detail, "at": utcnow().isoformat()}, live=True)

    def _release_sessions(self) -> None:
        if self.call is None:
            return
        for session in self.call.sessions:
            session.close()
        self.call.sessions.clear()

    async def _publish(self, event: Event, *, live: bool = False, call_feed: bool = True) -> None:
        call = self.call
        if call is None:
            return
        feed = self.services.feed
        if call_feed:
            await feed.publish(call_topic(call.tenant_id, call.call_id), event)
        if live:
            await feed.publish(live_topic(call.tenant_id), {**event, "call_id": call.call_id})


# --- database work (run in a thread) --------------------------------------------------------------------

def _open_call_row(tenant_id: str, started: CallStarted) -> Any:
    with session_scope() as session:
        call = store.open_call(session, tenant_id, started.call_id, protocol=started.protocol,
                               stream_id=started.stream_id, language=started.language,
                               details={"authenticated": started.authenticated,
                                        "tracks": [track.track for track in started.tracks]})
        tracks = {track.track: track.name for track in started.tracks}
        for participant in started.participants:  # phone numbers and names are not stored: PII
            store.add_participant(session, call, role=participant.role,
                                  track=tracks.get(participant.role, participant.role), external_id=participant.id)
        return store.assist_settings(session, tenant_id)


def _store_utterance(call: _Call, track: Track, timing: Event, redaction: Any, fused: EmotionReading,
                     assessment: Assessment, article_id: str | None) -> None:
    with session_scope() as session:
        row = store.get_call(session, call.tenant_id, call.call_id)
        store.add_utterance(session, row, speaker=track, track=track, start_ms=timing["start_ms"],
                            end_ms=max(timing["end_ms"], timing["start_ms"]), transcript=redaction.text,
                            redactions=[span.as_dict() for span in redaction.spans], emotion=fused.label,
                            emotion_probabilities=fused.probabilities, valence=assessment.valence,
                            sentiment_trend=assessment.trend, suggested_article_id=article_id)
        for escalation in assessment.events:
            store.add_escalation(session, row, escalation)


def _close_call_row(call: _Call, ended: CallEnded) -> None:
    with session_scope() as session:
        store.close_call(session, call.tenant_id, call.call_id, reason=ended.reason, detail=ended.detail)


# --- small helpers -------------------------------------------------------------------------------------

def _since(monotonic: float) -> float:
    return round(1000 * (time.monotonic() - monotonic), 1)


def _emotion_fields(reading: EmotionReading) -> Event:
    return {"label": reading.label, "probabilities": {label: round(float(p), 4) for label, p in
                                                      reading.probabilities.items()},
            "modalities": list(reading.modalities)}


def _sentiment(assessment: Assessment) -> Event:
    return {"valence": round(assessment.valence, 3), "trend": round(assessment.trend, 3),
            "direction": assessment.direction.value}
