"""3D U-Net over CT-sized volumes: the runtime's sliding-window inferer against MONAI's, per study.

Model: MONAI ``UNet`` (3D, 1 -> 2 channels, channels 16-32-64-128-256, strides 2, two residual
units: 4.8 M parameters), random weights (seed 0): timing only. Volumes: 1 x 256 x 256 x 64 float32
(a CT series' size after resampling), patches 64^3, overlap 0.25, Gaussian blending: 25 patches a
study.

Ways, each in its own subprocess (so its peak RSS is its own), ``K`` studies in flight at once
(K = 1, 2, 4; each caller a closed loop over its studies):

- ``monai sw=1``: MONAI's ``sliding_window_inference`` called per study (its default
  ``sw_batch_size=1``), each study in its own thread — how a service calling MONAI per request runs;
- ``monai sw=B``: the same with the best ``sw_batch_size`` for this box, measured first on one
  study over 1, 2, 4, 8;
- ``runtime``: :class:`model_runtime.sliding_window.SlidingWindowInferer` over a runtime model whose
  backend ``choose_cpu_backend`` picks by measurement (eager / ONNX Runtime / int8, and OpenVINO in
  f32 when the ``openvino`` extra is installed; ``torch.compile`` is not a candidate here), with
  the patch batch the chosen backend runs fastest per patch (of 1 / 4 / 8, measured in the same
  warm-up), patches of every study in flight sharing batches;
- ``runtime bf16``: the eager model with ``precision="bf16"`` (CPU autocast), when this CPU has
  AVX512-BF16 (reported with its largest difference from fp32).

Every way runs with the same torch/ONNX Runtime/OpenVINO thread count (all cores). The stitched
output of the runtime, through the backend it serves, is checked against
``sliding_window_inference`` (eager fp32) on the same weights.

Usage::

    python bench/families/volume.py            # ~6 min
    python bench/families/volume.py --quick    # ~1.5 min (128 x 128 x 64 volumes, K = 1, 2)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._measure import peak_rss_mb, threaded_callers  # noqa: E402

ROI = (64, 64, 64)
OVERLAP = 0.25
BLEND: Literal["gaussian"] = "gaussian"
FULL_SHAPE = (256, 256, 64)
QUICK_SHAPE = (128, 128, 64)
SW_BATCH_CANDIDATES = (1, 2, 4, 8)
RUNTIME_MAX_BATCH = 4
"""Patch batch of the bf16 way (eager under autocast); the fp32 way takes its measured best."""
RUNTIME_BATCH_CANDIDATES = (1, 4, 8)
BACKEND_OPTIONS = {"onnx": {"spinning": False}, "onnx-int8": {"spinning": False}}
"""ONNX Runtime's idle threads sleep: measured on this box (load ~9, K=4, 4 studies, alternated),
0.156 -> 0.173 and 0.168 volumes/s with spinning off, the stitching thread getting the cores back."""
MODEL_NAME = "bench-unet3d"


def unet() -> torch.nn.Module:
    """The benchmark's 3D U-Net (MONAI ``UNet``, 4.8 M parameters), seed 0, eval mode."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2).eval()


def study_volumes(count: int, shape: tuple[int, int, int], seed: int = 7) -> list[torch.Tensor]:
    """``count`` channel-first volumes ``(1, *shape)``: smooth random fields, about CT-normalised."""
    generator = torch.Generator().manual_seed(seed)
    volumes = []
    for _ in range(count):
        coarse = torch.randn(1, 1, *(max(2, size // 8) for size in shape), generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)
        volumes.append((smooth + 0.1 * torch.randn(1, 1, *shape, generator=generator))[0])
    return volumes


def summarise(latencies_s: list[float], wall_s: float) -> dict[str, Any]:
    """Volumes/s and per-volume p50/p99 (s); with few volumes p99 is close to the maximum."""
    ordered = sorted(latencies_s)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"volumes": len(ordered), "wall_s": wall_s, "volumes_per_s": len(ordered) / wall_s,
            "p50_s": pick(0.5), "p99_s": pick(0.99), "mean_s": statistics.fmean(ordered),
            "peak_rss_mb": peak_rss_mb(), "load_average_1min": os.getloadavg()[0]}


# -- MONAI, per study ------------------------------------------------------------------------------
def monai_infer(model: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor,
                sw_batch_size: int) -> torch.Tensor:
    """One study through MONAI's ``sliding_window_inference`` (batch axis added and removed)."""
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        output = sliding_window_inference(volume[None], ROI, sw_batch_size, model, overlap=OVERLAP, mode=BLEND)
    assert isinstance(output, torch.Tensor)
    return output[0]


def run_monai(sw_batch_size: int, concurrency: int, per_caller: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """``concurrency`` threads, each inferring ``per_caller`` studies one after the other."""
    model = unet()
    volumes = study_volumes(concurrency * per_caller, shape)
    monai_infer(model, volumes[0], sw_batch_size)  # warm-up: allocator, oneDNN kernels
    latencies, wall_s = threaded_callers(lambda volume: monai_infer(model, volume, sw_batch_size), volumes,
                                         concurrency)
    return summarise(latencies, wall_s)


def best_sw_batch_size(shape: tuple[int, int, int]) -> dict[str, Any]:
    """Time one study at each candidate ``sw_batch_size`` and return the fastest with the timings."""
    model = unet()
    volume = study_volumes(1, shape)[0]
    monai_infer(model, volume, 1)
    seconds: dict[int, float] = {}
    for size in SW_BATCH_CANDIDATES:
        started = time.perf_counter()
        monai_infer(model, volume, size)
        seconds[size] = time.perf_counter() - started
    return {"best": min(seconds, key=seconds.__getitem__), "seconds_per_study": seconds}


# -- the runtime -----------------------------------------------------------------------------------
def served_patch_model(precision: str, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """The U-Net as the runtime serves it, and how: ``(model, {"backend", "precision", "batch", ...})``.

    fp32 takes the backend ``choose_cpu_backend`` measures fastest (eager / ONNX Runtime / int8 /
    OpenVINO f32 where installed) and that backend's fastest patch batch per patch; bf16 serves the
    eager module under CPU autocast at :data:`RUNTIME_MAX_BATCH` (ONNX Runtime runs a graph in its
    own precision).
    """
    from model_runtime import choose_cpu_backend
    from model_runtime.backends import CPU_CANDIDATES, openvino_available

    module = unet()
    if precision != "fp32":
        return module, {"precision": precision, "backend": "eager", "batch": RUNTIME_MAX_BATCH}
    example = torch.randn(max(RUNTIME_BATCH_CANDIDATES), 1, *ROI, generator=torch.Generator().manual_seed(3))
    candidates = CPU_CANDIDATES + (("openvino",) if openvino_available() else ())
    if "openvino" not in candidates:
        print("  openvino is not installed (make bench, or pip install -e '.[bench]'): fp32 is chosen among "
              f"{', '.join(candidates)} only", flush=True)
    # Timed at batch 1 and full batches. Timed at full batches only, eager wins the micro-benchmark
    # (23 against 28 ms a patch) but served 10 % fewer volumes/s than ONNX Runtime (measured 2026-12-01).
    choice = choose_cpu_backend(module, example, candidates=candidates, max_abs_error=1e-3,
                                batch_sizes=RUNTIME_BATCH_CANDIDATES, repeats=3, workdir=workdir,
                                backend_options=BACKEND_OPTIONS)
    chosen = next(m for m in choice.measurements if m.name == choice.name)
    batch = min(chosen.per_item_ms, key=chosen.per_item_ms.__getitem__) if chosen.per_item_ms else RUNTIME_MAX_BATCH
    return choice.backend, {"precision": precision, "backend": choice.name, "batch": batch,
                            "backend_ms_per_patch": {m.name: m.per_item_ms for m in choice.measurements}}


async def infer_studies(model: Any, precision: str, volumes: list[torch.Tensor], concurrency: int,
                        batch: int = RUNTIME_MAX_BATCH) -> dict[str, Any]:
    """Load ``model`` as a patch model, warm up, then ``concurrency`` callers infer ``volumes`` between them."""
    from model_runtime import ModelRuntime, ModelSpec
    from model_runtime.sliding_window import SlidingWindowConfig, SlidingWindowInferer, run_patch_batch

    runtime = ModelRuntime()
    await runtime.load(ModelSpec(name=MODEL_NAME, version="bench", loader=lambda _ctx: model,
                                 run_batch=run_patch_batch, max_batch_size=batch, max_wait_ms=1.0,
                                 max_queue=512, precision=precision,
                                 uses_torch=isinstance(model, torch.nn.Module)))  # backends place themselves
    try:
        config = SlidingWindowConfig(roi_size=ROI, overlap=OVERLAP, mode=BLEND)
        inferer = SlidingWindowInferer(runtime, MODEL_NAME, config, patches_per_study=2 * batch)
        await inferer.infer(volumes[0])  # warm-up
        latencies: list[float] = []

        async def caller(mine: list[torch.Tensor]) -> None:
            for volume in mine:
                started = time.perf_counter()
                await inferer.infer(volume)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller(volumes[i::concurrency]) for i in range(concurrency)))
        result = summarise(latencies, time.perf_counter() - started)
        result["runtime_stats"] = runtime.stats().get(MODEL_NAME, {})
        return result
    finally:
        await runtime.close()


def run_runtime(precision: str, concurrency: int, per_caller: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """``concurrency`` asyncio callers, each inferring ``per_caller`` studies through the runtime."""
    volumes = study_volumes(concurrency * per_caller, shape)
    with tempfile.TemporaryDirectory(prefix="tessera-bench-unet-") as workdir:
        model, served = served_patch_model(precision, Path(workdir))
        result = asyncio.run(infer_studies(model, precision, volumes, concurrency, served["batch"]))
    result.update(served)
    return result


def check_equal_to_monai(shape: tuple[int, int, int], precision: str = "fp32") -> dict[str, Any]:
    """The runtime's stitched output, through the backend it serves (chosen as the timed point chooses
    it), against MONAI's eager fp32 one on the same weights and volume: the largest absolute
    difference and the share of voxels whose argmax class agrees."""
    from model_runtime import ModelRuntime, ModelSpec
    from model_runtime.sliding_window import SlidingWindowConfig, SlidingWindowInferer, run_patch_batch

    module = unet()
    volume = study_volumes(1, shape, seed=11)[0]
    expected = monai_infer(module, volume, RUNTIME_MAX_BATCH)
    workdir = tempfile.TemporaryDirectory(prefix="tessera-bench-unet-")
    served_model, served = served_patch_model(precision, Path(workdir.name))

    async def ours() -> torch.Tensor:
        runtime = ModelRuntime()
        await runtime.load(ModelSpec(name=MODEL_NAME, version="check", loader=lambda _ctx: served_model,
                                     run_batch=run_patch_batch, max_batch_size=served["batch"], max_queue=512,
                                     precision=precision, uses_torch=isinstance(served_model, torch.nn.Module)))
        try:
            inferer = SlidingWindowInferer(runtime, MODEL_NAME, SlidingWindowConfig(roi_size=ROI, overlap=OVERLAP,
                                                                                    mode=BLEND))
            output = await inferer.infer(volume)
            assert isinstance(output, torch.Tensor)
            return output
        finally:
            await runtime.close()

    with workdir:
        output = asyncio.run(ours())
    agree = (output.argmax(0) == expected.argmax(0)).float().mean()
    return {"max_abs_difference": float((output - expected).abs().max()), "argmax_agreement": float(agree),
            "backend": served["backend"]}


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16 or AMX), so bf16 can pay."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


# -- orchestration: one subprocess per point -------------------------------------------------------
def point(way: str, concurrency: int, per_caller: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Run one (way, K) point in a fresh subprocess and return its JSON record."""
    command = [sys.executable, __file__, "point", "--way", way, "--concurrency", str(concurrency),
               "--per-caller", str(per_caller), "--shape", ",".join(map(str, shape))]
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               env={**os.environ, "TESSERA_LOG_JSON": "false", "PYTHONWARNINGS": "ignore"})
    if completed.returncode != 0:
        raise RuntimeError(f"volume point {way} K={concurrency} failed:\n{completed.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    record.update(way=way, concurrency=concurrency)
    return record


def run_point(way: str, concurrency: int, per_caller: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """The body of one point, in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    if way.startswith("monai-sw"):
        return run_monai(int(way.removeprefix("monai-sw")), concurrency, per_caller, shape)
    if way == "best-sw":
        return best_sw_batch_size(shape)
    if way in ("check", "check-bf16"):
        return check_equal_to_monai(shape, "bf16" if way == "check-bf16" else "fp32")
    return run_runtime("bf16" if way == "runtime-bf16" else "fp32", concurrency, per_caller, shape)


def bench_volume(quick: bool) -> dict[str, Any]:
    """Every point of the family (see the module docstring); returns the JSON record."""
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    levels = (1, 2) if quick else (1, 2, 4)
    os.environ.setdefault("TESSERA_TORCH_THREADS", str(os.cpu_count() or 1))  # the runtime's threads: all cores
    search = point("best-sw", 1, 1, shape)
    best = int(search["best"])
    print(f"  monai sw_batch_size search (s a study): {search['seconds_per_study']} -> {best}", flush=True)
    ways = ["monai-sw1", *([f"monai-sw{best}"] if best != 1 else []), "runtime"]
    if bf16_supported():
        ways.append("runtime-bf16")
    points = []
    for level in levels:  # the ways side by side at each K, so a shared box's load drifts less between them
        for way in ways:
            per_caller = 1 if (way == "monai-sw1" or quick) else 2
            record = point(way, level, per_caller, shape)
            points.append(record)
            print(f"  {way:<14} K={level} {record['volumes_per_s']:.3f} vol/s p50 {record['p50_s']:.2f} s "
                  f"p99 {record['p99_s']:.2f} s rss {record['peak_rss_mb']:.0f} MB "
                  f"{record.get('backend', '')} {record.get('batch', '')} load {record['load_average_1min']:.1f}",
                  flush=True)
    check = point("check", 1, 1, shape)
    check_bf16 = point("check-bf16", 1, 1, shape) if "runtime-bf16" in ways else None
    return {"shape": shape, "roi": ROI, "overlap": OVERLAP, "blend": BLEND, "best_sw_batch_size": best,
            "sw_batch_search": search["seconds_per_study"], "points": points,
            "max_abs_difference_vs_monai": check["max_abs_difference"], "checked_backend": check["backend"],
            "bf16_vs_monai_fp32": check_bf16, "load_average": os.getloadavg(),
            "threads": os.cpu_count(),
            "parameters": sum(p.numel() for p in unet().parameters())}


def print_volume(record: dict[str, Any]) -> None:
    """The family's table: volumes/s, p50/p99 per volume and peak RSS per way and K."""
    shape = "x".join(map(str, record["shape"]))
    print(f"\n3D U-Net ({record['parameters'] / 1e6:.1f} M parameters), {shape} volumes, "
          f"{'x'.join(map(str, record['roi']))} patches, overlap {record['overlap']}, {record['blend']} blending, "
          f"{record['threads']} threads; runtime ({record.get('checked_backend', 'eager')}) vs MONAI max |diff| "
          f"{record['max_abs_difference_vs_monai']:.1e}; load average at the end {record.get('load_average')}")
    if record.get("bf16_vs_monai_fp32"):
        bf16 = record["bf16_vs_monai_fp32"]
        print(f"runtime bf16 vs MONAI fp32: max |diff| {bf16['max_abs_difference']:.2e}, "
              f"argmax class agrees on {100 * bf16['argmax_agreement']:.2f} % of voxels")
    print(f"{'way':<16} {'K':>2} {'vol/s':>7} {'p50 s':>7} {'p99 s':>7} {'RSS MB':>7}  backend")
    for p in sorted(record["points"], key=lambda p: (p["way"], p["concurrency"])):
        print(f"{p['way']:<16} {p['concurrency']:>2} {p['volumes_per_s']:>7.3f} {p['p50_s']:>7.2f} "
              f"{p['p99_s']:>7.2f} {p['peak_rss_mb']:>7.0f}  {p.get('backend', 'eager')}"
              + (f" batch {p['batch']}" if "batch" in p else ""))
    by = {(p["way"], p["concurrency"]): p["volumes_per_s"] for p in record["points"]}
    best = f"monai-sw{record['best_sw_batch_size']}"
    for level in sorted({p["concurrency"] for p in record["points"]}):
        if ("runtime", level) in by and (best, level) in by:
            print(f"  K={level}: runtime / {best} = {by[('runtime', level)] / by[(best, level)]:.2f}x, "
                  f"runtime / monai-sw1 = {by[('runtime', level)] / by[('monai-sw1', level)]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("point", help="run one point in this process (prints its JSON)")
    one.add_argument("--way", required=True)
    one.add_argument("--concurrency", type=int, default=1)
    one.add_argument("--per-caller", type=int, default=1)
    one.add_argument("--shape", default=",".join(map(str, FULL_SHAPE)))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "point":
        shape = tuple(int(v) for v in args.shape.split(","))
        assert len(shape) == 3
        print(json.dumps(run_point(args.way, args.concurrency, args.per_caller, (shape[0], shape[1], shape[2]))))
        return
    record = bench_volume(args.quick)
    print_volume(record)
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
