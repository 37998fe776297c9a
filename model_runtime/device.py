"""Device and precision per model: where a model runs (cpu, cuda, cuda:n) and in which precision.

A model spec names its device (``auto`` | ``cpu`` | ``cuda`` | ``cuda:<n>``, default
``settings.device``) and its precision (``fp32`` | ``fp16`` | ``bf16``, default ``fp32``).
``fp32`` runs the model in its own dtype with no autocast, on CPU and CUDA alike; ``fp16`` and
``bf16`` run it under ``torch.autocast`` with that dtype. Nothing is mixed-precision unless a spec
asks for it.

Validation (:func:`resolve_placement`):

- ``bf16`` on CPU is allowed (CPU autocast supports bfloat16; fast on CPUs with AVX512-BF16/AMX).
- ``fp16`` on CPU is refused when the spec names ``cpu`` explicitly (CPU fp16 kernels are few and
  slow); when ``auto`` falls back to CPU (a GPU spec on a machine without one), ``fp16`` runs as
  ``fp32`` with a warning, so the same spec loads on a CPU-only box.
- ``bf16`` on a CUDA device without native bf16 (before Ampere: only emulated) is refused: ask
  for ``fp16``.
- ``cuda`` or ``cuda:<n>`` with no such device visible is refused.

The runtime calls :func:`configure_threads` in each model worker thread because OpenMP thread counts
are per thread (of a model that uses torch, or once torch is imported). :func:`onnx_providers` gives
ONNX Runtime's execution providers for a placement: CUDA first when the placement is on a GPU and
this onnxruntime build has the CUDA provider, CPU always last (ONNX Runtime falls back to it for
operators CUDA lacks).

torch is imported only when a question needs it: a CPU placement in fp32 (``resolve_placement("cpu")``)
and the ONNX Runtime providers of a CPU placement never import it, so a process serving only ONNX
Runtime models on CPU (``tessera edge``) runs without torch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from shared.config import get_settings

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "bf16")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
logger = logging.getLogger("tessera.model_runtime.device")


class PlacementError(ValueError):
    """A device or precision a model spec asks for is malformed or cannot be had on this machine."""


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (``None`` for ``fp32``: no autocast, torch not imported)."""
    if precision == "fp32":
        return None
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@dataclass(frozen=True, init=False)
class Placement:
    """Where and in which precision a model runs.

    Parameters
    ----------
    device : torch.device or str
        ``cpu`` or ``cuda[:n]`` (a name such as ``"cpu"`` builds a placement without importing torch).
    autocast_dtype : torch.dtype or None
        Mixed-precision dtype under autocast (``torch.bfloat16``/``torch.float16``); ``None``
        runs in the model's own dtype (float32).
    """

    device_type: str
    """``cpu`` or ``cuda`` (what ``device.type`` says, without importing torch)."""
    device_index: int | None
    autocast_dtype: torch.dtype | None

    def __init__(self, device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> None:
        if isinstance(device, str):
            kind, _, index = device.strip().lower().partition(":")
            device_type, device_index = kind, int(index) if index else None
        else:
            device_type, device_index = device.type, device.index
        object.__setattr__(self, "device_type", device_type)
        object.__setattr__(self, "device_index", device_index)
        object.__setattr__(self, "autocast_dtype", autocast_dtype)

    @property
    def device(self) -> torch.device:
        """The ``torch.device`` (imports torch)."""
        import torch

        if self.device_index is None:
            return torch.device(self.device_type)
        return torch.device(self.device_type, self.device_index)

    @property
    def precision(self) -> str:
        """``fp32``, ``fp16`` or ``bf16``."""
        if self.autocast_dtype is None:
            return "fp32"
        return next(name for name in PRECISIONS if precision_dtype(name) == self.autocast_dtype)

    def describe(self) -> str:
        """Short label such as ``cpu`` or ``cuda:0/bf16``."""
        where = self.device_type if self.device_index is None else f"{self.device_type}:{self.device_index}"
        if self.autocast_dtype is None:
            return where
        return f"{where}/{self.precision}"


def _parse_device(choice: str) -> tuple[str, int | None]:
    match = _DEVICE_PATTERN.match(choice.strip().lower())
    if match is None:
        raise PlacementError(f"device {choice!r} is not one of auto, cpu, cuda, cuda:<n>")
    kind, index = match.group(1), match.group(2)
    if index is not None and kind != "cuda":
        raise PlacementError(f"device {choice!r}: only cuda takes an index")
    return kind, int(index) if index is not None else None


def resolve_device(preference: str | None = None) -> torch.device:
    """The device to load a model on.

    Parameters
    ----------
    preference : {"auto", "cpu", "cuda", "cuda:<n>"}, optional
        Defaults to ``settings.device``. ``auto`` picks the current CUDA device when one is visible.

    Raises
    ------
    PlacementError
        Malformed, or CUDA (or CUDA device ``n``) asked for but not visible.
    """
    import torch

    kind, index = _parse_device(preference or get_settings().device)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if kind == "cuda":
            raise PlacementError(f"device {preference or kind!r} asked for but torch sees no CUDA device")
        return torch.device("cpu")
    if index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise PlacementError(f"device cuda:{index} asked for but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively (Ampere, compute capability 8.0, or newer; any ROCm GPU).

    Not ``torch.cuda.is_bf16_supported()``: it asks about the *current* device, and by default
    answers yes where bf16 is only emulated (slowly) on older GPUs.
    """
    import torch

    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def resolve_placement(preference: str | None = None, precision: str | None = None) -> Placement:
    """Device plus precision of one model (see the module docstring for what is refused).

    Parameters
    ----------
    preference : str, optional
        As in :func:`resolve_device`.
    precision : {"fp32", "fp16", "bf16"}, optional
        Default ``fp32`` (no autocast).

    Raises
    ------
    PlacementError
        An unknown precision, or one the chosen device cannot run.

    ``cpu`` in fp32 is answered without importing torch.
    """
    wanted = (precision or "fp32").lower()
    if wanted not in PRECISIONS:
        raise PlacementError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if wanted == "fp32" and _parse_device(preference or get_settings().device)[0] == "cpu":
        return Placement("cpu")
    import torch

    device = resolve_device(preference)
    dtype = precision_dtype(wanted)
    if device.type == "cpu" and dtype == torch.float16:
        if _parse_device(preference or get_settings().device)[0] == "cpu":
            raise PlacementError("precision fp16 is not served on CPU (few, slow kernels): use bf16 or fp32")
        logger.warning("fp16 asked for but no CUDA device is visible: running in fp32 on CPU")
        dtype = None
    if device.type == "cuda" and dtype == torch.bfloat16 and not _native_bf16(device):
        raise PlacementError(f"precision bf16 asked for but {torch.cuda.get_device_name(device)} lacks it: use fp16")
    return Placement(device=device, autocast_dtype=dtype)


def configure_threads(threads: int | None = None) -> None:
    """Set torch's intra-op thread count for the calling thread (default ``settings.torch_threads``)."""
    import torch

    wanted = threads or get_settings().torch_threads
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@contextmanager
def inference_context(placement: Placement) -> Iterator[None]:
    """``torch.inference_mode`` plus autocast when the placement asks for mixed precision."""
    import torch

    autocast = (torch.autocast(placement.device_type, dtype=placement.autocast_dtype)
                if placement.autocast_dtype is not None else nullcontext())
    with torch.inference_mode(), autocast:
        yield


def onnx_providers(placement: Placement | None = None,
                   available: list[str] | None = None) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime execution providers for a placement, in order of preference.

    Parameters
    ----------
    placement : Placement, optional
        A CUDA placement gets ``("CUDAExecutionProvider", {"device_id": n})`` first when the
        provider is available; anything else (or no CUDA provider in this onnxruntime build) gets
        ``["CPUExecutionProvider"]``.
    available : list of str, optional
        ``onnxruntime.get_available_providers()`` by default.
    """
    if placement is None or placement.device_type != "cuda":
        return ["CPUExecutionProvider"]
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if "CUDAExecutionProvider" not in available:
        logger.warning("model placed on %s but onnxruntime has no CUDA provider: ONNX graphs run on CPU",
                       placement.describe())
        return ["CPUExecutionProvider"]
    device_id = placement.device_index if placement.device_index is not None else 0
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
