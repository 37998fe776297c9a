"""The emotion model: an audio encoder and a text encoder fused by cross-modal attention.

Architecture (:class:`EmotionNet`, sizes from :class:`EmotionModelConfig`):

- **Audio encoder**, one of
  - ``logmel`` (default): the shared log-mel features (:mod:`services.customer_service.features`,
    64 bands, 10 ms hop), normalised by per-band statistics stored in the weights (set from the
    training set by :meth:`LogMelEncoder.set_feature_statistics`; no per-utterance normalisation, so
    loudness stays a cue), two strided 1-D convolutions (40 ms frames) and a small pre-norm
    transformer with sinusoidal positions;
  - ``wav2vec2``: a ``transformers`` Wav2Vec2 model on the 16 kHz waveform (per-utterance
    normalised, as its feature extractor does): a tiny config from scratch, or a real pretrained
    checkpoint from a local directory (``audio_pretrained``).
- **Text encoder**: a small RoBERTa (``transformers``) with its own byte-level BPE tokenizer trained
  on our customer-service scripts (:func:`train_tokenizer`), or a pretrained RoBERTa-style
  checkpoint with its tokenizer from a local directory (``text_pretrained``).
- **Fusion** (:class:`CrossModalFusion`): audio frames attend to text tokens and tokens to frames
  (residual, layer norm), each stream is mean-pooled over its valid positions, and a missing
  modality's pooled vector is replaced by a learned "absent" embedding, so the classifier always
  sees both halves. A missing modality is never attended to (its attention output is zeroed, not
  averaged over padding). Training drops one of two present modalities now and then
  (``modality_dropout``) so both single-modality paths are trained.

Inputs go through :func:`prepare_utterance` (features and tokens of one utterance; numpy, for the
runtime's prepare pool) and :func:`collate` (padding into an :class:`EmotionBatch`). A model is
saved as a directory (:func:`save_emotion_model`: ``config.json``, ``weights.pt``, ``tokenizer/``)
that :func:`load_emotion_model` reads back without the pretrained source directories: their
``transformers`` configs are copied into ``config.json``.

Serving (:func:`emotion_model_spec`): the model is a model of the shared runtime. Items are
:class:`EmotionRequest` (int16 audio at 8-48 kHz and/or a transcript); ``prepare`` checks one
request, resamples to 16 kHz and computes its features and tokens in the runtime's thread pool;
``run_batch`` pads the utterances of concurrent calls into one batch and answers each with a
:class:`~services.customer_service.pipeline.EmotionReading`. The shipped artifact lies under
``<models_dir>/cs/emotion/<version>/`` (:func:`default_emotion_dir`; built by ``tessera train cs``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from services.customer_service.features import FEATURE_RATE, FeatureConfig, log_mel
from services.customer_service.labels import EMOTIONS

if TYPE_CHECKING:
    from model_runtime import LoadContext, ModelSpec
    from services.customer_service.pipeline import EmotionReading

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
TOKENIZER_DIR = "tokenizer"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""RoBERTa's special tokens, in RoBERTa's id order (pad = 1)."""
AudioKind = Literal["logmel", "wav2vec2"]


class ModelConfigError(ValueError):
    """A model configuration or saved model that cannot be built; the message says what is wrong."""


@dataclass(frozen=True)
class EmotionModelConfig:
    """Sizes and choices of :class:`EmotionNet` (JSON-serialisable; saved as ``config.json``)."""

    labels: tuple[str, ...] = EMOTIONS
    d_model: int = 128
    dropout: float = 0.1
    modality_dropout: float = 0.2
    """Training only: probability of hiding each of two present modalities (never both)."""
    fusion_heads: int = 4

    audio_kind: AudioKind = "logmel"
    audio_layers: int = 2
    audio_heads: int = 4
    audio_ff: int = 256
    conv_channels: int = 128
    max_audio_s: float = 20.0
    """Longer utterances are cut to their first ``max_audio_s`` seconds."""
    features: FeatureConfig = field(default_factory=FeatureConfig)
    audio_pretrained: str | None = None
    """Local directory of a pretrained wav2vec2-style checkpoint (``audio_kind="wav2vec2"``)."""
    wav2vec2: dict[str, Any] | None = None
    """``transformers`` Wav2Vec2 config (filled in when built; a tiny one by default)."""

    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 256
    max_text_tokens: int = 64
    text_pretrained: str | None = None
    """Local directory of a pretrained RoBERTa-style checkpoint and its tokenizer."""
    roberta: dict[str, Any] | None = None
    """``transformers`` RoBERTa config (filled in when built)."""

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ModelConfigError(f"labels must be two or more distinct names, got {self.labels}")
        if self.d_model % self.fusion_heads or self.d_model % self.audio_heads:
            raise ModelConfigError(f"d_model {self.d_model} must divide by fusion_heads and audio_heads")
        if self.audio_kind not in ("logmel", "wav2vec2"):
            raise ModelConfigError(f"audio_kind must be 'logmel' or 'wav2vec2', got {self.audio_kind!r}")
        if not 0 <= self.modality_dropout < 0.5:
            raise ModelConfigError(f"modality_dropout must be in [0, 0.5), got {self.modality_dropout}")

    def as_dict(self) -> dict[str, Any]:
        """The configuration as JSON values."""
        values = asdict(self)
        values["labels"] = list(self.labels)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EmotionModelConfig:
        """Read back :meth:`as_dict`; unknown keys are an error naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        values = dict(values)
        if "labels" in values:
            values["labels"] = tuple(values["labels"])
        if "features" in values:
            values["features"] = FeatureConfig(**values["features"])
        return cls(**values)


# --- tokenizer ------------------------------------------------------------------------------------

def script_texts(seed: int = 0, fills: int = 20) -> list[str]:
    """Every simulator script line (customer, neutral-content, agent), each with its slots filled
    ``fills`` times, and the acted-speech sentences: the tokenizer's training text."""
    from services.customer_service.datasets import RAVDESS_STATEMENTS
    from services.customer_service.simulate import AGENT_LINES, CUSTOMER_LINES, NEUTRAL_CONTENT_LINES, fill_slots

    rng = np.random.default_rng(seed)
    templates = [line for lines in CUSTOMER_LINES.values() for line in lines]
    templates += list(NEUTRAL_CONTENT_LINES) + [line for lines in AGENT_LINES.values() for line in lines]
    texts = [fill_slots(template, rng) for template in templates for _ in range(fills)]
    return texts + list(RAVDESS_STATEMENTS.values())


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, max_length: int = 64) -> Any:
    """A byte-level BPE tokenizer (RoBERTa's kind: any text encodes, no unknown words) trained on
    ``texts``, wrapped as a ``transformers`` fast tokenizer that adds ``<s>`` and ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # the trainer gives the special tokens the first ids, in SPECIAL_TOKENS order
    tokenizer.post_processor = RobertaProcessing(("</s>", SPECIAL_TOKENS.index("</s>")),
                                                 ("<s>", SPECIAL_TOKENS.index("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", model_max_length=max_length)


def load_tokenizer(directory: Path) -> Any:
    """A tokenizer saved with ``save_pretrained`` (ours or a pretrained checkpoint's), local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


# --- encoders -------------------------------------------------------------------------------------

def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """The transformer's fixed sine/cosine position table, ``(length, dim)``."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    scale = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * scale)
    table[:, 1::2] = torch.cos(position * scale[: dim // 2])
    return table


class LogMelEncoder(nn.Module):
    """Log-mel frames to ``d_model`` vectors every 40 ms: band normalisation, two stride-2
    convolutions, a pre-norm transformer."""

    band_mean: torch.Tensor
    band_std: torch.Tensor

    def __init__(self, config: EmotionModelConfig) -> None:
        super().__init__()
        bands = config.features.n_mels
        self.register_buffer("band_mean", torch.zeros(bands))
        self.register_buffer("band_std", torch.ones(bands))
        self.convolutions = nn.ModuleList([
            nn.Conv1d(bands, config.conv_channels, kernel_size=5, stride=2, padding=2),
            nn.Conv1d(config.conv_channels, config.d_model, kernel_size=5, stride=2, padding=2)])
        layer = nn.TransformerEncoderLayer(config.d_model, config.audio_heads, config.audio_ff, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.audio_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)

    def set_feature_statistics(self, mean: npt.ArrayLike, std: npt.ArrayLike) -> None:
        """Per-band mean and standard deviation of the training set's log-mel frames."""
        self.band_mean.copy_(torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.band_std.copy_(torch.as_tensor(np.maximum(np.asarray(std), 1e-3), dtype=torch.float32))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, n_mels)`` frames and their validity ``(B, T)`` to ``(B, T', d)`` and ``(B, T')``."""
        hidden = ((features - self.band_mean) / self.band_std * mask[..., None]).transpose(1, 2)
        lengths = mask.sum(dim=1)
        for convolution in self.convolutions:
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1  # kernel 5, stride 2, padding 2
            hidden = F.gelu(convolution(hidden))
            # zero what lies past each row's end, so padding in a batch reads as the edge does alone
            hidden = hidden * (torch.arange(hidden.shape[2], device=hidden.device) < lengths[:, None])[:, None, :]
        hidden = hidden.transpose(1, 2)
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        hidden = hidden + sinusoidal_positions(hidden.shape[1], hidden.shape[2], hidden.device)
        hidden = self.transformer(hidden, src_key_padding_mask=~_never_empty(valid))
        return self.norm(hidden), valid


class Wav2Vec2Encoder(nn.Module):
    """A ``transformers`` Wav2Vec2 model on 16 kHz waveforms, projected to ``d_model``."""

    def __init__(self, config: EmotionModelConfig) -> None:
        super().__init__()
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        if config.wav2vec2 is None:
            raise ModelConfigError("the wav2vec2 audio encoder needs its transformers config (build_emotion_net "
                                   "fills it in)")
        self.wav2vec2 = Wav2Vec2Model(Wav2Vec2Config.from_dict(config.wav2vec2))
        self.project = nn.Linear(self.wav2vec2.config.hidden_size, config.d_model)

    def forward(self, waveforms: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, S)`` samples and their validity to ``(B, T', d)`` and ``(B, T')`` (one frame per 20 ms)."""
        lengths = mask.sum(dim=1)
        mean = (waveforms * mask).sum(dim=1, keepdim=True) / lengths.clamp(min=1)[:, None]
        variance = (((waveforms - mean) * mask) ** 2).sum(dim=1, keepdim=True) / lengths.clamp(min=1)[:, None]
        normalised = (waveforms - mean) / torch.sqrt(variance + 1e-7) * mask
        hidden = self.wav2vec2(normalised, attention_mask=mask.long()).last_hidden_state
        frames = self.wav2vec2._get_feat_extract_output_lengths(cast(torch.LongTensor, lengths))
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < frames[:, None]
        return self.project(hidden), valid


class TextEncoder(nn.Module):
    """A ``transformers`` RoBERTa model on token ids, projected to ``d_model``."""

    def __init__(self, config: EmotionModelConfig) -> None:
        super().__init__()
        from transformers import RobertaConfig, RobertaModel

        if config.roberta is None:
            raise ModelConfigError("the text encoder needs its transformers config (build_emotion_net fills it in)")
        self.roberta = RobertaModel(RobertaConfig.from_dict(config.roberta), add_pooling_layer=False)
        self.project = nn.Linear(self.roberta.config.hidden_size, config.d_model)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L)`` token ids and their validity to ``(B, L, d)`` and ``(B, L)``."""
        hidden = self.roberta(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return self.project(hidden), mask


# --- fusion ---------------------------------------------------------------------------------------

def _never_empty(valid: torch.Tensor) -> torch.Tensor:
    """``valid`` with position 0 always valid, so attention over an absent row has a key (its output
    is discarded) instead of a softmax over nothing (NaN)."""
    safe = valid.clone()
    safe[:, 0] = True
    return safe


def masked_mean(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``(B, T, d)`` over the valid positions of each row (zeros for a row with none)."""
    weights = valid.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CrossModalFusion(nn.Module):
    """Audio frames attend to text tokens and tokens to frames; pooled streams, a learned stand-in
    for an absent modality, and the classifier."""

    def __init__(self, config: EmotionModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.audio_to_text = nn.MultiheadAttention(d, config.fusion_heads, dropout=config.dropout, batch_first=True)
        self.text_to_audio = nn.MultiheadAttention(d, config.fusion_heads, dropout=config.dropout, batch_first=True)
        self.audio_norm = nn.LayerNorm(d)
        self.text_norm = nn.LayerNorm(d)
        self.absent_audio = nn.Parameter(torch.zeros(d))
        self.absent_text = nn.Parameter(torch.zeros(d))
        self.classifier = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Dropout(config.dropout),
                                        nn.Linear(d, len(config.labels)))

    def forward(self, audio: torch.Tensor, audio_valid: torch.Tensor, has_audio: torch.Tensor,
                text: torch.Tensor, text_valid: torch.Tensor, has_text: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, labels)`` from both streams and which rows have each modality."""
        attended_text, _ = self.audio_to_text(audio, text, text, key_padding_mask=~_never_empty(text_valid),
                                              need_weights=False)
        attended_audio, _ = self.text_to_audio(text, audio, audio, key_padding_mask=~_never_empty(audio_valid),
                                               need_weights=False)
        audio = self.audio_norm(audio + attended_text * has_text[:, None, None])
        text = self.text_norm(text + attended_audio * has_audio[:, None, None])
        pooled_audio = torch.where(has_audio[:, None], masked_mean(audio, audio_valid), self.absent_audio)
        pooled_text = torch.where(has_text[:, None], masked_mean(text, text_valid), self.absent_text)
        return self.classifier(torch.cat([pooled_audio, pooled_text], dim=1))


# --- the network ----------------------------------------------------------------------------------

@dataclass
class EmotionBatch:
    """Padded inputs of a batch; a modality nobody in the batch has is ``None``."""

    audio: torch.Tensor | None
    """``(B, T, n_mels)`` log-mel frames (``logmel``) or ``(B, S)`` waveforms (``wav2vec2``)."""
    audio_valid: torch.Tensor | None
    input_ids: torch.Tensor | None
    text_valid: torch.Tensor | None
    has_audio: torch.Tensor
    has_text: torch.Tensor

    def to(self, device: torch.device | str) -> EmotionBatch:
        """The batch on ``device``."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)
        return EmotionBatch(move(self.audio), move(self.audio_valid), move(self.input_ids), move(self.text_valid),
                            self.has_audio.to(device), self.has_text.to(device))


class EmotionNet(nn.Module):
    """Audio encoder + text encoder + cross-modal fusion; ``forward`` gives logits over ``config.labels``."""

    def __init__(self, config: EmotionModelConfig) -> None:
        super().__init__()
        self.config = config
        self.audio_encoder: nn.Module = (LogMelEncoder(config) if config.audio_kind == "logmel"
                                         else Wav2Vec2Encoder(config))
        self.text_encoder = TextEncoder(config)
        self.fusion = CrossModalFusion(config)

    def forward(self, batch: EmotionBatch) -> torch.Tensor:
        """Logits ``(B, labels)``; rows without audio or text use the other modality alone."""
        has_audio, has_text = self._presence(batch)
        size = has_audio.shape[0]
        audio, audio_valid = self._encode(self.audio_encoder, batch.audio, batch.audio_valid, size)
        text, text_valid = self._encode(self.text_encoder, batch.input_ids, batch.text_valid, size)
        return self.fusion(audio, audio_valid & has_audio[:, None], has_audio, text, text_valid & has_text[:, None],
                           has_text)

    def _presence(self, batch: EmotionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        has_audio, has_text = batch.has_audio.bool(), batch.has_text.bool()
        if batch.audio is None:
            has_audio = torch.zeros_like(has_audio)
        if batch.input_ids is None:
            has_text = torch.zeros_like(has_text)
        if self.training and self.config.modality_dropout > 0:
            both = has_audio & has_text
            draw = torch.rand(both.shape, device=both.device)
            hide_audio = both & (draw < self.config.modality_dropout)
            hide_text = both & (draw >= 1 - self.config.modality_dropout)
            has_audio, has_text = has_audio & ~hide_audio, has_text & ~hide_text
        if not bool((has_audio | has_text).all()):
            raise ValueError("every utterance needs audio or text (a row has neither)")
        return has_audio, has_text

    def _encode(self, encoder: nn.Module, inputs: torch.Tensor | None, valid: torch.Tensor | None,
                size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs is None or valid is None:
            device = self.fusion.absent_audio.device
            return (torch.zeros(size, 1, self.config.d_model, device=device),
                    torch.zeros(size, 1, dtype=torch.bool, device=device))
        hidden, hidden_valid = encoder(inputs, valid.bool())
        return hidden, hidden_valid

    def parameter_count(self) -> dict[str, int]:
        """Parameters of each part and in all."""
        parts = {"audio": self.audio_encoder, "text": self.text_encoder, "fusion": self.fusion}
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(counts.values())
        return counts


def tiny_wav2vec2_config(hidden: int = 96) -> dict[str, Any]:
    """A small Wav2Vec2 config (the standard 7-layer convolutional front end, 320x down-sampling,
    narrow; 2 transformer layers) for training from scratch on CPU."""
    from transformers import Wav2Vec2Config

    config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=2 * hidden, conv_dim=(64,) * 7, feat_extract_norm="layer",
                            do_stable_layer_norm=True, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4,
                            mask_time_prob=0.0, layerdrop=0.0)
    return dict(config.to_dict())


def build_emotion_net(config: EmotionModelConfig, tokenizer: Any) -> tuple[EmotionNet, EmotionModelConfig]:
    """A new network for ``config`` with the ``transformers`` configs filled in: from the local
    pretrained directories when given (their weights loaded), else small ones sized by ``config``
    (RoBERTa's vocabulary from ``tokenizer``). Returns the network and the completed config."""
    from transformers import AutoConfig, AutoModel, RobertaConfig

    if config.text_pretrained:
        roberta = AutoConfig.from_pretrained(config.text_pretrained, local_files_only=True).to_dict()
    else:
        roberta = config.roberta or RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=config.d_model, num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads, intermediate_size=config.text_ff,
            max_position_embeddings=config.max_text_tokens + 4, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout).to_dict()
    wav2vec2 = config.wav2vec2
    if config.audio_kind == "wav2vec2":
        wav2vec2 = (AutoConfig.from_pretrained(config.audio_pretrained, local_files_only=True).to_dict()
                    if config.audio_pretrained else wav2vec2 or tiny_wav2vec2_config())
    completed = replace(config, roberta=_json_clean(roberta), wav2vec2=_json_clean(wav2vec2) if wav2vec2 else None)
    net = EmotionNet(completed)
    if config.text_pretrained:
        pretrained = AutoModel.from_pretrained(config.text_pretrained, local_files_only=True)
        net.text_encoder.roberta.load_state_dict(pretrained.state_dict(), strict=False)
    if config.audio_kind == "wav2vec2" and config.audio_pretrained:
        assert isinstance(net.audio_encoder, Wav2Vec2Encoder)
        pretrained = AutoModel.from_pretrained(config.audio_pretrained, local_files_only=True)
        net.audio_encoder.wav2vec2.load_state_dict(pretrained.state_dict(), strict=False)
    return net, completed


def _json_clean(values: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(values, default=str)))


# --- inputs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedUtterance:
    """One utterance's model inputs: log-mel frames or a waveform, and token ids; ``None`` when absent."""

    audio: npt.NDArray[np.float32] | None
    token_ids: npt.NDArray[np.int64] | None


def prepare_utterance(samples: npt.ArrayLike | None, text: str | None, *, config: EmotionModelConfig,
                      tokenizer: Any) -> PreparedUtterance:
    """Inputs of one utterance: ``samples`` mono float at 16 kHz (cut to ``max_audio_s``; empty or
    ``None``: no audio), ``text`` its transcript (blank or ``None``: no text)."""
    audio = None
    if samples is not None:
        waveform = np.asarray(samples, dtype=np.float32)
        if waveform.ndim != 1:
            raise ValueError(f"audio must be mono 1-D samples at {FEATURE_RATE} Hz, got shape {waveform.shape}")
        waveform = waveform[: int(config.max_audio_s * FEATURE_RATE)]
        if waveform.size:
            audio = log_mel(waveform, config.features) if config.audio_kind == "logmel" else waveform
    token_ids = None
    if text is not None and text.strip():
        encoded = tokenizer(text, truncation=True, max_length=config.max_text_tokens + 2)
        token_ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    if audio is None and token_ids is None:
        raise ValueError("an utterance needs audio or text; this one has neither")
    return PreparedUtterance(audio, token_ids)


def collate(items: Sequence[PreparedUtterance], pad_token_id: int) -> EmotionBatch:
    """Pad prepared utterances into one :class:`EmotionBatch` (a modality none of them has is ``None``)."""
    if not items:
        raise ValueError("collate needs at least one utterance")
    has_audio = torch.tensor([item.audio is not None for item in items])
    has_text = torch.tensor([item.token_ids is not None for item in items])
    audio, audio_valid = _pad([item.audio for item in items], 0.0, torch.float32)
    ids, text_valid = _pad([item.token_ids for item in items], pad_token_id, torch.long)
    return EmotionBatch(audio, audio_valid, ids, text_valid, has_audio, has_text)


def _pad(arrays: Sequence[npt.NDArray[Any] | None], fill: float, dtype: torch.dtype,
         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    present = [array for array in arrays if array is not None]
    if not present:
        return None, None
    longest = max(array.shape[0] for array in present)
    tail = present[0].shape[1:]
    padded = torch.full((len(arrays), longest, *tail), fill, dtype=dtype)
    valid = torch.zeros(len(arrays), longest, dtype=torch.bool)
    for row, array in enumerate(arrays):
        if array is not None:
            padded[row, : array.shape[0]] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
            valid[row, : array.shape[0]] = True
    return padded, valid


# --- the model: network, tokenizer, config --------------------------------------------------------

@dataclass
class EmotionModel:
    """A network with its tokenizer and config: what is saved, loaded and served."""

    net: EmotionNet
    tokenizer: Any
    config: EmotionModelConfig

    @classmethod
    def create(cls, config: EmotionModelConfig | None = None, tokenizer: Any | None = None) -> EmotionModel:
        """A new (untrained) model; without a tokenizer, one is trained on the simulator's scripts
        (or read from ``config.text_pretrained``)."""
        config = config or EmotionModelConfig()
        if tokenizer is None:
            tokenizer = (load_tokenizer(Path(config.text_pretrained)) if config.text_pretrained
                         else train_tokenizer(script_texts(), max_length=config.max_text_tokens + 2))
        net, completed = build_emotion_net(config, tokenizer)
        return cls(net, tokenizer, completed)

    def prepare(self, samples: npt.ArrayLike | None, text: str | None) -> PreparedUtterance:
        """:func:`prepare_utterance` with this model's config and tokenizer."""
        return prepare_utterance(samples, text, config=self.config, tokenizer=self.tokenizer)

    def batch(self, items: Sequence[PreparedUtterance]) -> EmotionBatch:
        """:func:`collate` with this tokenizer's padding id."""
        return collate(items, int(self.tokenizer.pad_token_id))

    @torch.inference_mode()
    def predict(self, items: Sequence[PreparedUtterance]) -> list[dict[str, float]]:
        """Probabilities over the labels, one mapping per utterance (the network in eval mode)."""
        self.net.eval()
        device = next(self.net.parameters()).device
        probabilities = F.softmax(self.net(self.batch(items).to(device)), dim=-1).cpu().numpy()
        return [{label: float(p) for label, p in zip(self.config.labels, row, strict=True)} for row in probabilities]


def save_emotion_model(model: EmotionModel, directory: Path) -> list[Path]:
    """``config.json``, ``weights.pt`` (state dict) and ``tokenizer/`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_FILE
    config_path.write_text(json.dumps(model.config.as_dict(), indent=1))
    weights = directory / WEIGHTS_FILE
    torch.save(model.net.state_dict(), weights)
    model.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    return [config_path, weights, directory / TOKENIZER_DIR]


def load_emotion_model(directory: Path, device: torch.device | str = "cpu") -> EmotionModel:
    """A model saved by :func:`save_emotion_model`, in eval mode on ``device``; the pretrained
    source directories its config names are not needed (their configs are in ``config.json``)."""
    config = EmotionModelConfig.from_dict(_read_config(directory))
    tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
    net = EmotionNet(config)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.to(device).eval()
    return EmotionModel(net, tokenizer, config)


# --- serving through the shared runtime -----------------------------------------------------------

MODELS_SUBDIR = "cs"
ARTIFACT_NAME = "emotion"
MAX_REQUEST_S = 30.0
"""An utterance longer than this is refused (``BadInput``): no endpointed utterance is that long."""


@dataclass(frozen=True)
class EmotionRequest:
    """One utterance for the ``cs-emotion`` model: audio, transcript, or both.

    ``samples``: mono int16 PCM at ``sample_rate`` (8000-48000 Hz, resampled to 16 kHz here);
    ``None`` or empty means no audio. ``text``: the transcript; ``None`` or blank means no text.
    """

    samples: npt.NDArray[np.int16] | None
    sample_rate: int
    text: str | None


def default_emotion_dir() -> Path:
    """The newest shipped emotion artifact, ``<models_dir>/cs/emotion/<version>``."""
    from model_runtime.artifacts import list_versions
    from shared.config import get_settings

    root = get_settings().models_dir / MODELS_SUBDIR
    versions = list_versions(root, ARTIFACT_NAME)
    if not versions:
        raise FileNotFoundError(f"no emotion model artifact under {root / ARTIFACT_NAME} (run `tessera train cs`)")
    return root / ARTIFACT_NAME / versions[-1]


class UtterancePreparer:
    """Checks one :class:`EmotionRequest` and turns it into model inputs (in the runtime's prepare
    pool); needs only the model's config and tokenizer, not its weights."""

    def __init__(self, config: EmotionModelConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def __call__(self, request: Any) -> PreparedUtterance:
        """The request's inputs; :class:`~model_runtime.BadInput` saying what is wrong otherwise."""
        from model_runtime import BadInput

        if not isinstance(request, EmotionRequest):
            raise BadInput(f"expected an EmotionRequest, got {type(request).__name__}")
        text = request.text
        if text is not None and not isinstance(text, str):
            raise BadInput(f"text must be a string or None, got {type(text).__name__}")
        samples = self._waveform(request)
        if samples is None and (text is None or not text.strip()):
            raise BadInput("the utterance has neither audio nor text")
        return prepare_utterance(samples, text, config=self.config, tokenizer=self.tokenizer)

    @staticmethod
    def _waveform(request: EmotionRequest) -> npt.NDArray[np.float32] | None:
        from model_runtime import BadInput
        from services.customer_service.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, resample

        samples = request.samples
        if samples is None:
            return None
        if not isinstance(samples, np.ndarray) or samples.dtype != np.int16 or samples.ndim != 1:
            shape = getattr(samples, "shape", None)
            raise BadInput(f"audio must be mono int16 samples (1-D), got {getattr(samples, 'dtype', type(samples))} "
                           f"of shape {shape}")
        if not samples.size:
            return None
        rate = request.sample_rate
        integer = isinstance(rate, int | np.integer) and not isinstance(rate, bool)
        if not integer or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise BadInput(f"sample rate {rate!r} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
        if samples.size > MAX_REQUEST_S * rate:
            raise BadInput(f"the utterance is {samples.size / rate:.1f} s long; "
                           f"at most {MAX_REQUEST_S:.0f} s is accepted")
        return resample(samples.astype(np.float32) / 32768.0, int(rate), FEATURE_RATE)


def readings(model: EmotionModel, items: Sequence[PreparedUtterance]) -> list[EmotionReading]:
    """The model's answers for a batch of prepared utterances, as the call pipeline reads them."""
    from services.customer_service.pipeline import EmotionReading

    answers = []
    for item, probabilities in zip(items, model.predict(items), strict=True):
        modalities = tuple(name for name, present in (("audio", item.audio is not None),
                                                      ("text", item.token_ids is not None)) if present)
        label = max(probabilities, key=probabilities.__getitem__)
        answers.append(EmotionReading(label=label, probabilities=probabilities, modalities=modalities))
    return answers


def emotion_model_spec(directory: Path | None = None, *, name: str = "cs-emotion", max_batch_size: int = 16,
                       max_wait_ms: float = 5.0, model: EmotionModel | None = None, version: str = "",
                       max_queue: int = 256, timeout_s: float | None = 30.0, device: str | None = None) -> ModelSpec:
    """The emotion model as a model of the shared runtime: items are :class:`EmotionRequest`,
    answers :class:`~services.customer_service.pipeline.EmotionReading`.

    Parameters
    ----------
    directory : Path, optional
        A saved model (:func:`save_emotion_model`, sealed as an artifact or a bare directory);
        default the newest shipped one (:func:`default_emotion_dir`).
    name : str
        Runtime model name.
    max_batch_size, max_wait_ms, max_queue, timeout_s
        Batching policy: utterances of concurrent calls share a batch.
    model : EmotionModel, optional
        A model built in code (tests), served instead of a directory.
    version : str
        Version label; empty takes the artifact manifest's.
    device : str, optional
        Overrides ``settings.device``.

    ``prepare`` (resampling, log-mel features, tokens) runs in the runtime's thread pool; a request
    without audio and text, with audio that is not mono int16, at a rate outside 8-48 kHz, or
    longer than :data:`MAX_REQUEST_S` fails alone with ``BadInput``.
    """
    from model_runtime import ModelSpec

    if model is None:
        directory = directory or default_emotion_dir()
        config = EmotionModelConfig.from_dict(_read_config(directory))
        preparer = UtterancePreparer(config, load_tokenizer(directory / TOKENIZER_DIR))
    else:
        preparer = UtterancePreparer(model.config, model.tokenizer)

    def load(context: LoadContext) -> EmotionModel:
        if model is not None:
            return model
        source = context.artifact_dir or directory
        assert source is not None
        return load_emotion_model(source, device=context.placement.device)

    warmup = [EmotionRequest(np.zeros(8000, np.int16), 8000, "I need help with my bill."),
              EmotionRequest(np.zeros(4000, np.int16), 8000, None),
              EmotionRequest(None, 8000, "thank you")]
    return ModelSpec(name=name, version=version or ("" if model is None else "in-code"), loader=load,
                     run_batch=readings, prepare=preparer, prepare_in="thread",
                     artifact_dir=directory if model is None else None, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=timeout_s, warmup_items=warmup,
                     device=device)


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    try:
        return dict(json.loads(config_path.read_text()))
    except (OSError, ValueError) as error:
        raise ModelConfigError(f"{config_path}: cannot read the model config ({error})") from error
