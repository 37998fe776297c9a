"""Call audio in: G.711 μ-law, resampling and the upload formats (WAV, Sun .au, FLAC, raw μ-law).

μ-law follows the G.711 reference implementation (Sun's ``g711.c``, which CPython's ``audioop``
also follows): encoding quantises the 16-bit sample to 14 bits, clips the magnitude at 8159 and
adds the bias 33 before finding the segment; decoding yields the segment midpoints in 16-bit
range (±32124 at the extremes). Both directions are table look-ups (256 and 65536 entries), so a
20 ms Twilio frame costs a single numpy indexing.

Uploads are recognised by their magic bytes (a declared content type only matters for headerless
μ-law). Samples come out as mono ``int16``; several channels are averaged. Every refusal is an
:class:`AudioError` carrying a machine-readable ``reason``: :class:`UnsupportedAudio` (415) for a
format or encoding this service does not read, :class:`InvalidAudio` (422) for one it reads whose
content is wrong (truncated, an out-of-range sample rate, no samples).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.signal import resample_poly

from shared.errors import ProblemError, UnprocessableContent, UnsupportedMediaType

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
TELEPHONE_RATE = 8000

_MULAW_BIAS = 0x84
_MULAW_CLIP_14BIT = 8159
_SEGMENT_ENDS_14BIT = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_ALAW = 0x0006
_WAVE_FORMAT_MULAW = 0x0007
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_WAVE_FORMAT_NAMES = {0x0002: "MS ADPCM", 0x0003: "IEEE float", _WAVE_FORMAT_ALAW: "A-law",
                      0x0011: "IMA ADPCM", 0x0055: "MPEG layer 3"}
_STREAMING_SIZES = (0, 0xFFFFFFFF)  # a WAV written while streaming leaves its sizes unset

_AU_ENCODING_MULAW = 1
_AU_ENCODING_PCM16 = 3

MULAW_CONTENT_TYPES = frozenset({"audio/basic", "audio/pcmu", "audio/x-mulaw", "audio/mulaw", "audio/x-ulaw"})


class AudioError(ProblemError):
    """Audio this service cannot use; ``reason`` says why in one machine-readable word."""

    def __init__(self, detail: str, *, reason: str, **extensions: Any) -> None:
        super().__init__(detail, reason=reason, **extensions)
        self.reason = reason


class UnsupportedAudio(AudioError, UnsupportedMediaType):
    """A container or encoding this service does not decode (415)."""


class InvalidAudio(AudioError, UnprocessableContent):
    """Audio in a supported format whose content is unusable: truncated, bad header, wrong rate (422)."""


@dataclass(frozen=True)
class Audio:
    """Decoded audio: mono ``int16`` samples at ``sample_rate``, and what they were decoded from."""

    samples: npt.NDArray[np.int16]
    sample_rate: int
    source_format: str
    source_channels: int = 1

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


# --- G.711 μ-law -----------------------------------------------------------------------------------

def _build_decode_table() -> npt.NDArray[np.int16]:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((codes & 0x0F) << 3) + _MULAW_BIAS) << ((codes & 0x70) >> 4)
    linear = np.where(codes & 0x80, _MULAW_BIAS - magnitude, magnitude - _MULAW_BIAS)
    return linear.astype(np.int16)


def _build_encode_table() -> npt.NDArray[np.uint8]:
    """Code of every int16 value, indexed by the value's bit pattern as uint16."""
    pcm14 = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32) >> 2
    mask = np.where(pcm14 < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm14), _MULAW_CLIP_14BIT) + (_MULAW_BIAS >> 2)
    segment = np.searchsorted(_SEGMENT_ENDS_14BIT, magnitude, side="left")
    code = (segment << 4) | ((magnitude >> np.minimum(segment + 1, 8)) & 0x0F)
    code = np.where(segment >= len(_SEGMENT_ENDS_14BIT), 0x7F, code)  # past the last segment: the maximum
    return (code ^ mask).astype(np.uint8)


MULAW_DECODE_TABLE = _build_decode_table()
MULAW_ENCODE_TABLE = _build_encode_table()


def mulaw_decode(data: bytes) -> npt.NDArray[np.int16]:
    """G.711 μ-law bytes to 16-bit linear samples (one sample a byte)."""
    return MULAW_DECODE_TABLE[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(samples: npt.ArrayLike) -> bytes:
    """16-bit linear samples to G.711 μ-law bytes; floats are taken as int16-scaled and clipped."""
    linear = np.asarray(samples)
    if linear.dtype != np.int16:
        linear = np.clip(np.rint(linear), -32768, 32767).astype(np.int16)
    return MULAW_ENCODE_TABLE[linear.view(np.uint16)].tobytes()


# --- resampling ------------------------------------------------------------------------------------

def resample(samples: npt.NDArray[Any], from_rate: int, to_rate: int) -> npt.NDArray[Any]:
    """Polyphase resampling (``scipy.signal.resample_poly``, Kaiser-windowed FIR) from one rate to
    another; ``int16`` in gives rounded, clipped ``int16`` out, anything else gives ``float32``."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate or len(samples) == 0:
        return samples.copy()
    common = math.gcd(from_rate, to_rate)
    converted = resample_poly(samples.astype(np.float32), to_rate // common, from_rate // common)
    if samples.dtype == np.int16:
        return np.clip(np.rint(converted), -32768, 32767).astype(np.int16)
    return converted.astype(np.float32)


# --- uploads ---------------------------------------------------------------------------------------

def read_audio(data: bytes, *, content_type: str | None = None) -> Audio:
    """Decode an uploaded utterance: WAV (PCM16 or μ-law), Sun .au (μ-law or PCM16), FLAC (when
    ``soundfile`` is installed) or headerless μ-law (declared by ``content_type``, e.g.
    ``audio/basic`` or ``audio/PCMU;rate=8000``; 8 kHz when no rate is given).

    Raises :class:`UnsupportedAudio` (415) or :class:`InvalidAudio` (422) with the reason.
    """
    if not data:
        raise InvalidAudio("the upload is empty", reason="empty")
    media_type, params = _parse_content_type(content_type)
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return read_wav(data)
    if data[:4] == b".snd":
        return read_au(data)
    if data[:4] == b"fLaC":
        return read_flac(data)
    if media_type in MULAW_CONTENT_TYPES:
        return read_raw_mulaw(data, _declared_rate(params))
    raise UnsupportedAudio(_unknown_format_detail(data, media_type), reason="unknown-format")


def read_raw_mulaw(data: bytes, sample_rate: int = TELEPHONE_RATE) -> Audio:
    """Headerless μ-law bytes at ``sample_rate`` (one channel)."""
    _check_rate(sample_rate)
    if not data:
        raise InvalidAudio("no μ-law samples", reason="empty")
    return Audio(mulaw_decode(data), sample_rate, "mulaw")


def read_wav(data: bytes) -> Audio:
    """A RIFF/WAVE file with 16-bit PCM or μ-law samples (also as WAVE_FORMAT_EXTENSIBLE)."""
    chunks = _riff_chunks(data)
    if "fmt " not in chunks:
        raise InvalidAudio("the WAV file has no 'fmt ' chunk", reason="truncated" if "data" not in chunks
                           else "bad-header")
    fmt = chunks["fmt "]
    if len(fmt) < 16:
        raise InvalidAudio(f"the WAV 'fmt ' chunk is {len(fmt)} bytes, at least 16 expected", reason="bad-header")
    format_tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if format_tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        format_tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID starts with the tag
    if "data" not in chunks:
        raise InvalidAudio("the WAV file has no 'data' chunk", reason="truncated")
    encoding = _wav_encoding(format_tag, bits)
    _check_rate(rate)
    _check_channels(channels)
    frame_bytes = channels * (2 if encoding == "pcm16" else 1)
    if block_align != frame_bytes:
        raise InvalidAudio(f"block align {block_align} does not match {channels} channel(s) of {bits}-bit "
                           f"samples ({frame_bytes})", reason="bad-header")
    payload = chunks["data"]
    if len(payload) % frame_bytes:
        raise InvalidAudio(f"the WAV data ends in a partial frame ({len(payload)} bytes, {frame_bytes} a frame)",
                           reason="truncated")
    if not payload:
        raise InvalidAudio("the WAV file has no samples", reason="empty")
    interleaved = (np.frombuffer(payload, dtype="<i2") if encoding == "pcm16" else mulaw_decode(payload))
    return Audio(_mix_to_mono(interleaved, channels), rate, f"wav-{encoding}", channels)


def read_au(data: bytes) -> Audio:
    """A Sun/NeXT .au file (``audio/basic``) with μ-law or 16-bit PCM samples."""
    if len(data) < 24:
        raise InvalidAudio(f"the .au header is {len(data)} bytes, 24 expected", reason="truncated")
    offset, size, encoding, rate, channels = struct.unpack_from(">IIIII", data, 4)
    if encoding not in (_AU_ENCODING_MULAW, _AU_ENCODING_PCM16):
        raise UnsupportedAudio(f".au encoding {encoding} is not supported (1 μ-law or 3 16-bit PCM)",
                               reason="unsupported-encoding")
    _check_rate(rate)
    _check_channels(channels)
    if offset < 24 or offset > len(data):
        raise InvalidAudio(f"the .au data offset {offset} lies outside the file", reason="bad-header")
    payload = data[offset:] if size == 0xFFFFFFFF else data[offset:offset + size]
    if size != 0xFFFFFFFF and len(payload) < size:
        raise InvalidAudio(f"the .au file declares {size} data bytes but holds {len(payload)}", reason="truncated")
    frame_bytes = channels * (1 if encoding == _AU_ENCODING_MULAW else 2)
    if not payload or len(payload) % frame_bytes:
        raise InvalidAudio(f"the .au data ({len(payload)} bytes) is not whole frames of {frame_bytes} bytes",
                           reason="empty" if not payload else "truncated")
    interleaved = (mulaw_decode(payload) if encoding == _AU_ENCODING_MULAW
                   else np.frombuffer(payload, dtype=">i2").astype(np.int16))
    name = "au-mulaw" if encoding == _AU_ENCODING_MULAW else "au-pcm16"
    return Audio(_mix_to_mono(interleaved, channels), rate, name, channels)


def read_flac(data: bytes) -> Audio:
    """A FLAC file, decoded by ``soundfile`` (libsndfile) when it is installed."""
    try:
        import soundfile  # type: ignore[import-not-found,unused-ignore]  # optional: not a dependency
    except ImportError as missing:
        raise UnsupportedAudio("FLAC needs the soundfile package, which is not installed here; "
                               "send WAV or μ-law", reason="flac-unavailable") from missing
    import io

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise InvalidAudio(f"the FLAC stream cannot be decoded: {error}", reason="bad-stream") from error
    _check_rate(int(rate))
    channels = int(samples.shape[1])
    _check_channels(channels)
    if not len(samples):
        raise InvalidAudio("the FLAC file has no samples", reason="empty")
    return Audio(_mix_to_mono(samples.reshape(-1), channels), int(rate), "flac", channels)


# --- helpers ---------------------------------------------------------------------------------------

def _riff_chunks(data: bytes) -> dict[str, bytes]:
    """The top-level chunks of a RIFF file; a 'data' chunk of streaming size takes the rest."""
    chunks: dict[str, bytes] = {}
    position = 12
    while position + 8 <= len(data):
        chunk_id = data[position:position + 4].decode("latin-1")
        size = struct.unpack_from("<I", data, position + 4)[0]
        body_start = position + 8
        if chunk_id == "data" and size in _STREAMING_SIZES:
            size = len(data) - body_start
        if body_start + size > len(data):
            raise InvalidAudio(f"the WAV {chunk_id!r} chunk declares {size} bytes but {len(data) - body_start} "
                               "remain", reason="truncated")
        chunks.setdefault(chunk_id, data[body_start:body_start + size])
        position = body_start + size + (size & 1)  # chunks are word-aligned
    return chunks


def _wav_encoding(format_tag: int, bits: int) -> str:
    if format_tag == _WAVE_FORMAT_PCM:
        if bits != 16:
            raise UnsupportedAudio(f"{bits}-bit PCM WAV is not supported (16-bit only)", reason="unsupported-encoding")
        return "pcm16"
    if format_tag == _WAVE_FORMAT_MULAW:
        if bits != 8:
            raise InvalidAudio(f"μ-law WAV with {bits} bits a sample (8 expected)", reason="bad-header")
        return "mulaw"
    name = _WAVE_FORMAT_NAMES.get(format_tag, f"format tag 0x{format_tag:04x}")
    raise UnsupportedAudio(f"{name} WAV is not supported (16-bit PCM or μ-law)", reason="unsupported-encoding")


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidAudio(f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz",
                           reason="sample-rate")


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= 8:
        raise InvalidAudio(f"{channels} channels (1 to 8 expected)", reason="bad-header")


def _mix_to_mono(interleaved: npt.NDArray[np.int16], channels: int) -> npt.NDArray[np.int16]:
    if channels == 1:
        return interleaved.astype(np.int16, copy=False)
    frames = interleaved.reshape(-1, channels).astype(np.int32)
    return np.rint(frames.mean(axis=1)).astype(np.int16)


def _parse_content_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    if not content_type:
        return "", {}
    media_type, *parameters = (part.strip() for part in content_type.split(";"))
    params = {}
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return media_type.lower(), params


def _declared_rate(params: dict[str, str]) -> int:
    declared = params.get("rate")
    if declared is None:
        return TELEPHONE_RATE
    if not declared.isdigit():
        raise InvalidAudio(f"the content type's rate {declared!r} is not a number of Hz", reason="sample-rate")
    return int(declared)


def _unknown_format_detail(data: bytes, media_type: str) -> str:
    if data[:4] == b"RIFX":
        return "big-endian (RIFX) WAV is not supported"
    if data[:4] == b"OggS":
        return "Ogg audio is not supported (WAV, FLAC or μ-law)"
    if data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "MP3 is not supported (WAV, FLAC or μ-law)"
    declared = f" (declared as {media_type})" if media_type else ""
    return (f"unrecognised audio{declared}: expected a WAV, .au or FLAC header, or headerless μ-law "
            "declared as audio/basic or audio/PCMU")
