"""Per-model serving metrics: Prometheus series (default registry) and an in-process latency window.

Every series carries one label, ``model``. The rolling window feeds ``runtime.stats()`` with p50/p99
without scraping Prometheus (histogram buckets are too coarse for a p99 in milliseconds).
"""

from __future__ import annotations

import math
import threading
from collections import deque

from prometheus_client import Counter, Gauge, Histogram

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
        self.latency = LatencyWindow()
