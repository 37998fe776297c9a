"""Device and precision: CUDA with fp16/bf16 autocast when present, else CPU in full precision.

Settings (``TESSERA_DEVICE`` = auto|cpu|cuda, ``TESSERA_TORCH_THREADS``) decide; the runtime calls
:func:`configure_threads` in each model worker thread because OpenMP thread counts are per thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from shared.config import get_settings


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a model runs.

    Parameters
    ----------
    device : torch.device
        ``cpu`` or ``cuda[:n]``.
    autocast_dtype : torch.dtype or None
        Mixed-precision dtype under autocast (``torch.bfloat16``/``torch.float16`` on CUDA); ``None``
        runs in the model's own dtype (float32 on CPU).
    """

    device: torch.device
    autocast_dtype: torch.dtype | None = None

    def describe(self) -> str:
        """Short label such as ``cpu`` or ``cuda:0/bf16``."""
        if self.autocast_dtype is None:
            return str(self.device)
        return f"{self.device}/{str(self.autocast_dtype).removeprefix('torch.').replace('bfloat', 'bf')}"


def resolve_device(preference: str | None = None) -> torch.device:
    """The device to load models on.

    Parameters
    ----------
    preference : {"auto", "cpu", "cuda"}, optional
        Defaults to ``settings.device``. ``auto`` picks CUDA when available.

    Raises
    ------
    RuntimeError
        ``cuda`` was asked for but no CUDA device is visible.
    """
    choice = preference or get_settings().device
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        raise RuntimeError("TESSERA_DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cpu")


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, fp16 on older ones, ``None`` (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_placement(preference: str | None = None) -> Placement:
    """Device plus precision, from settings unless ``preference`` is given."""
    device = resolve_device(preference)
    return Placement(device=device, autocast_dtype=autocast_dtype_for(device))


def configure_threads(threads: int | None = None) -> None:
    """Set torch's intra-op thread count for the calling thread (default ``settings.torch_threads``)."""
    wanted = threads or get_settings().torch_threads
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@contextmanager
def inference_context(placement: Placement) -> Iterator[None]:
    """``torch.inference_mode`` plus autocast when the placement asks for mixed precision."""
    autocast = (torch.autocast(placement.device.type, dtype=placement.autocast_dtype)
                if placement.autocast_dtype is not None else nullcontext())
    with torch.inference_mode(), autocast:
        yield
