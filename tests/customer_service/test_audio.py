"""G.711 μ-law against CPython's ``audioop`` (the G.711 reference, used here only as the oracle),
resampling, and reading uploads with precise 415/422 refusals."""

from __future__ import annotations

import io
import struct
import warnings
import wave

import numpy as np
import pytest

from services.customer_service.audio import (
    AudioError,
    InvalidAudio,
    UnsupportedAudio,
    mulaw_decode,
    mulaw_encode,
    read_audio,
    resample,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # deprecated (removed in 3.13): the oracle only, never in the service


ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def tone(rate: int, seconds: float = 0.25, hz: float = 440.0, amplitude: float = 8000.0) -> np.ndarray:
    """A sine tone as int16."""
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """A PCM16 WAV written by the standard library."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def mulaw_wav_bytes(payload: bytes, rate: int = 8000, *, format_tag: int = 7, bits: int = 8,
                    data_size: int | None = None) -> bytes:
    """A μ-law (or other tag) WAV built by hand: ``wave`` writes PCM only."""
    fmt = struct.pack("<HHIIHH", format_tag, 1, rate, rate * bits // 8, bits // 8, bits)
    size = len(payload) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_mulaw_encode_matches_the_g711_reference_for_every_16_bit_value() -> None:
    expected = audioop.lin2ulaw(ALL_INT16.tobytes(), 2)
    assert mulaw_encode(ALL_INT16) == expected


def test_mulaw_decode_matches_the_g711_reference_for_every_code() -> None:
    codes = bytes(range(256))
    expected = np.frombuffer(audioop.ulaw2lin(codes, 2), dtype=np.int16)
    np.testing.assert_array_equal(mulaw_decode(codes), expected)


def test_mulaw_round_trip_error_stays_within_one_quantisation_step() -> None:
    samples = tone(8000, amplitude=20000.0)
    decoded = mulaw_decode(mulaw_encode(samples)).astype(np.int32)
    error = np.abs(decoded - samples)
    assert error.max() <= np.abs(samples.astype(np.int32)).max() // 16 + 8


def test_mulaw_encode_clips_floats() -> None:
    assert mulaw_encode(np.array([1e9, -1e9])) == mulaw_encode(np.array([32767, -32768], dtype=np.int16))


def test_resample_8k_to_16k_keeps_a_tone_and_its_level() -> None:
    upsampled = resample(tone(8000, seconds=1.0), 8000, 16000)
    assert upsampled.dtype == np.int16 and len(upsampled) == 16000
    spectrum = np.abs(np.fft.rfft(upsampled.astype(np.float64)))
    assert np.argmax(spectrum) == 440  # 1 Hz bins over one second
    assert abs(np.abs(upsampled[1000:-1000]).max() - 8000) < 200


def test_resample_float_and_identity() -> None:
    signal = np.linspace(-1, 1, 441, dtype=np.float32)
    assert resample(signal, 44100, 16000).dtype == np.float32
    assert len(resample(signal, 44100, 16000)) == 160
    np.testing.assert_array_equal(resample(signal, 16000, 16000), signal)
    with pytest.raises(ValueError):
        resample(signal, 0, 16000)


def test_reads_pcm16_wav_and_mixes_stereo_to_mono() -> None:
    samples = tone(16000)
    audio = read_audio(wav_bytes(samples, 16000))
    assert (audio.sample_rate, audio.source_format, audio.source_channels) == (16000, "wav-pcm16", 1)
    np.testing.assert_array_equal(audio.samples, samples)
    stereo = np.stack([samples, np.zeros_like(samples)], axis=1).reshape(-1)
    mixed = read_audio(wav_bytes(stereo, 16000, channels=2))
    assert mixed.source_channels == 2
    assert np.abs(mixed.samples.astype(np.int32) - samples // 2).max() <= 1


def test_reads_mulaw_wav_and_raw_mulaw() -> None:
    payload = mulaw_encode(tone(8000))
    audio = read_audio(mulaw_wav_bytes(payload))
    assert (audio.sample_rate, audio.source_format) == (8000, "wav-mulaw")
    np.testing.assert_array_equal(audio.samples, mulaw_decode(payload))
    raw = read_audio(payload, content_type="audio/PCMU; rate=8000")
    assert raw.source_format == "mulaw" and raw.duration_s == pytest.approx(0.25)
    assert read_audio(payload, content_type="audio/basic").sample_rate == 8000


def test_reads_streaming_wav_with_unset_data_size() -> None:
    payload = mulaw_encode(tone(8000))
    audio = read_audio(mulaw_wav_bytes(payload, data_size=0xFFFFFFFF))
    assert len(audio.samples) == len(payload)


def test_reads_sun_au_mulaw() -> None:
    payload = mulaw_encode(tone(8000))
    header = b".snd" + struct.pack(">IIIII", 24, len(payload), 1, 8000, 1)
    audio = read_audio(header + payload)
    assert audio.source_format == "au-mulaw" and len(audio.samples) == len(payload)


@pytest.mark.parametrize(("data", "content_type", "error", "reason"), [
    (b"", None, InvalidAudio, "empty"),
    (b"\x00" * 100, None, UnsupportedAudio, "unknown-format"),
    (b"\x00" * 100, "application/octet-stream", UnsupportedAudio, "unknown-format"),
    (b"OggS" + b"\x00" * 60, None, UnsupportedAudio, "unknown-format"),
    (mulaw_wav_bytes(b"\x00" * 100, format_tag=6), None, UnsupportedAudio, "unsupported-encoding"),
    (mulaw_wav_bytes(b"\x00" * 100, format_tag=1, bits=24), None, UnsupportedAudio, "unsupported-encoding"),
    (mulaw_wav_bytes(b"\x00" * 100, rate=4000), None, InvalidAudio, "sample-rate"),
    (mulaw_wav_bytes(b"\x00" * 100, rate=96000), None, InvalidAudio, "sample-rate"),
    (mulaw_wav_bytes(b"\x00" * 100)[:-40], None, InvalidAudio, "truncated"),
    (wav_bytes(tone(8000), 8000)[:-1], None, InvalidAudio, "truncated"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", None, InvalidAudio, "truncated"),
    (b"\xff" * 80, "audio/PCMU;rate=4000", InvalidAudio, "sample-rate"),
    (b"\xff" * 80, "audio/PCMU;rate=fast", InvalidAudio, "sample-rate"),
    (b".snd" + struct.pack(">IIIII", 24, 10, 27, 8000, 1) + b"\x00" * 10, None, UnsupportedAudio,
     "unsupported-encoding"),
])
def test_bad_uploads_are_refused_with_a_precise_reason(data: bytes, content_type: str | None,
                                                       error: type[AudioError], reason: str) -> None:
    with pytest.raises(error) as raised:
        read_audio(data, content_type=content_type)
    assert raised.value.reason == reason
    problem = raised.value.to_problem()
    assert problem["status"] == (415 if error is UnsupportedAudio else 422)
    assert problem["reason"] == reason and problem["detail"]


def test_flac_is_decoded_or_refused_as_unsupported() -> None:
    try:
        import soundfile  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        with pytest.raises(UnsupportedAudio) as raised:
            read_audio(b"fLaC" + b"\x00" * 60)
        assert raised.value.reason == "flac-unavailable"
        return
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(16000), 16000, format="FLAC")
    audio = read_audio(buffer.getvalue())
    assert audio.source_format == "flac" and audio.sample_rate == 16000
