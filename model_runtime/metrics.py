"""Per-model serving metrics: Prometheus series (default registry) and an in-process latency window.

Every series carries one label, ``model``. The rolling window feeds ``runtime.stats()`` with p50/p99
without scraping Prometheus (histogram buckets are too coarse for a p99 in milliseconds).

GPU memory and utilisation: :class:`GpuCollector`, registered once in the default registry when this
module is imported, reads each visible CUDA device at scrape time — ``tessera_gpu_memory_allocated_bytes``,
``..._reserved_bytes``, ``..._max_allocated_bytes`` (torch's caching allocator, this process),
``..._free_bytes`` and ``..._total_bytes`` (the device, ``cudaMemGetInfo``), and
``tessera_gpu_utilization_ratio`` (0-1, ``torch.cuda.utilization``) when pynvml is installed. It
exports nothing until this process has initialised CUDA (so a CPU-only process, or one whose models
are all on CPU, exports no GPU series and never touches the driver from the scrape).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("tessera.model_runtime.metrics")

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

QUEUE_WAIT = Histogram("tessera_model_queue_wait_seconds", "Time an item waited in the batch queue",
                       ["model"], buckets=_SECONDS_BUCKETS)
BATCH_SIZE = Histogram("tessera_model_batch_size", "Items per executed batch", ["model"],
                       buckets=_BATCH_BUCKETS)
INFERENCE = Histogram("tessera_model_inference_seconds", "Wall time of one run_batch call",
                      ["model"], buckets=_SECONDS_BUCKETS)
QUEUE_DEPTH = Gauge("tessera_model_queue_depth", "Items waiting in the batch queue", ["model"])
REJECTED = Counter("tessera_model_rejected_total", "Items refused because the queue was full", ["model"])
DEADLINE_EXCEEDED = Counter("tessera_model_deadline_exceeded_total",
                            "Items dropped because they waited past their deadline", ["model"])
ERRORS = Counter("tessera_model_errors_total", "Items whose inference raised", ["model"])
OOM_SPLITS = Counter("tessera_model_oom_splits_total",
                     "Batches split in two because they ran out of memory or exceeded the memory budget",
                     ["model"])
OUT_OF_MEMORY = Counter("tessera_model_out_of_memory_total",
                        "Batches that ran out of device memory (then split and retried)", ["model"])


class LatencyWindow:
    """The last ``size`` latencies of one model, for percentiles on demand.

    Parameters
    ----------
    size : int
        Number of most recent samples kept (older ones fall out).
    """

    def __init__(self, size: int = 4096) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()  # recorded from the event loop, read from any thread

    def record(self, seconds: float) -> None:
        """Add one end-to-end latency, in seconds."""
        with self._lock:
            self._samples.append(seconds)

    def percentiles(self, *quantiles: float) -> list[float | None]:
        """Nearest-rank percentiles in milliseconds (``None`` when the window is empty).

        Parameters
        ----------
        quantiles : float
            Values in [0, 1], e.g. ``0.5, 0.99``.
        """
        with self._lock:
            ordered = sorted(self._samples)
        if not ordered:
            return [None for _ in quantiles]
        last = len(ordered) - 1
        return [ordered[min(last, max(0, math.ceil(q * len(ordered)) - 1))] * 1000.0 for q in quantiles]

    def __len__(self) -> int:
        return len(self._samples)


class ModelMetrics:
    """The labelled series of one model, resolved once (label lookup is not free on the hot path).

    Parameters
    ----------
    model : str
        Value of the ``model`` label.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.queue_wait = QUEUE_WAIT.labels(model)
        self.batch_size = BATCH_SIZE.labels(model)
        self.inference = INFERENCE.labels(model)
        self.queue_depth = QUEUE_DEPTH.labels(model)
        self.rejected = REJECTED.labels(model)
        self.deadline_exceeded = DEADLINE_EXCEEDED.labels(model)
        self.errors = ERRORS.labels(model)
        self.oom_splits = OOM_SPLITS.labels(model)
        self.latency = LatencyWindow()


_MEMORY_SERIES = (  # (name suffix, help, torch.cuda function)
    ("allocated", "Bytes held by tensors (torch caching allocator, this process)", "memory_allocated"),
    ("reserved", "Bytes reserved by torch's caching allocator (this process)", "memory_reserved"),
    ("max_allocated", "Peak bytes held by tensors since start or reset (this process)", "max_memory_allocated"),
)


class GpuCollector(Collector):
    """GPU memory and utilisation per CUDA device, read at scrape time (see the module docstring)."""

    def __init__(self) -> None:
        self.has_nvml = importlib.util.find_spec("pynvml") is not None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The GPU series, or nothing when this process has not initialised CUDA."""
        torch: Any = sys.modules.get("torch")  # a process that never imported torch has no CUDA to report
        if torch is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        devices = [str(index) for index in range(torch.cuda.device_count())]
        for suffix, documentation, function in _MEMORY_SERIES:
            family = GaugeMetricFamily(f"tessera_gpu_memory_{suffix}_bytes", documentation, labels=["device"])
            for device in devices:
                family.add_metric([device], float(getattr(torch.cuda, function)(int(device))))
            yield family
        free = GaugeMetricFamily("tessera_gpu_memory_free_bytes", "Free device memory (all processes)",
                                 labels=["device"])
        total = GaugeMetricFamily("tessera_gpu_memory_total_bytes", "Device memory", labels=["device"])
        for device in devices:
            free_bytes, total_bytes = torch.cuda.mem_get_info(int(device))
            free.add_metric([device], float(free_bytes))
            total.add_metric([device], float(total_bytes))
        yield free
        yield total
        utilization = self._utilization(torch, devices)
        if utilization is not None:
            yield utilization

    def _utilization(self, torch: Any, devices: list[str]) -> GaugeMetricFamily | None:
        if not self.has_nvml:
            return None
        family = GaugeMetricFamily("tessera_gpu_utilization_ratio",
                                   "Share of the last sample period a kernel was running (nvidia-smi)",
                                   labels=["device"])
        try:
            for device in devices:
                family.add_metric([device], torch.cuda.utilization(int(device)) / 100.0)
        except Exception as exc:  # NVML missing at runtime or the driver refusing: omit, never fail a scrape
            logger.debug("GPU utilisation not read: %r", exc)
            return None
        return family


_gpu_collector_lock = threading.Lock()
_gpu_collectors: dict[int, GpuCollector] = {}


def register_gpu_collector(registry: CollectorRegistry = REGISTRY) -> GpuCollector:
    """Register :class:`GpuCollector` in ``registry`` once (later calls return the same collector)."""
    with _gpu_collector_lock:
        collector = _gpu_collectors.get(id(registry))
        if collector is None:
            collector = GpuCollector()
            registry.register(collector)
            _gpu_collectors[id(registry)] = collector
        return collector


register_gpu_collector()
