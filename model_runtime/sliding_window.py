"""Sliding-window inference: one volume fans out into patches that share the runtime's batches and
fans back in as one stitched answer.

A study (a channel-first volume ``(C, *spatial)``) is cut into a grid of overlapping patches of
``roi_size``; each patch is one item of a model loaded in the :class:`~model_runtime.ModelRuntime`
(``run_batch`` gets a list of patches, e.g. :func:`run_patch_batch`), so the model's batcher groups
patches of every study in flight into the same batches. Each patch output is weighted (constant or
Gaussian importance map) and added into a preallocated output and weight sum as it arrives, so no
study holds all its patch outputs at once. The grid, padding and Gaussian map are MONAI's
(``monai.inferers.sliding_window_inference``, 1.6): the stitched output equals it on the same
weights, up to float summation order.

::

    runtime = get_runtime()
    await runtime.load(ModelSpec(name="nodule-seg", version="v1", loader=build_unet,
                                 run_batch=run_patch_batch, max_batch_size=8, max_queue=512))
    inferer = SlidingWindowInferer(runtime, "nodule-seg",
                                   SlidingWindowConfig(roi_size=(96, 96, 96), mode="gaussian"))
    mask_logits = await inferer.infer(volume, on_progress=lambda done, total: ...)
    study = inferer.start(volume)                  # or: a handle with a progress stream
    async for done, total in study.progress(): ...
    mask_logits = await study

Work off the event loop: padding, the weight sum and the final division run in a thread
(``asyncio.to_thread``); stitching too, one patch at a time per study (but for a model on a GPU,
whose stitches only queue kernels there: those are launched from the loop). Stitching, the weight sum
and the division are single-threaded NumPy (memory-bound work that gains nothing from torch's
intra-op threads, and that would otherwise compete with the model's threads: measured on the
2-core box under load, a 1x256x256x64 study's 25 ``addcmul_`` stitches took 250 ms with 2 torch
threads against 79 ms with 1). The importance map and the weight sum of a grid are computed once
per (image size, patch size, overlap, blend) and shared, read-only, by every study of that shape.
Cancelling a study (its
caller's task, or :meth:`StudyInference.cancel`) cancels its queued patches, which the batcher then
skips; other studies are untouched. A study's patches all come from one model version: a hot swap
under a study makes it start over on the new version rather than blend the two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from model_runtime.errors import BadInput, ModelNotReady, RuntimeOverloaded, RuntimeTimeout
from model_runtime.runtime import ModelRuntime

logger = logging.getLogger("tessera.model_runtime.sliding_window")

BlendMode = Literal["constant", "gaussian"]
PaddingMode = Literal["constant", "reflect", "replicate", "circular"]
ProgressCallback = Callable[[int, int], None]
Window = tuple[slice, ...]
PatchOutput = torch.Tensor | Mapping[str, torch.Tensor]
"""One patch's output, or one study's stitched output: a tensor, or named tensors."""
MAX_RETRY_WAIT_S = 1.0
"""Longest wait before a refused patch of a study under way is offered again (s)."""
MAX_VERSION_RESTARTS = 2
"""How often a study starts over because the model was swapped under it, before it gives up."""


@dataclass(frozen=True)
class SlidingWindowConfig:
    """How a volume is cut into patches and blended back, with the meaning of MONAI's arguments.

    Parameters
    ----------
    roi_size : tuple of int
        Patch size per spatial axis (voxels); a value <= 0 takes the whole axis.
    overlap : float or tuple of float
        Fraction of a patch shared with its neighbour along each axis, in [0, 1).
    mode : {"constant", "gaussian"}
        Blend overlapping patches with equal weights, or with a Gaussian that favours patch centres.
    sigma_scale : float or tuple of float
        Gaussian sigma as a fraction of the patch size, per axis (``mode="gaussian"`` only).
    padding_mode : {"constant", "reflect", "replicate", "circular"}
        How an axis shorter than the patch is padded (symmetrically; the output is cropped back).
    cval : float
        Fill value of ``constant`` padding.
    """

    roi_size: tuple[int, ...]
    overlap: float | tuple[float, ...] = 0.25
    mode: BlendMode = "constant"
    sigma_scale: float | tuple[float, ...] = 0.125
    padding_mode: PaddingMode = "constant"
    cval: float = 0.0

    def __post_init__(self) -> None:
        if not self.roi_size:
            raise ValueError("roi_size needs at least one spatial axis")
        if any(not 0.0 <= value < 1.0 for value in self.overlaps):
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in ("constant", "gaussian"):
            raise ValueError(f"mode must be 'constant' or 'gaussian', got {self.mode!r}")
        if self.padding_mode not in ("constant", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {self.padding_mode!r}")

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (3 for a volume)."""
        return len(self.roi_size)

    @property
    def overlaps(self) -> tuple[float, ...]:
        """``overlap`` per spatial axis."""
        return _per_axis(self.overlap, self.spatial_dims, "overlap")

    @property
    def sigma_scales(self) -> tuple[float, ...]:
        """``sigma_scale`` per spatial axis."""
        return _per_axis(self.sigma_scale, self.spatial_dims, "sigma_scale")

    def patch_size_for(self, image_size: Sequence[int]) -> tuple[int, ...]:
        """The patch size for an image: ``roi_size`` with non-positive entries replaced by the image's."""
        return tuple(roi if roi > 0 else size for roi, size in zip(self.roi_size, image_size, strict=True))


def _per_axis(value: float | tuple[float, ...], dims: int, name: str) -> tuple[float, ...]:
    if isinstance(value, int | float):
        return (float(value),) * dims
    if len(value) != dims:
        raise ValueError(f"{name} has {len(value)} values for {dims} spatial axes")
    return tuple(float(v) for v in value)


# -- the grid and the weights (pure functions, MONAI's arithmetic) --------------------------------
def scan_interval(image_size: Sequence[int], patch_size: Sequence[int], overlaps: Sequence[float]) -> tuple[int, ...]:
    """Step between patch starts per axis: ``int(patch * (1 - overlap))`` (at least 1), or the whole
    patch when it spans the axis (MONAI's ``_get_scan_interval``)."""
    steps = []
    for size, patch, overlap in zip(image_size, patch_size, overlaps, strict=True):
        steps.append(patch if patch == size else max(int(patch * (1 - overlap)), 1))
    return tuple(steps)


def patch_grid(image_size: Sequence[int], patch_size: Sequence[int], overlaps: Sequence[float]) -> list[Window]:
    """Every patch window over an image at least as large as the patch, in C order of their starts.

    The last patch on each axis is shifted back to end at the border (MONAI's ``dense_patch_slices``),
    so every voxel is covered and no patch leaves the image.

    Parameters
    ----------
    image_size, patch_size : sequence of int
        Spatial sizes (voxels), ``patch_size[i] <= image_size[i]``.
    overlaps : sequence of float
        Overlap per axis, in [0, 1).
    """
    steps = scan_interval(image_size, patch_size, overlaps)
    starts_per_axis = [_axis_starts(size, patch, step)
                       for size, patch, step in zip(image_size, patch_size, steps, strict=True)]
    grid = np.meshgrid(*starts_per_axis, indexing="ij")
    starts = np.stack([axis.ravel() for axis in grid], axis=1)
    return [tuple(slice(int(start), int(start) + patch) for start, patch in zip(row, patch_size, strict=True))
            for row in starts]


def _axis_starts(size: int, patch: int, step: int) -> list[int]:
    count = next((n for n in range(math.ceil(size / step)) if n * step + patch >= size), 0) + 1
    return [n * step - max(n * step + patch - size, 0) for n in range(count)]


def importance_map(patch_size: Sequence[int], mode: BlendMode = "constant",
                   sigma_scales: Sequence[float] = (0.125, 0.125, 0.125)) -> torch.Tensor:
    """Per-voxel weight of a patch's output, shape ``patch_size``, float32 (MONAI's ``compute_importance_map``).

    ``gaussian``: separable Gaussian centred on the patch with sigma ``sigma_scale * size`` per axis;
    weights are clamped below at max(min weight, 1e-3), so borders still count a little.
    """
    if mode == "constant":
        return torch.ones(tuple(patch_size), dtype=torch.float32)
    weights: torch.Tensor | None = None
    for axis, (size, sigma_scale) in enumerate(zip(patch_size, sigma_scales, strict=True)):
        sigma = size * sigma_scale
        offsets = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float)
        profile = torch.exp(offsets**2 / (-2 * sigma**2))
        weights = profile if weights is None else weights.unsqueeze(-1) * profile[(None,) * axis]
    assert weights is not None
    floor = max(torch.min(weights).item(), 1e-3)
    return torch.clamp_(weights, min=floor)


def padding_for(image_size: Sequence[int], patch_size: Sequence[int]) -> list[int]:
    """``torch.nn.functional.pad`` widths (last axis first) that grow each axis to at least the patch."""
    widths: list[int] = []
    for size, patch in reversed(list(zip(image_size, patch_size, strict=True))):
        missing = max(patch - size, 0)
        widths.extend([missing // 2, missing - missing // 2])
    return widths


# -- one study: plan (in a thread), stitch (in a thread), finish (in a thread) -----------------------
@dataclass
class StudyPlan:
    """A volume ready to be cut: padded, its windows, their weights and the weight sum per voxel.

    Attributes
    ----------
    volume : torch.Tensor
        ``(C, *padded_size)``; the caller's tensor itself when no padding was needed.
    windows : list of tuple of slice
        Patch windows over the spatial axes of ``volume``.
    weights : numpy.ndarray
        ``patch_size`` importance map, float32, read-only (shared by every study of this grid).
    weight_sum : numpy.ndarray
        ``padded_size``: the sum of ``weights`` over every window, float32, read-only (shared).
    crop : tuple of slice
        Spatial window of the original volume inside the padded one.
    """

    volume: torch.Tensor
    windows: list[Window]
    weights: np.ndarray
    weight_sum: np.ndarray
    crop: Window

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Spatial size of every patch."""
        return tuple(self.weights.shape)

    def patch(self, index: int) -> torch.Tensor:
        """Patch ``index`` as a view ``(C, *patch_size)`` of the (padded) volume (no copy)."""
        return self.volume[(slice(None), *self.windows[index])]


def plan_study(volume: torch.Tensor | np.ndarray, config: SlidingWindowConfig) -> StudyPlan:
    """Pad ``volume`` where it is smaller than the patch and lay out its windows and weights.

    Parameters
    ----------
    volume : torch.Tensor or numpy.ndarray
        ``(C, *spatial)``, floating point, channel first, no batch axis.
    config : SlidingWindowConfig
        Grid, blending and padding.

    Raises
    ------
    BadInput
        The volume's rank or dtype does not fit the config (a ``ValueError``; 422 at the HTTP edge).
    """
    tensor = _as_volume(volume, config.spatial_dims)
    image_size = tuple(tensor.shape[1:])
    patch_size = config.patch_size_for(image_size)
    widths = padding_for(image_size, patch_size)
    if any(widths):
        tensor = _pad(tensor, widths, config)
    padded_size = tuple(tensor.shape[1:])
    windows, weights, weight_sum = _grid_and_weights(padded_size, patch_size, config.overlaps, config.mode,
                                                     config.sigma_scales)
    before = widths[::2][::-1]  # pad widths come last axis first
    crop = tuple(slice(start, start + size) for start, size in zip(before, image_size, strict=True))
    return StudyPlan(volume=tensor, windows=list(windows), weights=weights, weight_sum=weight_sum, crop=crop)


@functools.lru_cache(maxsize=16)
def _grid_and_weights(padded_size: tuple[int, ...], patch_size: tuple[int, ...], overlaps: tuple[float, ...],
                      mode: BlendMode, sigma_scales: tuple[float, ...]) -> tuple[tuple[Window, ...], np.ndarray,
                                                                                 np.ndarray]:
    """The windows, importance map and weight sum of one grid, computed once and shared read-only."""
    windows = tuple(patch_grid(padded_size, patch_size, overlaps))
    weights = importance_map(patch_size, mode, sigma_scales).numpy()
    weight_sum = np.zeros(padded_size, dtype=np.float32)
    for window in windows:
        weight_sum[window] += weights
    weights.setflags(write=False)
    weight_sum.setflags(write=False)
    return windows, weights, weight_sum


def _as_volume(volume: torch.Tensor | np.ndarray, spatial_dims: int) -> torch.Tensor:
    tensor = torch.from_numpy(volume) if isinstance(volume, np.ndarray) else volume
    if not isinstance(tensor, torch.Tensor):
        raise BadInput(f"a volume is a torch tensor or numpy array, not {type(volume).__name__}")
    if tensor.ndim != spatial_dims + 1:
        raise BadInput(f"a volume is (C, {', '.join(['spatial'] * spatial_dims)}) for a "
                         f"{spatial_dims}D roi_size; got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise BadInput(f"a volume must be floating point, got {tensor.dtype}")
    if min(tensor.shape) == 0:
        raise BadInput(f"empty volume {tuple(tensor.shape)}")
    return tensor


def _pad(volume: torch.Tensor, widths: list[int], config: SlidingWindowConfig) -> torch.Tensor:
    # reflect/replicate/circular need a batch axis; constant fills with cval
    padded = F.pad(volume[None], widths, mode=config.padding_mode,
                   value=config.cval if config.padding_mode == "constant" else None)
    return padded[0]


class Stitcher:
    """The running weighted sum of one study's patch outputs, allocated at the first patch.

    A patch output is one tensor ``(C_out, *patch_size)`` or named tensors ``{name: (C_k, *patch_size)}``
    (each stitched on its own, as MONAI does with a dict-returning predictor).

    Parameters
    ----------
    plan : StudyPlan
        The study's windows, weights and weight sum.

    Notes
    -----
    Not thread-safe: one :meth:`add` at a time per study (the inferer serialises them). On the
    host the sums are NumPy float32 arrays, added into in place through one scratch buffer per
    output (no allocation per patch, no torch intra-op threads). When the first patch output lies
    on a GPU (a model served there through :func:`run_patch_batch_on_device`), the sums stay on that
    device as torch tensors and only the blended volume is copied to the host, once, in
    :meth:`finish` (through pinned memory: :func:`to_host_via_pinned`), instead of every patch output.
    """

    def __init__(self, plan: StudyPlan) -> None:
        self.plan = plan
        self.outputs: dict[str, np.ndarray] | None = None
        self._scratch: dict[str, np.ndarray] = {}
        self._on_device: _DeviceSums | None = None
        self.named = False

    @property
    def blends_on_device(self) -> bool:
        """The sums lie on a GPU (allocated at the first patch): an :meth:`add` only queues kernels there."""
        return self._on_device is not None

    def add(self, index: int, patch_output: PatchOutput) -> None:
        """Add window ``index``'s output times the importance map into the study's output."""
        parts = self._parts(patch_output)
        if self.outputs is None and self._on_device is None:
            self.named = isinstance(patch_output, Mapping)
            device = next(iter(parts.values())).device
            if device.type != "cpu":
                self._on_device = _DeviceSums(self.plan, parts, device)
        if self._on_device is not None:
            self._on_device.add(self.plan.windows[index], parts)
            return
        if self.outputs is None:
            self.outputs = {name: np.zeros((part.shape[0], *self.plan.weight_sum.shape), dtype=np.float32)
                            for name, part in parts.items()}
            self._scratch = {name: np.empty((part.shape[0], *self.plan.patch_size), dtype=np.float32)
                             for name, part in parts.items()}
        if parts.keys() != self.outputs.keys():
            raise ValueError(f"patch outputs changed from {sorted(self.outputs)} to {sorted(parts)}")
        window = (slice(None), *self.plan.windows[index])
        for name, part in parts.items():
            values = part.detach().to(device="cpu", dtype=torch.float32).numpy()
            scratch = self._scratch[name]
            if scratch.shape != values.shape:
                raise ValueError(f"patch output {name!r} changed from {scratch.shape[0]} to {values.shape[0]} channels")
            np.multiply(values, self.plan.weights, out=scratch)
            target = self.outputs[name][window]
            np.add(target, scratch, out=target)

    def _parts(self, patch_output: PatchOutput) -> dict[str, torch.Tensor]:
        parts = dict(patch_output) if isinstance(patch_output, Mapping) else {"": patch_output}
        expected = self.plan.patch_size
        for name, part in parts.items():
            if not isinstance(part, torch.Tensor) or tuple(part.shape[1:]) != expected or part.ndim < 2:
                shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise ValueError(f"a patch output{f' {name!r}' if name else ''} is "
                                 f"(C_out, {', '.join(map(str, expected))}); got {shape}")
        return parts

    def finish(self) -> PatchOutput:
        """The blended output ``(C_out, *spatial)`` of the original (unpadded) volume, float32 (or
        ``{name: (C_k, *spatial)}`` for named patch outputs)."""
        if self._on_device is not None:
            blended_on_device = self._on_device.finish()
            return blended_on_device if self.named else blended_on_device[""]
        if self.outputs is None:
            raise RuntimeError("no patch was stitched")
        crop = (slice(None), *self.plan.crop)
        whole = all(window == slice(0, size) for window, size in zip(self.plan.crop, self.plan.weight_sum.shape,
                                                                     strict=True))
        blended = {}
        for name, output in self.outputs.items():
            np.divide(output, self.plan.weight_sum, out=output)
            blended[name] = torch.from_numpy(output if whole else np.ascontiguousarray(output[crop]))
        return blended if self.named else blended[""]


class _DeviceSums:
    """A study's weighted sums on the GPU its patch outputs come from (see :class:`Stitcher`)."""

    def __init__(self, plan: StudyPlan, parts: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.plan = plan
        self.weights, self.weight_sum = _DEVICE_WEIGHTS.get(plan.weights, plan.weight_sum, device)
        self.sums = {name: torch.zeros((part.shape[0], *plan.weight_sum.shape), dtype=torch.float32, device=device)
                     for name, part in parts.items()}

    def add(self, window: Window, parts: Mapping[str, torch.Tensor]) -> None:
        if parts.keys() != self.sums.keys():
            raise ValueError(f"patch outputs changed from {sorted(self.sums)} to {sorted(parts)}")
        for name, part in parts.items():
            target = self.sums[name][(slice(None), *window)]
            if part.shape[0] != target.shape[0]:
                raise ValueError(f"patch output {name!r} changed from {target.shape[0]} to {part.shape[0]} channels")
            target.addcmul_(part.to(device=target.device, dtype=torch.float32), self.weights)

    def finish(self) -> dict[str, torch.Tensor]:
        """Each sum over the weight sum, cropped to the original volume, on the host."""
        crop = (slice(None), *self.plan.crop)
        blended = {name: total.div_(self.weight_sum)[crop] for name, total in self.sums.items()}
        return {name: to_host_via_pinned(part) if part.is_cuda else part.cpu() for name, part in blended.items()}


def to_host_via_pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (on a CUDA device) copied to ordinary host memory through a page-locked staging buffer.

    A plain ``.cpu()`` copies through the driver's pageable path: measured on an H200 host, a
    2x256x256x64 float32 output took 26.7 ms that way, holding the device's default stream (so it
    bounded every study in flight), against 0.6 ms into pinned memory and ~5 ms more for the host
    copy out of it (which runs without the GIL). The staging block comes from torch's caching host
    allocator and goes back to it at once, so callers never hold page-locked memory. Where page-locked
    memory is refused, the copy falls back to ``.cpu()``.
    """
    try:
        staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    except RuntimeError as refused:  # page-locked memory can be capped (ulimit -l, containers): slower, not broken
        logger.warning("pinned staging buffer refused (%s); copying to the host the pageable way", refused)
        return tensor.cpu()
    staging.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    copied.synchronize()
    return staging.clone()


class _DeviceWeightCache:
    """The importance map and weight sum of each grid (shared host arrays) copied once per device.

    Keyed by the identity of the shared, read-only host arrays of ``_grid_and_weights``; each entry
    keeps those arrays alive, so an identity is not reused while it is cached. Least recently used
    entries beyond ``size`` are dropped (a 256x256x64 weight sum is 16 MB of device memory).
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[int, int, torch.device], tuple[np.ndarray, np.ndarray, torch.Tensor,
                                                                          torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, weights: np.ndarray, weight_sum: np.ndarray, device: torch.device) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        """``(weights, weight_sum)`` as float32 tensors on ``device``."""
        key = (id(weights), id(weight_sum), device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[2], entry[3]
        on_device = (torch.tensor(weights, device=device), torch.tensor(weight_sum, device=device))
        with self._lock:
            self._entries[key] = (weights, weight_sum, *on_device)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return on_device


_DEVICE_WEIGHTS = _DeviceWeightCache()


# -- progress ---------------------------------------------------------------------------------------
@dataclass
class StudyProgress:
    """Patches stitched so far out of the study's total, with change notification on the event loop.

    Attributes
    ----------
    done : int
        Patches stitched (in the current pass: a study restarted on a swapped model starts again at 0).
    stitched_ever : int
        Patches stitched in every pass; more than zero means the study was admitted by the model.
    total : int or None
        Patches in the study (``None`` until the volume is planned).
    finished : bool
        The study has ended (answered, failed or cancelled).
    """

    on_progress: ProgressCallback | None = None
    done: int = 0
    stitched_ever: int = 0
    total: int | None = None
    finished: bool = False
    _changed: asyncio.Future[None] | None = field(default=None, repr=False)

    def begin(self, total: int) -> None:
        """Record the study's patch count and start from zero (reports ``(0, total)``)."""
        self.total = total
        self.done = 0
        self._publish()

    def advance(self) -> None:
        """Record one more stitched patch."""
        self.done += 1
        self.stitched_ever += 1
        self._publish()

    def end(self) -> None:
        """Record that the study is over, whatever its outcome."""
        self.finished = True
        self._publish(report=False)

    def _publish(self, *, report: bool = True) -> None:
        waiter, self._changed = self._changed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if report and self.on_progress is not None and self.total is not None:
            try:
                self.on_progress(self.done, self.total)
            except Exception:  # progress is advisory: a broken observer must not fail the study
                logger.exception("progress callback failed")

    async def updates(self) -> AsyncIterator[tuple[int, int]]:
        """Yield ``(done, total)`` whenever it changed (coalesced if the reader lags), until the study ends."""
        last: tuple[int, int] | None = None
        while True:
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            changed = self._changed
            current = None if self.total is None else (self.done, self.total)
            if current is not None and current != last:
                last = current
                yield current
                continue
            if self.finished:
                return
            await asyncio.shield(changed)  # shared by every reader: one reader's cancel must not cancel it


class StudyInference:
    """A study being inferred in its own task: await it for the output, read its progress, cancel it.

    Created by :meth:`SlidingWindowInferer.start`.
    """

    def __init__(self, task: asyncio.Task[PatchOutput], progress: StudyProgress) -> None:
        self._task = task
        self._progress = progress

    @property
    def done(self) -> int:
        """Patches stitched so far."""
        return self._progress.done

    @property
    def total(self) -> int | None:
        """Patches in the study (``None`` until planned)."""
        return self._progress.total

    @property
    def finished(self) -> bool:
        """The study has ended: answered, failed or cancelled."""
        return self._task.done()

    def progress(self) -> AsyncIterator[tuple[int, int]]:
        """``(done, total)`` as patches are stitched, ending when the study ends (see :meth:`StudyProgress.updates`)."""
        return self._progress.updates()

    def cancel(self) -> bool:
        """Cancel the study: its queued patches are skipped by the batcher; awaiting it raises CancelledError."""
        return self._task.cancel()

    async def result(self) -> PatchOutput:
        """The stitched output, as :meth:`SlidingWindowInferer.infer` returns it."""
        return await self._task

    def __await__(self) -> Generator[Any, None, PatchOutput]:
        return self._task.__await__()


# -- the inferer ------------------------------------------------------------------------------------
class _ModelSwapped(Exception):
    """The model was swapped while a study was under way: its patches would blend two versions."""


@dataclass
class _PinnedVersion:
    """The model version one pass over a study's patches runs on (the first patch's)."""

    version: str | None = None

    def check(self, served: str | None) -> None:
        if self.version is None:
            self.version = served
        elif served is not None and served != self.version:
            raise _ModelSwapped(f"{self.version} -> {served}")


def _stitch_handed(stitcher: Stitcher, index: int, handed: list[Any]) -> None:
    """Stitch the one output in ``handed``, taking it out of the list (see ``SlidingWindowInferer._lane``)."""
    stitcher.add(index, handed.pop())


class SlidingWindowInferer:
    """Sliding-window inference of whole volumes through one runtime model whose items are patches.

    Parameters
    ----------
    runtime : ModelRuntime
        Where the patch model is loaded.
    model : str
        Name of the loaded patch model: ``run_batch(model, patches)`` gets ``(C, *patch_size)``
        tensors and returns one ``(C_out, *patch_size)`` output per patch (see :func:`run_patch_batch`).
        Its ``prepare``, if any, runs on the event loop for every patch: keep it cheap or absent.
    config : SlidingWindowConfig
        Grid, blending and padding.
    patches_per_study : int
        Patches one study keeps queued or running at once: enough to fill the model's batches
        (about twice ``max_batch_size``) while bounding the patch outputs waiting to be stitched.
    max_patches_in_flight : int
        Patches queued or running across every study of this inferer; keep it below the model's
        ``max_queue``, so admitted studies wait for a slot rather than being refused mid-study.
        Slots are granted first come, first served, so concurrent studies interleave.
    """

    def __init__(self, runtime: ModelRuntime, model: str, config: SlidingWindowConfig, *,
                 patches_per_study: int = 16, max_patches_in_flight: int = 128) -> None:
        if patches_per_study < 1 or max_patches_in_flight < 1:
            raise ValueError("patches_per_study and max_patches_in_flight must be >= 1")
        self.runtime = runtime
        self.model = model
        self.config = config
        self.patches_per_study = patches_per_study
        self.max_patches_in_flight = max_patches_in_flight
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    async def infer(self, volume: torch.Tensor | np.ndarray, *, on_progress: ProgressCallback | None = None,
                    timeout_s: float | None = None) -> PatchOutput:
        """Infer one study; cancelling the caller cancels its remaining patches.

        Every patch of the answer comes from one model version: when the model is hot-swapped
        under a study, the study starts over on the new version (progress restarts from 0).

        Parameters
        ----------
        volume : torch.Tensor or numpy.ndarray
            ``(C, *spatial)``, floating point, channel first, no batch axis.
        on_progress : callable, optional
            ``(done, total)`` on the event loop: once with ``done=0`` when planned, then per patch.
        timeout_s : float, optional
            Deadline for the whole study (s).

        Returns
        -------
        torch.Tensor or dict of torch.Tensor
            ``(C_out, *spatial)`` float32 on the CPU: the blended patch outputs (``{name: (C_k, *spatial)}``
            when the model answers named outputs).

        Raises
        ------
        BadInput
            The volume does not fit the config (422 at the HTTP edge).
        RuntimeOverloaded
            The model refused the study's first patches (503): nothing was stitched yet.
        RuntimeTimeout
            The study was not done within ``timeout_s`` (504).
        ModelNotReady
            The model is not loaded, or was swapped under the study more than ``MAX_VERSION_RESTARTS`` times.
        ValueError
            A patch output is not ``(C_out, *patch_size)`` (the model does not fit the config).
        """
        progress = StudyProgress(on_progress=on_progress)
        try:
            return await self._run_study(volume, progress, timeout_s)
        finally:
            progress.end()

    def start(self, volume: torch.Tensor | np.ndarray, *, on_progress: ProgressCallback | None = None,
              timeout_s: float | None = None) -> StudyInference:
        """Start inferring one study in its own task (see :meth:`infer`) and return its handle."""
        progress = StudyProgress(on_progress=on_progress)
        task = asyncio.get_running_loop().create_task(self._run_study(volume, progress, timeout_s),
                                                      name=f"sliding-window-{self.model}")
        task.add_done_callback(lambda _task: progress.end())
        return StudyInference(task, progress)

    async def _run_study(self, volume: torch.Tensor | np.ndarray, progress: StudyProgress,
                         timeout_s: float | None) -> PatchOutput:
        try:
            async with asyncio.timeout(timeout_s):
                plan = await asyncio.to_thread(self._plan_on_model_device, volume)
                for _attempt in range(MAX_VERSION_RESTARTS + 1):
                    try:
                        return await self._infer_on_one_version(plan, progress)
                    except _ModelSwapped as swapped:
                        logger.info("model %s: swapped during a study (%s); starting the study over",
                                    self.model, swapped)
                raise ModelNotReady(f"model {self.model} changed version {MAX_VERSION_RESTARTS + 1} times "
                                    "during one study")
        except TimeoutError as exc:
            if isinstance(exc, RuntimeTimeout):  # a patch's own deadline
                raise
            raise RuntimeTimeout(f"model {self.model}: study not inferred within {timeout_s} s") from exc

    def _plan_on_model_device(self, volume: torch.Tensor | np.ndarray) -> StudyPlan:
        """:func:`plan_study`, the volume copied once to the GPU the model is served on (as MONAI's
        inferer cuts patches where the volume lies): its patches are then views there, and a batch is
        stacked on the device instead of copied from the host patch by patch."""
        plan = plan_study(volume, self.config)
        try:
            placement = self.runtime.placement(self.model)
        except KeyError:  # not loaded: predict answers that, patch by patch
            return plan
        if placement.device_type != "cuda":
            return plan
        return dataclasses.replace(plan, volume=plan.volume.to(placement.device))

    async def _infer_on_one_version(self, plan: StudyPlan, progress: StudyProgress) -> PatchOutput:
        """One pass over every patch of the study, all on the version its first patch goes to."""
        progress.begin(len(plan.windows))
        stitcher = Stitcher(plan)
        await self._fan_out(plan, _PinnedVersion(), stitcher, progress)
        return await asyncio.to_thread(stitcher.finish)

    async def _fan_out(self, plan: StudyPlan, pinned: _PinnedVersion, stitcher: Stitcher,
                       progress: StudyProgress) -> None:
        """Run every patch through one version of the model in ``patches_per_study`` lanes, stitching
        as they come; :class:`_ModelSwapped` when a patch would go to another version."""
        pending = iter(range(len(plan.windows)))  # shared: each lane takes the next window
        stitching = asyncio.Lock()
        lanes = [asyncio.ensure_future(self._lane(pending, plan, pinned, stitcher, stitching, progress))
                 for _ in range(min(self.patches_per_study, len(plan.windows)))]
        try:
            await asyncio.gather(*lanes)
        except BaseException:
            for lane in lanes:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            raise

    async def _lane(self, pending: Iterator[int], plan: StudyPlan, pinned: _PinnedVersion, stitcher: Stitcher,
                    stitching: asyncio.Lock, progress: StudyProgress) -> None:
        slots = self._slots_for_loop()
        for index in pending:
            async with slots:
                handed = [await self._predict_patch(plan.patch(index), pinned, progress)]
            async with stitching:
                if stitcher.blends_on_device:
                    # only kernel launches (tens of µs) once the sums are allocated: cheaper than a
                    # thread hop per patch, and no stitching thread competes with the model's worker
                    # for the GIL. A launch waits only when the device's launch queue is full (the
                    # worker ahead by more than ~2 batches), for as long as the GPU takes to free a slot
                    _stitch_handed(stitcher, index, handed)
                else:
                    # Handed over in a list the thread empties: the executor's work item, which a busy
                    # thread may keep a moment after the answer, does not hold the output, so a study
                    # holds at most one output per lane.
                    await asyncio.to_thread(_stitch_handed, stitcher, index, handed)
            progress.advance()

    async def _predict_patch(self, patch: torch.Tensor, pinned: _PinnedVersion, progress: StudyProgress) -> Any:
        """One patch through the model version the study started on.

        A study under way (a patch already stitched) was admitted: a refusal then waits
        ``retry_after_s`` and tries again (within the study's deadline) rather than losing the work
        done; a refusal of the first patches fails the study as overloaded.
        """
        while True:
            # predict looks the model up before its first await, so the version read here is the one
            # that answers (a swap routes new items to the new version while the old one drains)
            pinned.check(self._served_version())
            try:
                return await self.runtime.predict(self.model, patch)
            except RuntimeOverloaded as refused:
                if progress.stitched_ever == 0:
                    raise
                await asyncio.sleep(min(max(refused.retry_after_s, 0.001), MAX_RETRY_WAIT_S))

    def _served_version(self) -> str | None:
        try:
            return self.runtime.version(self.model)
        except KeyError:
            return None  # not loaded: predict says so

    def _slots_for_loop(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.max_patches_in_flight))
        return self._slots[1]


def run_patch_batch(model: Callable[[torch.Tensor], Any], patches: list[torch.Tensor]) -> list[PatchOutput]:
    """``run_batch`` for a patch model: stack to ``(N, C, *patch)``, run, split per patch.

    Parameters
    ----------
    model : callable
        A torch module (the batch goes to its device) or a runtime backend (``TorchBackend``,
        ``OnnxRuntimeBackend``...: they place it themselves); returns ``(N, C_out, *patch)`` or
        ``{name: (N, C_k, *patch)}``.
    patches : list of torch.Tensor
        ``(C, *patch)`` each.

    Returns
    -------
    list
        One float32 CPU output per patch: ``(C_out, *patch)``, or ``{name: (C_k, *patch)}``.
    """
    return _run_patches(model, patches, keep_on_gpu=False)


def run_patch_batch_on_device(model: Callable[[torch.Tensor], Any], patches: list[torch.Tensor]) -> list[PatchOutput]:
    """:func:`run_patch_batch` whose outputs stay on the GPU the model ran on (on the host otherwise).

    For a :class:`SlidingWindowInferer`'s model served on a GPU: its :class:`Stitcher` blends the
    patches there and moves only the finished volume to the host. Callers that read outputs
    themselves want :func:`run_patch_batch`.
    """
    return _run_patches(model, patches, keep_on_gpu=True)


def _run_patches(model: Callable[[torch.Tensor], Any], patches: list[torch.Tensor], *,
                 keep_on_gpu: bool) -> list[PatchOutput]:
    batch = torch.stack(patches)
    if isinstance(model, torch.nn.Module):
        device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
        batch = batch.to(device, non_blocking=True)
    output = model(batch)
    if isinstance(output, Mapping):
        kept = {name: _float_output(value, keep_on_gpu) for name, value in output.items()}
        return [{name: value[row] for name, value in kept.items()} for row in range(len(patches))]
    return list(_float_output(output, keep_on_gpu).unbind(0))


def _float_output(output: torch.Tensor, keep_on_gpu: bool) -> torch.Tensor:
    """float32, on the host unless ``keep_on_gpu`` and it lies on a GPU."""
    return output.float() if keep_on_gpu and output.device.type == "cuda" else output.float().cpu()
