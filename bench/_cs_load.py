"""Load generation and measurement for ``bench/customer_service.py``: concurrent simulated calls
through the platform-like clients of ``tests/customer_service/stream_clients.py``, the server's CPU
and memory from ``/proc``, and the models called directly (the naive baseline)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.customer_service.simulate import SimulatedCall
from services.customer_service.vad import EndpointConfig
from tests.conftest import sqlite_stack_at
from tests.customer_service.stream_clients import (
    AUDIOHOOK_PATH,
    AUTH_TOKEN,
    CLIENT_SECRET,
    TENANT,
    AssistFeed,
    AudioHookClient,
    CsServer,
    Received,
    TwilioClient,
    call_frames,
    emotion_models_env,
    serve_customer_service,
)

TAIL_SILENCE_S = 1.0
"""Silence after the streamed audio, so the VAD ends the last turn itself (hangover 0.5 s)."""
FEED_TIMEOUT_S = 180.0
PAD_MS = EndpointConfig().speech_pad_ms


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear), rounded to 0.1; ``None`` without values."""
    return round(float(np.percentile(np.asarray(values, dtype=float), q)), 1) if len(values) else None


# --- the server process tree -----------------------------------------------------------------------

class ProcessTree:
    """CPU time and peak memory of a process and its descendants, read from ``/proc`` (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")
        self.peak_mb = 0.0

    def pids(self) -> list[int]:
        """The process and its descendants now."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                if fields:
                    parents[int(entry.name)] = int(fields[1])
        found, frontier = [self.pid], [self.pid]
        while frontier:
            children = [pid for pid, parent in parents.items() if parent in frontier]
            found += children
            frontier = children
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU of the tree (live processes, and the reaped children of each)."""
        total = 0
        for pid in self.pids():
            fields = _stat_fields(pid)
            if fields:  # after the ")": state is 0, so utime..cstime are 11..14
                total += sum(int(value) for value in fields[11:15])
        self.sample_rss()
        return total / self.tick

    def sample_rss(self) -> float:
        """Sum of the tree's peak RSS (VmHWM) now, in MB; the largest seen is kept in :attr:`peak_mb`."""
        total_kb = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
        self.peak_mb = max(self.peak_mb, total_kb / 1024)
        return total_kb / 1024

    def peak_rss_mb(self) -> float:
        """The largest tree peak RSS seen so far (MB)."""
        self.sample_rss()
        return self.peak_mb


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (state first); empty when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2:].split()


@contextlib.contextmanager
def serve_for_bench(workdir: Path) -> Iterator[tuple[CsServer, ProcessTree, str]]:
    """The cs app under uvicorn on a migrated SQLite stack in ``workdir`` (production: streams
    signed), its process tree, and where its emotion model came from (an untrained one, for timing
    only, when none is shipped)."""
    models_env, origin = emotion_models_env(workdir / "models")
    os.environ.update(models_env)  # the naive baseline loads the same model in this process
    stack = sqlite_stack_at(workdir)
    with serve_customer_service(stack, env={"OMP_NUM_THREADS": "1", **models_env}) as server:
        yield server, ProcessTree(server.process.process.pid), origin


# --- streaming calls -------------------------------------------------------------------------------

@dataclass(frozen=True)
class EventTiming:
    """One assist event of an utterance: ``kind`` ``emotion`` (audio only), ``transcript`` or
    ``emotion_final`` (fused); server ``latency_ms`` from the VAD decision; ``client_ms`` from the
    decision's place in the paced stream to arrival (``None`` unpaced)."""

    kind: str
    utterance: int
    speaker: str
    start_ms: int
    end_ms: int
    latency_ms: float
    hangover_ms: float
    client_ms: float | None
    text: str = ""


@dataclass
class CallRun:
    """One streamed call: its protocol, ids, the audio sent and the events its feed carried."""

    protocol: str
    simulated_id: str
    call_id: str
    audio_s: float
    events: list[EventTiming] = field(default_factory=list)
    failure: str | None = None

    @property
    def transcripts(self) -> list[EventTiming]:
        """Its transcript events."""
        return [event for event in self.events if event.kind == "transcript"]


def event_timings(received: Sequence[Received], media_started_at: float | None,
                  pacing: float | None) -> list[EventTiming]:
    """The utterance events of a feed, with the client-side latency where the stream was paced."""
    timings = []
    for item in received:
        data = item.data
        kind = {"emotion": "emotion_final" if data.get("final") else "emotion",
                "transcript": "transcript"}.get(data.get("type", ""))
        if kind is None:
            continue
        client_ms = None
        if pacing and media_started_at is not None:
            decided_s = (data["end_ms"] - PAD_MS + data["hangover_ms"]) / 1000 / pacing
            client_ms = round(1000 * (item.at - media_started_at - decided_s), 1)
        timings.append(EventTiming(kind, data["utterance"], data["speaker"], data["start_ms"], data["end_ms"],
                                   float(data["latency_ms"]), float(data["hangover_ms"]), client_ms,
                                   data.get("text", "")))
    return timings


async def _stream_twilio(server: CsServer, call: SimulatedCall, frames: list[Any], pacing: float | None,
                         run: CallRun) -> float | None:
    client = TwilioClient(server.twilio_url, call_sid=run.call_id, tenant=TENANT, auth_token=AUTH_TOKEN,
                          tracks=("inbound", "outbound"))
    async with client:
        await client.send_connected()
        await client.send_start()
        await client.send_frames(frames, pacing)
        await client.send_stop()
        closed = await client.server_close(FEED_TIMEOUT_S)
    if closed.code != 1000:
        run.failure = f"twilio {run.call_id}: closed {closed.code} {closed.reason}"
    return client.media_started_at


async def _stream_audiohook(server: CsServer, call: SimulatedCall, frames: list[Any], pacing: float | None,
                            run: CallRun) -> float | None:
    client = AudioHookClient(server.ws(AUDIOHOOK_PATH), api_key=server.api_key, client_secret=CLIENT_SECRET,
                             conversation_id=run.call_id, channels=("external", "internal"))
    await client.connect()
    try:
        await client.open()
        await client.send_frames(frames, pacing)
        await client.close(timeout_s=FEED_TIMEOUT_S)
        if client.missed_pongs:
            run.failure = f"audiohook {run.call_id}: {client.missed_pongs} ping(s) without a pong in time"
    finally:
        await client.shutdown()
    return client.media_started_at


async def stream_call(server: CsServer, call: SimulatedCall, protocol: str, *, pacing: float | None,
                      max_call_s: float | None) -> CallRun:
    """Stream ``call`` (both tracks) over ``protocol`` under a fresh call id, with a feed subscriber."""
    call_id = "CA" + uuid.uuid4().hex if protocol == "twilio" else str(uuid.uuid4())
    frames = call_frames(call, ["customer", "agent"], tail_silence_s=TAIL_SILENCE_S, until_s=max_call_s)
    run = CallRun(protocol, call.call_id, call_id, audio_s=len(frames) * 0.02)
    feed = AssistFeed(server.base_url, call_id, server.api_key)
    subscribed = asyncio.ensure_future(feed.run())
    stream = _stream_twilio if protocol == "twilio" else _stream_audiohook
    try:
        started_at = await stream(server, call, frames, pacing, run)
        await asyncio.wait_for(subscribed, FEED_TIMEOUT_S)
    except Exception as error:  # a failed call is reported, the others still count
        run.failure = f"{protocol} {call_id}: {error!r}"
        subscribed.cancel()
        return run
    run.events = event_timings(feed.events, started_at, pacing)
    ended = [item.data for item in feed.events if item.data.get("type") == "call.ended"]
    if not ended:
        run.failure = run.failure or f"{protocol} {call_id}: the feed closed without call.ended ({feed.closed})"
    return run


async def stream_calls(server: CsServer, calls: Sequence[SimulatedCall], protocols: Sequence[str], *,
                       pacing: float | None, max_call_s: float | None, tree: ProcessTree) -> list[CallRun]:
    """Stream ``calls`` at once (one protocol each), sampling the server's memory meanwhile."""

    async def sample_memory() -> None:
        while True:
            await asyncio.to_thread(tree.sample_rss)
            await asyncio.sleep(1.0)

    sampler = asyncio.ensure_future(sample_memory())
    try:
        return list(await asyncio.gather(*(stream_call(server, call, protocol, pacing=pacing, max_call_s=max_call_s)
                                           for call, protocol in zip(calls, protocols, strict=True))))
    finally:
        sampler.cancel()


# --- the models, called directly (naive baseline) ---------------------------------------------------

Transcribe = Callable[[npt.NDArray[np.int16]], str]
Emotion = Callable[[npt.NDArray[np.int16], str], Any]


def direct_models(sample_rate: int = 8000) -> tuple[Transcribe, Emotion]:
    """ASR and emotion as the server loads them, called in this process one item at a time: a
    pocketsphinx :class:`~services.customer_service.asr.Recognizer` with the same domain LM, and the
    emotion model's runtime spec run without the runtime (loader, prepare, ``run_batch`` of one)."""
    from services.customer_service.asr import Recognizer, build_domain_lm, domain_texts

    recognizer = Recognizer(build_domain_lm(domain_texts()))
    run_emotion = direct_spec_runner(_emotion_spec())

    def transcribe(samples: npt.NDArray[np.int16]) -> str:
        return recognizer.transcribe(samples, sample_rate).text

    def emotion(samples: npt.NDArray[np.int16], text: str) -> Any:
        from services.customer_service.model import EmotionRequest

        return run_emotion(EmotionRequest(samples, sample_rate, text or None))

    return transcribe, emotion


def _emotion_spec() -> Any:
    from services.customer_service import model

    return model.emotion_model_spec(name="bench-cs-emotion")


def direct_spec_runner(spec: Any) -> Callable[[Any], Any]:
    """One item at a time through a runtime :class:`~model_runtime.ModelSpec`, without the runtime:
    its loader once (torch threads as the runtime sets them), then ``prepare``, ``run_batch`` of one
    item and ``finalize``; the spec's warm-up items are run once first, as the runtime does."""
    import torch

    from model_runtime import LoadContext, load_manifest, resolve_placement
    from model_runtime.device import configure_threads

    configure_threads()
    manifest = load_manifest(spec.artifact_dir) if spec.artifact_dir is not None else None
    placement = resolve_placement(spec.device, spec.precision)
    model = spec.loader(LoadContext(spec.artifact_dir, manifest, placement))

    def run(item: Any) -> Any:
        prepared = spec.prepare(item) if spec.prepare else item
        with torch.inference_mode() if spec.uses_torch else contextlib.nullcontext():
            outputs = spec.run_batch(model, [prepared])
        output = outputs[0] if isinstance(outputs, Sequence) else outputs
        return spec.finalize(output) if spec.finalize else output

    for item in spec.warmup_items:
        run(item)
    return run
