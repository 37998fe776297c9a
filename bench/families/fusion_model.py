"""The audio + text fusion benchmark's model, its decode and its runtime spec: what every server of
:mod:`bench.families.fusion` shares, importable without the servers' packages (LitServe, uvicorn), so the
GPU benchmark (:mod:`bench.runtime_gpu`) serves the same model.

Model (:class:`FusionClassifier`, random weights, seed 0, nothing downloaded): a small
wav2vec2-style audio encoder (``transformers`` ``Wav2Vec2Model``: 7-layer conv feature encoder with
layer norm, 128 channels instead of wav2vec2-base's 512, 3 transformer layers, hidden 128, 4 heads)
and a small text encoder (``RobertaModel``: 2 layers, hidden 128, 4 heads, over a byte-level
tokenizer, at most 64 tokens), fused by one transformer layer over
``[fusion token; text; audio]`` with modality embeddings and a key padding mask, the fusion
token's state giving 6-way emotion logits. Either modality may be missing (masks drop it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import RobertaConfig, RobertaModel, Wav2Vec2Config, Wav2Vec2Model

from model_runtime import ModelSpec, choose_cpu_backend, collate, length_bucket, run_collated
from model_runtime.backends import CALIBRATION_OPTION, CPU_CANDIDATES, QUANTIZED_CPU_CANDIDATES

SAMPLE_RATE = 16_000
EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "surprised")
BOS_ID, PAD_ID, EOS_ID, BYTE_OFFSET = 0, 1, 2, 3
VOCAB_SIZE = 256 + BYTE_OFFSET
MAX_TOKENS = 64
MIN_AUDIO_SAMPLES = 400  # the conv encoder's receptive field (25 ms): shorter audio gives no frame
MAX_AUDIO_SAMPLES = 10 * SAMPLE_RATE
PAD_AXES = {"audio": (0,), "tokens": (0,)}
MODEL_NAME = "fusion"
RUNTIME_BATCH = 8
RUNTIME_BATCH_COST = 8 * SAMPLE_RATE  # 8 s of audio: padded batches beyond ~100k samples leave the CPU cache
BUCKET_BASE = 2.0
POOL_SIZE, POOL_SEED = 32, 16
WORDS = ("i", "you", "we", "really", "never", "always", "can't", "believe", "this", "is", "so", "great", "awful",
         "today", "call", "again", "thanks", "please", "why", "what", "happened", "okay", "fine", "wait",
         "refund", "order", "late", "love", "hate", "sorry")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def audio_config(hidden: int = 128, layers: int = 3, conv_channels: int = 128) -> Wav2Vec2Config:
    """A small wav2vec2 config: layer-norm conv encoder (so padding changes nothing), no SpecAugment."""
    return Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=2 * hidden, conv_dim=(conv_channels,) * 7,
                          feat_extract_norm="layer", do_stable_layer_norm=True, apply_spec_augment=False,
                          mask_time_prob=0.0, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
                          hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          feat_proj_dropout=0.0, layerdrop=0.0)


def text_config(hidden: int = 128, layers: int = 2) -> RobertaConfig:
    """A small RoBERTa config over the byte-level vocabulary of :func:`tokenize`."""
    return RobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=2 * hidden,
                         max_position_embeddings=MAX_TOKENS + PAD_ID + 1, type_vocab_size=1,
                         pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class FusionLayer(torch.nn.Module):
    """A post-norm transformer encoder layer with a key padding mask, written with shape-agnostic
    reshapes so that an ONNX export keeps the sequence length dynamic (unlike ``nn.MultiheadAttention``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.feed_forward = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                                torch.nn.Linear(2 * width, width))
        self.norm_attention = torch.nn.LayerNorm(width)
        self.norm_feed_forward = torch.nn.LayerNorm(width)

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        rows, width = states.shape[0], states.shape[2]
        query, key, value = (part.reshape(rows, -1, self.heads, width // self.heads).transpose(1, 2)
                             for part in self.qkv(states).chunk(3, dim=-1))
        attended = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                                    attn_mask=valid[:, None, None, :])
        states = self.norm_attention(states + self.out(attended.transpose(1, 2).reshape(rows, -1, width)))
        return self.norm_feed_forward(states + self.feed_forward(states))


class FusionClassifier(torch.nn.Module):
    """Audio (wav2vec2-style) + text (RoBERTa-style) encoders fused by attention; 6 emotion logits.

    ``forward(audio, audio_mask, tokens, tokens_mask)`` takes the padded batch of
    :func:`model_runtime.collate` (``audio`` (N, S) float, ``tokens`` (N, T) int64, masks ``True`` on
    real samples/tokens) and returns (N, 6) logits. A row whose mask is all ``False`` lacks that
    modality; a batch may lack it entirely (S or T = 0).
    """

    def __init__(self, audio: Wav2Vec2Config, text: RobertaConfig, width: int = 128, classes: int = len(EMOTIONS)
                 ) -> None:
        super().__init__()
        self.audio_encoder = Wav2Vec2Model(audio)
        self.text_encoder = RobertaModel(text, add_pooling_layer=False)
        self.audio_projection = torch.nn.Linear(audio.hidden_size, width)
        self.text_projection = torch.nn.Linear(text.hidden_size, width)
        self.fusion_token = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.modality = torch.nn.Embedding(3, width)  # fusion token, text, audio
        self.fusion = FusionLayer(width, heads=4)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, audio: torch.Tensor, audio_mask: torch.Tensor, tokens: torch.Tensor,
                tokens_mask: torch.Tensor) -> torch.Tensor:
        rows = audio.shape[0]
        fusion_token = (self.fusion_token + self.modality.weight[0]).expand(rows, 1, -1)
        text_states, text_valid = self._encode_text(tokens, tokens_mask)
        audio_states, audio_valid = self._encode_audio(audio, audio_mask)
        sequence = torch.cat([fusion_token, text_states + self.modality.weight[1],
                              audio_states + self.modality.weight[2]], dim=1)
        valid = torch.cat([torch.ones(rows, 1, dtype=torch.bool, device=audio.device), text_valid, audio_valid], 1)
        fused = self.fusion(sequence, valid)
        return self.head(fused[:, 0])

    def _encode_audio(self, audio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = audio.shape[0], self.audio_projection.out_features
        if audio.shape[1] < MIN_AUDIO_SAMPLES:
            return audio.new_zeros(rows, 0, width), torch.zeros(rows, 0, dtype=torch.bool, device=audio.device)
        lengths = mask.sum(dim=1)
        present = lengths > 0
        # Rows without audio run as silence of full length (their frames are dropped below), so the
        # encoder's own mask never sees an empty row.
        encoder_mask = (mask | ~present[:, None]).long()
        states = self.audio_encoder(audio, attention_mask=encoder_mask).last_hidden_state
        frames = self.audio_encoder._get_feat_extract_output_lengths(lengths).clamp(min=0)  # type: ignore[arg-type]
        valid = torch.arange(states.shape[1], device=audio.device)[None, :] < frames[:, None]
        return torch.where(valid[..., None], self.audio_projection(states), 0.0), valid

    def _encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = tokens.shape[0], self.text_projection.out_features
        if tokens.shape[1] == 0:
            return self.fusion_token.new_zeros(rows, 0, width), torch.zeros(rows, 0, dtype=torch.bool,
                                                                            device=tokens.device)
        present = mask.any(dim=1, keepdim=True)
        states = self.text_encoder(input_ids=tokens, attention_mask=(mask | ~present).long()).last_hidden_state
        valid = mask & present
        return torch.where(valid[..., None], self.text_projection(states), 0.0), valid


def fusion_model(seed: int = 0, *, hidden: int = 128, audio_layers: int = 3, conv_channels: int = 128,
                 text_layers: int = 2) -> FusionClassifier:
    """The fusion model with fixed random weights, in eval mode (smaller sizes for tests)."""
    torch.manual_seed(seed)
    model = FusionClassifier(audio_config(hidden, audio_layers, conv_channels), text_config(hidden, text_layers),
                             width=hidden)
    return model.eval()


def parameter_counts(model: FusionClassifier) -> dict[str, int]:
    """Parameters per part (audio encoder, text encoder, fusion + head) and in total."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    audio, text = count(model.audio_encoder), count(model.text_encoder)
    total = count(model)
    return {"audio_encoder": audio, "text_encoder": text, "fusion_and_head": total - audio - text, "total": total}


# ---------------------------------------------------------------------------------------------
# Decode and run: the same code in every server
# ---------------------------------------------------------------------------------------------
def tokenize(text: str) -> np.ndarray:
    """Byte-level tokens: ``<s>`` + UTF-8 bytes (+3) + ``</s>``, at most 64; empty text -> no tokens."""
    if not text:
        return np.zeros(0, dtype=np.int64)
    body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[:MAX_TOKENS - 2].astype(np.int64) + BYTE_OFFSET
    return np.concatenate([[BOS_ID], body, [EOS_ID]]).astype(np.int64)


def decode(body: bytes, transcript: str) -> dict[str, torch.Tensor]:
    """Request body (int16 PCM) and transcript -> ``{"audio": float32 (S,), "tokens": int64 (T,)}``.

    Audio is scaled to [-1, 1) and normalised to zero mean and unit variance per utterance (as
    wav2vec2's feature extractor does). Raises ``ValueError`` for an odd byte count, audio
    shorter than 25 ms or longer than 10 s, or neither audio nor text.
    """
    if len(body) % 2:
        raise ValueError("the body must be int16 PCM (an even number of bytes)")
    samples = len(body) // 2
    if 0 < samples < MIN_AUDIO_SAMPLES or samples > MAX_AUDIO_SAMPLES:
        raise ValueError(f"audio must last 25 ms to 10 s at 16 kHz, got {samples} samples")
    tokens = tokenize(transcript)
    if samples == 0 and tokens.size == 0:
        raise ValueError("neither audio nor transcript")
    audio = np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0
    if samples:
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    return {"audio": torch.from_numpy(audio), "tokens": torch.from_numpy(tokens)}


def decode_item(item: tuple[bytes, str]) -> dict[str, torch.Tensor]:
    """:func:`decode` over a ``(body, transcript)`` pair: the runtime's ``prepare``."""
    return decode(*item)


def audio_samples(prepared: dict[str, torch.Tensor]) -> float:
    """An item's batch cost: its audio samples (a text-only item costs as 0.1 s of audio)."""
    return float(max(int(prepared["audio"].shape[0]), SAMPLE_RATE // 10))


run_fusion = run_collated(PAD_AXES, pad_values={"tokens": PAD_ID})


def answer(logits: torch.Tensor) -> dict[str, Any]:
    """One row of logits -> ``{"label", "probabilities"}``."""
    answered = probabilities(logits).tolist()
    best = max(range(len(answered)), key=answered.__getitem__)
    return {"label": EMOTIONS[best], "probabilities": dict(zip(EMOTIONS, answered, strict=True))}


def predict_one(model: FusionClassifier, item: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One utterance through the model on its own (the naive way)."""
    with torch.inference_mode():
        return answer(run_fusion(model, [item])[0])


class FusionGraph:
    """The fusion model served by a backend ``choose_cpu_backend`` picked, eager where the graph cannot go.

    The exported graph was traced with both modalities present; a batch in which every row lacks
    one of them (zero-length audio or tokens) runs on the eager module instead.
    """

    def __init__(self, model: FusionClassifier, backend: Any, backend_name: str) -> None:
        self.model, self.backend, self.backend_name = model, backend, backend_name

    def __call__(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        if named["audio"].shape[1] < MIN_AUDIO_SAMPLES or named["tokens"].shape[1] == 0:
            return self.model(**named)
        output = self.backend(named)
        return torch.as_tensor(next(iter(output.values())) if isinstance(output, dict) else output)


ONNX_DYNAMIC_AXES = {"audio": {1: "samples"}, "audio_mask": {1: "samples"}, "tokens": {1: "tokens"},
                     "tokens_mask": {1: "tokens"}}


def backend_example(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A padded example batch for export and measurement, as the model's keyword arguments.

    Tokens are cut to 32: the export check reruns the graph at doubled sizes, which must stay
    within the text encoder's 64 positions.
    """
    batch = collate([{**item, "tokens": item["tokens"][:32]} for item in items], PAD_AXES, {"tokens": PAD_ID})
    return {**batch.inputs, **{name + "_mask": mask for name, mask in batch.masks.items()}}


FLOAT_TOLERANCE = 1e-3
"""Largest logit difference from eager a float backend may show (rounding, not a different model)."""
QUANTIZED_TOLERANCE = 0.01
"""Largest difference from eager's answered probabilities a quantized backend may show (one percentage
point: the label and every probability a caller reads as the eager model's, to two decimals at worst)."""
CALIBRATION_UTTERANCES = 16


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits -> the probabilities callers are answered with (:func:`answer`)."""
    return torch.softmax(logits.float(), dim=-1)


def answered_probabilities(outputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """A backend's outputs (the logits, or ONNX Runtime's ``{"logits": ...}``) -> answered probabilities."""
    return probabilities(outputs["logits"] if isinstance(outputs, dict) else outputs)


def choose_backend(model: FusionClassifier, *, quantized: bool = False) -> tuple[FusionGraph, dict[str, Any]]:
    """The fastest accurate backend on this machine (``model_runtime.choose_cpu_backend``).

    Float (default): eager vs ONNX Runtime vs ONNX dynamic int8, within :data:`FLOAT_TOLERANCE` of eager's
    logits. ``quantized``: ONNX Runtime's calibrated int8 (``onnx-int8-static``) joins them, every candidate
    judged on the answered probabilities within :data:`QUANTIZED_TOLERANCE`, over 8 pool utterances; its
    activation ranges come from :data:`CALIBRATION_UTTERANCES` utterances the load never sends (the pool
    continued with the same seed).
    """
    export = {"dynamic_axes": ONNX_DYNAMIC_AXES, "output_names": ["logits"]}
    if not quantized:
        example = backend_example([decode(pcm, text) for pcm, text, _ in utterance_pool()[:2]])
        choice = choose_cpu_backend(model, example, max_abs_error=FLOAT_TOLERANCE, batch_sizes=(1, 4), repeats=3,
                                    export_options=export)
        return FusionGraph(model, choice.backend, choice.name), choice.as_dict()
    pool = utterance_pool(POOL_SIZE + CALIBRATION_UTTERANCES)
    example = backend_example([decode(pcm, text) for pcm, text, _ in pool[:8]])
    calibration = [backend_example([decode(pcm, text)]) for pcm, text, _ in pool[POOL_SIZE:]]
    choice = choose_cpu_backend(model, example, CPU_CANDIDATES + QUANTIZED_CPU_CANDIDATES,
                                max_abs_error=QUANTIZED_TOLERANCE, batch_sizes=(1, 4), repeats=3,
                                export_options=export, compare_as=answered_probabilities,
                                backend_options={"onnx-int8-static": {CALIBRATION_OPTION: calibration}})
    return FusionGraph(model, choice.backend, choice.name), choice.as_dict()


def fusion_spec(model: FusionClassifier | FusionGraph, *, name: str = MODEL_NAME, buckets: bool,
                warmup: Sequence[tuple[bytes, str]] = ()) -> ModelSpec:
    """The runtime's spec: decode in ``prepare`` (thread pool), cost = audio samples, optional buckets."""
    bucket = length_bucket(lambda item: int(item["audio"].shape[0]), base=BUCKET_BASE) if buckets else None
    return ModelSpec(name=name, version="bench", loader=lambda _ctx: model, prepare=decode_item,
                     prepare_in="thread", run_batch=run_fusion, finalize=answer, max_batch_size=RUNTIME_BATCH,
                     max_queue=256, cost=audio_samples, max_batch_cost=RUNTIME_BATCH_COST, bucket=bucket,
                     warmup_items=list(warmup))


def utterance_pool(count: int = POOL_SIZE, seed: int = POOL_SEED) -> list[tuple[bytes, str, float]]:
    """``count`` utterances ``(int16 PCM bytes, transcript, seconds)`` of 1–6 s: a few sines + noise."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        seconds = float(rng.uniform(1.0, 6.0))
        time_axis = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wave = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(90, 400) * time_axis + rng.uniform(0, 6))
                   for _ in range(3))
        wave = wave * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * time_axis)) + rng.normal(0, 0.02,
                                                                                                    time_axis.size)
        pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 13))))
        pool.append((pcm, text, seconds))
    return pool
