"""GPU memory and utilisation in /metrics: exported when CUDA is in use, absent (and harmless) on CPU."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from model_runtime.metrics import GpuCollector, register_gpu_collector


def test_on_cpu_nothing_is_exported_and_nothing_fails() -> None:
    assert register_gpu_collector() is register_gpu_collector()  # registered once, at import
    exposition = generate_latest(REGISTRY).decode()
    if not torch.cuda.is_initialized():
        assert "tessera_gpu_" not in exposition


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports two initialised CUDA devices with known numbers (the collector's logic only)."""
    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 2,
                        "memory_allocated": lambda index: 1000 + index, "memory_reserved": lambda index: 2000 + index,
                        "max_memory_allocated": lambda index: 3000 + index,
                        "mem_get_info": lambda index: (4000 + index, 8000),
                        "utilization": lambda index: 50 + index}.items():
        monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.usefixtures("fake_gpus")
def test_with_cuda_every_device_reports_memory_and_utilisation() -> None:
    registry = CollectorRegistry()
    collector = register_gpu_collector(registry)
    collector.has_nvml = True
    exposition = generate_latest(registry).decode()
    for line in ('tessera_gpu_memory_allocated_bytes{device="1"} 1001.0',
                 'tessera_gpu_memory_reserved_bytes{device="0"} 2000.0',
                 'tessera_gpu_memory_max_allocated_bytes{device="1"} 3001.0',
                 'tessera_gpu_memory_free_bytes{device="0"} 4000.0',
                 'tessera_gpu_memory_total_bytes{device="1"} 8000.0',
                 'tessera_gpu_utilization_ratio{device="1"} 0.51'):
        assert line in exposition


@pytest.mark.usefixtures("fake_gpus")
def test_utilisation_is_omitted_without_pynvml_or_when_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    collector = GpuCollector()
    collector.has_nvml = False
    assert "tessera_gpu_utilization_ratio" not in {family.name for family in collector.collect()}

    def refuses(index: int) -> int:
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(torch.cuda, "utilization", refuses)
    collector.has_nvml = True
    names = {family.name for family in collector.collect()}
    assert "tessera_gpu_utilization_ratio" not in names and "tessera_gpu_memory_allocated_bytes" in names
