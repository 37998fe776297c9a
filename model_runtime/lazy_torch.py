"""Checks about torch that never import it.

A process that serves only ONNX Runtime (or other non-torch) models must not pay for torch (seconds
and hundreds of MB at import): ``tessera edge`` runs on small gateways. The runtime's modules import
torch inside the functions that need it, and ask these questions instead of ``isinstance(x,
torch.Tensor)``: a process that never imported torch holds no tensor and no torch module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from typing_extensions import TypeIs


def loaded_torch() -> ModuleType | None:
    """The torch module if this process has imported it, else ``None`` (never imports it)."""
    return sys.modules.get("torch")


def torch_loaded() -> bool:
    """Whether this process has imported torch (so asking it something costs nothing more)."""
    return loaded_torch() is not None


def is_tensor(value: object) -> TypeIs[torch.Tensor]:
    """``isinstance(value, torch.Tensor)``, without importing torch."""
    torch_module = loaded_torch()
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def is_torch_module(value: object) -> TypeIs[torch.nn.Module]:
    """``isinstance(value, torch.nn.Module)``, without importing torch."""
    torch_module = loaded_torch()
    return torch_module is not None and isinstance(value, torch_module.nn.Module)


def imported_on_use(owner: str, sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``owner`` serving each name of ``sources`` from the module it
    maps to, imported the first time the name is asked for (so importing ``owner`` imports no torch)."""

    def module_getattr(name: str) -> Any:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {owner!r} has no attribute {name!r}")
        return getattr(importlib.import_module(source), name)

    return module_getattr
