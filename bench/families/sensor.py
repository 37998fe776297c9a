"""Sensor-window attention family: windows/s batched by the model runtime vs one window per call.

Model: the attention model the IIoT vertical will serve over sensor windows of 50 time steps x 24
sensors: input projection to d_model 64, learned positions, 2 transformer encoder layers (4 heads,
ff 128, batch_first), attention pooling over time, two heads: P(failure within 72 h) (a logit,
answered as a probability) and remaining useful life (hours, softplus). Random weights, seed 0.

Ways to score the windows, each at K concurrent asyncio callers sending one window per call, all
with the same torch intra-op thread count (``settings.torch_threads``, 1 by default):

- ``unbatched``: the naive way, ``asyncio.to_thread(model, window[None])`` per call;
- ``runtime``: ``get_runtime().load(ModelSpec(...))``, greedy dynamic batching, ``runtime.predict``;
- ``runtime+<backend>``: the same, the loader serving what ``choose_cpu_backend`` measured fastest;
- ``bulk``: ``runtime.predict_many_sync`` over every window at once (a scheduled job's path).

Usage::

    python bench/families/sensor.py            # 4,096 windows
    python bench/families/sensor.py --quick    # 1,024 windows, under a minute

Writes ``bench/results/sensor.json``. :func:`bench_sensor` and :func:`print_sensor` are the entry
points ``bench/runtime.py`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model_runtime import BackendChoice, LoadContext, ModelRuntime, ModelSpec, choose_cpu_backend, get_runtime  # noqa: E402
from model_runtime.device import configure_threads  # noqa: E402
from model_runtime.prepare import PrepareIn  # noqa: E402
from shared.config import get_settings  # noqa: E402

STEPS, SENSORS = 50, 24
D_MODEL, HEADS, FEED_FORWARD, LAYERS = 64, 4, 128, 2
CALLERS = (1, 4, 16)
MAX_BATCH = 64
PREPARE_IN: PrepareIn = "loop"  # a 2 us check: a thread hop per call costs more (halved K=4 batches)
INLINE_BELOW_MS = 1.0
"""Batches predicted under this run on the loop (``ModelSpec.inline_below_ms``): hand-offs took 0.2 of 1 ms at K=4."""
WINDOWS_FULL, WINDOWS_QUICK = 4096, 1024
ROUNDS_FULL, ROUNDS_QUICK = 5, 3
MODEL_NAME = "sensor-window"
Answer = dict[str, float]


class SensorWindowAttention(torch.nn.Module):
    """(N, 50, 24) float32 -> ``{"failure_logit": (N,), "rul_hours": (N,)}``."""

    def __init__(self) -> None:
        super().__init__()
        self.project = torch.nn.Linear(SENSORS, D_MODEL)
        self.position = torch.nn.Parameter(0.02 * torch.randn(1, STEPS, D_MODEL))
        layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.pool_score = torch.nn.Linear(D_MODEL, 1)
        self.failure_head = torch.nn.Linear(D_MODEL, 1)
        self.rul_head = torch.nn.Linear(D_MODEL, 1)

    def forward(self, window: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.encoder(self.project(window) + self.position)
        weights = torch.softmax(self.pool_score(hidden), dim=1)  # attention pooling over time
        pooled = (weights * hidden).sum(dim=1)
        return {"failure_logit": self.failure_head(pooled).squeeze(-1),
                "rul_hours": torch.nn.functional.softplus(self.rul_head(pooled)).squeeze(-1)}


def build_model(seed: int = 0) -> SensorWindowAttention:
    """The model with fixed random weights, in eval mode."""
    torch.manual_seed(seed)
    return SensorWindowAttention().eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(parameter.numel() for parameter in model.parameters())


def make_windows(count: int, seed: int = 1) -> list[np.ndarray]:
    """``count`` random float32 windows of shape (50, 24), as a feature pipeline hands them over."""
    rng = np.random.default_rng(seed)
    return list(rng.standard_normal((count, STEPS, SENSORS), dtype=np.float32))


def prepare_window(window: Any) -> torch.Tensor:
    """Validate one window (ndarray, float32, 50x24, finite) and view it as a tensor.

    Raises
    ------
    ValueError
        Anything else (the runtime answers the caller with ``BadInput``).
    """
    if not isinstance(window, np.ndarray) or window.dtype != np.float32:
        raise ValueError(f"a window is a float32 ndarray, got {type(window).__name__} "
                         f"{getattr(window, 'dtype', '')}")
    if window.shape != (STEPS, SENSORS):
        raise ValueError(f"a window is {STEPS}x{SENSORS}, got {window.shape}")
    if not np.isfinite(window).all():
        raise ValueError("a window holds NaN or infinite values")
    return torch.from_numpy(window)


def answers_of(outputs: dict[str, torch.Tensor]) -> list[Answer]:
    """Batched model outputs -> one ``{"p_failure", "rul_hours"}`` per window."""
    probabilities = torch.sigmoid(outputs["failure_logit"]).tolist()
    hours = outputs["rul_hours"].tolist()
    return [{"p_failure": p, "rul_hours": h} for p, h in zip(probabilities, hours, strict=True)]


def score_one(model: Callable[[torch.Tensor], Any], window: np.ndarray) -> Answer:
    """The naive way: the model on one window, in the calling thread, under ``inference_mode``."""
    configure_threads()  # OpenMP thread counts are per thread: the same count as the runtime's worker
    with torch.inference_mode():
        return answers_of(model(torch.from_numpy(window)[None]))[0]


@dataclass
class BatchCounter:
    """Counts the batches and items that pass through ``run_batch`` (mean batch size)."""

    batches: int = 0
    items: int = 0

    def reset(self) -> None:
        """Forget the warm-up."""
        self.batches = self.items = 0

    @property
    def mean(self) -> float | None:
        """Mean batch size since the last reset."""
        return self.items / self.batches if self.batches else None


@dataclass
class Served:
    """One model loaded in the runtime, with what its loader measured."""

    name: str
    counter: BatchCounter
    backend: str = "eager"
    choice: BackendChoice | None = field(default=None, repr=False)


def sensor_spec(name: str, loader: Callable[[LoadContext], Any], counter: BatchCounter, *,
                uses_torch: bool = True, max_batch_size: int = MAX_BATCH,
                prepare_in: PrepareIn = PREPARE_IN) -> ModelSpec:
    """The serving spec: greedy batches of up to ``max_batch_size`` windows, ``prepare_window`` first."""

    def run_batch(model: Any, windows: list[torch.Tensor]) -> list[Answer]:
        counter.batches += 1
        counter.items += len(windows)
        return answers_of(model(torch.stack(windows)))

    return ModelSpec(name=name, version="bench", loader=loader, run_batch=run_batch, prepare=prepare_window,
                     max_batch_size=max_batch_size, max_queue=1024, fill="greedy", prepare_in=prepare_in,
                     inline_below_ms=INLINE_BELOW_MS, uses_torch=uses_torch,
                     warmup_items=make_windows(max_batch_size, seed=7))


async def load_eager(runtime: ModelRuntime, model: torch.nn.Module, name: str = MODEL_NAME) -> Served:
    """Serve the torch module itself."""
    served = Served(name, BatchCounter())
    await runtime.load(sensor_spec(name, lambda _context: model, served.counter))
    served.counter.reset()
    return served


async def load_chosen(runtime: ModelRuntime, model: torch.nn.Module, *, repeats: int,
                      name: str = f"{MODEL_NAME}-chosen", candidates: Sequence[str] | None = None) -> Served:
    """Serve what ``choose_cpu_backend`` measures fastest (eager, ONNX Runtime, int8...) at load time."""
    served = Served(name, BatchCounter())
    example = torch.from_numpy(np.stack(make_windows(MAX_BATCH, seed=3)))
    options: dict[str, Any] = {} if candidates is None else {"candidates": tuple(candidates)}

    def loader(_context: LoadContext) -> Any:
        served.choice = choose_cpu_backend(model, example, max_abs_error=1e-3, batch_sizes=(1, 8, MAX_BATCH),
                                           repeats=repeats, **options)
        return served.choice.backend

    # the eager candidate is a TorchBackend that enters inference_mode itself
    await runtime.load(sensor_spec(name, loader, served.counter, uses_torch=False))
    assert served.choice is not None
    served.backend = served.choice.name
    served.counter.reset()
    return served


# ------------------------------------------------------------------------------------------ load
async def run_callers(windows: Sequence[np.ndarray], callers: int,
                      call: Callable[[np.ndarray], Awaitable[Answer]]) -> tuple[list[Answer], list[float], float]:
    """``callers`` concurrent loops, each awaiting ``call`` on every ``callers``-th window.

    Returns
    -------
    answers, latencies_s, wall_s
        Answers in window order, each call's latency (s), wall time of the whole run (s).
    """
    answers: list[Answer | None] = [None] * len(windows)
    latencies: list[float] = []

    async def caller(first: int) -> None:
        for index in range(first, len(windows), callers):
            started = time.perf_counter()
            answers[index] = await call(windows[index])
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(first) for first in range(callers)))
    wall = time.perf_counter() - started
    missing = sum(answer is None for answer in answers)
    if missing:
        raise RuntimeError(f"{missing} of {len(windows)} windows got no answer")
    return [answer for answer in answers if answer is not None], latencies, wall


async def score_unbatched(model: torch.nn.Module, windows: Sequence[np.ndarray],
                          callers: int) -> tuple[list[Answer], list[float], float]:
    """The naive way at ``callers`` concurrent callers (see :func:`run_callers`)."""
    return await run_callers(windows, callers, lambda window: asyncio.to_thread(score_one, model, window))


async def score_runtime(runtime: ModelRuntime, name: str, windows: Sequence[np.ndarray],
                        callers: int) -> tuple[list[Answer], list[float], float]:
    """``runtime.predict`` at ``callers`` concurrent callers (see :func:`run_callers`)."""
    return await run_callers(windows, callers, lambda window: runtime.predict(name, window))


def predict_many(runtime: ModelRuntime, name: str, windows: Sequence[np.ndarray]) -> list[Answer]:
    """``runtime.predict_many_sync`` with the worker's thread count set in the calling thread."""
    configure_threads()
    return runtime.predict_many_sync(name, windows)


# ------------------------------------------------------------------------------------------ memory
def reset_peak_rss() -> None:
    """Reset the kernel's peak RSS (VmHWM) of this process, where Linux allows it."""
    with contextlib.suppress(OSError):  # not Linux, or not allowed: peak_rss_mb reports the lifetime peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak RSS (MB) since :func:`reset_peak_rss`: VmHWM, or ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile_ms(latencies: Sequence[float], quantile: float) -> float:
    """The ``quantile`` of ``latencies`` (s), in ms (nearest rank)."""
    ordered = sorted(latencies)
    return 1000.0 * ordered[min(len(ordered) - 1, round(quantile * (len(ordered) - 1)))]


def point(way: str, backend: str, callers: int, windows: int, latencies: Sequence[float], wall: float,
          mean_batch: float | None) -> dict[str, Any]:
    """One row of the table."""
    return {"way": way, "backend": backend, "callers": callers, "windows": windows,
            "windows_per_s": windows / wall, "p50_ms": percentile_ms(latencies, 0.5),
            "p99_ms": percentile_ms(latencies, 0.99), "mean_batch": mean_batch, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------ bench
async def measure(way: str, backend: str, callers: int, windows: Sequence[np.ndarray],
                  score: Callable[[], Awaitable[tuple[list[Answer], list[float], float]]],
                  counter: BatchCounter | None = None) -> dict[str, Any]:
    """Run ``score`` once (peak RSS reset before, batch counter reset) and make its row."""
    if counter is not None:
        counter.reset()
    reset_peak_rss()
    _answers, latencies, wall = await score()
    mean_batch = counter.mean if counter is not None else 1.0
    return point(way, backend, callers, len(windows), latencies, wall, mean_batch)


async def measure_bulk(runtime: ModelRuntime, served: Served, windows: Sequence[np.ndarray]) -> dict[str, Any]:
    """``predict_many_sync`` over every window (batches of ``max_batch_size``), off the loop."""
    served.counter.reset()
    reset_peak_rss()
    started = time.perf_counter()
    await asyncio.to_thread(predict_many, runtime, served.name, windows)
    wall = time.perf_counter() - started
    row = point(f"bulk {served.backend}", served.backend, 1, len(windows), [wall], wall, served.counter.mean)
    row["p50_ms"] = row["p99_ms"] = None  # one call: its latency is the wall time
    return row


async def measure_round(runtime: ModelRuntime, model: torch.nn.Module, eager: Served, chosen: Served,
                        windows: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """One run of every way at every K (interleaved, so background load drifts hit all alike), then bulk."""
    rows: list[dict[str, Any]] = []
    for callers in CALLERS:
        rows.append(await measure("unbatched", "eager", callers, windows,
                                  partial(score_unbatched, model, windows, callers)))
        for served, way in ((eager, "runtime"), (chosen, f"runtime+{chosen.backend}")):
            rows.append(await measure(way, served.backend, callers, windows,
                                      partial(score_runtime, runtime, served.name, windows, callers),
                                      served.counter))
    for served in (eager, chosen):
        rows.append(await measure_bulk(runtime, served, windows))
    return rows


def median_rows(rounds: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per row position, the run with the median windows/s (its own latencies and RSS), with ``runs``."""
    medians = []
    for runs in zip(*rounds, strict=True):
        ordered = sorted(runs, key=lambda row: row["windows_per_s"])
        medians.append({**ordered[(len(ordered) - 1) // 2], "runs": len(ordered),
                        "windows_per_s_range": [ordered[0]["windows_per_s"], ordered[-1]["windows_per_s"]]})
    return medians


async def measure_all(model: torch.nn.Module, windows: Sequence[np.ndarray], *, rounds: int,
                      backend_repeats: int) -> tuple[list[dict[str, Any]], BackendChoice]:
    """``rounds`` rounds of every way at every K plus bulk, the median run kept; unloads what it loaded."""
    runtime = get_runtime()
    eager = await load_eager(runtime, model)
    chosen = await load_chosen(runtime, model, repeats=backend_repeats)
    assert chosen.choice is not None
    measured = []
    try:
        for index in range(rounds):
            measured.append(await measure_round(runtime, model, eager, chosen, windows))
            print(f"  sensor-window: round {index + 1}/{rounds} measured", flush=True)
    finally:
        for served in (eager, chosen):
            await runtime.unload(served.name)
    return median_rows(measured), chosen.choice


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """windows/s of each runtime way over the unbatched way, per K."""
    by = {(row["way"], row["callers"]): row["windows_per_s"] for row in rows}
    ways = sorted({row["way"] for row in rows if row["way"].startswith("runtime")})
    return {f"{way}/unbatched": {k: by[(way, k)] / by[("unbatched", k)] for k in CALLERS
                                 if (way, k) in by and ("unbatched", k) in by} for way in ways}


def bench_sensor(quick: bool) -> dict[str, Any]:
    """Run the sensor-window family benchmark (progress lines only) and return the JSON record.

    Runs its own event loop (``asyncio.run``): call it outside one. Print the table with
    :func:`print_sensor`.

    Parameters
    ----------
    quick : bool
        1,024 windows and fewer backend timing repeats (under a minute) instead of 4,096.

    Returns
    -------
    dict
        ``{"family", "model", "points", "ratios", "backends", "config"}``.
    """
    threads = get_settings().torch_threads
    torch.set_num_threads(threads)
    model = build_model()
    windows = make_windows(WINDOWS_QUICK if quick else WINDOWS_FULL)
    rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
    load_before = os.getloadavg()[0]  # the box may be shared: say how busy it was
    rows, choice = asyncio.run(measure_all(model, windows, rounds=rounds, backend_repeats=10 if quick else 30))
    load_after = os.getloadavg()[0]
    record = {"family": "sensor-window",
              "model": {"parameters": parameter_count(model), "input": [STEPS, SENSORS], "d_model": D_MODEL,
                        "layers": LAYERS, "heads": HEADS, "feed_forward": FEED_FORWARD},
              "points": rows, "ratios": ratios(rows), "backends": choice.as_dict(),
              "config": {"quick": quick, "windows": len(windows), "callers": list(CALLERS),
                         "rounds": rounds, "max_batch_size": MAX_BATCH, "fill": "greedy",
                         "prepare_in": PREPARE_IN, "inline_below_ms": INLINE_BELOW_MS, "torch_threads": threads,
                         "load_average_1min": [round(load_before, 2), round(load_after, 2)],
                         "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}
    return record


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_sensor(record: dict[str, Any]) -> None:
    """Print the family's table: one row per way and K, then the bulk rows and the ratios."""
    model, config, backends = record["model"], record["config"], record["backends"]
    print(f"\nSensor-window attention ({model['input'][0]}x{model['input'][1]}, {model['parameters']:,} parameters), "
          f"{config['windows']} windows, {config['torch_threads']} torch thread(s)\n"
          f"{config['cpus']} CPUs (1-min load {config['load_average_1min'][0]:.1f} before, "
          f"{config['load_average_1min'][1]:.1f} after); chosen backend: {backends['chosen']}; "
          f"median of {config['rounds']} interleaved rounds")
    print(f"{'way':<20} {'K':>3} {'windows/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} {'peak RSS MB':>11}")
    for row in record["points"]:
        print(f"{row['way']:<20} {row['callers']:>3} {row['windows_per_s']:>10.0f} {_fmt(row['p50_ms'], '.2f'):>8} "
              f"{_fmt(row['p99_ms'], '.2f'):>8} {_fmt(row['mean_batch'], '.1f'):>10} {row['peak_rss_mb']:>11.0f}")
    for name, by_callers in record["ratios"].items():
        print(f"  {name:<28} " + "  ".join(f"K={k}: {ratio:.2f}x" for k, ratio in by_callers.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{WINDOWS_QUICK} windows (under a minute)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sensor.json")
    args = parser.parse_args()
    record = bench_sensor(args.quick)
    print_sensor(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
