"""The failure-risk network (:class:`SensorWindowNet`, described in :mod:`services.iiot.model`) and what
needs torch to save, export, load or exercise it.

:mod:`services.iiot.model` imports no torch and serves these names on first use, so the edge gateway
(ONNX Runtime only) never loads torch; import them from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from services.iiot.model import (
    CONFIG_FILE,
    MASKED,
    NORMALISATION_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    SensorWindowConfig,
    example_mask,
    read_config,
)


class ChannelAttention(nn.Module):
    """Softmax weights over channels from each channel's window summary; ``(B, T, F)`` -> ``(B, F)``."""

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.channel_bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Channel weights (summing to 1 per row) of normalised, zero-padded ``x`` with validity ``mask``."""
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)[..., None]  # (B, 1, 1)
        mean = x.sum(dim=1, keepdim=True) / count
        spread = torch.sqrt((((x - mean) * mask[..., None]) ** 2).sum(dim=1, keepdim=True) / count + 1e-6)
        summary = torch.stack([mean[:, 0], spread[:, 0], x[:, -1]], dim=-1)  # (B, F, 3); step -1 is "now"
        return F.softmax(self.score(summary).squeeze(-1) + self.channel_bias, dim=-1)


class NumericTokens(nn.Module):
    """One ``d``-wide token per scalar input: ``(B, F)`` -> ``(B, F, d)``.

    Periodic (``frequencies`` > 0): ``ReLU(W_f [sin(2 pi c_f x), cos(2 pi c_f x)] + b_f)`` with learned
    frequencies ``c_f`` per feature, which lets attention layers draw sharp thresholds on a scalar;
    else linear: ``x w_f + b_f``.
    """

    def __init__(self, features: int, d: int, frequencies: int = 0, sigma: float = 1.0) -> None:
        super().__init__()
        self.frequencies = frequencies
        if frequencies:
            self.frequency = nn.Parameter(torch.randn(features, frequencies) * sigma)
            self.weight = nn.Parameter(torch.randn(features, 2 * frequencies, d) / (2 * frequencies) ** 0.5)
        else:
            self.weight = nn.Parameter(torch.randn(features, d) * 0.5)
        self.bias = nn.Parameter(torch.zeros(features, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of standardised scalars ``x`` (B, F)."""
        if not self.frequencies:
            return x[..., None] * self.weight + self.bias
        angle = 2.0 * torch.pi * x[..., None] * self.frequency  # (B, F, k)
        periodic = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)  # (B, F, 2k)
        projected = torch.matmul(periodic.transpose(0, 1), self.weight).transpose(0, 1)  # (B, F, d)
        return F.relu(projected + self.bias)


class SensorWindowNet(nn.Module):
    """Attention over a sensor window: ``(window (B, T, F), mask (B, T))`` -> named outputs (see module doc)."""

    channel_mean: torch.Tensor
    channel_std: torch.Tensor

    def __init__(self, config: SensorWindowConfig) -> None:
        super().__init__()
        self.config = config
        channels, d = len(config.channels), config.d_model
        self.register_buffer("channel_mean", torch.zeros(channels))
        self.register_buffer("channel_std", torch.ones(channels))
        self.channel_attention = (ChannelAttention(channels) if config.channel_attention and not config.feature_tokens
                                  else None)
        if config.feature_tokens:
            self.tokens = NumericTokens(channels, d, config.numeric_frequencies, config.frequency_sigma)
            self.summary_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        else:
            self.embed = nn.Linear(channels + 1, d)  # + the step's validity flag
            self.position = nn.Parameter(torch.randn(1, config.window, d) * 0.02)
        self.convs = nn.ModuleList(nn.Conv1d(d, d, config.conv_kernel, padding=config.conv_kernel - 1)
                                   for _ in range(config.conv_layers))
        layer = nn.TransformerEncoderLayer(d, config.heads, config.d_ff, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.pool_score = nn.Linear(d, 1)
        self.joined_norm = nn.LayerNorm(2 * d)
        self.failure_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
        self.rul_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))

    def set_normalisation(self, mean: npt.ArrayLike, std: npt.ArrayLike) -> None:
        """Per-channel mean and standard deviation of the training windows' valid steps."""
        self.channel_mean.copy_(torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.channel_std.copy_(torch.as_tensor(np.maximum(np.asarray(std), 1e-6), dtype=torch.float32))

    def encode(self, window: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training outputs: ``failure_logit`` (B,), ``rul_normalised`` (B,) and both attention weights."""
        x = (window - self.channel_mean) / self.channel_std * mask[..., None]
        if self.config.feature_tokens:
            return self._encode_features(x[:, -1], mask)
        if self.channel_attention is not None:
            channel_weights = self.channel_attention(x, mask)
            x = x * (channel_weights * x.shape[-1])[:, None, :]
        else:
            channel_weights = torch.full_like(x[:, 0], 1.0 / x.shape[-1])
        steps = x.shape[1]
        hidden = self.embed(torch.cat([x, mask[..., None]], dim=-1)) + self.position[:, -steps:]
        if self.convs:  # causal: step t sees steps <= t; padded steps held at zero
            hidden = hidden * mask[..., None]
            for conv in self.convs:
                step = F.gelu(conv(hidden.transpose(1, 2))[..., :steps].transpose(1, 2))
                hidden = hidden + F.dropout(step, self.config.conv_dropout, self.training) * mask[..., None]
        padding = (1.0 - mask) * MASKED  # (B, T): additive key mask, exports cleanly to ONNX
        bias = padding[:, None, :].repeat_interleave(self.config.heads, dim=0).expand(-1, steps, -1)
        hidden = self.norm(self.encoder(hidden, mask=bias))
        time_weights = F.softmax(self.pool_score(hidden).squeeze(-1) + padding, dim=-1)
        pooled = (time_weights[..., None] * hidden).sum(dim=1)
        joined = self.joined_norm(torch.cat([pooled, hidden[:, -1]], dim=-1))
        joined = F.dropout(joined, self.config.head_dropout, self.training)
        return {"failure_logit": self.failure_head(joined).squeeze(-1),
                "rul_normalised": self.rul_head(joined).squeeze(-1),
                "time_weights": time_weights, "channel_weights": channel_weights}

    def _encode_features(self, row: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature-token mode: a summary token and one token per channel of the (only) step ``row`` (B, F)."""
        tokens = self.tokens(row)
        hidden = torch.cat([self.summary_token.expand(row.shape[0], -1, -1), tokens], dim=1)
        hidden = self.norm(self.encoder(hidden))
        channel_weights = F.softmax(self.pool_score(hidden[:, 1:]).squeeze(-1), dim=-1)
        pooled = (channel_weights[..., None] * hidden[:, 1:]).sum(dim=1)
        joined = self.joined_norm(torch.cat([pooled, hidden[:, 0]], dim=-1))
        return {"failure_logit": self.failure_head(joined).squeeze(-1),
                "rul_normalised": self.rul_head(joined).squeeze(-1),
                "time_weights": mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0),
                "channel_weights": channel_weights}

    def forward(self, window: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``p_failure`` (B,), ``rul_hours`` (B,; ``rul_unit``), ``time_weights`` (B, T), ``channel_weights`` (B, F)."""
        encoded = self.encode(window, mask)
        return {"p_failure": torch.sigmoid(encoded["failure_logit"]),
                "rul_hours": encoded["rul_normalised"].clamp(min=0.0) * self.config.rul_scale,
                "time_weights": encoded["time_weights"], "channel_weights": encoded["channel_weights"]}

    def parameter_count(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters())


# --- saving and loading ---------------------------------------------------------------------------

def save_risk_model(net: SensorWindowNet, directory: Path, *, onnx: bool = True) -> list[Path]:
    """Write ``config.json``, ``weights.pt``, ``normalisation.json`` and (by default) ``model.onnx``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / CONFIG_FILE, directory / WEIGHTS_FILE, directory / NORMALISATION_FILE]
    written[0].write_text(json.dumps(net.config.as_dict(), indent=1) + "\n")
    torch.save(net.state_dict(), written[1])
    stats = {"channels": list(net.config.channels), "mean": net.channel_mean.tolist(), "std": net.channel_std.tolist()}
    written[2].write_text(json.dumps(stats, indent=1) + "\n")
    if onnx:
        written.append(export_risk_onnx(net, directory / ONNX_FILE))
    return written


def export_risk_onnx(net: SensorWindowNet, path: Path) -> Path:
    """The network as ONNX (inputs ``window``, ``mask``; a dynamic batch axis), checked against torch."""
    from model_runtime.backends import export_onnx

    example = example_inputs(net.config, batch=2)
    was_training = net.training
    try:
        return export_onnx(net, example, path)
    finally:
        net.train(was_training)


def example_inputs(config: SensorWindowConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``window``/``mask`` tensors of ``config``'s shape; later rows have padded front steps."""
    generator = torch.Generator().manual_seed(seed)
    window = torch.randn(batch, config.window, len(config.channels), generator=generator)
    mask = torch.from_numpy(example_mask(config, batch))
    return {"window": window * mask[..., None], "mask": mask}


def load_artifact(directory: Path, device: torch.device | str = "cpu") -> SensorWindowNet:
    """The network saved by :func:`save_risk_model` in ``directory``, in eval mode on ``device``."""
    net = SensorWindowNet(read_config(directory))
    net.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return net.to(device).eval()
