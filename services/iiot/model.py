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

This module imports no torch: the network and what saves, exports or loads it
(:data:`TORCH_NAMES`, in :mod:`services.iiot.network`) are imported from here on first use. Served
from ONNX Runtime (``backend="onnx"``), the model is fed NumPy arrays on CPU and the process never
loads torch (``tessera edge`` on a small gateway).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from model_runtime.lazy_torch import imported_on_use

if TYPE_CHECKING:
    from model_runtime import LoadContext, ModelSpec
    from model_runtime.device import Placement
    from services.iiot.network import (  # noqa: F401 (served by __getattr__)
        ChannelAttention,
        NumericTokens,
        SensorWindowNet,
        example_inputs,
        export_risk_onnx,
        load_artifact,
        save_risk_model,
    )

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
INLINE_BELOW_MS = 1.0
"""A batch of windows the runtime predicts under this (ms) runs on the event loop, without a thread hand-off."""
TORCH_NAMES = ("ChannelAttention", "NumericTokens", "SensorWindowNet", "example_inputs", "export_risk_onnx",
               "load_artifact", "save_risk_model")
"""Names of :mod:`services.iiot.network` served by this module (imported, with torch, on first use)."""


__getattr__ = imported_on_use(__name__, dict.fromkeys(TORCH_NAMES, "services.iiot.network"))


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



# --- saving and loading ---------------------------------------------------------------------------

def example_mask(config: SensorWindowConfig, batch: int = 2) -> npt.NDArray[np.float32]:
    """``(batch, window)`` validity of example windows: row 0 full, later rows with padded front steps."""
    mask = np.ones((batch, config.window), np.float32)
    for row in range(1, batch):
        mask[row, : min(row * max(config.window // 4, 1), config.window - 1)] = 0.0
    return mask


def warmup_requests(config: SensorWindowConfig, count: int = 2, seed: int = 0) -> list[RiskRequest]:
    """Random requests of ``config``'s shape (the :func:`example_mask` gaps) for the runtime's warm-up."""
    masks = example_mask(config, count)
    windows = np.random.default_rng(seed).standard_normal((count, config.window, len(config.channels)))
    return [RiskRequest((windows[row] * masks[row, :, None]).astype(np.float32), masks[row]) for row in range(count)]


def read_config(directory: Path) -> SensorWindowConfig:
    """The :class:`SensorWindowConfig` saved in ``directory``."""
    path = directory / CONFIG_FILE
    try:
        return SensorWindowConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelConfigError(f"{path}: cannot read the model config ({error})") from error


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
    """What the runtime holds: a backend over named tensors (or arrays) and the config it answers for."""

    backend: Any
    config: SensorWindowConfig
    tensors: bool = True
    """Feed the backend torch tensors; ``False``: NumPy arrays (ONNX Runtime, without torch)."""

    @property
    def backend_name(self) -> str:
        """The backend's label (``eager`` or ``onnx``), as ``runtime.loaded()`` reports it."""
        return str(self.backend.name)

    def __call__(self, items: Sequence[Mapping[str, npt.NDArray[np.float32]]]) -> list[RiskResult]:
        """Answers for a batch of prepared windows."""
        batch: dict[str, Any] = {name: np.stack([item[name] for item in items]) for name in ("window", "mask")}
        if self.tensors:
            import torch

            batch = {name: torch.from_numpy(array) for name, array in batch.items()}
        return risk_results(self.backend(batch), self.config)


Backend = Literal["auto", "eager", "onnx"]


def build_served_model(directory: Path, backend: Backend = "auto", threads: int | None = None,
                       placement: Placement | None = None) -> ServedRiskModel:
    """The artifact in ``directory`` behind ONNX Runtime (``auto`` when it has ``model.onnx``; fed NumPy
    arrays, on CPU) or eager torch."""
    from model_runtime.backends import OnnxRuntimeBackend, TorchBackend

    config = read_config(directory)
    use_onnx = backend == "onnx" or (backend == "auto" and (directory / ONNX_FILE).is_file())
    if use_onnx:
        return ServedRiskModel(OnnxRuntimeBackend(directory / ONNX_FILE, threads=threads), config, tensors=False)
    from services.iiot.network import load_artifact  # imports torch (this module's own names skip __getattr__)

    return ServedRiskModel(TorchBackend(load_artifact(directory), placement), config)


def risk_model_spec(artifact_dir: Path | None = None, *, name: str = "iiot", tier: Tier = "cloud",
                    backend: Backend = "auto", net: SensorWindowNet | None = None, version: str = "",
                    max_batch_size: int = 64, max_wait_ms: float = 5.0, max_queue: int = 1024,
                    timeout_s: float | None = 30.0, threads: int | None = None,
                    inline_below_ms: float | None = INLINE_BELOW_MS) -> ModelSpec:
    """The risk model as a model of the shared runtime: items :class:`RiskRequest`, answers :class:`RiskResult`.

    Parameters
    ----------
    artifact_dir : Path, optional
        A sealed artifact (verified by the runtime); default the newest shipped one of ``tier``.
    name : str
        Runtime model name.
    backend : {"auto", "eager", "onnx"}
        ``auto``: ONNX Runtime when the artifact has ``model.onnx``, else eager torch. ``onnx``: the
        model is served on CPU without torch (the process does not import it: ``tessera edge``).
    net : SensorWindowNet, optional
        A network built in code (tests), served eagerly instead of an artifact.
    max_batch_size, max_wait_ms, max_queue, timeout_s
        Batching policy: windows of concurrently scored assets share a batch.
    inline_below_ms : float, optional
        Batches predicted shorter run on the event loop (``ModelSpec.inline_below_ms``); ``None``: never.
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

    onnx_only = backend == "onnx" and net is None  # ONNX Runtime on CPU: no torch mode, no torch placement
    return ModelSpec(name=name, version=version or ("" if net is None else "in-code"), loader=load,
                     run_batch=run_batch, prepare=WindowPreparer(config), prepare_in="auto",
                     artifact_dir=artifact_dir if net is None else None, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=timeout_s,
                     inline_below_ms=inline_below_ms, warmup_items=warmup_requests(config), uses_torch=not onnx_only,
                     device="cpu" if onnx_only else None)


def with_tier(config: SensorWindowConfig, tier: Tier) -> SensorWindowConfig:
    """``config`` with the sizes of ``tier``."""
    return replace(config, tier=tier, **TIERS[tier])
