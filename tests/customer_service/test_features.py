"""The log-mel front end's level setting: ``keep`` leaves the absolute level in the features (model
v1), ``utterance`` takes it out, so a quiet line gives the features of a loud one."""

from __future__ import annotations

import numpy as np
import pytest

from services.customer_service.features import DEFAULT_FEATURES, FeatureConfig, log_mel, utterance_level
from services.customer_service.model import EmotionModelConfig


def voice_like(seconds: float = 1.5, seed: int = 0) -> np.ndarray:
    """Bursts of noise with pauses, at about -20 dBFS (float, full scale 1)."""
    rng = np.random.default_rng(seed)
    audio = rng.normal(0.0, 0.1, int(16000 * seconds)).astype(np.float32)
    audio[4000:6000] *= 0.01
    return audio


def test_the_default_keeps_the_level() -> None:
    assert DEFAULT_FEATURES.level == "keep"
    audio = voice_like()
    np.testing.assert_allclose(log_mel(audio * 0.1) - log_mel(audio), np.log(0.01), atol=1e-3)


def test_utterance_level_takes_a_uniform_gain_out() -> None:
    relative = FeatureConfig(level="utterance")
    audio = voice_like()
    for gain in (0.05, 0.3, 3.0):  # (much quieter, the 1e-10 floor of the pauses shows)
        np.testing.assert_allclose(log_mel(audio * gain, relative), log_mel(audio, relative), atol=1e-3)
    features = log_mel(audio, relative)
    loud_frames = np.log(np.exp(features).sum(axis=1))
    assert np.percentile(loud_frames, 90) == pytest.approx(0.0, abs=1e-3)  # the level is the reference


def test_utterance_level_keeps_the_contour_within_the_utterance() -> None:
    relative = FeatureConfig(level="utterance")
    audio = voice_like()
    features = log_mel(audio, relative)
    pause = features[26:36].mean()  # samples 4000-6000 are 40 dB down
    speech = features[60:100].mean()
    assert speech - pause == pytest.approx(np.log(1e4), abs=0.5)


def test_silence_and_bad_settings() -> None:
    relative = FeatureConfig(level="utterance")
    assert np.isfinite(log_mel(np.zeros(800, dtype=np.float32), relative)).all()
    assert np.isfinite(utterance_level(np.zeros((3, relative.n_mels), dtype=np.float32), relative))
    with pytest.raises(ValueError, match="feature level"):
        FeatureConfig(level="peak")


def test_a_model_config_reads_the_level_back_and_an_older_one_keeps_the_level() -> None:
    config = EmotionModelConfig(features=FeatureConfig(level="utterance"))
    assert EmotionModelConfig.from_dict(config.as_dict()).features.level == "utterance"
    older = config.as_dict()
    del older["features"]["level"], older["features"]["level_percentile"]
    assert EmotionModelConfig.from_dict(older).features == DEFAULT_FEATURES
