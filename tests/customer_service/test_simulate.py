"""The call simulator (simulated data): espeak-ng speech with per-emotion prosody, calls whose ground
truth matches their audio, a telephone line that band-limits and μ-law codes, 20 ms frames that
reassemble to the tracks, and the same bytes from the same seed.

Tests that speak need espeak-ng (Debian package; ``scripts/ensure_services.sh`` installs it) and
skip, saying so, without it; the line, the frames and the scripts are tested without it.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from services.customer_service.audio import mulaw_decode, read_wav
from services.customer_service.labels import EMOTIONS
from services.customer_service.simulate import (
    CUSTOMER_LINES,
    EMOTION_PROSODY,
    FRAME_BYTES,
    MULAW_SILENCE,
    SCENARIOS,
    VOICES,
    VOICES_BY_NAME,
    SimulatedCall,
    SynthesisError,
    espeak_path,
    iter_frames,
    main,
    plan_turns,
    read_call,
    simulate_call,
    simulate_corpus,
    synthesize,
    telephone_channel,
    twilio_call_sid,
)

needs_espeak = pytest.mark.skipif(espeak_path() is None, reason="espeak-ng is not installed (Debian package "
                                  "espeak-ng; scripts/ensure_services.sh installs it): no speech to simulate")


def tone(frequency: float, seconds: float = 1.0, rate: int = 8000, level: float = 8000.0) -> npt.NDArray[np.float32]:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def rms(samples: npt.NDArray[np.int16]) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


# --- without espeak-ng ----------------------------------------------------------------------------

def test_the_line_passes_the_voice_band_and_stops_what_is_outside_it() -> None:
    passed = {f: rms(mulaw_decode(telephone_channel(tone(f))[2000:])) for f in (100, 1000, 3000, 3800)}
    reference = 8000 / np.sqrt(2)
    assert passed[1000] == pytest.approx(reference, rel=0.05)
    assert passed[3000] == pytest.approx(reference, rel=0.1)
    assert passed[100] < 0.05 * reference  # mains hum and rumble below 300 Hz
    assert passed[3800] < 0.2 * reference  # above the 3400 Hz edge (the 4 kHz Nyquist cuts the rest)


def test_the_line_resamples_to_8_khz_and_its_noise_comes_from_the_seed() -> None:
    coded = telephone_channel(tone(1000, rate=22050), 22050)
    assert len(coded) == 8000
    silence = np.zeros(8000, dtype=np.float32)
    noisy = [telephone_channel(silence, rng=np.random.default_rng(7), noise_dbfs=-50) for _ in range(2)]
    assert noisy[0] == noisy[1]
    assert noisy[0] != telephone_channel(silence, rng=np.random.default_rng(8), noise_dbfs=-50)
    level_db = 20 * np.log10(rms(mulaw_decode(noisy[0])) / 32768)
    assert -60 < level_db < -50  # white noise at -50 dBFS, band-limited to about 3.1 of 4 kHz
    with pytest.raises(ValueError, match="needs an rng"):
        telephone_channel(silence, noise_dbfs=-50)


def fake_call(samples: int = 8000 + 37) -> SimulatedCall:
    rng = np.random.default_rng(0)
    tracks = {"customer": rng.integers(0, 256, samples, dtype=np.uint8).tobytes(),
              "agent": rng.integers(0, 256, samples, dtype=np.uint8).tobytes()}
    return SimulatedCall("CAfake", 0, "routine", {"customer": "us_f2", "agent": "us_m3"}, tracks, (), None)


def test_frames_are_20_ms_of_each_track_and_reassemble_to_it() -> None:
    call = fake_call()
    frames = list(iter_frames(call, ("customer", "agent")))
    assert len(frames) == 51
    assert all(len(p) == FRAME_BYTES for f in frames for p in f.payloads.values())
    assert [f.timestamp_ms for f in frames[:3]] == [0, 20, 40]
    for role in ("customer", "agent"):
        joined = b"".join(f.payloads[role] for f in frames)
        assert joined[:len(call.tracks[role])] == call.tracks[role]
        assert set(joined[len(call.tracks[role]):]) == {MULAW_SILENCE}
    both = frames[0].interleaved(("customer", "agent"))
    assert both[0::2] == frames[0].payloads["customer"] and both[1::2] == frames[0].payloads["agent"]
    assert list(iter_frames(call))[0].payloads.keys() == {"customer"}


def test_frames_refuse_a_track_the_call_does_not_have() -> None:
    with pytest.raises(ValueError, match="no track 'inbound'"):
        next(iter_frames(fake_call(), ("inbound",)))


def test_each_scenario_gives_its_arc_to_the_customer_and_the_agent_answers_in_between() -> None:
    for scenario, arc in SCENARIOS.items():
        turns = plan_turns(scenario, np.random.default_rng(3))
        assert [t.emotion for t in turns if t.role == "customer"] == list(arc)
        roles = [t.role for t in turns]
        assert roles[0] == roles[-1] == "agent"
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # turns alternate
        assert all(t.emotion in ("neutral", "happy") for t in turns if t.role == "agent")


def test_every_label_has_prosody_and_scripts_and_there_are_five_voices_or_more() -> None:
    assert set(EMOTION_PROSODY) == set(CUSTOMER_LINES) == set(EMOTIONS)
    assert len(VOICES) >= 5 and {v.gender for v in VOICES} == {"male", "female"}
    assert twilio_call_sid(1).startswith("CA") and len(twilio_call_sid(1)) == 34


# --- with espeak-ng -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def call() -> SimulatedCall:
    if espeak_path() is None:
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng; scripts/ensure_services.sh installs it)")
    return simulate_call(11, scenario="recovered")


@needs_espeak
def test_espeak_speaks_every_voice() -> None:
    prosody = EMOTION_PROSODY["neutral"]
    for voice in VOICES:
        samples, rate = synthesize("Thank you for calling.", voice, prosody)
        assert rate == 22050 and 0.5 < samples.size / rate < 3, voice.name


@needs_espeak
def test_synthesis_refuses_empty_text() -> None:
    with pytest.raises(SynthesisError, match="empty"):
        synthesize("  ", VOICES[0], EMOTION_PROSODY["neutral"])


@needs_espeak
def test_the_same_seed_gives_the_same_call_and_another_seed_another(call: SimulatedCall) -> None:
    again = simulate_call(11, scenario="recovered")
    assert again.tracks == call.tracks and again.manifest() == call.manifest()
    other = simulate_call(12, scenario="recovered")
    assert other.tracks["customer"] != call.tracks["customer"] and other.call_id != call.call_id


@needs_espeak
def test_the_ground_truth_matches_the_audio_of_each_track(call: SimulatedCall) -> None:
    manifest = call.manifest()
    assert manifest["simulated"] is True and manifest["sample_rate"] == 8000
    assert [u["emotion"] for u in manifest["utterances"] if u["role"] == "customer"] == list(SCENARIOS["recovered"])
    assert call.voices["customer"] != call.voices["agent"]
    ends = 0
    for utterance in call.utterances:
        assert ends < utterance.start_ms < utterance.end_ms <= call.duration_ms  # in order, gaps between
        ends = utterance.end_ms
        other = "agent" if utterance.role == "customer" else "customer"
        start, end = utterance.start_ms * 8, utterance.end_ms * 8
        speaking, silent = call.pcm(utterance.role)[start:end], call.pcm(other)[start:end]
        assert rms(speaking) > 20 * rms(silent), utterance  # speech on its track, line noise on the other


@needs_espeak
def test_streamed_frames_carry_the_whole_call(call: SimulatedCall) -> None:
    frames = list(iter_frames(call, ("customer", "agent")))
    assert len(frames) == -(-len(call.tracks["customer"]) // FRAME_BYTES)
    customer = b"".join(frame.payloads["customer"] for frame in frames)
    assert customer.startswith(call.tracks["customer"])


@needs_espeak
def test_emotions_differ_in_loudness_and_pace_as_their_prosody_says() -> None:
    voices = [VOICES_BY_NAME["us_m3"], VOICES_BY_NAME["gb_f3"]]
    clips = simulate_corpus(5, 2, voices=voices, emotions=("angry", "sad", "neutral"), noise_dbfs=None,
                            neutral_text_share=0.0)
    loudness = {e: np.mean([rms(c.samples) for c in clips if c.emotion == e]) for e in ("angry", "sad", "neutral")}
    seconds_per_char = {e: np.mean([c.samples.size / c.sample_rate / len(c.text) for c in clips if c.emotion == e])
                        for e in ("angry", "sad", "neutral")}
    assert loudness["angry"] > loudness["neutral"] > loudness["sad"]
    assert seconds_per_char["sad"] > seconds_per_char["neutral"] > seconds_per_char["angry"]
    assert all(c.sample_rate == 8000 and c.voice in {"us_m3", "gb_f3"} for c in clips)
    assert simulate_corpus(5, 1, voices=voices[:1], emotions=("sad",))[0].clip_id == "sim-5-us_m3-sad-0000"


@needs_espeak
def test_the_corpus_does_not_depend_on_workers_or_on_other_voices() -> None:
    one = simulate_corpus(2, 1, voices=VOICES[:2], emotions=("happy",), workers=1)
    two = simulate_corpus(2, 1, voices=VOICES[:2], emotions=("happy",), workers=2)
    alone = simulate_corpus(2, 1, voices=VOICES[1:2], emotions=("happy",))
    assert [c.samples.tobytes() for c in one] == [c.samples.tobytes() for c in two]
    assert alone[0].samples.tobytes() == one[1].samples.tobytes()


@needs_espeak
def test_command_line_writes_calls_and_a_corpus_with_ground_truth(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calls", "--out", str(tmp_path / "calls"), "--seed", "3", "--scenario", "routine",
                 "--voices", "us_m3,us_f2"]) == 0
    manifest_path = next((tmp_path / "calls").glob("*.json"))
    truth = json.loads(manifest_path.read_text())
    stem = manifest_path.with_suffix("")
    with wave.open(str(stem) + ".wav") as stereo:
        assert (stereo.getnchannels(), stereo.getframerate()) == (2, 8000)
        assert stereo.getnframes() == len(Path(str(stem) + ".customer.ulaw").read_bytes())
    assert set(truth["voices"].values()) == {"us_m3", "us_f2"} and truth["scenario"] == "routine"
    again = read_call(manifest_path)
    assert again.manifest() == truth and again.tracks["customer"] == Path(str(stem) + ".customer.ulaw").read_bytes()
    with pytest.raises(ValueError, match="not a simulated call"):
        read_call(tmp_path / "calls" / "missing.json")
    assert "(simulated)" in capsys.readouterr().out

    assert main(["utterances", "--out", str(tmp_path / "corpus"), "--per-voice-emotion", "1",
                 "--voices", "rp_f5"]) == 0
    corpus = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert [c["emotion"] for c in corpus["clips"]] == list(EMOTIONS) and corpus["simulated"] is True
    first = read_wav((tmp_path / "corpus" / corpus["clips"][0]["path"]).read_bytes())
    assert first.sample_rate == 8000 and first.samples.size == corpus["clips"][0]["num_samples"]


def test_command_line_names_an_unknown_voice(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["calls", "--out", str(tmp_path), "--voices", "hal9000"])
    assert exit_info.value.code == 2
    assert "unknown voice 'hal9000'" in capsys.readouterr().err
