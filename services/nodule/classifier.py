"""Stage 2 of the v3 nodule detector: false-positive reduction by a small 3D CNN on candidate crops.

Each candidate of :mod:`services.nodule.candidates` is seen as a ``32^3`` crop of the volume
resampled to 1 mm isotropic (the candidate stage's own grid: cropping costs a slice), HU clipped to
``[-1000, 200]`` and scaled to ``[0, 1]``. :class:`CropNet` maps a crop to one logit (nodule or not):

- the **teacher**: 24-48-64-96 channels, a stride-2 stem, two 3x3x3 convolutions per level, strided
  convolutions down to 2^3, global average and max pooling, a two-layer head (715,513 parameters);
- the **student**, distilled from the teacher's soft labels: 16-24-32-48 channels, one convolution per
  level (76,385 parameters: 89 % fewer).

A v10 artifact also holds a :class:`~services.nodule.candidate_features.FeatureModel`; it is served as
:class:`BlendedCropProbability` (the two logits averaged), its items carrying each crop's features.
A teacher may average its logit over symmetric views of each crop (:class:`ViewAveragedNet`, the
artifact's ``test_time_views``; v14's teacher: 16), the views the training augments with.

(A full-resolution teacher stem was tried first: it did not reach 100 steps of 32 crops in 6 minutes
on the shared CPU, so it would not have trained in the time there was.)

Serving goes through the shared runtime like every other model: :func:`classifier_model_spec`
builds the :class:`~model_runtime.ModelSpec` whose ``run_batch`` stacks the crops of every
candidate of every study in flight into one batch (bounded by ``max_batch_size``); the detector
(:mod:`services.nodule.two_stage`) submits one crop per candidate with ``runtime.predict`` and
gets back that candidate's probability.

The artifact (``config.json`` with ``"kind": "two_stage"``, ``weights.pt``) lives under
``models/nodule/<role>/<version>/`` like the dense v1/v2 networks; :func:`load_detector
<services.nodule.detect.load_detector>` tells them apart by ``kind``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_runtime import LoadContext, ModelSpec, resolve_device, run_collated, run_patch_batch
from services.nodule.candidate_features import FEATURE_NAMES, FeatureModel, candidate_features
from services.nodule.candidates import HU_CLIP

KIND = "two_stage"
CROP_SIZE = 32
"""Crop side (grid voxels of :data:`~services.nodule.candidates.GRID_MM`): 32 mm of context."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True)
class CropNetConfig:
    """Architecture of one :class:`CropNet`.

    ``channels``: the stem's and each of the three strided levels' channels; ``convs_per_level``:
    3x3x3 convolutions per level (the first of a level strides, except the stem's).
    """

    channels: tuple[int, int, int, int] = (8, 16, 32, 32)
    convs_per_level: int = 1
    hidden: int = 32
    stem_stride: int = 1

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CropNetConfig:
        """Inverse of :meth:`to_json`."""
        return cls(channels=tuple(int(c) for c in raw["channels"]),  # type: ignore[arg-type]
                   convs_per_level=int(raw["convs_per_level"]), hidden=int(raw.get("hidden", 32)),
                   stem_stride=int(raw.get("stem_stride", 1)))


TEACHER_CROP_CONFIG = CropNetConfig(channels=(24, 48, 64, 96), convs_per_level=2, hidden=64, stem_stride=2)
STUDENT_CROP_CONFIG = CropNetConfig(channels=(16, 24, 32, 48), convs_per_level=1, hidden=32, stem_stride=2)


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm3d(out_channels), nn.LeakyReLU(0.01, inplace=True))


class CropNet(nn.Module):
    """``(N, 1, 32, 32, 32)`` normalised crops to ``(N, 1)`` nodule logits."""

    def __init__(self, config: CropNetConfig = STUDENT_CROP_CONFIG) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.channels
        convs = config.convs_per_level
        layers: list[nn.Module] = [_conv(1, c0, stride=config.stem_stride)]
        previous = c0
        for width in (c1, c2, c3):
            layers.append(_conv(previous, width, stride=2))
            layers += [_conv(width, width) for _ in range(convs - 1)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * c3, config.hidden), nn.LeakyReLU(0.01, inplace=True),
                                  nn.Linear(config.hidden, 1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 1)``."""
        x = self.features(crops)
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
        return self.head(pooled)  # type: ignore[no-any-return]


TEST_TIME_VIEW_COUNTS = (1, 8, 16)
"""How many views :class:`ViewAveragedNet` may average: the crop itself; its 8 flips over the three axes; those 8
with rows and columns swapped as well (16). Training augments with exactly these (:mod:`training_fp`)."""


def crop_view(crops: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0-15) of ``(N, 1, D, H, W)`` crops: bits 0-2 flip depth, rows, columns; bit 3 swaps rows and
    columns. View 0 is the crop itself."""
    flips = [axis for bit, axis in enumerate((2, 3, 4)) if view >> bit & 1]
    out = torch.flip(crops, flips) if flips else crops
    return out.transpose(3, 4) if view & 8 else out


class ViewAveragedNet(nn.Module):
    """A :class:`CropNet` whose logit is its mean over ``views`` symmetric views of each crop (test-time
    augmentation: one forward pass per view, so it costs ``views`` x the network's time).

    Only a teacher is served this way (v14): a heavier, steadier ensemble of itself, and a student's soft labels
    are computed from it as served; a student stays one pass.
    """

    def __init__(self, net: CropNet, views: int) -> None:
        super().__init__()
        if views not in TEST_TIME_VIEW_COUNTS:
            raise ValueError(f"test-time views must be one of {TEST_TIME_VIEW_COUNTS}, not {views}")
        self.net, self.views = net, views

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 1)``: the mean over the views (each view in its own pass, so memory stays one pass's)."""
        total = self.net(crops)
        for view in range(1, self.views):
            total = total + self.net(crop_view(crops, view))
        return total / self.views


def with_test_time_views(net: CropNet, views: int) -> nn.Module:
    """``net`` itself for one view, else the :class:`ViewAveragedNet` averaging ``views`` views."""
    return net if views == 1 else ViewAveragedNet(net, views)


class CropProbability(nn.Module):
    """What the runtime serves: a :class:`CropNet` followed by a sigmoid, ``(N, 1)`` probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``(N, 1)`` nodule probabilities."""
        return torch.sigmoid(self.net(crops))


class BlendedCropProbability(nn.Module):
    """What the runtime serves for a v10 artifact: the sigmoid of ``cnn_weight`` x the CNN's logit +
    (1 - ``cnn_weight``) x the :class:`~services.nodule.candidate_features.FeatureModel`'s logit.

    ``forward(crops, features)`` takes the named batch of :func:`classifier_model_spec`'s items
    (``crops`` ``(N, 1, 32, 32, 32)``, ``features`` ``(N, F)``) and returns ``(N, 1)`` probabilities on the CPU.
    """

    def __init__(self, net: nn.Module, feature_model: FeatureModel, cnn_weight: float) -> None:
        super().__init__()
        self.net, self.feature_model, self.cnn_weight = net, feature_model, cnn_weight

    def forward(self, crops: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(N, 1)`` nodule probabilities."""
        device = next(self.net.parameters()).device
        cnn = self.net(crops.to(device))[:, 0].float().cpu().double()
        boosted = torch.from_numpy(self.feature_model.logits(features.cpu().numpy()))
        blended = self.cnn_weight * cnn + (1.0 - self.cnn_weight) * boosted
        return torch.sigmoid(blended).float()[:, None]


def crop_hu(normalised: np.ndarray) -> np.ndarray:
    """The inverse of :func:`normalise_crop_hu` (clipped HU, float32)."""
    low, high = HU_CLIP
    return np.asarray(normalised, dtype=np.float32) * np.float32(high - low) + np.float32(low)


def normalise_crop_hu(hu: np.ndarray) -> np.ndarray:
    """HU to the classifier's input: clip to :data:`~services.nodule.candidates.HU_CLIP`, scale to [0, 1]."""
    low, high = HU_CLIP
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def extract_crops(iso: np.ndarray, centres: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """``(n, size, size, size)`` crops of the isotropic volume centred on ``(n, 3)`` grid indices (air-padded)."""
    half = size // 2
    shape = np.asarray(iso.shape)
    out = np.empty((len(centres), size, size, size), dtype=iso.dtype)
    for row, centre in enumerate(np.rint(np.asarray(centres)).astype(int)):
        start = centre - half
        low, high = np.maximum(start, 0), np.minimum(start + size, shape)
        if (low - start).any() or (start + size - high).any():  # reaches past the volume: air there
            out[row] = HU_CLIP[0]
        if (high > low).all():
            inner = tuple(slice(int(a - b), int(c - b)) for a, b, c in zip(low, start, high, strict=True))
            out[row][inner] = iso[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    return out


# -- artifacts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TwoStageSettings:
    """The v3 detector's settings (chosen on the validation split, shipped in ``config.json``).

    Parameters
    ----------
    max_candidates : int
        Candidates per scan from stage 1.
    faint_candidates : int
        How many of them stage 1 fills by its faint (ground-glass) ranking
        (:func:`~services.nodule.candidates.scan_candidates`); 0 in artifacts before v11.
    report_threshold : float
        Classifier probability from which a candidate is reported as a nodule.
    solid_share_min, ground_glass_share_max : float
        Attenuation shares for the type (as in :class:`~services.nodule.model.DetectorSettings`).
    blended : bool
        Whether the classifier also takes each candidate's hand-crafted features (a v10 artifact with a
        feature model; set from the artifact when it is read).
    centre_shift_limit : float
        In candidate radii: when the segmentation's core centroid lies further than this from the stage-1
        peak, the peak is reported as the centre instead (the region grew into a vessel or the wall).
        0 keeps the centroid always, as artifacts before v12 do.
    test_time_views : int
        Views of each crop the network's logit is averaged over (:class:`ViewAveragedNet`; one of
        :data:`TEST_TIME_VIEW_COUNTS`); 1, a single pass, in artifacts before v14 and in every student.
    """

    max_candidates: int = 64
    faint_candidates: int = 0
    report_threshold: float = 0.5
    solid_share_min: float = 0.6
    ground_glass_share_max: float = 0.08
    blended: bool = False
    centre_shift_limit: float = 0.0
    test_time_views: int = 1

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TwoStageSettings:
        """From the ``detector`` entry of ``config.json`` (missing keys take defaults)."""
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


@dataclass(frozen=True)
class TwoStageArtifactConfig:
    """``config.json`` of a v3 (two-stage) artifact."""

    net: CropNetConfig
    detector: TwoStageSettings = field(default_factory=TwoStageSettings)
    role: str = "student"
    cnn_weight: float | None = None
    """The CNN logit's share in the blend with the feature model (``None``: no feature model, the CNN alone)."""

    def write(self, directory: Path) -> None:
        """Write ``config.json`` into ``directory``."""
        raw: dict[str, Any] = {"kind": KIND, "net": self.net.to_json(), "detector": asdict(self.detector),
                               "role": self.role, "crop_size": CROP_SIZE, "hu_clip": list(HU_CLIP),
                               "data": "simulated chest CT (services.nodule.simulate)"}
        if self.cnn_weight is not None:
            raw["feature_model"] = {"file": FeatureModel.FILE, "cnn_weight": self.cnn_weight,
                                    "features": list(FEATURE_NAMES)}
        (directory / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> TwoStageArtifactConfig:
        """Read ``config.json`` from ``directory``."""
        raw = json.loads((directory / CONFIG_FILE).read_text())
        blend = raw.get("feature_model")
        if blend is not None and list(blend["features"]) != list(FEATURE_NAMES):
            raise ValueError(f"{directory}: its feature model was trained on other features than this code computes")
        detector = replace(TwoStageSettings.from_json(raw.get("detector", {})), blended=blend is not None)
        return cls(net=CropNetConfig.from_json(raw["net"]), detector=detector, role=str(raw.get("role", "student")),
                   cnn_weight=None if blend is None else float(blend["cnn_weight"]))


def is_two_stage(directory: Path) -> bool:
    """Whether the artifact in ``directory`` is a v3 two-stage detector (else a dense network)."""
    try:
        return bool(json.loads((directory / CONFIG_FILE).read_text()).get("kind") == KIND)
    except (OSError, ValueError):
        return False


def write_crop_weights(net: CropNet, directory: Path) -> None:
    """Save ``net``'s state dict (CPU tensors)."""
    torch.save({key: value.detach().cpu() for key, value in net.state_dict().items()}, directory / WEIGHTS_FILE)


def load_crop_net(directory: Path, device: torch.device | str = "cpu") -> tuple[CropNet, TwoStageArtifactConfig]:
    """Build the classifier of an artifact directory and load its weights (eval mode)."""
    config = TwoStageArtifactConfig.read(directory)
    net = CropNet(config.net)
    net.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return net.eval().to(device), config


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- the runtime adapter --------------------------------------------------------------------------
def _load_for_runtime(context: LoadContext, net: CropNet | None, feature_model: FeatureModel | None,
                      cnn_weight: float | None, views: int) -> nn.Module:
    if net is None:
        if context.artifact_dir is None:
            raise ValueError("a crop classifier needs an artifact directory or a network built in code")
        net, config = load_crop_net(context.artifact_dir)
        views = config.detector.test_time_views
        if config.cnn_weight is not None:
            feature_model, cnn_weight = FeatureModel.load(context.artifact_dir), config.cnn_weight
    served = with_test_time_views(net.eval(), views)
    if feature_model is not None and cnn_weight is not None:
        return BlendedCropProbability(served.to(context.placement.device), feature_model, cnn_weight)
    return CropProbability(served).to(context.placement.device)


def classifier_model_spec(name: str, *, artifact_dir: Path | None = None, net: CropNet | None = None,
                          feature_model: FeatureModel | None = None, cnn_weight: float = 0.5,
                          test_time_views: int = 1, version: str = "", max_batch_size: int = 64,
                          device: str | None = None, precision: str | None = None, warm_up: bool = True) -> ModelSpec:
    """The :class:`~model_runtime.ModelSpec` that serves a crop classifier.

    Items are :func:`crop_items`: ``(1, 32, 32, 32)`` float tensors (one candidate's normalised crop) or,
    for a classifier blended with a feature model (a v10 artifact, or ``net`` with ``feature_model``),
    ``{"crops": (1, 32, 32, 32), "features": (F,)}``; each answer is a ``(1,)`` tensor holding that
    candidate's probability. Crops of every study in flight share batches of up to ``max_batch_size``.
    ``test_time_views`` applies to ``net`` (an artifact's own setting applies to it).
    """
    if artifact_dir is None and net is None:
        raise ValueError("classifier_model_spec needs artifact_dir or net")
    blended = feature_model is not None if net is not None else TwoStageArtifactConfig.read(
        artifact_dir).cnn_weight is not None  # type: ignore[arg-type]
    on_cuda = resolve_device(device).type == "cuda"
    empty = np.full((1, CROP_SIZE, CROP_SIZE, CROP_SIZE), HU_CLIP[0], dtype=np.float32)
    warmup = list(crop_items(empty, blended)) if warm_up else []
    return ModelSpec(
        name=name, version=version or ("" if artifact_dir is not None else "in-code"),
        loader=lambda context: _load_for_runtime(context, net, feature_model, cnn_weight, test_time_views),
        run_batch=run_collated({}) if blended else run_patch_batch,
        artifact_dir=artifact_dir, max_batch_size=max_batch_size, max_wait_ms=2.0, max_queue=4096,
        warmup_items=warmup, device=device, precision=precision or ("fp16" if on_cuda else None),
    )


def crop_tensors(crops: np.ndarray) -> Sequence[torch.Tensor]:
    """Normalised ``(1, 32, 32, 32)`` tensors of HU crops, ready for ``runtime.predict``."""
    normalised = torch.from_numpy(normalise_crop_hu(crops))
    return [crop[None] for crop in normalised]


def crop_items(crops: np.ndarray, blended: bool) -> Sequence[torch.Tensor | dict[str, torch.Tensor]]:
    """The classifier's items for ``(n, 32, 32, 32)`` HU crops: :func:`crop_tensors`, or, for a blended
    classifier, each crop with its :func:`~services.nodule.candidate_features.candidate_features`."""
    tensors = crop_tensors(crops)
    if not blended:
        return tensors
    low, high = HU_CLIP
    features = torch.from_numpy(candidate_features(np.clip(crops, low, high)))
    return [{"crops": crop, "features": row} for crop, row in zip(tensors, features, strict=True)]

