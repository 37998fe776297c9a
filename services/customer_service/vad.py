"""Voice-activity detection and endpointing of live calls: silero-vad's ONNX model, stepped as
streaming sessions of the shared runtime so windows of many concurrent calls share one batch.

The model (``silero_vad/data/silero_vad.onnx`` from the silero-vad wheel, the file its own
``load_silero_vad(onnx=True)`` serves; nothing is downloaded) is run by ONNX Runtime directly, as
silero's ``OnnxWrapper`` does: inputs ``input (B, context + window)``, ``state (2, B, 128)`` and a
scalar ``sr``; outputs the speech probability ``(B, 1)`` and the new state. A stream's state is
the recurrent state and the last ``context`` samples of its previous window (64 at 16 kHz, 32 at
8 kHz), prepended to the next 512- or 256-sample window (32 ms either way). Rows of a batch are
independent, so the runtime's :class:`~model_runtime.StreamingModel` stacks the states of the
calls that have a window waiting, steps them together, and hands each call its own new state.
Because ``sr`` is one scalar per batch, each sample rate is its own streaming model
(``cs-vad-8k`` for telephone audio, ``cs-vad-16k``).

The session comes from the platform's :func:`~model_runtime.backends.onnx_session` without its
load-time onnxsim pass (``simplify=False``), which fails on silero's STFT branch (reflect padding
of its random probe input) and costs ~5 s.

:class:`Endpointer` turns the per-window probabilities into speech-start and end-of-utterance
decisions (silero's ``VADIterator`` rules plus a minimum speech length and a maximum utterance
length); :class:`CallVad` feeds a call's audio frames of any length through a session and cuts
the utterances out, padded, with the hangover (the silence waited before deciding the end)
reported apart from the decision time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from model_runtime import BadInput, LoadContext, ModelRuntimeError, Session, StreamingModel
from model_runtime.backends import onnx_session

logger = logging.getLogger("tessera.cs.vad")

SILERO_VERSION = "6.2.3"
SILERO_ONNX_FILE = "silero_vad.onnx"
WINDOW_SAMPLES = {8000: 256, 16000: 512}
CONTEXT_SAMPLES = {8000: 32, 16000: 64}
STATE_SHAPE = (2, 128)  # (2, B, 128) stacked: batch axis 1


def vad_model_name(sample_rate: int) -> str:
    """The runtime name of the VAD streaming model for ``sample_rate`` (``cs-vad-8k``)."""
    return f"cs-vad-{sample_rate // 1000}k"


def silero_onnx_path() -> Path:
    """The ONNX model shipped in the silero-vad wheel (found without importing the package,
    whose ``__init__`` imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the silero-vad package is not installed (pip install silero-vad==6.2.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SILERO_ONNX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"silero-vad is installed but its model {path} is missing")
    return path


class SileroVad:
    """silero-vad's ONNX graph at one sample rate, over a batch of streams (one ONNX Runtime session)."""

    backend_name = "onnxruntime"

    def __init__(self, sample_rate: int, model_path: Path | None = None, *, threads: int = 1) -> None:
        if sample_rate not in WINDOW_SAMPLES:
            raise ValueError(f"silero-vad runs at 8000 or 16000 Hz, not {sample_rate}")
        self.session = onnx_session(model_path or silero_onnx_path(), threads=threads, simplify=False)
        self.sample_rate = sample_rate
        self.window = WINDOW_SAMPLES[sample_rate]
        self.context = CONTEXT_SAMPLES[sample_rate]
        self._sr = np.array(sample_rate, dtype=np.int64)

    def initial_state(self) -> dict[str, npt.NDArray[np.float32]]:
        """A stream's state before its first window: zero recurrent state, zero context."""
        return {"state": np.zeros(STATE_SHAPE, np.float32), "context": np.zeros(self.context, np.float32)}

    def step(self, states: Mapping[str, Any], windows: npt.NDArray[np.float32]
             ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
        """Speech probabilities ``(B,)`` of B streams' next windows ``(B, window)``, and their new states."""
        frames = np.concatenate([states["context"], windows], axis=1)
        probability, new_state = self.session.run(None, {"input": frames, "state": states["state"], "sr": self._sr})
        return probability[:, 0], {"state": new_state, "context": frames[:, -self.context:]}

    def probabilities(self, samples: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """One stream's probabilities, window by window, unbatched (offline use and reference)."""
        state: Mapping[str, Any] = {name: value[None] if name == "context" else value[:, None]
                                    for name, value in self.initial_state().items()}
        out = np.empty(0, np.float32)
        for window in as_windows(samples, self.window):
            probability, state = self.step(state, window[None])
            out = np.append(out, probability)
        return out


def as_windows(samples: npt.NDArray[Any], window: int) -> npt.NDArray[np.float32]:
    """Whole windows of ``samples`` as float32 in [-1, 1] (int16 scaled by 1/32768); a partial
    last window is zero-padded."""
    audio = to_float(samples)
    padded = np.pad(audio, (0, -len(audio) % window))
    return padded.reshape(-1, window)


def to_float(samples: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """int16 samples scaled to [-1, 1) float32; float input is taken as already scaled."""
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    return samples.astype(np.float32, copy=False)


def vad_streaming_model(sample_rate: int = 8000, *, max_batch_size: int = 64, max_wait_ms: float = 2.0,
                        idle_timeout_s: float = 120.0, run_inline: bool = False,
                        model_path: Path | None = None) -> StreamingModel:
    """The VAD as a streaming model of the shared runtime: one step = one window of one call.

    Chunks are one window of samples (int16 or float in [-1, 1]); the answer is the window's speech
    probability (a Python float). A window of the wrong length fails alone with ``BadInput``.
    """
    window = WINDOW_SAMPLES[sample_rate]

    def load(_: LoadContext) -> SileroVad:
        return SileroVad(sample_rate, model_path)

    def prepare_window(chunk: Any) -> npt.NDArray[np.float32]:
        array = np.asarray(chunk)
        if array.shape != (window,):
            raise BadInput(f"a VAD window at {sample_rate} Hz is {window} samples, got shape {array.shape}")
        return to_float(array)

    def step(model: SileroVad, states: dict[str, Any], windows: Any) -> tuple[Any, dict[str, Any]]:
        probabilities, new_states = model.step(states, windows)
        return [float(p) for p in probabilities], new_states

    return StreamingModel(
        name=vad_model_name(sample_rate), version=f"silero-{SILERO_VERSION}", loader=load, step=step,
        initial_state=lambda model: model.initial_state(), prepare_chunk=prepare_window,
        state_axes={"state": 1}, idle_timeout_s=idle_timeout_s, max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms, run_inline=run_inline, uses_torch=False, warmup_chunks=[np.zeros(window, np.int16)],
    )


# --- endpointing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EndpointConfig:
    """Endpointing rules (silero's defaults, with a longer hangover for conversational turns).

    threshold : a window at or above it is speech; ``threshold - 0.15`` and below is silence while
        in speech (hysteresis).
    min_speech_ms : speech shorter than this before the silence (a click, a cough) is dropped.
    min_silence_ms : the hangover: silence this long ends the utterance.
    speech_pad_ms : audio kept before the first and after the last speech window.
    max_utterance_s : an utterance this long is cut (and the next one starts at once).
    """

    threshold: float = 0.5
    min_speech_ms: float = 250.0
    min_silence_ms: float = 500.0
    speech_pad_ms: float = 100.0
    max_utterance_s: float = 20.0

    @property
    def neg_threshold(self) -> float:
        """The exit threshold while in speech."""
        return max(self.threshold - 0.15, 0.01)


@dataclass(frozen=True)
class SpeechStart:
    """Speech was confirmed (``min_speech_ms`` of it); it began at ``start_sample`` (padded)."""

    start_sample: int
    decided_sample: int


@dataclass(frozen=True)
class SpeechEnd:
    """End of utterance decided at ``decided_sample``: speech ran ``start_sample``..``end_sample``
    (padded; ``speech_end_sample`` unpadded); ``hangover_samples`` of silence were waited for."""

    start_sample: int
    end_sample: int
    speech_end_sample: int
    decided_sample: int
    hangover_samples: int
    forced: bool = False


VadEvent = SpeechStart | SpeechEnd


class Endpointer:
    """One stream's speech-start and end-of-utterance decisions from window probabilities (pure logic)."""

    def __init__(self, sample_rate: int, config: EndpointConfig | None = None) -> None:
        self.config = config or EndpointConfig()
        self.sample_rate = sample_rate
        self.window = WINDOW_SAMPLES[sample_rate]
        self._min_speech = self._samples(self.config.min_speech_ms)
        self._min_silence = self._samples(self.config.min_silence_ms)
        self._pad = self._samples(self.config.speech_pad_ms)
        self._max_utterance = self._samples(self.config.max_utterance_s * 1000)
        self.position = 0  # samples consumed
        self._candidate: int | None = None  # first speech sample, before min_speech is reached
        self._speech_start: int | None = None  # confirmed start (unpadded)
        self._silence_from: int | None = None  # first silent sample while in speech

    def _samples(self, ms: float) -> int:
        return int(round(self.sample_rate * ms / 1000))

    @property
    def pad_samples(self) -> int:
        """Samples of padding kept around speech."""
        return self._pad

    @property
    def in_speech(self) -> bool:
        """Whether an utterance is open (confirmed speech, end not yet decided)."""
        return self._speech_start is not None

    @property
    def pending_start(self) -> int | None:
        """The first sample that audio must be kept from: the candidate's or utterance's start, padded."""
        first = self._speech_start if self._speech_start is not None else self._candidate
        return None if first is None else max(0, first - self._pad)

    def update(self, probability: float) -> VadEvent | None:
        """Take the next window's speech probability; return the decision it makes, if any."""
        window_start, self.position = self.position, self.position + self.window
        speech = probability >= self.config.threshold
        if self._speech_start is None:
            return self._update_idle(speech, probability, window_start)
        return self._update_in_speech(speech, probability, window_start)

    def _update_idle(self, speech: bool, probability: float, window_start: int) -> VadEvent | None:
        if speech:
            if self._candidate is None:
                self._candidate = window_start
            self._silence_from = None
        elif self._candidate is not None and probability < self.config.neg_threshold:
            if self._silence_from is None:
                self._silence_from = window_start
            if self.position - self._silence_from >= self._min_silence:
                self._candidate = self._silence_from = None  # too short: a click or a cough
                return None
        if self._candidate is not None and self._voiced_since_candidate() >= self._min_speech:
            self._speech_start, self._candidate = self._candidate, None
            return SpeechStart(max(0, self._speech_start - self._pad), self.position)
        return None

    def _voiced_since_candidate(self) -> int:
        assert self._candidate is not None
        end = self._silence_from if self._silence_from is not None else self.position
        return end - self._candidate

    def _update_in_speech(self, speech: bool, probability: float, window_start: int) -> VadEvent | None:
        assert self._speech_start is not None
        if speech:
            self._silence_from = None
        elif probability < self.config.neg_threshold and self._silence_from is None:
            self._silence_from = window_start
        if self._silence_from is not None and self.position - self._silence_from >= self._min_silence:
            return self._end(self._silence_from, forced=False)
        if self.position - self._speech_start >= self._max_utterance:
            return self._end(self.position, forced=True)
        return None

    def _end(self, speech_end: int, *, forced: bool) -> SpeechEnd:
        assert self._speech_start is not None
        event = SpeechEnd(start_sample=max(0, self._speech_start - self._pad),
                          end_sample=min(self.position, speech_end + self._pad), speech_end_sample=speech_end,
                          decided_sample=self.position, hangover_samples=self.position - speech_end, forced=forced)
        self._speech_start = self._silence_from = None
        if forced:
            self._candidate = self.position  # speech goes on: the next utterance starts here
        return event

    def finish(self) -> SpeechEnd | None:
        """The stream ended: close an open utterance at its last speech (no hangover waited)."""
        if self._speech_start is None:
            return None
        speech_end = self._silence_from if self._silence_from is not None else self.position
        return self._end(speech_end, forced=False)


# --- one call ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Utterance:
    """One endpointed utterance of a call: its audio (padded) and timing.

    ``decided_monotonic`` is ``time.monotonic()`` when the end was decided: latency of the
    transcript and emotion events is measured from it. ``hangover_ms`` is the silence waited
    for before that decision (not part of that latency).
    """

    samples: npt.NDArray[np.int16]
    sample_rate: int
    start_s: float
    end_s: float
    speech_end_s: float
    hangover_ms: float
    decided_monotonic: float
    forced: bool = False


@dataclass
class _AudioTail:
    """The samples of a stream from ``first`` on (older ones dropped)."""

    first: int = 0
    chunks: list[npt.NDArray[np.int16]] = field(default_factory=list)

    def append(self, samples: npt.NDArray[np.int16]) -> None:
        self.chunks.append(samples)

    def between(self, start: int, end: int) -> npt.NDArray[np.int16]:
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        self.chunks = [audio]
        return audio[max(0, start - self.first):max(0, end - self.first)]

    def drop_before(self, sample: int) -> None:
        if sample <= self.first:
            return
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        self.chunks = [audio[sample - self.first:]]
        self.first = sample


class SpeechObserver(Protocol):
    """Follows an utterance while it is spoken (a speech-to-text decoding as the audio comes)."""

    def speech_started(self, start_sample: int, samples: npt.NDArray[np.int16]) -> None:
        """Speech was confirmed: its audio so far, from ``start_sample`` (padded)."""
        ...

    def speech_continues(self, samples: npt.NDArray[np.int16]) -> None:
        """More audio of the open utterance."""
        ...

    def speech_ended(self) -> None:
        """The utterance's end was decided (all its audio was handed over)."""
        ...


class CallVad:
    """One call's VAD: audio frames of any length in, utterances out, through a runtime session.

    Frames are cut into 32 ms windows; each window is one step of the call's streaming session
    (shared batches across calls). Only the audio an open or possible utterance needs is kept.
    An ``observer`` is handed each utterance's audio from its confirmed start, window by window,
    so work on it can begin before its end is decided.
    """

    def __init__(self, session: Session, sample_rate: int, config: EndpointConfig | None = None, *,
                 observer: SpeechObserver | None = None) -> None:
        self.session = session
        self.observer = observer
        self._observed_to: int | None = None
        self.endpointer = Endpointer(sample_rate, config)
        self.sample_rate = sample_rate
        self._window = WINDOW_SAMPLES[sample_rate]
        self._pending = np.zeros(0, np.int16)  # samples not yet a whole window
        self._audio = _AudioTail()
        self.speaking = False
        self.failed_windows = 0

    async def feed(self, samples: npt.NDArray[np.int16]) -> list[Utterance]:
        """Add a frame (int16); return the utterances whose end it decided."""
        self._audio.append(samples)
        self._pending = np.concatenate([self._pending, samples])
        whole = len(self._pending) - len(self._pending) % self._window
        windows, self._pending = self._pending[:whole].reshape(-1, self._window), self._pending[whole:]
        steps = [self.session.step(window) for window in windows]
        utterances = []
        for result in await asyncio.gather(*steps, return_exceptions=True):
            if isinstance(result, BaseException):
                if not isinstance(result, ModelRuntimeError):
                    raise result
                # overloaded or late: the window counts as silence rather than stalling the call
                self.failed_windows += 1
                logger.warning("call %s: VAD window failed (%s); taken as silence", self.session.stream_id, result)
                result = 0.0
            event = self.endpointer.update(result)
            self._observe(event)
            utterance = self._on_event(event)
            if utterance is not None:
                utterances.append(utterance)
        self._trim()
        return utterances

    def finish(self) -> Utterance | None:
        """The call ended: the open utterance, if any, cut at its last speech."""
        event = self.endpointer.finish()
        self._observe(event)
        return self._on_event(event)

    def _observe(self, event: VadEvent | None) -> None:
        if self.observer is None:
            return
        position = self.endpointer.position
        if isinstance(event, SpeechStart):
            self.observer.speech_started(event.start_sample, self._audio.between(event.start_sample, position))
            self._observed_to = position
        elif self._observed_to is not None and position > self._observed_to:
            self.observer.speech_continues(self._audio.between(self._observed_to, position))
            self._observed_to = position
        if isinstance(event, SpeechEnd) and self._observed_to is not None:
            self.observer.speech_ended()
            self._observed_to = None

    def _on_event(self, event: VadEvent | None) -> Utterance | None:
        if isinstance(event, SpeechStart):
            self.speaking = True
        if not isinstance(event, SpeechEnd):
            return None
        self.speaking = self.endpointer.in_speech
        rate = self.sample_rate
        return Utterance(samples=self._audio.between(event.start_sample, event.end_sample), sample_rate=rate,
                         start_s=event.start_sample / rate, end_s=event.end_sample / rate,
                         speech_end_s=event.speech_end_sample / rate,
                         hangover_ms=1000 * event.hangover_samples / rate,
                         decided_monotonic=time.monotonic(), forced=event.forced)

    def _trim(self) -> None:
        keep_from = self.endpointer.pending_start
        if keep_from is None:  # idle: keep the padding's worth before the next possible start
            keep_from = self.endpointer.position - self.endpointer.pad_samples - self._window
        self._audio.drop_before(max(0, keep_from))
