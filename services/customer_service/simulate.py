"""Simulated customer-service calls with ground truth, spoken by espeak-ng over a telephone line.

**Everything this module makes is simulated data, not recorded calls.** Speech is synthesised by
espeak-ng (Debian package ``espeak-ng``; ``scripts/ensure_services.sh`` installs it), a formant
synthesiser: robotic next to a human voice, so figures of a model trained or scored on these calls
are figures on simulated speech.

- **Voices** (:data:`VOICES`): ten espeak-ng accent + variant pairs (five male, five female
  variants), each with its own pitch offset. The simulated set is split by voice
  (:mod:`services.customer_service.datasets`), its stand-in for speaker independence.
- **Prosody per emotion** (:data:`EMOTION_PROSODY`): base pitch (``-p``), pitch range (SSML
  ``<prosody range>``, which espeak-ng has no command-line flag for), speed (``-s``), amplitude
  (``-a``) and word gap (``-g``), jittered per utterance (:func:`draw_prosody`). Amplitude stays at
  or below 130, above which espeak-ng clips.
- **Scripts per emotion** (:data:`CUSTOMER_LINES`, :data:`AGENT_LINES`) with slots (order numbers,
  products, minutes) filled from the seed. A share of customer turns (``neutral_text_share``) says a
  lexically neutral line (:data:`NEUTRAL_CONTENT_LINES`) in an emotional voice, so the text does
  not give every label away and fusion has something to do; the manifest says which turns those are.
- **A call** (:func:`simulate_call`): agent greeting, customer and agent turns following one of
  the :data:`SCENARIOS` (an emotional arc of the customer), agent closing; silence gaps between
  turns. Two tracks, customer (Twilio ``inbound``, AudioHook ``external``) and agent (``outbound`` /
  ``internal``), each silent while the other speaks.
- **Telephone line** (:func:`telephone_channel`): resampled to 8 kHz, optional white line noise
  (fixed level in dBFS, so quiet voices get a worse SNR), band-limited to 300-3400 Hz
  (4th-order Butterworth), G.711 μ-law (:mod:`services.customer_service.audio`).
- **Line conditions** (:class:`LineCondition`, :func:`degrade_line`): a received line worse than
  the simulator's: gain (quiet lines), white, pink or babble noise (other simulated speakers) at an
  SNR, fixed-level line noise, another band, a second μ-law pass; for training augmentation and
  robustness measurements.
- **Frames** (:func:`iter_frames`): the call as 20 ms μ-law frames (160 bytes a track), as the
  stream protocols carry them, for tests and the benchmark.
- **Files** (:func:`write_call`, :func:`read_call`, :func:`write_corpus`): raw μ-law per track, a
  stereo PCM16 WAV to listen to, and the ground truth as JSON.

Everything is a function of the seed: the same seed gives the same bytes (espeak-ng is
deterministic). The command line (:func:`main`, ``tessera simulate cs``) derives each call's seed
from (seed, index), so runs with different seeds share no call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt
from scipy.signal import butter, sosfilt

from services.customer_service.audio import AudioError, mulaw_decode, mulaw_encode, read_wav, resample
from services.customer_service.labels import EMOTIONS

TELEPHONE_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = TELEPHONE_RATE * FRAME_MS // 1000
"""μ-law bytes of one 20 ms frame of one track (160)."""
MULAW_SILENCE = 0xFF
"""μ-law code of a zero sample, used to pad the last frame."""
BAND_HZ = (300.0, 3400.0)
LINE_GAIN = 0.8
"""Scale from espeak-ng's output to the line (its peaks reach ~24000 at amplitude 100)."""
DEFAULT_NOISE_DBFS = -55.0
ROLES = ("customer", "agent")
TWILIO_TRACKS: Mapping[str, str] = {"customer": "inbound", "agent": "outbound"}
AUDIOHOOK_CHANNELS: Mapping[str, str] = {"customer": "external", "agent": "internal"}
ESPEAK_TIMEOUT_S = 20.0

_BAND_SOS = butter(4, BAND_HZ, btype="bandpass", fs=TELEPHONE_RATE, output="sos")
_TRIM_LEVEL = 64  # |sample| below this at the edges of espeak-ng's output is its lead-in/out silence


class SynthesisError(RuntimeError):
    """espeak-ng failed or produced no audio; the message says how."""


class EspeakMissing(SynthesisError):
    """espeak-ng is not installed."""


# --- voices and prosody ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Voice:
    """One simulated speaker: an espeak-ng voice with a variant, and a pitch offset of its own."""

    name: str
    espeak: str
    gender: str
    pitch_offset: int = 0


VOICES: tuple[Voice, ...] = (
    Voice("us_m3", "en-us+m3", "male", 0),
    Voice("us_f2", "en-us+f2", "female", 0),
    Voice("gb_m1", "en-gb+m1", "male", 4),
    Voice("gb_f3", "en-gb+f3", "female", -4),
    Voice("scotland_m4", "en-gb-scotland+m4", "male", -3),
    Voice("caribbean_f4", "en-029+f4", "female", 3),
    Voice("nyc_m6", "en-us-nyc+m6", "male", 2),
    Voice("rp_f5", "en-gb-x-rp+f5", "female", -2),
    Voice("lancaster_m7", "en-gb-x-gbclan+m7", "male", -5),
    Voice("us_f1", "en-us+f1", "female", 5),
)
VOICES_BY_NAME: Mapping[str, Voice] = {voice.name: voice for voice in VOICES}


@dataclass(frozen=True)
class Prosody:
    """espeak-ng settings of one utterance."""

    pitch: int
    """``-p``, 0-99 (50 is the voice's own)."""
    pitch_range: int
    """SSML ``<prosody range>`` in percent of the voice's own (100)."""
    speed: int
    """``-s``, words per minute."""
    amplitude: int
    """``-a``, 0-200 (100 default; espeak-ng clips above ~130)."""
    word_gap: int = 0
    """``-g``, pause between words in 10 ms units."""


EMOTION_PROSODY: Mapping[str, Prosody] = {
    "neutral": Prosody(pitch=50, pitch_range=100, speed=165, amplitude=90),
    "happy": Prosody(pitch=64, pitch_range=165, speed=182, amplitude=105),
    "sad": Prosody(pitch=36, pitch_range=45, speed=125, amplitude=60, word_gap=3),
    "angry": Prosody(pitch=58, pitch_range=150, speed=192, amplitude=125),
    "frustrated": Prosody(pitch=54, pitch_range=125, speed=168, amplitude=108, word_gap=1),
}
"""Centre of each emotion's prosody; :func:`draw_prosody` jitters around it."""


def draw_prosody(emotion: str, voice: Voice, rng: np.random.Generator) -> Prosody:
    """The prosody of one utterance: the emotion's centre, the voice's pitch offset, and jitter
    (pitch +-5, range and speed +-12 % / +-8 %, amplitude +-10 %, capped at 130)."""
    centre = EMOTION_PROSODY[emotion]
    return Prosody(
        pitch=int(np.clip(centre.pitch + voice.pitch_offset + rng.integers(-5, 6), 0, 99)),
        pitch_range=int(round(centre.pitch_range * rng.uniform(0.88, 1.12))),
        speed=int(round(centre.speed * rng.uniform(0.92, 1.08))),
        amplitude=int(min(130, round(centre.amplitude * rng.uniform(0.9, 1.1)))),
        word_gap=centre.word_gap,
    )


# --- scripts --------------------------------------------------------------------------------------

CUSTOMER_LINES: Mapping[str, tuple[str, ...]] = {
    "neutral": (
        "Hi, I'm calling to check the status of order {order}.",
        "I'd like to update the billing address on my account.",
        "Could you tell me when my {product} will be delivered?",
        "I have a question about the charges on this month's bill.",
        "I need to change the delivery date for my order.",
        "Can you confirm which plan I'm currently on?",
        "I'd like to know how to reset my password.",
        "Okay, I understand. What's the next step?",
        "I was told to call this number about a refund for {amount} dollars.",
        "Could you send me a copy of the invoice by email?",
        "Is the {product} covered by the warranty?",
        "Alright, I can wait a moment while you check.",
    ),
    "happy": (
        "That's wonderful, thank you so much for your help!",
        "Perfect, that's exactly what I needed. You've been great.",
        "Oh, that's fantastic news, I really appreciate it!",
        "Great, the {product} arrived and it works beautifully.",
        "Thank you, you've made my day, honestly!",
        "Brilliant, that was so much easier than I expected.",
        "Excellent, I'm really happy with how quickly you sorted this out.",
        "Lovely, thanks again, you've been super helpful!",
        "Wow, that's a great deal, I'll definitely take it!",
        "Amazing, the refund is already in my account. Thank you!",
        "I'm delighted, everything is working perfectly now.",
        "Thanks a lot, I'll recommend you to my friends!",
    ),
    "sad": (
        "I'm calling because my husband passed away last month, and the account was in his name.",
        "I lost my job, and I just can't afford the payments anymore.",
        "The {product} was a gift for my mother, and it arrived broken.",
        "I've been really unwell, so I missed the last two payments.",
        "I'm sorry, this has been a very hard week for me.",
        "I was looking forward to this for so long, and now it's cancelled.",
        "I don't know what to do anymore, nothing seems to work out.",
        "My dog died, so I need to cancel the pet insurance.",
        "I feel so alone dealing with all of this paperwork.",
        "It was the last photo of my father on that phone, and now it's gone.",
        "I'm just so disappointed, I really hoped it would be different.",
        "I'm sorry, give me a moment, this is difficult to talk about.",
    ),
    "angry": (
        "This is absolutely unacceptable! I want to speak to a manager right now!",
        "You charged me {amount} dollars twice and nobody has fixed it!",
        "I'm furious! This is the third time I've called about this!",
        "Don't tell me to calm down! Just give me my money back!",
        "Your company is a complete joke, I'm cancelling everything today!",
        "I've been on hold for {minutes} minutes! This is ridiculous!",
        "Stop reading me your script and fix the problem!",
        "If this isn't sorted today, I'm going to report you!",
        "You people lied to me! You promised it would arrive last week!",
        "I am sick and tired of your excuses! Fix it now!",
        "Cancel my account immediately! I'm done with you!",
        "How dare you charge me for something I never ordered!",
    ),
    "frustrated": (
        "I've already explained this twice, why does nobody write it down?",
        "Ugh, I've restarted the {product} five times and it still doesn't work.",
        "Seriously? You're transferring me again?",
        "I've been waiting {days} days for a reply, this is getting really tiresome.",
        "Look, I just want this to work, is that too much to ask?",
        "This is the fourth agent I've spoken to today.",
        "Why is it so complicated just to get a simple refund?",
        "I keep getting the same error message, over and over again.",
        "I did everything the website said and it still failed.",
        "Honestly, I'm running out of patience with this.",
        "You said someone would call me back, and nobody did.",
        "Every time I call, I get a different answer.",
    ),
}
"""Customer turns whose words fit their emotion."""

NEUTRAL_CONTENT_LINES: tuple[str, ...] = (
    "My order number is {order}.",
    "I'm calling about my {product}.",
    "The account is under the name {name}.",
    "I placed the order {days} days ago.",
    "It was {amount} dollars.",
    "The reference number is {order}.",
    "I'm calling about this month's bill.",
    "Yes, the address is the same as before.",
    "The {product} was delivered on Monday.",
    "My phone number ends in {digits}.",
)
"""Lexically neutral customer turns, said in any emotion's voice (``text_source: neutral_text``)."""

AGENT_LINES: Mapping[str, tuple[str, ...]] = {
    "greeting": (
        "Thank you for calling Tessera support, my name is {agent}. How can I help you today?",
        "Good morning, you're through to customer service, this is {agent} speaking.",
        "Hello, thanks for holding. My name is {agent}, what can I do for you?",
    ),
    "inform": (
        "Let me look that up for you. Can I have your order number, please?",
        "I can see your account here. Give me one moment to check.",
        "Your {product} is scheduled to arrive within {days} days.",
        "I've updated that for you, you should get a confirmation email shortly.",
        "Could you confirm the name on the account, please?",
    ),
    "empathise": (
        "I'm really sorry about that, I completely understand your frustration.",
        "I apologise for the trouble. Let me see what I can do right now.",
        "I'm so sorry to hear that. Let's sort this out together.",
        "I understand, and I'm sorry you've had to call again.",
        "That sounds really difficult. I'll make this as easy as I can.",
    ),
    "resolve": (
        "I've issued a refund of {amount} dollars, it should appear in three to five days.",
        "I've escalated this to my supervisor and added a credit to your account.",
        "I've sent a replacement {product} by express delivery, free of charge.",
        "I've waived the late fee and set up a payment plan for you.",
    ),
    "closing": (
        "Is there anything else I can help you with today?",
        "Thank you for your patience. Have a lovely day!",
        "You're welcome. Thanks for calling, and take care.",
    ),
}
"""Agent turns by the phase of the call."""

SCENARIOS: Mapping[str, tuple[str, ...]] = {
    "routine": ("neutral", "neutral", "happy"),
    "satisfied": ("neutral", "happy", "happy"),
    "escalating": ("frustrated", "frustrated", "angry", "angry"),
    "recovered": ("frustrated", "angry", "neutral", "happy"),
    "bereavement": ("sad", "sad", "neutral"),
    "disappointed": ("sad", "frustrated", "neutral"),
}
"""Emotional arcs of the customer: one emotion per customer turn."""

_PRODUCTS = ("router", "phone", "laptop", "washing machine", "headphones", "smart speaker", "television")
_NAMES = ("Jordan Smith", "Priya Patel", "Maria Garcia", "Chen Wei", "Sam O'Brien", "Amara Okafor")
_AGENTS = ("Alex", "Taylor", "Morgan", "Jamie", "Casey")


def fill_slots(template: str, rng: np.random.Generator) -> str:
    """A script line with its slots (order, product, amount, minutes, days, name, digits, agent)
    filled from ``rng``."""
    values = {
        "order": str(rng.integers(10000, 99999)),
        "product": str(rng.choice(_PRODUCTS)),
        "amount": str(rng.integers(12, 480)),
        "minutes": str(rng.integers(20, 95)),
        "days": str(rng.integers(3, 15)),
        "name": str(rng.choice(_NAMES)),
        "digits": " ".join(str(d) for d in rng.integers(0, 10, size=4)),
        "agent": str(rng.choice(_AGENTS)),
    }
    return template.format(**values)


def customer_line(emotion: str, rng: np.random.Generator, neutral_text_share: float) -> tuple[str, str]:
    """Text of one customer turn in ``emotion`` and where it came from (``script`` or ``neutral_text``)."""
    if emotion != "neutral" and rng.random() < neutral_text_share:
        return fill_slots(str(rng.choice(NEUTRAL_CONTENT_LINES)), rng), "neutral_text"
    return fill_slots(str(rng.choice(CUSTOMER_LINES[emotion])), rng), "script"


# --- synthesis ------------------------------------------------------------------------------------

def espeak_path() -> str | None:
    """Path of the ``espeak-ng`` executable, or ``None`` when it is not installed."""
    return shutil.which("espeak-ng")


def synthesize(text: str, voice: Voice, prosody: Prosody) -> tuple[npt.NDArray[np.int16], int]:
    """Speak ``text`` with espeak-ng: mono ``int16`` samples and their rate (22050 Hz), the
    synthesiser's lead-in and trailing silence trimmed. Raises :class:`EspeakMissing` or
    :class:`SynthesisError`."""
    executable = espeak_path()
    if executable is None:
        raise EspeakMissing("espeak-ng is not installed (Debian package espeak-ng; "
                            "scripts/ensure_services.sh installs it)")
    if not text.strip():
        raise SynthesisError("nothing to say: the text is empty")
    ssml = f'<speak><prosody range="{prosody.pitch_range}%">{escape(text)}</prosody></speak>'
    with tempfile.TemporaryDirectory(prefix="tessera-espeak-") as folder:
        # -w, not --stdout: a streamed WAV header declares a bogus 0x7ffff000-byte data chunk
        output = Path(folder) / "speech.wav"
        command = [executable, "-m", "-z", "-v", voice.espeak, "-p", str(prosody.pitch), "-s", str(prosody.speed),
                   "-a", str(prosody.amplitude), "-g", str(prosody.word_gap), "-w", str(output), "--stdin"]
        try:
            done = subprocess.run(command, input=ssml.encode(), capture_output=True, timeout=ESPEAK_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired as error:
            raise SynthesisError(f"espeak-ng took over {ESPEAK_TIMEOUT_S:.0f} s on {text[:40]!r}") from error
        if done.returncode != 0 or not output.exists():
            raise SynthesisError(f"espeak-ng exited {done.returncode} (voice {voice.espeak}): "
                                 f"{done.stderr.decode(errors='replace').strip()[:300]}")
        data = output.read_bytes()
    try:
        audio = read_wav(data)
    except AudioError as error:
        raise SynthesisError(f"espeak-ng wrote unreadable audio for {text[:40]!r}: {error.detail}") from error
    return _trim(audio.samples), audio.sample_rate


def _trim(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) >= _TRIM_LEVEL)
    if loud.size == 0:
        raise SynthesisError("espeak-ng produced only silence")
    return samples[loud[0]:loud[-1] + 1]


# --- the telephone line ---------------------------------------------------------------------------

def to_line(samples: npt.NDArray[Any], sample_rate: int) -> npt.NDArray[np.float32]:
    """Speech as float samples at 8 kHz on the line's int16 scale (resampled, :data:`LINE_GAIN`)."""
    return resample(samples.astype(np.float32), sample_rate, TELEPHONE_RATE) * np.float32(LINE_GAIN)


def telephone_channel(line: npt.NDArray[Any], sample_rate: int = TELEPHONE_RATE, *,
                      rng: np.random.Generator | None = None, noise_dbfs: float | None = None) -> bytes:
    """Audio through a simulated telephone line: resampled to 8 kHz, white line noise at
    ``noise_dbfs`` (RMS re full scale; needs ``rng``), band-limited to 300-3400 Hz, G.711 μ-law.
    Samples are on the int16 scale (int16 or float)."""
    signal = resample(np.asarray(line, dtype=np.float32), sample_rate, TELEPHONE_RATE)
    if noise_dbfs is not None:
        if rng is None:
            raise ValueError("line noise needs an rng (the simulation is deterministic from its seed)")
        signal = signal + rng.normal(0.0, 32768.0 * 10 ** (noise_dbfs / 20), size=signal.size).astype(np.float32)
    return mulaw_encode(sosfilt(_BAND_SOS, signal))


def telephone_band(samples: npt.NDArray[Any], sample_rate: int, *, rng: np.random.Generator | None = None,
                   noise_dbfs: float | None = None) -> npt.NDArray[np.int16]:
    """:func:`telephone_channel` decoded again: the int16 8 kHz samples a listener on the line hears."""
    return mulaw_decode(telephone_channel(samples, sample_rate, rng=rng, noise_dbfs=noise_dbfs))


# --- line conditions (augmentation and robustness tests) -----------------------------------------

NOISE_KINDS = ("white", "pink", "babble")
"""Additive noise :func:`degrade_line` makes: white, pink (-3 dB an octave) and babble (several
other talkers summed)."""


@dataclass(frozen=True)
class LineCondition:
    """How a received telephone signal differs from the clean line: a gain on the speech, additive
    noise at an SNR, fixed-level white line noise, the line's band and its μ-law coding.

    Applied by :func:`degrade_line` in that order to 8 kHz speech already on the line (a second
    μ-law pass is a tandem codec, as on calls bridged through two networks)."""

    gain_db: float = 0.0
    """Gain on the speech (negative: a quiet line or a distant talker)."""
    noise: str | None = None
    """One of :data:`NOISE_KINDS`, or ``None`` for no additive noise."""
    snr_db: float = 20.0
    """Speech (active level of the gained speech) to ``noise`` ratio."""
    line_noise_dbfs: float | None = None
    """White line noise at this RMS re full scale, whatever the speech level (as the simulator's line)."""
    band_hz: tuple[float, float] = BAND_HZ
    mulaw: bool = True

    def describe(self) -> str:
        """A short human-readable name (``gain -20 dB, babble 10 dB SNR``)."""
        parts = [f"gain {self.gain_db:+.0f} dB"] if self.gain_db else []
        if self.noise:
            parts.append(f"{self.noise} {self.snr_db:.0f} dB SNR")
        if self.line_noise_dbfs is not None:
            parts.append(f"line noise {self.line_noise_dbfs:.0f} dBFS")
        if tuple(self.band_hz) != BAND_HZ:
            parts.append(f"band {self.band_hz[0]:.0f}-{self.band_hz[1]:.0f} Hz")
        return ", ".join(parts) or "as received"


def active_level_dbfs(samples: npt.ArrayLike, sample_rate: int = TELEPHONE_RATE, *, frame_ms: float = 20.0,
                      range_db: float = 35.0) -> float:
    """Active speech level in dBFS (int16 scale): the mean power of the 20 ms frames within
    ``range_db`` of the loudest one, so pauses do not lower it (a simple stand-in for ITU-T P.56).
    ``-inf`` for digital silence."""
    signal = np.asarray(samples, dtype=np.float64)
    size = max(1, int(sample_rate * frame_ms / 1000))
    if signal.size < size:
        signal = np.pad(signal, (0, size - signal.size))
    power = np.mean(signal[: signal.size // size * size].reshape(-1, size) ** 2, axis=1)
    if not np.any(power > 0):
        return float("-inf")
    active = power[power >= power.max() * 10 ** (-range_db / 10)]
    return float(10 * np.log10(active.mean() / 32768.0 ** 2))


def pink_noise(size: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Pink noise (power falling 3 dB an octave) of unit RMS, shaped from white noise in the
    frequency domain."""
    spectrum = np.fft.rfft(rng.normal(size=max(size, 2)))
    spectrum[1:] /= np.sqrt(np.arange(1, spectrum.size))
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n=max(size, 2))[:size]
    return (noise / (np.sqrt(np.mean(noise ** 2)) or 1.0)).astype(np.float32)


def babble_noise(size: int, talkers: Sequence[npt.NDArray[Any]], rng: np.random.Generator,
                 count: tuple[int, int] = (3, 6)) -> npt.NDArray[np.float32]:
    """Babble of unit RMS: ``count`` (drawn, inclusive) of ``talkers`` (8 kHz speech of other
    speakers), each looped to ``size`` from a random start and brought to the same active level,
    summed."""
    if not talkers:
        raise ValueError("babble needs other talkers' speech")
    mix = np.zeros(size, dtype=np.float64)
    chosen = rng.choice(len(talkers), size=min(len(talkers), int(rng.integers(count[0], count[1] + 1))),
                        replace=False)
    for index in chosen:
        talker = np.asarray(talkers[int(index)], dtype=np.float64)
        looped = np.resize(np.roll(talker, -int(rng.integers(0, talker.size))), size)
        level = active_level_dbfs(looped)
        if np.isfinite(level):
            mix += looped / (32768.0 * 10 ** (level / 20))
    return (mix / (np.sqrt(np.mean(mix ** 2)) or 1.0)).astype(np.float32)


@lru_cache(maxsize=64)
def _band_filter(low: float, high: float) -> npt.NDArray[np.float64]:
    return np.asarray(butter(4, (low, high), btype="bandpass", fs=TELEPHONE_RATE, output="sos"))


def degrade_line(samples: npt.ArrayLike, condition: LineCondition, rng: np.random.Generator, *,
                 talkers: Sequence[npt.NDArray[Any]] = ()) -> npt.NDArray[np.int16]:
    """8 kHz speech (int16 scale) as received over a line in ``condition``: gained, additive noise
    at ``snr_db`` below the gained speech's active level (``talkers``: other speakers' 8 kHz speech
    for babble), white line noise, band-limited (4th-order Butterworth) and μ-law coded."""
    signal = np.asarray(samples, dtype=np.float64) * 10 ** (condition.gain_db / 20)
    if condition.noise is not None:
        if condition.noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {condition.noise!r}; known: {', '.join(NOISE_KINDS)}")
        level = active_level_dbfs(signal)
        if np.isfinite(level):
            unit = (rng.normal(size=signal.size) if condition.noise == "white" else
                    pink_noise(signal.size, rng) if condition.noise == "pink" else
                    babble_noise(signal.size, talkers, rng))
            signal = signal + unit * 32768.0 * 10 ** ((level - condition.snr_db) / 20)
    if condition.line_noise_dbfs is not None:
        signal = signal + rng.normal(0.0, 32768.0 * 10 ** (condition.line_noise_dbfs / 20), size=signal.size)
    low, high = condition.band_hz
    if (low, high) != BAND_HZ or condition.noise is not None or condition.line_noise_dbfs is not None:
        signal = sosfilt(_band_filter(float(low), float(high)), signal)
    if condition.mulaw:
        return mulaw_decode(mulaw_encode(signal))
    return np.clip(np.rint(signal), -32768, 32767).astype(np.int16)


# --- single utterances (the training corpus) ------------------------------------------------------

@dataclass(frozen=True)
class SimulatedClip:
    """One simulated utterance with its ground truth (simulated data)."""

    clip_id: str
    voice: str
    gender: str
    emotion: str
    text: str
    text_source: str
    prosody: Prosody
    samples: npt.NDArray[np.int16] = field(repr=False)
    sample_rate: int

    def truth(self) -> dict[str, Any]:
        """The clip's labels and settings as JSON values (no audio)."""
        return {"clip_id": self.clip_id, "voice": self.voice, "gender": self.gender, "emotion": self.emotion,
                "text": self.text, "text_source": self.text_source, "prosody": asdict(self.prosody),
                "sample_rate": self.sample_rate, "num_samples": int(self.samples.size), "simulated": True}


def simulate_clip(clip_id: str, emotion: str, voice: Voice, rng: np.random.Generator, *, telephone: bool = True,
                  noise_dbfs: float | None = DEFAULT_NOISE_DBFS, neutral_text_share: float = 0.25) -> SimulatedClip:
    """One customer utterance in ``emotion`` by ``voice``: over the telephone line (8 kHz, μ-law
    round trip) when ``telephone``, else as espeak-ng made it (22050 Hz)."""
    _check_emotion(emotion)
    text, source = customer_line(emotion, rng, neutral_text_share)
    prosody = draw_prosody(emotion, voice, rng)
    samples, rate = synthesize(text, voice, prosody)
    if telephone:
        samples = telephone_band(to_line(samples, rate), TELEPHONE_RATE, rng=rng, noise_dbfs=noise_dbfs)
        rate = TELEPHONE_RATE
    return SimulatedClip(clip_id, voice.name, voice.gender, emotion, text, source, prosody, samples, rate)


def simulate_corpus(seed: int, per_voice_emotion: int, *, voices: Sequence[Voice] = VOICES,
                    emotions: Sequence[str] = EMOTIONS, telephone: bool = True,
                    noise_dbfs: float | None = DEFAULT_NOISE_DBFS, neutral_text_share: float = 0.25,
                    workers: int = 1) -> list[SimulatedClip]:
    """``per_voice_emotion`` clips for every (voice, emotion), ordered by voice, emotion, number.

    Each clip's randomness comes from (seed, voice name, emotion, number), so a clip does not
    change when other voices or emotions are added, and ``workers`` (espeak-ng processes run at
    once) changes nothing but the time taken.
    """
    if per_voice_emotion < 0:
        raise ValueError(f"per_voice_emotion must be >= 0, got {per_voice_emotion}")
    for emotion in emotions:
        _check_emotion(emotion)
    jobs = [(voice, emotion, number) for voice in voices for emotion in emotions for number in range(per_voice_emotion)]

    def make(job: tuple[Voice, str, int]) -> SimulatedClip:
        voice, emotion, number = job
        rng = np.random.default_rng(_derived_seed(seed, voice.name, emotion, number))
        clip_id = f"sim-{seed}-{voice.name}-{emotion}-{number:04d}"
        return simulate_clip(clip_id, emotion, voice, rng, telephone=telephone, noise_dbfs=noise_dbfs,
                             neutral_text_share=neutral_text_share)

    if workers <= 1:
        return [make(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # the work is in espeak-ng subprocesses
        return list(pool.map(make, jobs))


# --- calls ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UtteranceTruth:
    """Ground truth of one utterance of a simulated call."""

    index: int
    role: str
    voice: str
    emotion: str
    text: str
    text_source: str
    start_ms: int
    end_ms: int
    prosody: Prosody


@dataclass(frozen=True)
class SimulatedCall:
    """A simulated call: one μ-law track (8 kHz) per role, of equal length, and its ground truth."""

    call_id: str
    seed: int
    scenario: str
    voices: Mapping[str, str]
    tracks: Mapping[str, bytes] = field(repr=False)
    utterances: tuple[UtteranceTruth, ...]
    noise_dbfs: float | None

    @property
    def duration_ms(self) -> int:
        """Length of the call."""
        return len(next(iter(self.tracks.values()))) * 1000 // TELEPHONE_RATE

    def pcm(self, role: str) -> npt.NDArray[np.int16]:
        """One track decoded to int16 8 kHz samples."""
        return mulaw_decode(self.tracks[role])

    def manifest(self) -> dict[str, Any]:
        """The call's ground truth as JSON values (no audio)."""
        return {
            "call_id": self.call_id, "seed": self.seed, "scenario": self.scenario, "simulated": True,
            "sample_rate": TELEPHONE_RATE, "encoding": "mulaw", "duration_ms": self.duration_ms,
            "noise_dbfs": self.noise_dbfs, "voices": dict(self.voices),
            "tracks": {role: {"twilio": TWILIO_TRACKS[role], "audiohook": AUDIOHOOK_CHANNELS[role]}
                       for role in self.tracks},
            "utterances": [{**asdict(u), "prosody": asdict(u.prosody)} for u in self.utterances],
        }


@dataclass(frozen=True)
class _Turn:
    role: str
    emotion: str
    text: str
    text_source: str


def plan_turns(scenario: str, rng: np.random.Generator, neutral_text_share: float = 0.25) -> list[_Turn]:
    """The turns of a call following ``scenario``: greeting, then each customer turn followed by the
    agent's answer (empathy after a negative turn, then a resolution once the arc turns), closing."""
    arc = SCENARIOS[scenario]
    turns = [_agent_turn("greeting", _agent_emotion(rng), rng)]
    for position, emotion in enumerate(arc):
        text, source = customer_line(emotion, rng, neutral_text_share)
        turns.append(_Turn("customer", emotion, text, source))
        if position == len(arc) - 1:
            break
        troubled, still_troubled = emotion in _TROUBLED, arc[position + 1] in _TROUBLED
        phase = "empathise" if troubled and still_troubled else "resolve" if troubled else "inform"
        turns.append(_agent_turn(phase, "neutral", rng))
    turns.append(_agent_turn("closing", _agent_emotion(rng), rng))
    return turns


_TROUBLED = frozenset({"angry", "frustrated", "sad"})


def _agent_turn(phase: str, emotion: str, rng: np.random.Generator) -> _Turn:
    return _Turn("agent", emotion, fill_slots(str(rng.choice(AGENT_LINES[phase])), rng), "script")


def _agent_emotion(rng: np.random.Generator) -> str:
    return "happy" if rng.random() < 0.5 else "neutral"


def simulate_call(seed: int, *, scenario: str | None = None, voices: Sequence[Voice] = VOICES,
                  noise_dbfs: float | None = DEFAULT_NOISE_DBFS, neutral_text_share: float = 0.25,
                  gap_ms: tuple[int, int] = (250, 1200)) -> SimulatedCall:
    """One simulated call, a function of ``seed``: a scenario (drawn unless given), an agent and a
    customer voice drawn from ``voices`` (distinct when there are two or more), the turns of
    :func:`plan_turns` placed on their speakers' tracks with silence gaps drawn from ``gap_ms``,
    and the line (:func:`telephone_channel`) applied to each track."""
    rng = np.random.default_rng(seed)
    if scenario is None:
        scenario = str(rng.choice(sorted(SCENARIOS)))
    elif scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(sorted(SCENARIOS))}")
    if not voices:
        raise ValueError("simulate_call needs at least one voice")
    chosen = rng.choice(len(voices), size=2, replace=len(voices) < 2)
    cast = {"agent": voices[int(chosen[0])], "customer": voices[int(chosen[1])]}
    turns = plan_turns(scenario, rng, neutral_text_share)
    spoken = []
    for turn in turns:
        prosody = draw_prosody(turn.emotion, cast[turn.role], rng)
        samples, rate = synthesize(turn.text, cast[turn.role], prosody)
        spoken.append((turn, prosody, to_line(samples, rate)))
    cursor = int(rng.integers(300, 700)) * TELEPHONE_RATE // 1000
    placed: list[tuple[int, npt.NDArray[np.float32]]] = []
    truths = []
    for index, (turn, prosody, line) in enumerate(spoken):
        placed.append((cursor, line))
        truths.append(UtteranceTruth(index, turn.role, cast[turn.role].name, turn.emotion, turn.text, turn.text_source,
                                     _ms(cursor), _ms(cursor + line.size), prosody))
        cursor += line.size + int(rng.integers(gap_ms[0], gap_ms[1] + 1)) * TELEPHONE_RATE // 1000
    length = cursor + TELEPHONE_RATE // 2
    tracks = {}
    for role in ROLES:
        track = np.zeros(length, dtype=np.float32)
        for (start, line), truth in zip(placed, truths, strict=True):
            if truth.role == role:
                track[start:start + line.size] += line
        tracks[role] = telephone_channel(track, rng=rng, noise_dbfs=noise_dbfs)
    return SimulatedCall(call_id=twilio_call_sid(seed), seed=seed, scenario=scenario,
                         voices={role: voice.name for role, voice in cast.items()}, tracks=tracks,
                         utterances=tuple(truths), noise_dbfs=noise_dbfs)


def twilio_call_sid(seed: int) -> str:
    """A Twilio-shaped call SID (``CA`` + 32 hex digits) derived from the seed."""
    return "CA" + hashlib.sha256(f"tessera-cs-simulated-call:{seed}".encode()).hexdigest()[:32]


def _ms(samples: int) -> int:
    return samples * 1000 // TELEPHONE_RATE


# --- streaming ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MediaFrame:
    """20 ms of a call: ``FRAME_BYTES`` μ-law bytes for each track asked for."""

    index: int
    timestamp_ms: int
    payloads: Mapping[str, bytes]

    def interleaved(self, roles: Sequence[str]) -> bytes:
        """The tracks interleaved sample by sample in ``roles`` order (AudioHook's multi-channel PCMU)."""
        channels = [np.frombuffer(self.payloads[role], dtype=np.uint8) for role in roles]
        return np.stack(channels, axis=1).tobytes()


def iter_frames(call: SimulatedCall, roles: Sequence[str] = ("customer",), *,
                frame_bytes: int = FRAME_BYTES) -> Iterator[MediaFrame]:
    """The call as consecutive μ-law frames of ``frame_bytes`` per track (20 ms at 8 kHz), for one
    or two tracks; the last frame is padded with μ-law silence. Not paced: the caller sleeps."""
    if not roles:
        raise ValueError("iter_frames needs at least one track")
    unknown = [role for role in roles if role not in call.tracks]
    if unknown:
        raise ValueError(f"no track {unknown[0]!r} in the call; it has {', '.join(call.tracks)}")
    if frame_bytes <= 0:
        raise ValueError(f"frame_bytes must be positive, got {frame_bytes}")
    length = len(call.tracks[roles[0]])
    for index, start in enumerate(range(0, length, frame_bytes)):
        payloads = {role: call.tracks[role][start:start + frame_bytes].ljust(frame_bytes, bytes([MULAW_SILENCE]))
                    for role in roles}
        yield MediaFrame(index, start * 1000 // TELEPHONE_RATE, payloads)


# --- files ----------------------------------------------------------------------------------------

def write_wav(path: Path, channels: Sequence[npt.NDArray[np.int16]], sample_rate: int) -> None:
    """16-bit PCM WAV with one channel per array (equal lengths)."""
    frames = np.stack([np.asarray(c, dtype="<i2") for c in channels], axis=1)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(len(channels))
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(frames.tobytes())


def write_call(call: SimulatedCall, folder: Path) -> list[Path]:
    """``<call_id>.<role>.ulaw`` (raw μ-law per track), ``<call_id>.wav`` (PCM16, channel 0 the
    customer, 1 the agent) and ``<call_id>.json`` (ground truth) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for role, track in call.tracks.items():
        path = folder / f"{call.call_id}.{role}.ulaw"
        path.write_bytes(track)
        paths.append(path)
    wav = folder / f"{call.call_id}.wav"
    write_wav(wav, [call.pcm(role) for role in ROLES], TELEPHONE_RATE)
    manifest = folder / f"{call.call_id}.json"
    manifest.write_text(json.dumps(call.manifest(), indent=1))
    return [*paths, wav, manifest]


def read_call(manifest: Path) -> SimulatedCall:
    """A call written by :func:`write_call`, from its ``<call_id>.json`` (the ``.ulaw`` tracks beside it)."""
    try:
        truth = json.loads(manifest.read_text())
        tracks = {role: (manifest.parent / f"{truth['call_id']}.{role}.ulaw").read_bytes() for role in truth["tracks"]}
        utterances = tuple(UtteranceTruth(**{**u, "prosody": Prosody(**u["prosody"])}) for u in truth["utterances"])
        return SimulatedCall(call_id=truth["call_id"], seed=truth["seed"], scenario=truth["scenario"],
                             voices=truth["voices"], tracks=tracks, utterances=utterances,
                             noise_dbfs=truth["noise_dbfs"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest}: not a simulated call written by write_call ({error})") from error


CORPUS_MANIFEST = "manifest.json"


def write_corpus(clips: Sequence[SimulatedClip], folder: Path, *, seed: int) -> Path:
    """Each clip as ``clips/<clip_id>.wav`` and their ground truth in ``manifest.json``."""
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    entries = []
    for clip in clips:
        relative = f"clips/{clip.clip_id}.wav"
        write_wav(folder / relative, [clip.samples], clip.sample_rate)
        entries.append({"path": relative, **clip.truth()})
    manifest = folder / CORPUS_MANIFEST
    manifest.write_text(json.dumps({"simulated": True, "seed": seed, "generator": "espeak-ng",
                                    "clips": entries}, indent=1))
    return manifest


# --- helpers and command line ---------------------------------------------------------------------

def _check_emotion(emotion: str) -> None:
    if emotion not in EMOTION_PROSODY:
        raise ValueError(f"unknown emotion {emotion!r}; known: {', '.join(EMOTIONS)}")


def _derived_seed(seed: int, *parts: str | int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def call_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th call of a run with ``seed``."""
    return _derived_seed(seed, "call", index)


def pick_voices(names: Sequence[str] | None) -> tuple[Voice, ...]:
    """The voices named (all of :data:`VOICES` for ``None``); ``ValueError`` naming an unknown one."""
    if not names:
        return VOICES
    unknown = [name for name in names if name not in VOICES_BY_NAME]
    if unknown:
        raise ValueError(f"unknown voice {unknown[0]!r}; known: {', '.join(VOICES_BY_NAME)}")
    return tuple(VOICES_BY_NAME[name] for name in names)


def main(argv: list[str] | None = None) -> int:
    """``tessera simulate cs``: write simulated customer-service calls (``calls``) or a labelled
    corpus of single customer utterances (``utterances``), with ground truth. Simulated speech
    (espeak-ng), not recorded calls."""
    parser = argparse.ArgumentParser(prog="tessera simulate cs", description=main.__doc__)
    parser.add_argument("kind", choices=("calls", "utterances"))
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1, help="calls to write (calls)")
    parser.add_argument("--per-voice-emotion", type=int, default=2, help="clips per voice and emotion (utterances)")
    parser.add_argument("--voices", default="", help=f"comma-separated subset of {', '.join(VOICES_BY_NAME)}")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help="calls: one scenario for all (default: drawn)")
    parser.add_argument("--noise-dbfs", type=float, default=DEFAULT_NOISE_DBFS, help="line noise; 'nan' for none")
    parser.add_argument("--clean", action="store_true", help="utterances: no telephone line (22050 Hz as synthesised)")
    parser.add_argument("--workers", type=int, default=1, help="espeak-ng processes at once (utterances)")
    args = parser.parse_args(argv)
    try:
        voices = pick_voices([name.strip() for name in args.voices.split(",") if name.strip()])
    except ValueError as error:
        parser.error(str(error))
    noise = None if np.isnan(args.noise_dbfs) else args.noise_dbfs
    try:
        if args.kind == "calls":
            _write_calls(args.out, args.seed, args.count, voices, args.scenario, noise)
        else:
            _write_utterances(args, voices, noise)
    except SynthesisError as error:
        parser.exit(1, f"tessera simulate cs: {error}\n")
    return 0


def _write_calls(out: Path, seed: int, count: int, voices: Sequence[Voice], scenario: str | None,
                 noise: float | None) -> None:
    for index in range(count):
        call = simulate_call(call_seed(seed, index), scenario=scenario, voices=voices, noise_dbfs=noise)
        write_call(call, out)
        labels = " ".join(f"{u.role[0]}:{u.emotion}" for u in call.utterances)
        print(f"{out / call.call_id}: {call.scenario}, {call.duration_ms / 1000:.1f} s, "
              f"{len(call.utterances)} utterances ({labels}) (simulated)")


def _write_utterances(args: argparse.Namespace, voices: Sequence[Voice], noise: float | None) -> None:
    started = time.perf_counter()
    clips = simulate_corpus(args.seed, args.per_voice_emotion, voices=voices, telephone=not args.clean,
                            noise_dbfs=noise, workers=args.workers)
    manifest = write_corpus(clips, args.out, seed=args.seed)
    seconds = sum(clip.samples.size / clip.sample_rate for clip in clips)
    print(f"{manifest}: {len(clips)} clips, {seconds:.0f} s of simulated speech, "
          f"in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
