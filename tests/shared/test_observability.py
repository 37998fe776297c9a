"""The process metrics the platform adds beside the request metrics."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from shared.app import tune_garbage_collector
from shared.observability import observe_gc_pauses


def _collections(generation: int) -> float:
    return REGISTRY.get_sample_value("tessera_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0


def test_every_garbage_collection_is_timed_once_per_process() -> None:
    observe_gc_pauses()
    observe_gc_pauses()  # a second call adds no second timer
    gc.disable()  # only the two collections below
    try:
        before = [_collections(generation) for generation in range(3)]
        gc.collect(0)
        gc.collect()
        after = [_collections(generation) for generation in range(3)]
    finally:
        gc.enable()
    assert after[0] - before[0] == 1
    assert after[2] - before[2] == 1
    paused = REGISTRY.get_sample_value("tessera_gc_pause_seconds_sum", {"generation": "2"}) or 0.0
    assert paused > 0


def test_the_service_apps_garbage_collector_tuning_times_collections() -> None:
    thresholds = gc.get_threshold()
    tune_garbage_collector()
    gc.disable()
    try:
        before = _collections(1)
        gc.collect(1)
        assert _collections(1) - before == 1
    finally:
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*thresholds)
