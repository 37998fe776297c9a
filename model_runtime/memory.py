"""A memory budget per model, and out-of-memory answered by splitting the batch, never by a dead worker.

:func:`run_with_oom_split` runs a batch; when it does not fit it runs the two halves one after the
other, recursively, down to single items:

- *before* running, when the model has a :class:`MemoryBudget` and the batch's estimated bytes
  (``bytes_per_item`` summed over the items) exceed it; an item whose own estimate exceeds the
  budget is refused without running;
- *after* the device says so: ``torch.cuda.OutOfMemoryError`` (``torch.OutOfMemoryError``, which
  CPU builds can raise too) or ONNX Runtime's allocation failure (:func:`is_out_of_memory`). The
  exception (and the traceback holding the failed batch's tensors) is dropped and the CUDA caching
  allocator's free blocks are released (``torch.cuda.empty_cache``) before the halves run.

A single item that still does not fit raises :class:`ItemTooLargeForMemory`, the runtime's own
error (a :class:`~model_runtime.errors.BadInput`: 422 at the HTTP edge), so that caller alone fails.
Outputs come back in item order, as one list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from model_runtime.errors import BadInput
from model_runtime.lazy_torch import loaded_torch

if TYPE_CHECKING:
    import torch

Item = TypeVar("Item")
Output = TypeVar("Output")
logger = logging.getLogger("tessera.model_runtime.memory")

_ORT_OOM_MARKERS = ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation")


class ItemTooLargeForMemory(BadInput):
    """One item does not fit the model's memory (its estimate exceeds the budget, or it ran out alone)."""


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes one batch of a model may take, and what one item is estimated to take.

    Parameters
    ----------
    budget_bytes : int
        Most estimated bytes per ``run_batch`` call (activations and inputs; the weights are
        already resident). :func:`device_memory_budget` derives one from a GPU's free memory.
    bytes_per_item : int or callable
        A constant, or ``(prepared_item) -> int`` for variable-sized items (e.g. voxels x
        channels x 4 x a per-model activation factor, measured once).
    """

    budget_bytes: int
    bytes_per_item: int | Callable[[Any], int]

    @classmethod
    def on_device(cls, device: torch.device, bytes_per_item: int | Callable[[Any], int],
                  fraction: float = 0.8) -> MemoryBudget | None:
        """A budget of ``fraction`` of the device's free memory now (call after the weights are loaded).

        ``None`` on CPU, where out-of-memory is the operating system's business, not a batch's.
        """
        budget_bytes = device_memory_budget(device, fraction)
        return None if budget_bytes is None else cls(budget_bytes, bytes_per_item)

    def estimate(self, items: Sequence[Any]) -> int:
        """Estimated bytes of running ``items`` together."""
        if isinstance(self.bytes_per_item, int):
            return self.bytes_per_item * len(items)
        return sum(self.bytes_per_item(item) for item in items)

    def fits(self, items: Sequence[Any]) -> bool:
        """Whether ``items`` may run as one batch."""
        return self.estimate(items) <= self.budget_bytes


def device_memory_budget(device: torch.device, fraction: float = 0.8) -> int | None:
    """``fraction`` of the CUDA device's free memory now, in bytes; ``None`` on CPU (no budget)."""
    if device.type != "cuda":
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free * fraction)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory (torch's OOM, or ONNX Runtime's allocator)."""
    torch_module = loaded_torch()  # a process that never imported torch has no torch OOM
    if torch_module is not None and isinstance(error, torch_module.OutOfMemoryError):
        return True
    # ONNX Runtime raises its own RuntimeException / Fail types with the CUDA allocator's message
    name = type(error).__name__
    if isinstance(error, RuntimeError) or name in ("RuntimeException", "Fail", "RuntimeError"):
        message = str(error).lower()
        return any(marker in message for marker in _ORT_OOM_MARKERS)
    return False


def halve(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """The default split: first half, second half (the first gets the smaller half of an odd count)."""
    middle = len(items) // 2
    return items[:middle], items[middle:]


def release_cached_memory() -> None:
    """Return the CUDA caching allocator's unused blocks, so the halves start from what is really free."""
    torch_module = loaded_torch()  # without torch there is no CUDA caching allocator
    if torch_module is not None and torch_module.cuda.is_available() and torch_module.cuda.is_initialized():
        torch_module.cuda.empty_cache()


def run_with_oom_split(run: Callable[[list[Item]], Sequence[Output]], batch: list[Item],
                       split: Callable[[list[Item]], tuple[list[Item], list[Item]]] = halve, *,
                       budget: MemoryBudget | None = None,
                       on_split: Callable[[], None] | None = None,
                       on_out_of_memory: Callable[[], None] | None = None) -> list[Output]:
    """Run ``batch``, splitting it until every part fits (see the module docstring).

    Parameters
    ----------
    run : callable
        ``(items) -> outputs``, one output per item, in order (the model's bound ``run_batch``).
    batch : list
        Prepared items.
    split : callable
        ``(items) -> (first, second)``, both non-empty for two or more items; :func:`halve` by default.
    budget : MemoryBudget, optional
        Split before running while the estimate exceeds it.
    on_split : callable, optional
        Called once per split, for the budget or after running out of memory (e.g. a Prometheus
        counter's ``inc``).
    on_out_of_memory : callable, optional
        Called once per batch that really ran out of device memory (before it is split).

    Raises
    ------
    ItemTooLargeForMemory
        A single item over the budget, or out of memory on its own.
    """
    if budget is not None and not budget.fits(batch):
        if len(batch) == 1:
            estimate = budget.estimate(batch)
            raise ItemTooLargeForMemory(
                f"item needs about {estimate} bytes, over the model's memory budget of {budget.budget_bytes}",
                estimated_bytes=estimate, budget_bytes=budget.budget_bytes)
        return _run_halves(run, batch, split, budget, on_split, on_out_of_memory)
    try:
        return list(run(batch))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # outside the except block: the exception's traceback (and the failed batch's tensors) is gone
    release_cached_memory()
    if on_out_of_memory is not None:
        on_out_of_memory()
    if len(batch) == 1:
        raise ItemTooLargeForMemory(f"item ran out of device memory on its own: {message}")
    logger.warning("batch of %d ran out of memory (%s); running it in halves", len(batch), message)
    return _run_halves(run, batch, split, budget, on_split, on_out_of_memory)


def _run_halves(run: Callable[[list[Item]], Sequence[Output]], batch: list[Item],
                split: Callable[[list[Item]], tuple[list[Item], list[Item]]],
                budget: MemoryBudget | None, on_split: Callable[[], None] | None,
                on_out_of_memory: Callable[[], None] | None) -> list[Output]:
    first, second = split(batch)
    if not first or not second or len(first) + len(second) != len(batch):
        raise ValueError(f"split of {len(batch)} items gave parts of {len(first)} and {len(second)}")
    if on_split is not None:
        on_split()
    return (run_with_oom_split(run, first, split, budget=budget, on_split=on_split, on_out_of_memory=on_out_of_memory)
            + run_with_oom_split(run, second, split, budget=budget, on_split=on_split,
                                 on_out_of_memory=on_out_of_memory))
