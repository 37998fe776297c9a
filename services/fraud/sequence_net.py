"""The card-sequence transformer (torch): trained by ``training.py``, exported to ONNX for serving.

Kept apart from :mod:`services.fraud.model` so that serving, which runs the exported ONNX graph
(or a backend the card names), never imports torch: the API's model child process stays small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from services.fraud.features import SEQUENCE_CHANNELS, SEQUENCE_STEPS
from services.fraud.model import SEQUENCE_STATE_FILE, SequenceConfig


class CardSequenceEncoder(nn.Module):
    """Tiny transformer encoder over a card's last transactions; scores the last one.

    Input ``(B, K, S)`` float32 from ``features.sequence_matrix`` (K = 17 steps, the current
    transaction last; S = 7 channels, channel 0 = valid flag). Output ``(B,)`` fraud logits.
    Padded steps are masked out of attention; the current step is always valid.
    """

    def __init__(self, config: SequenceConfig = SequenceConfig()) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(len(SEQUENCE_CHANNELS), config.d_model)
        self.position = nn.Parameter(torch.zeros(1, SEQUENCE_STEPS, config.d_model))
        layer = nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.d_ff, config.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, 1)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, K, S) float32 -> (B,) logits."""
        padding = sequences[..., 0] < 0.5
        hidden = self.embed(sequences) + self.position
        # Additive float mask rather than a bool key-padding mask: exports cleanly to ONNX.
        bias = padding.to(hidden.dtype)[:, None, :] * -1e4
        bias = bias.repeat_interleave(self.config.n_heads, dim=0).expand(-1, SEQUENCE_STEPS, -1)
        hidden = self.encoder(hidden, mask=bias)
        return self.head(self.norm(hidden[:, -1])).squeeze(-1)


class SequenceEnsemble(nn.Module):
    """Mean logit of several :class:`CardSequenceEncoder` (the stacking fold models)."""

    def __init__(self, models: list[CardSequenceEncoder]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, K, S) float32 -> (B,) mean logits."""
        return torch.stack([model(sequences) for model in self.models]).mean(0)


def load_sequence_ensemble(directory: Path) -> SequenceEnsemble:
    """The card-sequence transformer from its state file, in eval mode (eager torch)."""
    state = torch.load(directory / SEQUENCE_STATE_FILE, map_location="cpu", weights_only=True)
    config = SequenceConfig(**state["config"])
    model = SequenceEnsemble([CardSequenceEncoder(config) for _ in range(state["n_models"])])
    model.load_state_dict(state["weights"])
    return model.eval()
