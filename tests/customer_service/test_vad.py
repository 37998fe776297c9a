"""VAD: silero's ONNX model stepped with per-call state (equal to silero's own wrapper), batched
across calls through the shared runtime's streaming sessions, and the endpointer's decisions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import numpy as np
import pytest

from model_runtime import BadInput, ModelRuntime, StreamingSessions
from services.customer_service.vad import (
    CallVad,
    EndpointConfig,
    Endpointer,
    SileroVad,
    SpeechEnd,
    SpeechStart,
    Utterance,
    as_windows,
    silero_onnx_path,
    vad_model_name,
    vad_streaming_model,
)

RATE = 8000
WINDOW = 256


def noisy_tone(seconds: float, seed: int) -> np.ndarray:
    """A wobbling tone in noise (int16): content for the model, not speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    signal = 6000 * np.sin(2 * np.pi * (180 + 40 * np.sin(3 * t)) * t) + rng.normal(0, 800, t.size)
    return np.clip(signal, -32768, 32767).astype(np.int16)


def run_endpointer(probabilities: Iterable[float], config: EndpointConfig) -> list[object]:
    endpointer = Endpointer(RATE, config)
    events = [endpointer.update(p) for p in probabilities]
    return [event for event in [*events, endpointer.finish()] if event is not None]


CONFIG = EndpointConfig(min_speech_ms=96, min_silence_ms=160, speech_pad_ms=32, max_utterance_s=2.0)


def test_endpointer_confirms_speech_then_ends_after_the_hangover() -> None:
    events = run_endpointer([0.0] * 5 + [0.9] * 10 + [0.0] * 10, CONFIG)
    start, end = events
    assert start == SpeechStart(start_sample=5 * WINDOW - 256, decided_sample=8 * WINDOW)
    assert isinstance(end, SpeechEnd) and not end.forced
    assert end.speech_end_sample == 15 * WINDOW
    assert end.decided_sample == 20 * WINDOW  # 160 ms = 5 windows of silence
    assert end.hangover_samples == 5 * WINDOW
    assert (end.start_sample, end.end_sample) == (4 * WINDOW, 16 * WINDOW)


def test_endpointer_drops_blips_and_bridges_short_pauses() -> None:
    assert run_endpointer([0.9] * 2 + [0.0] * 10, CONFIG) == []  # 64 ms: a click
    events = run_endpointer([0.9] * 5 + [0.0] * 3 + [0.9] * 5 + [0.0] * 10, CONFIG)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]  # a 96 ms pause stays inside
    # hysteresis: 0.4 is below the threshold but above threshold - 0.15, so speech goes on
    events = run_endpointer([0.9] * 5 + [0.4] * 8 + [0.0] * 10, CONFIG)
    end = events[-1]
    assert isinstance(end, SpeechEnd) and end.speech_end_sample == 13 * WINDOW


def test_endpointer_cuts_long_speech_and_closes_at_the_end_of_the_stream() -> None:
    events = run_endpointer([0.9] * 70, CONFIG)  # 2.24 s of speech, 2 s at most
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, SpeechStart, SpeechEnd]
    forced, last = events[1], events[3]
    assert isinstance(forced, SpeechEnd) and forced.forced and forced.hangover_samples == 0
    assert isinstance(last, SpeechEnd) and last.end_sample == 70 * WINDOW


def test_onnx_steps_equal_silero_wrapper() -> None:
    torch = pytest.importorskip("torch")
    from silero_vad.utils_vad import OnnxWrapper

    audio = noisy_tone(1.0, seed=1)
    ours = SileroVad(RATE).probabilities(audio)
    wrapper = OnnxWrapper(str(silero_onnx_path()), force_onnx_cpu=True)
    theirs = [float(wrapper(torch.from_numpy(window), RATE)) for window in as_windows(audio, WINDOW)]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_calls_batched_through_the_runtime_equal_each_call_alone() -> None:
    streams = {f"call-{n}": noisy_tone(0.8, seed=n) for n in range(4)}
    alone = {call: SileroVad(RATE).probabilities(audio) for call, audio in streams.items()}
    runtime = ModelRuntime()

    async def scenario() -> tuple[dict[str, list[float]], float]:
        sessions = StreamingSessions(runtime)
        name = vad_model_name(RATE)
        await sessions.load(vad_streaming_model(RATE))
        batch = sessions.metrics_for(name).batch_streams
        count_before = _histogram(batch, "_count")
        opened = {call: sessions.open_session(name, call) for call in streams}
        outputs: dict[str, list[float]] = {call: [] for call in streams}
        for index in range(len(alone["call-0"])):
            steps = {call: session.step(as_windows(streams[call], WINDOW)[index]) for call, session in opened.items()}
            for call, task in steps.items():
                outputs[call].append(await task)
        with pytest.raises(BadInput):
            await opened["call-0"].step(np.zeros(100, np.int16))
        batches = _histogram(batch, "_count") - count_before
        await sessions.close()
        await runtime.unload(name)
        return outputs, batches

    outputs, batches = asyncio.run(scenario())
    for call in streams:
        np.testing.assert_allclose(outputs[call], alone[call], atol=1e-5)
    windows = 4 * len(alone["call-0"])
    assert batches < windows / 2, f"{batches} batches for {windows} windows: calls did not share batches"


def _histogram(metric: object, suffix: str) -> float:
    samples = metric.collect()[0].samples  # type: ignore[attr-defined]
    return sum(s.value for s in samples if s.name.endswith(suffix))


def test_call_vad_cuts_utterances_from_telephone_speech() -> None:
    simulate = pytest.importorskip("services.customer_service.simulate")
    if simulate.espeak_path() is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng): no speech to test with")
    voice, prosody = simulate.VOICES[0], simulate.EMOTION_PROSODY["neutral"]
    first, rate = simulate.synthesize("I would like to check the status of my order please.", voice, prosody)
    second, _ = simulate.synthesize("My router keeps dropping the connection.", voice, prosody)
    silence = np.zeros(rate, np.int16)
    line = simulate.telephone_band(np.concatenate([silence[: rate // 2], first, silence, second, silence]), rate)
    truth = [(0.5, 0.5 + len(first) / rate), (1.5 + len(first) / rate, 1.5 + (len(first) + len(second)) / rate)]
    config = EndpointConfig(min_silence_ms=400, speech_pad_ms=100)
    runtime = ModelRuntime()

    async def scenario() -> list[Utterance]:
        sessions = StreamingSessions(runtime)
        await sessions.load(vad_streaming_model(RATE))
        with sessions.open_session(vad_model_name(RATE), "CA-test") as session:
            call = CallVad(session, RATE, config)
            found = []
            for offset in range(0, len(line), 160):  # 20 ms frames, as Twilio sends them
                found += await call.feed(line[offset:offset + 160])
            assert call.finish() is None and call.failed_windows == 0
        await sessions.close()
        await runtime.unload(vad_model_name(RATE))
        return found

    utterances = asyncio.run(scenario())
    assert len(utterances) == 2
    for utterance, (start, end) in zip(utterances, truth, strict=True):
        assert abs(utterance.start_s - (start - 0.1)) < 0.15 and abs(utterance.speech_end_s - end) < 0.15
        assert 400 <= utterance.hangover_ms < 400 + 32 + 1
        assert len(utterance.samples) == round((utterance.end_s - utterance.start_s) * RATE)
