"""The model runtime on a CUDA device: the model families in fp32 / fp16 / bf16, the memory budget and
out-of-memory recovery, each beside the naive way in the same run (issue 16's GPU table).

In-process (no HTTP: on a GPU the model is no longer what the CPU-bound HTTP tables measure), one
CUDA device, torch eager under the runtime's placement (``ModelSpec.device="cuda"``, ``precision``):

- **volume**: the 3D U-Net of :mod:`bench.families.volume` on 256x256x64 volumes, 64^3 patches,
  overlap 0.25, Gaussian blending; MONAI's ``sliding_window_inference`` per study on the GPU (its
  default ``sw_batch_size=1`` and the best of a search; the best also with its output copied back
  through pinned memory, as the runtime does) against the runtime's
  :class:`~model_runtime.sliding_window.SlidingWindowInferer` (patches of concurrent studies share
  batches; its patch batch the best of a search at 4 studies), at 1 / 2 / 4 concurrent studies; each
  precision's output against MONAI fp32;
- **fusion**: the audio + text model of :mod:`bench.families.fusion_model`, 1-6 s utterances from
  K closed-loop callers, one by one (each caller's thread runs the model per utterance) against the
  runtime (padded batches bounded by audio samples, with and without length buckets);
- **sensor**: the sensor-window attention model of :mod:`bench.families.sensor`, windows/s
  unbatched against batched;
- **out of memory**: the U-Net's batches under a per-process memory cap (``torch.cuda.
  set_per_process_memory_fraction``) that a full batch exceeds: with no budget each batch runs out of
  memory and is split in halves and retried (real CUDA OOMs), with a :class:`~model_runtime.memory.
  MemoryBudget` batches are cut to fit beforehand; the outputs are checked against an uncapped run;
- **costs**: the U-Net's forward per batch size (total and launch time) and a study's copies to and
  from the device (pageable and through pinned memory), measured apart;
- ``/metrics``: the ``tessera_gpu_*`` series after the run.

Usage::

    python bench/runtime_gpu.py                 # on a CUDA machine, ~3 min
    python bench/runtime_gpu.py --quick         # small shapes, short points (also runs on CPU, for checks)

Writes ``bench/results/runtime_gpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._measure import threaded_callers  # noqa: E402
from bench.families import fusion_model as fusion  # noqa: E402
from bench.families import sensor, volume  # noqa: E402
from model_runtime import ModelRuntime, ModelSpec, TorchBackend  # noqa: E402
from model_runtime.batcher import FillPolicy  # noqa: E402
from model_runtime.memory import MemoryBudget  # noqa: E402
from model_runtime.metrics import OOM_SPLITS, OUT_OF_MEMORY  # noqa: E402
from model_runtime.sliding_window import (  # noqa: E402
    SlidingWindowConfig,
    SlidingWindowInferer,
    run_patch_batch_on_device,
    to_host_via_pinned,
)

PRECISIONS = ("fp32", "fp16", "bf16")
LEVELS = (1, 2, 4)
CALLERS = (1, 4, 16)
SW_BATCH_CANDIDATES = (1, 4, 8, 16, 32, 64)
"""MONAI's ``sw_batch_size`` search, on one study (its best p50)."""
PATCH_BATCH_CANDIDATES = (16, 32, 64)
"""The runtime's patch batch search, fp32 at 4 studies (its best volumes/s): each way gets its best batch."""
FUSION_BATCH, FUSION_BATCH_COST = 32, 64 * fusion.SAMPLE_RATE
WINDOW_MS = {"fusion": 5.0, "sensor": 2.0}
"""The ``window`` fill's wait for a batch: about a third of a batch's time on the GPU (~17 ms for an utterance,
launch-bound; ~3 ms for sensor windows), so callers answered by one batch can join the next."""
POINT_SECONDS = {"fusion": 4.0, "sensor": 3.0}
"""Closed-loop seconds a point (``--seconds`` overrides both; ``--quick``: 1 s)."""


# ------------------------------------------------------------------------------------------- helpers
def precisions_on(device: torch.device) -> tuple[str, ...]:
    """The precisions to measure: all three on a GPU; on CPU (a check of this script) fp16 is not served."""
    return PRECISIONS if device.type == "cuda" else ("fp32", "bf16")


def summarise(latencies_s: Sequence[float], wall_s: float, count_key: str) -> dict[str, Any]:
    """Rate, p50 and p99 (ms) of one point."""
    ordered = sorted(latencies_s)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000  # noqa: E731
    return {count_key: len(ordered) / wall_s, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "count": len(ordered)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory torch allocated on ``device`` since the last reset (MB; 0 on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def batch_totals(name: str) -> tuple[float, float]:
    """Batches run and items in them so far, for model ``name`` (the runtime's batch-size histogram)."""
    from prometheus_client import REGISTRY

    return tuple(REGISTRY.get_sample_value(f"tessera_model_batch_size_{kind}", {"model": name}) or 0.0
                 for kind in ("count", "sum"))  # type: ignore[return-value]


def mean_batch(name: str, before: tuple[float, float]) -> float | None:
    """Mean batch size since ``before`` (:func:`batch_totals`)."""
    batches, items = (now - then for now, then in zip(batch_totals(name), before, strict=True))
    return round(items / batches, 2) if batches else None


def oom_splits(name: str) -> float:
    return float(OOM_SPLITS.labels(name)._value.get())


def out_of_memory_count(name: str) -> float:
    """Batches of model ``name`` that really ran out of device memory (splits also count budget cuts)."""
    return float(OUT_OF_MEMORY.labels(name)._value.get())


# -------------------------------------------------------------------------------------------- volume
def monai_point(model: torch.nn.Module, volumes: list[torch.Tensor], concurrency: int, sw_batch_size: int,
                device: torch.device, pinned_output: bool = False) -> dict[str, Any]:
    """Studies through MONAI's ``sliding_window_inference`` on the device, one thread per caller.

    The output comes back to the host by ``.cpu()`` (what a service calling MONAI per study does),
    or with ``pinned_output`` through a page-locked staging buffer, as the runtime's inferer copies it.
    """
    from monai.inferers import sliding_window_inference

    def infer(study: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output = sliding_window_inference(study[None].to(device), volume.ROI, sw_batch_size, model,
                                              overlap=volume.OVERLAP, mode=volume.BLEND)
            assert isinstance(output, torch.Tensor)
            blended = output[0].float()
            return to_host_via_pinned(blended) if pinned_output and blended.is_cuda else blended.cpu()

    infer(volumes[0])
    reset_peak(device)
    latencies, wall_s = threaded_callers(infer, volumes, concurrency)
    result = summarise(latencies, wall_s, "volumes_per_s")
    return {**result, "peak_gpu_mb": peak_memory_mb(device)}


def unet_spec(name: str, precision: str, device: torch.device, batch: int,
              memory_budget: MemoryBudget | None = None) -> ModelSpec:
    """The U-Net as a runtime patch model on ``device`` in ``precision``."""
    return ModelSpec(name=name, version="gpu-bench", loader=lambda context: volume.unet().to(context.placement.device),
                     run_batch=run_patch_batch_on_device, max_batch_size=batch, max_wait_ms=1.0, max_queue=1024,
                     device=str(device), precision=precision, memory_budget=memory_budget)


async def runtime_studies(runtime: ModelRuntime, name: str, volumes: list[torch.Tensor], concurrency: int,
                          batch: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Studies through the runtime's sliding-window inferer, ``concurrency`` callers; timings and outputs."""
    inferer = SlidingWindowInferer(runtime, name, SlidingWindowConfig(roi_size=volume.ROI, overlap=volume.OVERLAP,
                                                                     mode=volume.BLEND), patches_per_study=2 * batch)
    await inferer.infer(volumes[0])
    latencies: list[float] = []
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(volumes)

    async def caller(indices: list[int]) -> None:
        for index in indices:
            started = time.perf_counter()
            output = await inferer.infer(volumes[index])
            assert isinstance(output, torch.Tensor)
            outputs[index] = output
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(list(range(i, len(volumes), concurrency))) for i in range(concurrency)))
    return summarise(latencies, time.perf_counter() - started, "volumes_per_s"), outputs


def bench_volume(device: torch.device, quick: bool) -> dict[str, Any]:
    """MONAI per study vs the runtime in each precision, at each concurrency; fidelity vs MONAI fp32."""
    shape = volume.QUICK_SHAPE if quick else volume.FULL_SHAPE
    per_caller = 1 if quick else 3
    levels = (1, 2) if quick else LEVELS
    model = volume.unet().to(device)
    check = volume.study_volumes(1, shape, seed=11)[0]
    search = {}
    for size in ((1, 4) if quick else SW_BATCH_CANDIDATES):
        search[size] = monai_point(model, [check, check], 1, size, device)["p50_ms"]
    best = min(search, key=search.__getitem__)
    batch_search = asyncio.run(search_patch_batch(device, (4,) if quick else PATCH_BATCH_CANDIDATES,
                                                  volume.study_volumes(2 * max(levels), shape), max(levels)))
    patch_batch = max(batch_search, key=batch_search.__getitem__)
    points: list[dict[str, Any]] = []
    for level in levels:
        studies = volume.study_volumes(level * per_caller, shape)
        for size in sorted({1, best}):
            points.append({"way": f"monai sw={size}", "precision": "fp32", "studies": level,
                           **monai_point(model, studies, level, size, device)})
            print_point(points[-1])
        if device.type == "cuda":
            points.append({"way": f"monai sw={best}, pinned output", "precision": "fp32", "studies": level,
                           **monai_point(model, studies, level, best, device, pinned_output=True)})
            print_point(points[-1])
    reference = volume.monai_infer(lambda batch: model(batch.to(device)).float().cpu(), check, best)

    async def runtime_ways() -> None:
        for precision in precisions_on(device):
            runtime = ModelRuntime()
            name = f"unet-{precision}"
            await runtime.load(unet_spec(name, precision, device, patch_batch))
            try:
                for level in levels:
                    studies = volume.study_volumes(level * per_caller, shape)
                    reset_peak(device)
                    timing, _ = await runtime_studies(runtime, name, studies, level, patch_batch)
                    points.append({"way": "runtime", "precision": precision, "studies": level, **timing,
                                   "peak_gpu_mb": peak_memory_mb(device), "batch": patch_batch})
                    print_point(points[-1])
                _, (output,) = await runtime_studies(runtime, name, [check], 1, patch_batch)
                fidelity[precision] = {"max_abs_difference": float((output - reference).abs().max()),
                                       "argmax_agreement": float((output.argmax(0) == reference.argmax(0))
                                                                 .float().mean())}
            finally:
                await runtime.close()

    fidelity: dict[str, dict[str, float]] = {}
    asyncio.run(runtime_ways())
    return {"shape": shape, "roi": volume.ROI, "sw_batch_search_p50_ms": search, "best_sw_batch_size": best,
            "patch_batch_search_volumes_per_s": batch_search, "patch_batch": patch_batch,
            "points": points, "fidelity_vs_monai_fp32": fidelity}


async def search_patch_batch(device: torch.device, candidates: Sequence[int], studies: list[torch.Tensor],
                             concurrency: int) -> dict[int, float]:
    """The runtime's volumes/s (fp32) with each patch batch, ``concurrency`` studies in flight."""
    rates = {}
    for batch in candidates:
        runtime = ModelRuntime()
        await runtime.load(unet_spec("unet-search", "fp32", device, batch))
        try:
            await runtime_studies(runtime, "unet-search", studies[:1], 1, batch)  # warm-up
            timing, _ = await runtime_studies(runtime, "unet-search", studies, concurrency, batch)
            rates[batch] = timing["volumes_per_s"]
        finally:
            await runtime.close()
        print(f"  runtime patch batch {batch}: {rates[batch]:.2f} volumes/s at {concurrency} studies", flush=True)
    return rates


# --------------------------------------------------------------------------------------------- costs
COST_BATCHES = (1, 4, 16, 32, 64, 128)


def bench_costs(device: torch.device, quick: bool) -> dict[str, Any]:
    """What a study's parts cost on this device, measured apart (the decomposition behind the volume table).

    The U-Net's forward per batch size, fp32 and bf16: total time (synchronised) and the CPU time the
    call takes to return (launching its kernels); and a study's copies: the volume to the device, its
    output back by a pageable ``.cpu()`` and through a pinned staging buffer (``to_host_via_pinned``).
    """
    model = volume.unet().to(device)
    on_gpu = device.type == "cuda" and not quick  # on a CPU (a check of this script) two small batches
    forward = []
    for precision in precisions_on(device):
        for batch in (COST_BATCHES if on_gpu else (1, 2)):
            patches = torch.randn(batch, 1, *volume.ROI, device=device)
            total_ms, launch_ms = _forward_ms(model, patches, precision, repeats=8 if on_gpu else 2)
            forward.append({"precision": precision, "batch": batch, "ms": total_ms, "ms_per_patch": total_ms / batch,
                            "launch_ms": launch_ms})
            print(f"  forward {precision} batch {batch:>3}: {total_ms:7.2f} ms ({total_ms / batch:.3f} a patch), "
                  f"launch {launch_ms:.2f} ms", flush=True)
    record: dict[str, Any] = {"forward": forward}
    if device.type == "cuda":
        shape = volume.QUICK_SHAPE if quick else volume.FULL_SHAPE
        study = torch.randn(1, *shape)
        output = torch.randn(2, *shape, device=device)
        record["copies_ms"] = {"volume_to_device": _synchronised_ms(lambda: study.to(device)),
                               "output_cpu": _synchronised_ms(output.cpu),
                               "output_via_pinned": _synchronised_ms(lambda: to_host_via_pinned(output))}
        print("  copies (ms): " + ", ".join(f"{name} {ms:.2f}" for name, ms in record["copies_ms"].items()),
              flush=True)
    return record


def _forward_ms(model: torch.nn.Module, patches: torch.Tensor, precision: str, repeats: int) -> tuple[float, float]:
    """Mean ms of one forward (synchronised) and of the call alone (until it returns)."""
    autocast = torch.autocast(patches.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        model(patches)
        _synchronise(patches.device)
        launch = 0.0
        started = time.perf_counter()
        for _ in range(repeats):
            called = time.perf_counter()
            model(patches)
            launch += time.perf_counter() - called
        _synchronise(patches.device)
        total = time.perf_counter() - started
    return total / repeats * 1000, launch / repeats * 1000


def _synchronised_ms(work: Callable[[], object], repeats: int = 10) -> float:
    work()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------- fusion
def one_by_one(run_one: Callable[[Any], Any], items: Sequence[Any], callers: int, seconds: float) -> dict[str, Any]:
    """``callers`` threads in a closed loop, each running the model on one item at a time."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(offset: int) -> None:
        index = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            run_one(items[index % len(items)])
            with lock:
                latencies.append(time.perf_counter() - started)
            index += callers

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "wall_s": time.perf_counter() - started}


async def closed_loop(runtime: ModelRuntime, name: str, items: Sequence[Any], callers: int,
                      seconds: float) -> dict[str, Any]:
    """``callers`` asyncio callers in a closed loop through ``runtime.predict``."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def caller(offset: int) -> None:
        index = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await runtime.predict(name, items[index % len(items)])
            latencies.append(time.perf_counter() - started)
            index += callers

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return {"latencies": latencies, "wall_s": time.perf_counter() - started}


def bench_fusion(device: torch.device, quick: bool) -> dict[str, Any]:
    """Utterances one by one (fp32, eager on the device) vs the runtime in each precision."""
    from model_runtime.device import Placement

    seconds = 1.0 if quick else POINT_SECONDS["fusion"]
    pool = fusion.utterance_pool()
    requests = [(pcm, text) for pcm, text, _ in pool]
    naive = TorchBackend(fusion.fusion_model(), Placement(device))
    points: list[dict[str, Any]] = []
    for callers in CALLERS:
        run = one_by_one(lambda request: fusion.run_fusion(naive, [fusion.decode(*request)]), requests, callers,
                         seconds)
        points.append({"way": "one-by-one", "precision": "fp32", "callers": callers,
                       **summarise(run["latencies"], run["wall_s"], "utt_per_s")})
        print_point(points[-1])

    async def runtime_ways() -> None:
        # Length buckets (the CPU table's best), one padded batch of any lengths (padding is cheap on a GPU),
        # the same waiting a few ms for a fuller batch (the window fill), then the mixed precisions.
        mixed = [precision for precision in precisions_on(device) if precision != "fp32"]
        ways: list[tuple[str, str, bool, FillPolicy]] = [
            ("runtime+buckets", "fp32", True, "greedy"), ("runtime", "fp32", False, "greedy"),
            ("runtime+window", "fp32", False, "window"),
            *(("runtime", precision, False, "greedy") for precision in mixed)]
        for way, precision, buckets, fill in ways:
            runtime = ModelRuntime()
            name = f"fusion-{way}-{precision}"
            spec = fusion.fusion_spec(fusion.fusion_model(), name=name, buckets=buckets, warmup=requests[:4])
            await runtime.load(dataclasses.replace(
                spec, loader=lambda context: TorchBackend(fusion.fusion_model(), context.placement),
                device=str(device), precision=precision, max_batch_size=FUSION_BATCH,
                max_batch_cost=FUSION_BATCH_COST, fill=fill, max_wait_ms=WINDOW_MS["fusion"]))
            try:
                for callers in CALLERS:
                    before = batch_totals(name)
                    run = await closed_loop(runtime, name, requests, callers, seconds)
                    points.append({"way": way, "precision": precision, "callers": callers,
                                   **summarise(run["latencies"], run["wall_s"], "utt_per_s"),
                                   "mean_batch": mean_batch(name, before)})
                    print_point(points[-1])
            finally:
                await runtime.close()

    asyncio.run(runtime_ways())
    return {"points": points, "max_batch": FUSION_BATCH, "max_batch_cost_samples": FUSION_BATCH_COST}


# -------------------------------------------------------------------------------------------- sensor
def bench_sensor(device: torch.device, quick: bool) -> dict[str, Any]:
    """Windows one at a time (K threads) vs the runtime's batches, fp32."""
    from model_runtime.device import Placement

    seconds = 1.0 if quick else POINT_SECONDS["sensor"]
    windows = sensor.make_windows(512)
    naive = TorchBackend(sensor.build_model(), Placement(device))
    points: list[dict[str, Any]] = []
    for callers in CALLERS:
        run = one_by_one(lambda window: sensor.answers_of(naive(torch.from_numpy(window)[None])), windows, callers,
                         seconds)
        points.append({"way": "unbatched", "callers": callers,
                       **summarise(run["latencies"], run["wall_s"], "windows_per_s")})
        print_point(points[-1])

    async def batched(way: str, fill: FillPolicy) -> None:
        runtime = ModelRuntime()
        name = f"sensor-gpu-{fill}"
        spec = sensor.sensor_spec(name, lambda context: TorchBackend(sensor.build_model(), context.placement),
                                  sensor.BatchCounter())
        await runtime.load(dataclasses.replace(spec, device=str(device), fill=fill, max_wait_ms=WINDOW_MS["sensor"]))
        try:
            for callers in CALLERS:
                before = batch_totals(name)
                run = await closed_loop(runtime, name, windows, callers, seconds)
                points.append({"way": way, "callers": callers,
                               **summarise(run["latencies"], run["wall_s"], "windows_per_s"),
                               "mean_batch": mean_batch(name, before)})
                print_point(points[-1])
        finally:
            await runtime.close()

    asyncio.run(batched("runtime", "greedy"))
    asyncio.run(batched("runtime+window", "window"))
    return {"points": points}


# ------------------------------------------------------------------------------------- out of memory
def bench_out_of_memory(device: torch.device, quick: bool) -> dict[str, Any]:
    """U-Net batches of up to 64 patches under a memory cap that about 12 patches fit in.

    Ways: uncapped (the reference outputs), capped without a budget (each oversize batch runs out
    of memory and is split in halves, as often as needed), capped with a budget sized from the
    measured bytes per patch (batches cut to fit before they run).
    """
    if device.type != "cuda":
        return {"skipped": "needs a CUDA device"}
    shape = volume.QUICK_SHAPE if quick else volume.FULL_SHAPE
    studies = volume.study_volumes(2 if quick else 4, shape, seed=5)
    batch = 64
    per_patch = measure_bytes_per_patch(device)
    record: dict[str, Any] = {"bytes_per_patch": per_patch, "max_batch": batch}

    async def way(name: str, budget: MemoryBudget | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
        runtime = ModelRuntime()
        await runtime.load(unet_spec(name, "fp32", device, batch, budget))
        try:
            splits_before, oom_before = oom_splits(name), out_of_memory_count(name)
            timing, outputs = await runtime_studies(runtime, name, studies, len(studies), batch)
            return {**timing, "oom_splits": oom_splits(name) - splits_before,
                    "out_of_memory": out_of_memory_count(name) - oom_before}, outputs
        finally:
            await runtime.close()

    uncapped, expected = asyncio.run(way("unet-uncapped", None))
    record["uncapped"] = uncapped
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    cap_bytes = torch.cuda.memory_allocated(device) + 12 * per_patch + study_state_bytes(shape, len(studies), batch)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
    try:
        for name, budget in (("unet-capped", None),
                             ("unet-budget", MemoryBudget(budget_bytes=10 * per_patch, bytes_per_item=per_patch))):
            torch.cuda.empty_cache()
            timing, outputs = asyncio.run(way(name, budget))
            timing["max_abs_difference_vs_uncapped"] = max(float((a - b).abs().max())
                                                           for a, b in zip(outputs, expected, strict=True))
            record[name.removeprefix("unet-")] = timing
            print(f"  {name:<14} {timing['volumes_per_s']:.2f} vol/s, splits {timing['oom_splits']:.0f} "
                  f"(out of memory {timing['out_of_memory']:.0f}), "
                  f"max |diff| {timing['max_abs_difference_vs_uncapped']:.2e}", flush=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    record["cap_mb"] = cap_bytes / 2**20
    return record


def study_state_bytes(shape: tuple[int, int, int], studies: int, batch: int) -> int:
    """GPU memory outside the batches' own: each study's volume and weighted sums, two batches of patch
    outputs waiting to be stitched, the grid's weight sum, and 256 MB of allocator slack (fp32)."""
    voxels = shape[0] * shape[1] * shape[2]
    per_study = voxels * 4 * (1 + 2)  # input volume (1 channel) + sums (2 channels)
    waiting_outputs = 2 * batch * 2 * volume.ROI[0] * volume.ROI[1] * volume.ROI[2] * 4
    return studies * per_study + waiting_outputs + voxels * 4 + 256 * 2**20


def measure_bytes_per_patch(device: torch.device) -> int:
    """Peak bytes of one fp32 U-Net patch (from batches of 4 and 8: the difference over 4)."""
    model = volume.unet().to(device)
    peaks = []
    for size in (4, 8):
        batch = torch.randn(size, 1, *volume.ROI, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model(batch)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    del model
    torch.cuda.empty_cache()
    return int((peaks[1] - peaks[0]) / 4)


# ---------------------------------------------------------------------------------------------- main
def print_point(point: dict[str, Any]) -> None:
    rate = next(key for key in point if key.endswith("_per_s"))
    extras = " ".join(f"{key} {point[key]}" for key in ("studies", "callers", "precision", "mean_batch")
                      if point.get(key) is not None)
    memory = f" peak {point['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in point else ""
    print(f"  {point['way']:<12} {extras:<28} {point[rate]:9.2f} {rate.removesuffix('_per_s')}/s "
          f"p50 {point['p50_ms']:8.2f} ms p99 {point['p99_ms']:8.2f} ms{memory}", flush=True)


def gpu_metrics() -> list[str]:
    """The ``tessera_gpu_*`` lines of the runtime's Prometheus exposition."""
    from prometheus_client import REGISTRY, generate_latest

    return [line for line in generate_latest(REGISTRY).decode().splitlines() if line.startswith("tessera_gpu")]


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(name=properties.name, memory_gb=round(properties.total_memory / 2**30, 1),
                    capability=f"{properties.major}.{properties.minor}", cuda=torch.version.cuda)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 s points")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default="costs,volume,fusion,sensor,oom")
    parser.add_argument("--seconds", type=float, help="closed-loop seconds a fusion / sensor point")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime_gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.seconds:
        POINT_SECONDS.update(fusion=args.seconds, sensor=args.seconds)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the memory calls need an index
    torch.backends.cudnn.benchmark = False  # MONAI's default; shapes vary between ways
    record: dict[str, Any] = {"machine": machine(device)}
    print(json.dumps(record["machine"]), flush=True)
    sections = {"costs": bench_costs, "volume": bench_volume, "fusion": bench_fusion, "sensor": bench_sensor,
                "oom": bench_out_of_memory}
    for section in args.sections.split(","):
        print(f"== {section}", flush=True)
        started = time.perf_counter()
        record[section] = sections[section](device, args.quick)
        record[section]["seconds"] = round(time.perf_counter() - started, 1)
        write(args.out, record)  # after each section: a run cut short keeps what it measured
    record["gpu_metrics"] = gpu_metrics()
    print("\n".join(record["gpu_metrics"]))
    write(args.out, record)
    print(f"wrote {args.out}")


def write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
