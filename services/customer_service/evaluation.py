"""Measurements of the customer-service speech pipeline: word error rate, real-time factor, and the
cost of a VAD window batched across calls versus one call at a time.

Speech for the measurements is simulated: espeak-ng sentences through a simulated telephone line
(:mod:`services.customer_service.simulate`), so the figures describe synthetic speech, not real
callers.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Histogram

from model_runtime import ModelRuntime, StreamingSessions
from services.customer_service.asr import domain_texts
from services.customer_service.vad import WINDOW_SAMPLES, SileroVad, vad_model_name, vad_streaming_model

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation (``"Don't!"`` -> ``["don't"]``)."""
    return _WORD.findall(text.lower())


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (substitutions, insertions, deletions cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for row, ref_word in enumerate(reference, start=1):
        current = [row]
        for column, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[column] + 1, current[column - 1] + 1,
                               previous[column - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class WordErrors:
    """Word errors summed over a set of utterances: WER = errors / reference words."""

    errors: int
    reference_words: int
    utterances: int

    @property
    def wer(self) -> float:
        """Word error rate (0 when there were no reference words)."""
        return self.errors / self.reference_words if self.reference_words else 0.0


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> WordErrors:
    """Corpus word error counts of aligned reference and hypothesis transcripts."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    errors = words = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        ref_words = normalize_words(reference)
        errors += edit_distance(ref_words, normalize_words(hypothesis))
        words += len(ref_words)
    return WordErrors(errors, words, len(references))


# --- VAD cost ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VadCost:
    """Milliseconds of CPU-bound wall time per 32 ms VAD window."""

    calls: int
    windows_per_call: int
    direct_one_by_one_ms: float
    direct_batched_ms: float
    runtime_sessions_ms: float
    mean_batch_streams: float

    def as_dict(self) -> dict[str, float]:
        """Plain numbers for a report."""
        return {"calls": self.calls, "windows_per_call": self.windows_per_call,
                "direct_one_by_one_ms_per_window": round(self.direct_one_by_one_ms, 4),
                "direct_batched_ms_per_window": round(self.direct_batched_ms, 4),
                "runtime_sessions_ms_per_window": round(self.runtime_sessions_ms, 4),
                "runtime_mean_batch_streams": round(self.mean_batch_streams, 2)}


def measure_vad_cost(calls: int = 8, windows_per_call: int = 100, sample_rate: int = 8000, *,
                     seed: int = 0, run_inline: bool = False) -> VadCost:
    """VAD cost per window: the ONNX model stepped one call at a time, all calls in one batch, and
    through the runtime's streaming sessions with every call submitting its windows concurrently.

    Noise-like windows stand in for audio (the model's cost does not depend on the content).
    """
    window = WINDOW_SAMPLES[sample_rate]
    rng = np.random.default_rng(seed)
    audio = (rng.standard_normal((windows_per_call, calls, window)) * 0.05).astype(np.float32)
    model = SileroVad(sample_rate)
    one_by_one = _timed_direct(model, audio, batched=False)
    batched = _timed_direct(model, audio, batched=True)
    runtime_ms, mean_batch = asyncio.run(_timed_sessions(audio, sample_rate, run_inline))
    return VadCost(calls, windows_per_call, one_by_one, batched, runtime_ms, mean_batch)


def _timed_direct(model: SileroVad, audio: np.ndarray, *, batched: bool) -> float:
    steps, calls, _ = audio.shape
    initial = model.initial_state()
    width = calls if batched else 1
    states = [{"state": np.repeat(initial["state"][:, None], width, axis=1),
               "context": np.repeat(initial["context"][None], width, axis=0)}
              for _ in range(1 if batched else calls)]
    started = time.perf_counter()
    for step in range(steps):
        if batched:
            _, states[0] = model.step(states[0], audio[step])
        else:
            for call in range(calls):
                _, states[call] = model.step(states[call], audio[step, call:call + 1])
    return 1000 * (time.perf_counter() - started) / (steps * calls)


async def _timed_sessions(audio: np.ndarray, sample_rate: int, run_inline: bool) -> tuple[float, float]:
    runtime = ModelRuntime()
    sessions = StreamingSessions(runtime)
    name = vad_model_name(sample_rate)
    await sessions.load(vad_streaming_model(sample_rate, run_inline=run_inline))
    steps, calls, _ = audio.shape
    opened = [sessions.open_session(name, f"bench-{call}") for call in range(calls)]
    histogram = sessions.metrics_for(name).batch_streams
    batches_before, streams_before = _histogram(histogram, "_count"), _histogram(histogram, "_sum")
    started = time.perf_counter()
    for step in range(steps):
        await asyncio.gather(*(session.step(audio[step, call]) for call, session in enumerate(opened)))
    elapsed = time.perf_counter() - started
    batches = _histogram(histogram, "_count") - batches_before
    streams = _histogram(histogram, "_sum") - streams_before
    await sessions.close()
    await runtime.unload(name)
    return 1000 * elapsed / (steps * calls), streams / batches if batches else 0.0


def _histogram(histogram: Histogram, suffix: str) -> float:
    """The ``_count`` or ``_sum`` of a labelled histogram child."""
    return sum(sample.value for metric in histogram.collect() for sample in metric.samples
               if sample.name.endswith(suffix))


def median_ms(values: Sequence[float]) -> float:
    """Median of a list of milliseconds (0 when empty)."""
    return statistics.median(values) if values else 0.0


# --- ASR word error rate on simulated telephone speech ----------------------------------------------

HELD_OUT_SENTENCES: tuple[str, ...] = (
    "My internet has been really slow since yesterday morning.",
    "I never received the confirmation email for my order.",
    "Can you tell me why my bill is higher this month?",
    "The engineer did not turn up at all today.",
    "I want to return the headphones because they are faulty.",
    "Please send the replacement to my work address instead.",
    "How long will it take for the money to come back to my card?",
    "I forgot the password for my account again.",
    "The screen on my laptop is broken after one week.",
    "Could you put a note on my account so I do not have to explain again?",
    "I would like to speak to your supervisor about this complaint.",
    "The delivery driver left the parcel at the wrong house.",
    "Why was I charged a late fee when I paid on time?",
    "Can I change my plan to a cheaper one?",
    "The television keeps turning itself off every evening.",
    "I need a copy of my last three invoices for my accountant.",
)
"""Customer-service sentences written for the measurement that are not in the domain text."""

DEV_HELD_OUT_SENTENCES: tuple[str, ...] = (
    "My phone keeps dropping calls when I am at home.",
    "I was told someone would ring me back but nobody did.",
    "The parcel tracking page has not changed for five days.",
    "Can you explain what this extra charge on my statement is for?",
    "I moved house last month and my post is still going to the old address.",
    "The router lights are flashing orange and nothing works.",
    "I would like to cancel the insurance I added by mistake.",
    "Why does it say my payment failed when the money has gone?",
    "I need to update the phone number on my account.",
    "The washing machine you delivered is making a loud noise.",
    "Is there a discount if I pay for the whole year?",
    "I have been waiting on hold for forty minutes.",
    "Please close my account and send me the final bill.",
    "The app will not let me log in after the update.",
    "Can someone come out and fix the connection this week?",
    "I was charged twice for the same order yesterday.",
)
"""Sentences for choosing decoder settings (a development set): not in the domain text, nor in
:data:`HELD_OUT_SENTENCES`, which stay for the measurement."""

DEV_IN_SCRIPT_SEED = 29
"""Seed of the development set's in-script sentences (the measurement's is 11)."""


def development_sets() -> dict[str, Sequence[str]]:
    """The sentence sets decoder settings are chosen on: other script fills (a line the measurement
    also has is left out) and other held-out sentences than the measurement's
    (:func:`in_script_sentences` with seed 11, :data:`HELD_OUT_SENTENCES`)."""
    measured = set(in_script_sentences())
    return {"in_script": [line for line in in_script_sentences(seed=DEV_IN_SCRIPT_SEED) if line not in measured],
            "held_out": list(DEV_HELD_OUT_SENTENCES)}


def measurement_sets() -> dict[str, Sequence[str]]:
    """The sentence sets WER is reported on."""
    return {"in_script": in_script_sentences(), "held_out": list(HELD_OUT_SENTENCES)}


def in_script_sentences(count: int = 24, seed: int = 11) -> list[str]:
    """Customer script lines with freshly filled slots (their templates are in the domain text)."""
    from services.customer_service import simulate

    rng = np.random.default_rng(seed)
    templates = [*(line for lines in simulate.CUSTOMER_LINES.values() for line in lines),
                 *simulate.NEUTRAL_CONTENT_LINES]
    chosen = rng.choice(len(templates), size=min(count, len(templates)), replace=False)
    return [simulate.fill_slots(templates[index], rng) for index in chosen]


@dataclass(frozen=True)
class AsrScore:
    """WER and real-time factor of one recogniser on one sentence set."""

    set_name: str
    lm: str
    errors: WordErrors
    real_time_factor: float

    def as_dict(self) -> dict[str, object]:
        """Plain numbers for a report."""
        return {"set": self.set_name, "lm": self.lm, "sentences": self.errors.utterances,
                "reference_words": self.errors.reference_words, "wer": round(self.errors.wer, 3),
                "rtf": round(self.real_time_factor, 3)}


def telephone_speech(text: str, voice_index: int) -> tuple[np.ndarray, list[str]]:
    """``text`` spoken by espeak-ng (neutral prosody, a US or GB voice), through the simulated
    telephone line (8 kHz μ-law round trip), and its reference words (numbers spelled out, which
    is also what espeak-ng is given)."""
    from services.customer_service import simulate
    from services.customer_service.asr import sentence_words

    words = [word for sentence in sentence_words(text) for word in sentence]
    voice = simulate.VOICES[voice_index % 4]  # us_m3, us_f2, gb_m1, gb_f3
    samples, rate = simulate.synthesize(" ".join(words), voice, simulate.EMOTION_PROSODY["neutral"])
    return simulate.telephone_band(samples, rate), words


def measure_asr(sets: dict[str, Sequence[str]] | None = None, *, generic_words: int = 2000,
                acoustic_model: Path | None = None) -> list[AsrScore]:
    """WER and RTF of the generic and the domain language model on simulated telephone speech of
    each sentence set (default: in-script and held-out), with the configured acoustic model or the
    one in ``acoustic_model``."""
    from services.customer_service.asr import DecoderSettings, Recognizer, build_domain_lm

    sets = sets or measurement_sets()
    folder = str(acoustic_model) if acoustic_model is not None else None
    # each at its better language weight: pocketsphinx's 6.5 for the generic model (8 made it worse)
    recognizers = {"generic": Recognizer(None, DecoderSettings(lw=6.5, acoustic_model=folder)),
                   "domain": Recognizer(build_domain_lm(domain_texts(), generic_words=generic_words),
                                        DecoderSettings(acoustic_model=folder))}
    scores = []
    for set_name, sentences in sets.items():
        audio = [telephone_speech(sentence, index) for index, sentence in enumerate(sentences)]
        references = [" ".join(words) for _, words in audio]
        for lm_name, recognizer in recognizers.items():
            transcripts = [recognizer.transcribe(samples, 8000) for samples, _ in audio]
            decode_s = sum(t.decode_s for t in transcripts)
            audio_s = sum(t.audio_s for t in transcripts)
            scores.append(AsrScore(set_name, lm_name, word_errors(references, [t.text for t in transcripts]),
                                   decode_s / audio_s))
    return scores
