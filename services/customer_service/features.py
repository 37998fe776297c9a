"""Log-mel features of an utterance: the one function training and serving both call.

Input is mono audio at :data:`FEATURE_RATE` (16 kHz; telephone audio is upsampled 8 -> 16 kHz
first, as the speech-to-text path does). The mel filters span 50-4000 Hz by default: call audio
has nothing above 3.4-4 kHz, so a model trained on full-band studio speech (the real acted set)
and served on telephone audio sees the same bands in both.

Level (``FeatureConfig.level``): ``"keep"`` (the default, and model v1's) leaves the absolute level
in the features: the level of the voice is an emotion cue (anger is loud), but so is the gain of
the line, which a caller's phone and network set. ``"utterance"`` subtracts each utterance's own
speech level (the log of a high percentile of its frames' mel energy) from every value: a uniform
gain then changes nothing (down to the codec's quantisation and the noise floor), and only the
level *within* the utterance (stress, pauses, the spectrum's shape) is left to the model.

The STFT is vectorised numpy (frames as a strided view, one ``rfft``); the filter bank is
``transformers.audio_utils.mel_filter_bank`` (HTK mel scale, as torchaudio).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

FEATURE_RATE = 16000
"""Sample rate the features are defined at."""
LEVEL_MODES = ("keep", "utterance")


@dataclass(frozen=True)
class FeatureConfig:
    """How log-mel features are computed; a model card records it so serving matches training."""

    sample_rate: int = FEATURE_RATE
    n_fft: int = 400
    """25 ms window at 16 kHz."""
    hop_length: int = 160
    """10 ms hop at 16 kHz."""
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 4000.0
    log_floor: float = 1e-10
    """Mel power below this is clipped before the log (digital silence)."""
    level: str = "keep"
    """``keep``: absolute level; ``utterance``: relative to the utterance's speech level (see the module)."""
    level_percentile: float = 90.0
    """With ``level="utterance"``: the percentile of frame energies taken as the speech level."""

    def __post_init__(self) -> None:
        if self.level not in LEVEL_MODES:
            raise ValueError(f"feature level {self.level!r} is not one of {', '.join(LEVEL_MODES)}")

    def as_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON values."""
        return asdict(self)


DEFAULT_FEATURES = FeatureConfig()


@lru_cache(maxsize=8)
def _filters(config: FeatureConfig) -> npt.NDArray[np.float32]:
    from transformers.audio_utils import mel_filter_bank  # heavy import, done once per config

    bank = mel_filter_bank(num_frequency_bins=config.n_fft // 2 + 1, num_mel_filters=config.n_mels,
                           min_frequency=config.f_min, max_frequency=config.f_max,
                           sampling_rate=config.sample_rate, norm=None, mel_scale="htk")
    return np.asarray(bank, dtype=np.float32)


@lru_cache(maxsize=8)
def _window(n_fft: int) -> npt.NDArray[np.float32]:
    return np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann, as torch.hann_window


def frame_count(num_samples: int, config: FeatureConfig = DEFAULT_FEATURES) -> int:
    """Number of feature frames :func:`log_mel` returns for ``num_samples`` samples."""
    return 1 + max(num_samples, 0) // config.hop_length


def log_mel(samples: npt.ArrayLike, config: FeatureConfig = DEFAULT_FEATURES) -> npt.NDArray[np.float32]:
    """Natural-log mel power of mono audio at ``config.sample_rate``: shape ``(frames, n_mels)``,
    ``frames = 1 + len(samples) // hop_length`` (centred frames, reflect padding); with
    ``config.level == "utterance"`` minus the utterance's level (:func:`utterance_level`).

    ``int16`` input is scaled to [-1, 1); floats are taken as already in [-1, 1]. An empty or
    non-1-D input is a ``ValueError``.
    """
    audio = np.asarray(samples)
    if audio.ndim != 1:
        raise ValueError(f"log_mel takes mono 1-D samples, got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("log_mel got no samples")
    signal = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
    pad = config.n_fft // 2
    padded = np.pad(signal, pad, mode="reflect") if signal.size > pad else np.pad(signal, pad)
    frames = np.lib.stride_tricks.sliding_window_view(padded, config.n_fft)[::config.hop_length]
    spectrum = np.fft.rfft(frames * _window(config.n_fft), axis=1)
    power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)
    mel = power @ _filters(config)
    features = np.log(np.maximum(mel, config.log_floor))
    if config.level == "utterance":
        features -= utterance_level(mel, config)
    return features.astype(np.float32)


def utterance_level(mel: npt.NDArray[np.float32], config: FeatureConfig = DEFAULT_FEATURES) -> float:
    """Natural log of the speech level of mel power frames ``(frames, n_mels)``: the
    ``config.level_percentile``-th percentile of the frames' summed mel power (loud frames, not
    pauses), floored at the digital-silence floor."""
    energy = mel.sum(axis=1, dtype=np.float64)
    return float(np.log(max(float(np.percentile(energy, config.level_percentile)),
                            config.log_floor * config.n_mels)))
