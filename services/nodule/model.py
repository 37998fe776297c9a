"""The nodule detector's networks and their runtime adapter.

Two compact 3D U-Nets (:class:`NoduleNet`) map a CT patch to per-voxel nodule logits (a
segmentation-style probability map; :mod:`services.nodule.detect` turns it into nodules):

- the **teacher** is wide (24-48-96-128 channels, two convolutions per level, concatenating skips;
  2.4 M parameters);
- the **student** is distilled from it (12-24-48-64 channels, one convolution per level, additive
  skips; 0.21 M parameters): 9 % of the teacher's parameters, under a tenth of its multiply-adds.
  (v1 used 16-32-64-64; the thinner stem runs at the highest resolution, so it is where the time goes.)

Both share one shape: a stem convolution with stride (1, 2, 2), so the network works at half the
in-plane resolution (CT pixels are 0.6-0.9 mm, slices 1-2.5 mm: the stem's output is roughly
isotropic), three stride-2 levels below it, a decoder back to the stem's resolution, a 1x1x1 head
and a trilinear upsampling of the logits to the input size. Patch sides must therefore be multiples
of :data:`SIZE_MULTIPLE` ((8, 16, 16) voxels).

Input: one channel of HU clipped to ``[-1024, 400]`` and scaled to ``[0, 1]`` (:func:`normalise_hu`).
No resampling: the networks see native voxels; they are trained on the spacings the simulator draws
(slices 1-2.5 mm, pixels 0.6-0.9 mm). The weights shipped under ``models/nodule/`` were trained on
**simulated** chest CT only (:mod:`services.nodule.simulate`).

Serving goes through the shared runtime only: :func:`nodule_model_spec` builds the
:class:`~model_runtime.ModelSpec` (loader from a sealed artifact, ``run_batch=run_patch_batch_on_device``,
batches bounded by voxels, device and precision from settings), and
:mod:`services.nodule.detect` feeds it patches through :class:`~model_runtime.SlidingWindowInferer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_runtime import LoadContext, ModelSpec, SlidingWindowConfig, resolve_device, run_patch_batch_on_device

HU_WINDOW = (-1024.0, 400.0)
"""HU range the networks see (clipped, then scaled to [0, 1]): air to dense soft tissue; bone saturates."""
SIZE_MULTIPLE = (8, 16, 16)
"""Every patch side must be a multiple of this (stem stride (1, 2, 2) times three stride-2 levels)."""
CONFIG_FILE = "config.json"
MODELS_SUBDIR = "nodule"
"""Artifacts live under ``<models_dir>/nodule/<role>/<version>/`` (role: ``student`` or ``teacher``)."""
WEIGHTS_FILE = "weights.pt"
TEACHER_NAME = "nodule-teacher"
STUDENT_NAME = "nodule-student"
DEFAULT_ROI = (64, 144, 144)
"""Inference patch (slices, rows, columns): a 64 x 256 x 256 study is 4 patches at 1/8 overlap."""
DEFAULT_OVERLAP = 0.125


@dataclass(frozen=True)
class NetConfig:
    """Architecture of one :class:`NoduleNet`.

    Parameters
    ----------
    channels : tuple of int
        Feature channels at the stem's resolution and at each of the three levels below it.
    convs_per_level : int
        3x3x3 convolutions per encoder and decoder level (the first encoder one strides).
    concat_skips : bool
        Decoder joins a skip by concatenation (U-Net) or by adding a 1x1x1 projection (cheaper).
    """

    channels: tuple[int, int, int, int] = (12, 24, 48, 64)
    convs_per_level: int = 1
    concat_skips: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> NetConfig:
        """Inverse of :meth:`to_json`."""
        return cls(channels=tuple(raw["channels"]), convs_per_level=int(raw["convs_per_level"]),  # type: ignore[arg-type]
                   concat_skips=bool(raw["concat_skips"]))


TEACHER_CONFIG = NetConfig(channels=(24, 48, 96, 128), convs_per_level=2, concat_skips=True)
STUDENT_CONFIG = NetConfig(channels=(12, 24, 48, 64), convs_per_level=1, concat_skips=False)


def _conv(in_channels: int, out_channels: int, stride: int | tuple[int, int, int] = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm3d(out_channels), nn.LeakyReLU(0.01, inplace=True))


def _stage(in_channels: int, out_channels: int, convs: int, stride: int | tuple[int, int, int] = 1) -> nn.Sequential:
    layers = [_conv(in_channels, out_channels, stride)]
    layers += [_conv(out_channels, out_channels) for _ in range(convs - 1)]
    return nn.Sequential(*layers)


class _Up(nn.Module):
    """One decoder level: upsample the deeper features x2, join the skip, convolve."""

    def __init__(self, deep: int, skip: int, convs: int, concat: bool) -> None:
        super().__init__()
        self.concat = concat
        self.project = None if concat else nn.Conv3d(deep, skip, 1, bias=False)
        self.block = _stage(deep + skip if concat else skip, skip, convs)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        deep = F.interpolate(deep, size=skip.shape[2:], mode="trilinear", align_corners=False)
        if self.project is None:
            return self.block(torch.cat([deep, skip], dim=1))
        return self.block(skip + self.project(deep))


class NoduleNet(nn.Module):
    """Compact 3D U-Net: ``(N, 1, D, H, W)`` normalised CT to ``(N, 1, D, H, W)`` nodule logits.

    Parameters
    ----------
    config : NetConfig
        Channels, convolutions per level and skip style.
    """

    def __init__(self, config: NetConfig = STUDENT_CONFIG) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.channels
        convs = config.convs_per_level
        self.stem = _stage(1, c0, convs, stride=(1, 2, 2))
        self.down1 = _stage(c0, c1, convs, stride=2)
        self.down2 = _stage(c1, c2, convs, stride=2)
        self.down3 = _stage(c2, c3, convs, stride=2)
        self.up2 = _Up(c3, c2, convs, config.concat_skips)
        self.up1 = _Up(c2, c1, convs, config.concat_skips)
        self.up0 = _Up(c1, c0, convs, config.concat_skips)
        self.head = nn.Conv3d(c0, 1, 1)
        assert self.head.bias is not None
        nn.init.constant_(self.head.bias, -4.0)  # nodules are rare: start near p = 0.02

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Logits of the input's size (sides multiples of :data:`SIZE_MULTIPLE`)."""
        s0 = self.stem(volume)
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        s3 = self.down3(s2)
        x = self.up0(self.up1(self.up2(s3, s2), s1), s0)
        return F.interpolate(self.head(x), size=volume.shape[2:], mode="trilinear", align_corners=False)


class NoduleProbability(nn.Module):
    """What the runtime serves: a :class:`NoduleNet` whose logits go through a sigmoid.

    Probabilities (not logits) are what the sliding window blends, so overlapping patches average
    in probability space.
    """

    def __init__(self, net: NoduleNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``(N, 1, D, H, W)`` probabilities in [0, 1]."""
        return torch.sigmoid(self.net(volume))


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def normalise_hu(hu: np.ndarray) -> np.ndarray:
    """HU to the networks' input: clip to :data:`HU_WINDOW`, scale to [0, 1], float32."""
    low, high = HU_WINDOW
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


# -- artifacts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorSettings:
    """Post-processing settings shipped with a model (chosen on the validation split, never on evaluation).

    Parameters
    ----------
    candidate_threshold : float
        Probability above which voxels form candidate components.
    report_threshold : float
        Confidence (a component's maximum probability) from which a candidate is reported as a nodule.
    solid_share_min : float
        A nodule whose interior has at least this share of voxels >= :data:`SOLID_HU_MIN` is solid.
    ground_glass_share_max : float
        Below this share it is ground glass; in between, part-solid.
    roi_size : tuple of int
        Sliding-window patch (slices, rows, columns).
    overlap : float
        Sliding-window overlap.
    """

    candidate_threshold: float = 0.5
    report_threshold: float = 0.5
    solid_share_min: float = 0.6
    ground_glass_share_max: float = 0.08
    roi_size: tuple[int, int, int] = DEFAULT_ROI
    overlap: float = DEFAULT_OVERLAP

    def window(self) -> SlidingWindowConfig:
        """The sliding-window config these settings describe (Gaussian blending)."""
        return SlidingWindowConfig(roi_size=self.roi_size, overlap=self.overlap, mode="gaussian", cval=0.0)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DetectorSettings:
        """From the ``detector`` entry of an artifact's ``config.json`` (missing keys take defaults)."""
        known = {key: raw[key] for key in cls.__dataclass_fields__ if key in raw}
        if "roi_size" in known:
            known["roi_size"] = tuple(int(v) for v in known["roi_size"])
        return cls(**known)


@dataclass(frozen=True)
class NoduleArtifactConfig:
    """``config.json`` of a nodule artifact: the architecture and the detector settings."""

    net: NetConfig
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    role: str = "student"

    def write(self, directory: Path) -> None:
        """Write ``config.json`` into ``directory``."""
        raw = {"net": self.net.to_json(), "detector": asdict(self.detector), "role": self.role,
               "hu_window": list(HU_WINDOW), "data": "simulated chest CT (services.nodule.simulate)"}
        (directory / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> NoduleArtifactConfig:
        """Read ``config.json`` from ``directory``."""
        raw = json.loads((directory / CONFIG_FILE).read_text())
        return cls(net=NetConfig.from_json(raw["net"]), detector=DetectorSettings.from_json(raw.get("detector", {})),
                   role=str(raw.get("role", "student")))


def write_weights(net: NoduleNet, directory: Path) -> None:
    """Save ``net``'s state dict (CPU tensors) as the artifact payload."""
    state = {key: value.detach().cpu() for key, value in net.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)


def load_net(directory: Path, device: torch.device | str = "cpu") -> tuple[NoduleNet, NoduleArtifactConfig]:
    """Build the network of an artifact directory and load its weights (eval mode)."""
    config = NoduleArtifactConfig.read(directory)
    net = NoduleNet(config.net)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval().to(device), config


def default_artifact_dir(role: str = "student") -> Path:
    """The newest shipped artifact of ``role`` (``student`` or ``teacher``) under ``<models_dir>/nodule/<role>/``."""
    from model_runtime.artifacts import list_versions
    from shared.config import get_settings

    root = get_settings().models_dir / MODELS_SUBDIR
    versions = list_versions(root, role)
    if not versions:
        raise FileNotFoundError(f"no nodule {role} artifact under {root / role} (run `tessera train nodule`)")
    return root / role / versions[-1]


# -- the runtime adapter --------------------------------------------------------------------------
def _load_for_runtime(context: LoadContext, net: NoduleNet | None) -> NoduleProbability:
    if net is None:
        if context.artifact_dir is None:
            raise ValueError("a nodule model needs an artifact directory or a network built in code")
        net, _ = load_net(context.artifact_dir)
    return NoduleProbability(net.eval()).to(context.placement.device)


def patch_voxels(patch: torch.Tensor) -> float:
    """Cost of one patch for the batcher: its voxel count."""
    return float(patch.numel())


def nodule_model_spec(name: str = STUDENT_NAME, *, artifact_dir: Path | None = None, net: NoduleNet | None = None,
                      version: str = "", roi_size: Sequence[int] = DEFAULT_ROI, max_batch_voxels: int | None = None,
                      max_batch_size: int = 8, device: str | None = None, precision: str | None = None,
                      warm_up: bool = True) -> ModelSpec:
    """The :class:`~model_runtime.ModelSpec` that serves one nodule network to the sliding window.

    Parameters
    ----------
    name : str
        Runtime model name (``nodule-student`` or ``nodule-teacher``).
    artifact_dir : Path, optional
        A sealed artifact (``config.json`` + ``weights.pt``); verified by the runtime before loading.
    net : NoduleNet, optional
        A network built in code (tests), used instead of an artifact.
    version : str
        Version label; empty takes the artifact manifest's.
    roi_size : sequence of int
        Patch size the warm-up runs (the inferer's ``roi_size``).
    max_batch_voxels : int, optional
        Voxels per batch (cost-aware batching by patch volume); default: 4 patches on GPU, 2 on CPU.
    max_batch_size : int
        Patches per batch at most.
    device, precision : str, optional
        Override ``settings.device``; precision defaults to fp16 on CUDA, fp32 on CPU.
    warm_up : bool
        Run one patch at load time.
    """
    if artifact_dir is None and net is None:
        raise ValueError("nodule_model_spec needs artifact_dir or net")
    on_cuda = resolve_device(device).type == "cuda"
    patch_size = int(np.prod(roi_size))
    budget = max_batch_voxels if max_batch_voxels is not None else patch_size * (4 if on_cuda else 2)
    warmup = [torch.zeros((1, *roi_size), dtype=torch.float32)] if warm_up else []
    return ModelSpec(
        name=name, version=version or ("" if artifact_dir is not None else "in-code"),
        loader=lambda context: _load_for_runtime(context, net),
        run_batch=run_patch_batch_on_device, artifact_dir=artifact_dir,
        max_batch_size=max_batch_size, max_wait_ms=5.0, max_queue=512,
        cost=patch_voxels, max_batch_cost=float(max(budget, patch_size)),
        warmup_items=warmup, device=device, precision=precision or ("fp16" if on_cuda else None),
    )
