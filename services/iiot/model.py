"""The failure-risk model: attention over a sensor window, and its serving adapter for the shared runtime.

Architecture (:class:`SensorWindowNet`, sizes from :class:`SensorWindowConfig`):

- **Normalisation** in the network: each channel standardised by training statistics stored as
  buffers (``channel_mean``, ``channel_std``; also written to ``normalisation.json``), so the ONNX
  graph carries them too; padded steps are zeroed.
- **Channel attention** (optional): a softmax over channels from each channel's summary of the
  window (mean, spread, last value) and a learned per-channel bias; channels are rescaled by it
  (weights x F, so a uniform attention changes nothing) and the weights are the channel drivers.
- **Time encoder**: one linear embedding per time step plus a learned positional embedding
  (windows are right-aligned: the last step is "now"), a small pre-norm transformer encoder whose
  attention never looks at padded steps (an additive mask, so the graph exports to ONNX).
- **Masked attention pooling** over the valid steps (the weights are the time drivers), joined with
  the last step's state, then two heads: ``p_failure`` (P(failure within the horizon), sigmoid) and
  ``rul_hours`` (remaining useful life; a normalised regression times ``rul_scale``; for C-MAPSS
  the unit is cycles, see ``rul_unit``).

- **Tabular rows** (``feature_tokens``, window 1: AI4I 2020): one token per input channel
  (:class:`NumericTokens`, periodic embeddings) and a summary token; the attention runs over the
  inputs and the pooling weights over them are the channel drivers.
- **Convolutional front** (``conv_layers`` > 0; C-MAPSS): causal 1-D convolutions over time between
  the step embedding and the attention.

Inputs are named ``window`` ``(B, T, F)`` float32 and ``mask`` ``(B, T)`` float32 (1 = a reading);
outputs ``p_failure`` ``(B,)``, ``rul_hours`` ``(B,)``, ``time_weights`` ``(B, T)`` and
``channel_weights`` ``(B, F)``. Two sizes (:data:`TIERS`): ``cloud`` and a tiny ``edge`` whose ONNX
graph is well under 1 MB (``tessera edge`` scores windows on the gateway with it).

Serving (:func:`risk_model_spec`): items are :class:`RiskRequest` (a window and its mask);
``prepare`` checks one request and pads it to the model's window; windows of concurrent assets
share a batch; answers are :class:`RiskResult` with the attention drivers. The artifact directory
holds ``config.json``, ``weights.pt``, ``normalisation.json`` and ``model.onnx``, sealed with a
manifest the runtime verifies (:mod:`model_runtime.artifacts`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from model_runtime import LoadContext, ModelSpec
    from model_runtime.device import Placement

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
NORMALISATION_FILE = "normalisation.json"
ONNX_FILE = "model.onnx"
MODELS_SUBDIR = "iiot"
TIERS: dict[str, dict[str, Any]] = {
    "cloud": {"d_model": 48, "heads": 2, "layers": 2, "d_ff": 96},
    "edge": {"d_model": 24, "heads": 2, "layers": 1, "d_ff": 48},
}
"""Sizes of the two shipped tiers (the rest of :class:`SensorWindowConfig` comes from the data)."""
Tier = Literal["cloud", "edge"]
MASKED = -1e4
"""Additive attention bias of a padded step (finite, so a window of padding gives no NaN)."""
TOP_DRIVERS = 3


class ModelConfigError(ValueError):
    """A configuration or saved model that cannot be built; the message says what is wrong."""


@dataclass(frozen=True)
class SensorWindowConfig:
    """Sizes and data facts of :class:`SensorWindowNet` (JSON-serialisable; saved as ``config.json``)."""

    channels: tuple[str, ...]
    """Input channel names, in column order of ``window``'s last axis."""
    window: int = 48
    """Time steps per window (requests with fewer are padded at the front)."""
    step_hours: float = 1.0
    """Hours between steps (a C-MAPSS model: one cycle, say so in ``rul_unit``)."""
    tier: str = "cloud"
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    d_ff: int = 128
    dropout: float = 0.0
    """Off by default: on CPU its random masks cost more than the attention itself at these sizes
    (measured: a third of a training step); weight decay and early stopping regularise instead."""
    channel_attention: bool = True
    rul_scale: float = 720.0
    """The RUL head predicts RUL / ``rul_scale``; targets are capped at it."""
    rul_unit: str = "hours"
    horizon_hours: float = 72.0
    """``p_failure`` is P(failure within this horizon)."""
    feature_tokens: bool = False
    """Tabular rows (``window`` 1, e.g. AI4I 2020): each channel is a token of its own and the
    attention runs over the channels (FT-Transformer style) instead of over time steps; the
    pooling weights over the channel tokens are the channel drivers."""
    numeric_frequencies: int = 0
    """Feature tokens: periodic embedding of each scalar (sin/cos of this many learned frequencies,
    then a linear map and ReLU; Gorishniy et al. 2022, "On embeddings for numerical features"); 0: a
    linear embedding (value x w + b)."""
    frequency_sigma: float = 1.0
    """Initial spread of the periodic embedding's frequencies (inputs are standardised)."""
    conv_layers: int = 0
    """Windows: causal 1-D convolutions over time (kernel ``conv_kernel``, residual, GELU) between the
    step embedding and the attention, the convolutional front of the C-MAPSS literature (Li et al.
    2018); 0: none (the shipped fleet models)."""
    conv_kernel: int = 5
    conv_dropout: float = 0.0
    """Dropout on each convolution's output before it joins the residual (training only; 0: none)."""
    head_dropout: float = 0.0
    """Dropout on the joined features before the two heads (training only; 0: none)."""

    def __post_init__(self) -> None:
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ModelConfigError(f"channels must be distinct names, got {self.channels}")
        if self.d_model % self.heads:
            raise ModelConfigError(f"d_model {self.d_model} must divide by heads {self.heads}")
        if self.window < 1 or self.rul_scale <= 0:
            raise ModelConfigError(f"window ({self.window}) must be >= 1 and rul_scale ({self.rul_scale}) > 0")
        if self.feature_tokens and self.window != 1:
            raise ModelConfigError(f"feature_tokens is for tabular rows (window 1), got window {self.window}")

    @classmethod
    def for_tier(cls, tier: Tier, channels: Sequence[str], **facts: Any) -> SensorWindowConfig:
        """The ``cloud`` or ``edge`` sizes with the data's ``channels`` and other ``facts``."""
        if tier not in TIERS:
            raise ModelConfigError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}")
        return cls(channels=tuple(channels), tier=tier, **{**TIERS[tier], **facts})

    def as_dict(self) -> dict[str, Any]:
        """The configuration as JSON values."""
        values = asdict(self)
        values["channels"] = list(self.channels)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SensorWindowConfig:
        """Read back :meth:`as_dict`; unknown keys are an error naming them."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ModelConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**{**values, "channels": tuple(values["channels"])})


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
    mask = torch.ones(batch, config.window)
    for row in range(1, batch):
        mask[row, : min(row * max(config.window // 4, 1), config.window - 1)] = 0.0
    return {"window": window * mask[..., None], "mask": mask}


def read_config(directory: Path) -> SensorWindowConfig:
    """The :class:`SensorWindowConfig` saved in ``directory``."""
    path = directory / CONFIG_FILE
    try:
        return SensorWindowConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelConfigError(f"{path}: cannot read the model config ({error})") from error


def load_artifact(directory: Path, device: torch.device | str = "cpu") -> SensorWindowNet:
    """The network saved by :func:`save_risk_model` in ``directory``, in eval mode on ``device``."""
    net = SensorWindowNet(read_config(directory))
    net.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return net.to(device).eval()


def default_risk_dir(tier: Tier = "cloud") -> Path:
    """The newest shipped artifact of a tier, ``<models_dir>/iiot/<tier>/<version>``."""
    from model_runtime.artifacts import list_versions
    from shared.config import get_settings

    root = get_settings().models_dir / MODELS_SUBDIR
    versions = list_versions(root, tier)
    if not versions:
        raise FileNotFoundError(f"no {tier} risk model under {root / tier} (run `tessera train iiot`)")
    return root / tier / versions[-1]


# --- serving through the shared runtime -----------------------------------------------------------

@dataclass(frozen=True)
class RiskRequest:
    """One asset's window for the risk model.

    ``window``: ``(T, F)`` float values, oldest step first, ``F`` = the model's channels, ``T`` at
    most the model's window (shorter windows are padded at the front). ``mask``: ``(T,)``, 1 where
    the step holds a reading, 0 for a gap (``None``: every step). NaN is allowed only in gaps.
    """

    window: npt.NDArray[np.floating[Any]]
    mask: npt.NDArray[np.floating[Any]] | None = None


@dataclass(frozen=True)
class RiskDrivers:
    """What the attention weighed most: channels ``(name, weight)`` and time steps ``(steps_ago, weight)``
    (``steps_ago`` 0 is the newest step), strongest first."""

    channels: tuple[tuple[str, float], ...]
    time_steps: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RiskResult:
    """The model's answer for one window: P(failure within the horizon), RUL and its drivers."""

    p_failure: float
    rul_hours: float
    drivers: RiskDrivers = field(default_factory=lambda: RiskDrivers((), ()))


class WindowPreparer:
    """Checks one :class:`RiskRequest` and pads it to the model's window (in the runtime's prepare step)."""

    def __init__(self, config: SensorWindowConfig) -> None:
        self.config = config

    def __call__(self, request: Any) -> dict[str, npt.NDArray[np.float32]]:
        """``{"window": (W, F), "mask": (W,)}`` float32; :class:`~model_runtime.BadInput` saying what is wrong."""
        from model_runtime import BadInput

        if not isinstance(request, RiskRequest):
            raise BadInput(f"expected a RiskRequest, got {type(request).__name__}")
        window = _float_array(request.window, "window")
        channels, limit = len(self.config.channels), self.config.window
        if window.ndim != 2 or window.shape[1] != channels or not 1 <= window.shape[0] <= limit:
            raise BadInput(f"window must be (T, {channels}) with 1 <= T <= {limit}, got shape {window.shape}")
        mask = np.ones(window.shape[0], np.float32) if request.mask is None else _float_array(request.mask, "mask")
        if mask.shape != (window.shape[0],) or not np.isin(mask, (0.0, 1.0)).all():
            raise BadInput(f"mask must be ({window.shape[0]},) of 0/1, got shape {mask.shape}")
        if not mask.any():
            raise BadInput("the window holds no reading (mask is all 0)")
        if not np.isfinite(window[mask > 0]).all():
            raise BadInput("window holds NaN or infinite values at steps the mask marks as readings")
        padded = np.zeros((limit, channels), np.float32)
        padded_mask = np.zeros(limit, np.float32)
        padded[limit - window.shape[0]:] = np.where(mask[:, None] > 0, window, 0.0)
        padded_mask[limit - window.shape[0]:] = mask
        return {"window": padded, "mask": padded_mask}


def _float_array(values: Any, name: str) -> npt.NDArray[np.float32]:
    from model_runtime import BadInput

    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise BadInput(f"{name} must be numbers ({error})") from error


def risk_results(outputs: Mapping[str, Any], config: SensorWindowConfig, top: int = TOP_DRIVERS,
                 ) -> list[RiskResult]:
    """One :class:`RiskResult` per row of a batch of named outputs (tensors or arrays)."""
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    results = []
    for row in range(arrays["p_failure"].shape[0]):
        channel_weights, time_weights = arrays["channel_weights"][row], arrays["time_weights"][row]
        strongest_channels = np.argsort(-channel_weights, kind="stable")[:top]
        strongest_steps = np.argsort(-time_weights, kind="stable")[:top]
        drivers = RiskDrivers(
            channels=tuple((config.channels[i], float(channel_weights[i])) for i in strongest_channels),
            time_steps=tuple((int(len(time_weights) - 1 - i), float(time_weights[i])) for i in strongest_steps))
        results.append(RiskResult(float(arrays["p_failure"][row]), float(arrays["rul_hours"][row]), drivers))
    return results


@dataclass
class ServedRiskModel:
    """What the runtime holds: a backend over named tensors and the config it answers for."""

    backend: Any
    config: SensorWindowConfig

    @property
    def backend_name(self) -> str:
        """The backend's label (``eager`` or ``onnx``), as ``runtime.loaded()`` reports it."""
        return str(self.backend.name)

    def __call__(self, items: Sequence[Mapping[str, npt.NDArray[np.float32]]]) -> list[RiskResult]:
        """Answers for a batch of prepared windows."""
        batch = {name: torch.from_numpy(np.stack([item[name] for item in items])) for name in ("window", "mask")}
        return risk_results(self.backend(batch), self.config)


Backend = Literal["auto", "eager", "onnx"]


def build_served_model(directory: Path, backend: Backend = "auto", threads: int | None = None,
                       placement: Placement | None = None) -> ServedRiskModel:
    """The artifact in ``directory`` behind ONNX Runtime (``auto`` when it has ``model.onnx``) or eager torch."""
    from model_runtime.backends import OnnxRuntimeBackend, TorchBackend

    config = read_config(directory)
    use_onnx = backend == "onnx" or (backend == "auto" and (directory / ONNX_FILE).is_file())
    if use_onnx:
        return ServedRiskModel(OnnxRuntimeBackend(directory / ONNX_FILE, threads=threads), config)
    return ServedRiskModel(TorchBackend(load_artifact(directory), placement), config)


def risk_model_spec(artifact_dir: Path | None = None, *, name: str = "iiot", tier: Tier = "cloud",
                    backend: Backend = "auto", net: SensorWindowNet | None = None, version: str = "",
                    max_batch_size: int = 64, max_wait_ms: float = 5.0, max_queue: int = 1024,
                    timeout_s: float | None = 30.0, threads: int | None = None) -> ModelSpec:
    """The risk model as a model of the shared runtime: items :class:`RiskRequest`, answers :class:`RiskResult`.

    Parameters
    ----------
    artifact_dir : Path, optional
        A sealed artifact (verified by the runtime); default the newest shipped one of ``tier``.
    name : str
        Runtime model name.
    backend : {"auto", "eager", "onnx"}
        ``auto``: ONNX Runtime when the artifact has ``model.onnx``, else eager torch.
    net : SensorWindowNet, optional
        A network built in code (tests), served eagerly instead of an artifact.
    max_batch_size, max_wait_ms, max_queue, timeout_s
        Batching policy: windows of concurrently scored assets share a batch.
    threads : int, optional
        ONNX Runtime intra-op threads (default ``settings.torch_threads``).
    """
    from model_runtime import ModelSpec
    from model_runtime.backends import TorchBackend

    if net is None:
        artifact_dir = artifact_dir or default_risk_dir(tier)
        config = read_config(artifact_dir)
    else:
        config = net.config

    def load(context: LoadContext) -> ServedRiskModel:
        if net is not None:
            return ServedRiskModel(TorchBackend(net.eval(), context.placement), config)
        source = context.artifact_dir or artifact_dir
        assert source is not None
        return build_served_model(source, backend, threads, context.placement)

    def run_batch(model: ServedRiskModel, items: list[Any]) -> list[RiskResult]:
        return model(items)

    examples = example_inputs(config, batch=2)
    warmup = [RiskRequest(examples["window"][row].numpy(), examples["mask"][row].numpy()) for row in range(2)]
    return ModelSpec(name=name, version=version or ("" if net is None else "in-code"), loader=load,
                     run_batch=run_batch, prepare=WindowPreparer(config), prepare_in="auto",
                     artifact_dir=artifact_dir if net is None else None, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=timeout_s, warmup_items=warmup)


def with_tier(config: SensorWindowConfig, tier: Tier) -> SensorWindowConfig:
    """``config`` with the sizes of ``tier``."""
    return replace(config, tier=tier, **TIERS[tier])
