"""Checks about torch that never import it.

A process that serves only ONNX Runtime (or other non-torch) models must not pay for torch (seconds
and hundreds of MB at import): ``tessera edge`` runs on small gateways. The runtime's modules import
torch inside the functions that need it, and ask these questions instead of ``isinstance(x,
torch.Tensor)``: a process that never imported torch holds no tensor and no torch module.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from typing_extensions import TypeIs


def torch_loaded() -> bool:
    """Whether this process has imported torch (so asking it something costs nothing more)."""
    return "torch" in sys.modules


def is_tensor(value: object) -> TypeIs[torch.Tensor]:
    """``isinstance(value, torch.Tensor)``, without importing torch."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def is_torch_module(value: object) -> TypeIs[torch.nn.Module]:
    """``isinstance(value, torch.nn.Module)``, without importing torch."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.nn.Module)
