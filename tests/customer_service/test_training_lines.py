"""Line conditions for training augmentation and robustness tests: gain, white / pink / babble noise at
an SNR, line noise, band and μ-law (simulate.degrade_line), the random conditions training draws, and
the augmenter that hears a share of the examples over them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.customer_service.simulate import (
    LineCondition,
    active_level_dbfs,
    babble_noise,
    degrade_line,
    pink_noise,
)
from services.customer_service.training import (
    QUICK_PLAN,
    TEST_LINES,
    Example,
    LineAugmenter,
    LineHearing,
    TrainPlan,
    draw_line_condition,
    line_samples,
)


def talk(seconds: float = 2.0, level_dbfs: float = -20.0, seed: int = 0) -> np.ndarray:
    """A 1 kHz tone switched on and off like speech, at ``level_dbfs`` while on (8 kHz, int16 scale)."""
    t = np.arange(int(8000 * seconds)) / 8000
    on = (np.floor(t * 3) % 2 == 0).astype(float)
    tone = np.sin(2 * np.pi * (1000 + 50 * seed) * t) * np.sqrt(2) * 32768 * 10 ** (level_dbfs / 20)
    return (tone * on).astype(np.float32)


def test_active_level_ignores_pauses() -> None:
    assert active_level_dbfs(talk(level_dbfs=-20.0)) == pytest.approx(-20.0, abs=0.3)
    assert active_level_dbfs(np.zeros(800)) == float("-inf")


def test_gain_moves_the_level_and_mulaw_keeps_it() -> None:
    speech = talk()
    quiet = degrade_line(speech, LineCondition(gain_db=-20.0), np.random.default_rng(0))
    assert quiet.dtype == np.int16 and quiet.size == speech.size
    assert active_level_dbfs(quiet) == pytest.approx(-40.0, abs=0.5)


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
def test_noise_lands_at_the_asked_snr(kind: str) -> None:
    speech = talk(level_dbfs=-20.0)
    talkers = [talk(level_dbfs=-25.0, seed=s) for s in range(1, 6)]
    condition = LineCondition(noise=kind, snr_db=10.0, mulaw=False, band_hz=(1.0, 3999.0))
    noisy = degrade_line(speech, condition, np.random.default_rng(1), talkers=talkers).astype(float)
    clean = degrade_line(speech, replace(condition, noise=None, snr_db=0.0), np.random.default_rng(1))
    noise = noisy - clean
    snr = active_level_dbfs(clean) - 10 * np.log10(np.mean(noise ** 2) / 32768 ** 2)
    assert snr == pytest.approx(10.0, abs=1.0)


def test_noise_comes_from_the_rng_and_babble_needs_talkers() -> None:
    speech = talk()
    first, again, other = (degrade_line(speech, LineCondition(noise="white", snr_db=5.0), np.random.default_rng(seed))
                           for seed in (3, 3, 4))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    with pytest.raises(ValueError, match="other talkers"):
        babble_noise(100, [], np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown noise"):
        degrade_line(speech, LineCondition(noise="brown"), np.random.default_rng(0))


def test_pink_noise_falls_3_db_an_octave() -> None:
    noise = pink_noise(1 << 16, np.random.default_rng(0))
    power = np.abs(np.fft.rfft(noise)) ** 2
    octave = [power[(1 << k):(2 << k)].sum() for k in (8, 10)]  # two octaves apart
    assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(1.0, abs=1e-3)
    assert 10 * np.log10(octave[0] / octave[1]) == pytest.approx(0.0, abs=1.0)  # equal power per octave


def test_drawn_conditions_cover_the_plan() -> None:
    rng = np.random.default_rng(0)
    drawn = [draw_line_condition(TrainPlan(), rng) for _ in range(400)]
    gains = [c.gain_db for c in drawn]
    assert -20.0 <= min(gains) < -18.0 and 6.0 < max(gains) <= 8.0
    assert {c.noise for c in drawn} == {None, "white", "pink", "babble"}
    assert 0.4 < np.mean([c.line_noise_dbfs is not None for c in drawn]) < 0.6
    assert all(200 <= c.band_hz[0] <= 400 and 3000 <= c.band_hz[1] <= 3600 for c in drawn)
    assert all(condition.describe() for condition in [*drawn[:5], *TEST_LINES.values(), LineCondition()])


def test_the_augmenter_hears_a_share_of_the_examples_over_other_speakers_babble() -> None:
    config = QUICK_PLAN.model
    examples = [Example(f"c{i}", np.zeros((3, 64), np.float32), "", "angry", f"s{i % 3}", "simulated",
                        talk(seed=i).astype(np.int16)) for i in range(6)]
    hearing = LineHearing(config, examples)
    assert len(hearing.others("s0")) == 4 and all(line is not None for line in hearing.others("s1"))
    augmenter = LineAugmenter(replace(QUICK_PLAN, line_augment=0.5), hearing)
    rng = np.random.default_rng(0)
    heard = [augmenter(examples[0], rng) for _ in range(200)]
    share = np.mean([out.shape != (3, 64) for out in heard])
    assert 0.4 < share < 0.6  # recomputed features have the clip's frames, not the stand-in's 3
    without_line = replace(examples[0], line=None)
    assert augmenter(without_line, rng) is without_line.features
    copies = hearing.heard(examples, TEST_LINES["babble 10 dB SNR"], seed=5)
    again = hearing.heard(examples, TEST_LINES["babble 10 dB SNR"], seed=5)
    assert all(np.array_equal(a.features, b.features) for a, b in zip(copies, again, strict=True))


def test_line_samples_are_8_khz_int16_and_speed_changes_the_length() -> None:
    audio = np.sin(np.arange(16000) * 0.2).astype(np.float32) * 0.5
    assert line_samples(audio).dtype == np.int16 and line_samples(audio).size == 8000
    assert line_samples(audio, 0.9).size == pytest.approx(8000 / 0.9, abs=2)
