"""Execution backends for one torch model, and a measured choice between them on CPU.

A backend is a callable ``(batch: Tensor[N, ...] float32, CPU) -> Tensor[N, ...] float32, CPU`` with a
``name``. Candidates:

- ``eager``: the torch module itself (CUDA + autocast when the placement says so);
- ``onnx``: the module exported with the TorchScript-based exporter (``dynamo=False``: the dynamo
  exporter needs ``onnxscript``, not installed) and run by ONNX Runtime;
- ``onnx-int8``: that graph with weights quantized to int8 by ONNX Runtime's dynamic quantizer
  (chosen over ``torch.ao.quantize_dynamic``, deprecated in torch 2.13 and unsafe on
  ``nn.TransformerEncoder`` unless the process-wide MHA fast path is switched off).

Only single-input, single-output modules are exported. :func:`choose_cpu_backend` exports and
measures latency and accuracy against eager; :func:`compare_backends` measures backends a vertical
built itself (e.g. from the graphs in its artifact). A vertical measures at training time and
records the choice in its artifact (:func:`record_backend_choice`: manifest ``extra`` and model
card), and its loader serves :func:`recorded_backend`.
Every ONNX Runtime session is made by :func:`onnx_session`, which first folds the export's shape
plumbing away (:func:`simplified_onnx`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from model_runtime.artifacts import MANIFEST_NAME, MODEL_CARD_NAME, ArtifactManifest
from model_runtime.device import Placement, inference_context, onnx_providers
from shared.config import get_settings

CPU_CANDIDATES: tuple[str, ...] = ("eager", "onnx", "onnx-int8")
SERVING_BACKEND_KEY = "serving_backend"
"""Manifest ``extra`` key of the measured choices: ``{component: BackendChoice.as_dict()}``."""
logger = logging.getLogger("tessera.model_runtime.backends")


class Backend(Protocol):
    """Runs a batch: ``(Tensor[N, ...]) -> Tensor[N, ...]`` on CPU, float32."""

    name: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """A torch module under ``inference_mode`` (and autocast on CUDA).

    Parameters
    ----------
    module : torch.nn.Module
        Put in eval mode and moved to ``placement.device``.
    placement : Placement, optional
        Defaults to CPU, fp32.
    """

    def __init__(self, module: torch.nn.Module, placement: Placement | None = None) -> None:
        self.placement = placement or Placement(torch.device("cpu"))
        self.module = module.eval().to(self.placement.device)
        self.name = "eager" if self.placement.device.type == "cpu" else f"eager/{self.placement.describe()}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with inference_context(self.placement):
            output = self.module(batch.to(self.placement.device, non_blocking=True))
        return output.float().cpu()


class OnnxRuntimeBackend:
    """An ONNX graph run by ONNX Runtime, on CUDA when the placement is a GPU and the provider exists.

    Parameters
    ----------
    model : Path or bytes
        ``.onnx`` file or its serialized bytes; one input, one output, dynamic axis 0.
    threads : int, optional
        Intra-op threads (default ``settings.torch_threads``).
    name : str
        Label reported by ``runtime.loaded()``.
    placement : Placement, optional
        Chooses the execution providers (:func:`~model_runtime.device.onnx_providers`); CPU by default.
        The graph runs in its own precision (the placement's autocast applies to torch only).
    """

    def __init__(self, model: Path | bytes, *, threads: int | None = None, name: str = "onnx",
                 placement: Placement | None = None) -> None:
        self.session = onnx_session(model, threads=threads, placement=placement)
        self._input = self.session.get_inputs()[0].name
        self.name = name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self._input: array})[0])


def simplified_onnx(model: Path | bytes) -> bytes:
    """The graph with constant shape computations folded away (onnxsim), checked on random inputs.

    A TorchScript export of a transformer carries hundreds of Shape/Gather/Unsqueeze/Concat nodes
    that ONNX Runtime runs one by one on every call, constant folding notwithstanding. Measured on
    the fraud card-sequence ensemble: 387 -> 123 nodes, a batch of one 150 -> 102 us, outputs equal
    to 5e-7. The graph is returned unchanged (with a warning) if onnxsim fails or its check does.
    """
    import onnx

    proto = onnx.load(str(model)) if isinstance(model, Path) else onnx.load_from_string(model)
    try:
        import onnxsim

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints progress
            warnings.simplefilter("ignore")
            simplified, checked = onnxsim.simplify(proto, check_n=3)
    except Exception as exc:  # an exotic graph: serve it as exported rather than not at all
        logger.warning("ONNX graph not simplified (%r); serving it as exported", exc)
        return proto.SerializeToString()
    if not checked:
        logger.warning("simplified ONNX graph failed its output check; serving it as exported")
        return proto.SerializeToString()
    return simplified.SerializeToString()


def onnx_session(model: Path | bytes, *, threads: int | None = None, placement: Placement | None = None) -> Any:
    """An ONNX Runtime session of :func:`simplified_onnx` ``(model)``.

    ``threads``: intra-op threads (default ``settings.torch_threads``); one inter-op thread.
    ``placement``: a CUDA placement runs on ONNX Runtime's CUDA provider when this build has it
    (:func:`~model_runtime.device.onnx_providers`), else on CPU.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or get_settings().torch_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(simplified_onnx(model), options, providers=onnx_providers(placement))


def export_onnx(module: torch.nn.Module, example_batch: torch.Tensor, path: Path, *,
                opset: int = 17) -> Path:
    """Export ``module`` to ``path`` with a dynamic batch axis.

    Parameters
    ----------
    module : torch.nn.Module
        Single-input, single-output module; exported in eval mode on CPU.
    example_batch : Tensor[N, ...]
        Example input (any N >= 1).
    path : Path
        Destination ``.onnx`` file.
    """
    module = module.eval().cpu()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The fused transformer fast path (aten::_transformer_encoder_layer_fwd) has no ONNX symbolic;
    # it is process-wide, so it is off only for the export (other threads just run unfused meanwhile).
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice, once per export
            torch.onnx.export(module, (example_batch.cpu(),), str(path), dynamo=False,
                              input_names=["input"], output_names=["output"], opset_version=opset,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def quantize_onnx_int8(source: Path, destination: Path) -> Path:
    """Write an int8-weight copy of an ONNX graph (dynamic activation quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs a "run pre-processing" hint on every call
    try:
        quantize_dynamic(str(source), str(destination), weight_type=QuantType.QInt8)
    finally:
        quiet.setLevel(level)
    return destination


def build_cpu_backend(kind: str, module: torch.nn.Module, example_batch: torch.Tensor,
                      workdir: Path) -> Backend:
    """Build one CPU backend by name (``eager``, ``onnx`` or ``onnx-int8``), exporting into ``workdir``."""
    if kind == "eager":
        return TorchBackend(module)
    onnx_path = workdir / "model.onnx"
    if not onnx_path.exists():
        export_onnx(module, example_batch, onnx_path)
    if kind == "onnx":
        return OnnxRuntimeBackend(onnx_path, name="onnx")
    if kind == "onnx-int8":
        quantized = quantize_onnx_int8(onnx_path, workdir / "model.int8.onnx")
        return OnnxRuntimeBackend(quantized, name="onnx-int8")
    raise ValueError(f"unknown CPU backend {kind!r}; expected one of {CPU_CANDIDATES}")


@dataclass
class BackendMeasurement:
    """One candidate as measured: latency per batch size and error versus eager.

    Attributes
    ----------
    latency_ms : dict[int, float]
        Median wall time of one call, by batch size (ms).
    per_item_ms : dict[int, float]
        ``latency_ms[b] / b`` (ms per item).
    max_abs_error : float
        Largest absolute output difference from eager on the example batch.
    """

    name: str
    latency_ms: dict[int, float] = field(default_factory=dict)
    per_item_ms: dict[int, float] = field(default_factory=dict)
    max_abs_error: float = 0.0
    accurate: bool = True
    error: str | None = None

    @property
    def score(self) -> float:
        """Geometric mean of latency over batch sizes (lower is better; inf when unusable)."""
        if self.error or not self.accurate or not self.latency_ms:
            return math.inf
        return math.exp(statistics.fmean(math.log(v) for v in self.latency_ms.values()))


@dataclass
class BackendChoice:
    """The fastest accurate backend and every measurement behind the choice.

    ``conditions``: how it was measured (threads, example rows, machine), recorded beside it.
    """

    backend: Backend
    measurements: list[BackendMeasurement]
    max_abs_error: float
    conditions: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Name of the chosen backend."""
        return self.backend.name

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record for a model card."""
        return {"chosen": self.name, "max_abs_error_allowed": self.max_abs_error,
                "measurements": [asdict(m) for m in self.measurements], "conditions": self.conditions}


def time_call(call: Callable[[torch.Tensor], Any], batch: torch.Tensor, *, repeats: int = 30,
              warmup: int = 3) -> float:
    """Median wall time of ``call(batch)`` in milliseconds."""
    with torch.inference_mode():
        for _ in range(warmup):
            call(batch)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call(batch)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def _tile(example_batch: torch.Tensor, size: int) -> torch.Tensor:
    return example_batch[torch.arange(size) % example_batch.shape[0]].contiguous()


def _measure(name: str, backend: Backend, example_batch: torch.Tensor, reference: torch.Tensor,
             batch_sizes: Sequence[int], max_abs_error: float, repeats: int) -> BackendMeasurement:
    with torch.inference_mode():
        error = float((backend(example_batch) - reference).abs().max())
    measurement = BackendMeasurement(name, max_abs_error=error, accurate=error <= max_abs_error)
    for size in batch_sizes:
        latency = time_call(backend, _tile(example_batch, size), repeats=repeats)
        measurement.latency_ms[size] = round(latency, 4)
        measurement.per_item_ms[size] = round(latency / size, 4)
    return measurement


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``threads`` (unchanged when None)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compare_backends(reference: Backend, candidates: Mapping[str, Backend], example_batch: torch.Tensor,
                     max_abs_error: float = 1e-3, *, batch_sizes: Sequence[int] = (1, 32), repeats: int = 30,
                     threads: int | None = None,
                     failed: Sequence[BackendMeasurement] = ()) -> BackendChoice:
    """Measure built backends against ``reference`` and choose the fastest accurate one.

    Parameters
    ----------
    reference : Backend
        Whose outputs are the truth (eager torch); chosen when no candidate is usable.
    candidates : mapping of name -> Backend
        The backends to measure (the reference may be one of them, under its own name).
    example_batch : Tensor[N, ...]
        Representative inputs; accuracy is checked on all N, latency on tiles of it.
    max_abs_error : float
        Largest allowed absolute difference from the reference's outputs (output units).
    batch_sizes : sequence of int
        Batch sizes to time; the score is the geometric mean of their latencies.
    repeats : int
        Timed calls per batch size (median kept).
    threads : int, optional
        Torch intra-op threads while measuring (match what serving uses, e.g. 1).
    failed : sequence of BackendMeasurement
        Candidates that could not be built, recorded as they are.
    """
    with torch_threads(threads), torch.inference_mode():
        reference_output = reference(example_batch)
        measurements = list(failed)
        for name, backend in candidates.items():
            try:
                measurements.append(_measure(name, backend, example_batch, reference_output, batch_sizes,
                                             max_abs_error, repeats))
            except Exception as exc:  # a candidate that cannot run is recorded, not fatal
                measurements.append(BackendMeasurement(name, accurate=False, error=repr(exc)))
    best = min(measurements, key=lambda m: m.score)
    chosen = candidates.get(best.name, reference) if math.isfinite(best.score) else reference
    conditions = {"torch_threads": threads or torch.get_num_threads(), "example_rows": int(example_batch.shape[0]),
                  "repeats": repeats, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return BackendChoice(backend=chosen, measurements=measurements, max_abs_error=max_abs_error,
                         conditions=conditions)


def choose_cpu_backend(model: torch.nn.Module, example_batch: torch.Tensor,
                       candidates: Sequence[str] = CPU_CANDIDATES, max_abs_error: float = 1e-3, *,
                       batch_sizes: Sequence[int] = (1, 32), repeats: int = 30,
                       workdir: Path | None = None) -> BackendChoice:
    """Export, measure each CPU backend and return the fastest one whose outputs stay close to eager.

    Parameters
    ----------
    model : torch.nn.Module
        Single-input, single-output module (float32).
    example_batch : Tensor[N, ...]
        Representative inputs; accuracy is checked on all N, latency on tiles of it.
    candidates : sequence of str
        Backend names from :data:`CPU_CANDIDATES`.
    max_abs_error, batch_sizes, repeats
        As in :func:`compare_backends`.
    workdir : Path, optional
        Where exported graphs are written (a temporary directory by default; keep it if the
        chosen backend is ONNX, since ONNX Runtime has already loaded the graph into memory).

    Returns
    -------
    BackendChoice
        The chosen backend (eager when nothing beats it accurately) and all measurements.
    """
    eager = TorchBackend(model)
    built: dict[str, Backend] = {}
    failed: list[BackendMeasurement] = []
    with tempfile.TemporaryDirectory(prefix="tessera-backend-") as scratch:
        folder = workdir or Path(scratch)
        for name in candidates:
            try:
                built[name] = eager if name == "eager" else build_cpu_backend(name, model, example_batch, folder)
            except Exception as exc:  # a candidate that cannot be built is recorded, not fatal
                failed.append(BackendMeasurement(name, accurate=False, error=repr(exc)))
        return compare_backends(eager, built, example_batch, max_abs_error, batch_sizes=batch_sizes,
                                repeats=repeats, failed=failed)


# --------------------------------------------------------------------------- the record in an artifact

BACKEND_SECTION = "## Serving backend (measured)"


def record_backend_choice(directory: Path, component: str, choice: BackendChoice) -> None:
    """Write ``choice`` into a sealed artifact: manifest ``extra[serving_backend][component]`` and the card.

    Neither file is a payload file, so the artifact's digests (and its served bytes) are unchanged.
    The card gets (or has replaced) a ``## Serving backend (measured)`` section per component.
    """
    manifest_path = directory / MANIFEST_NAME
    raw = json.loads(manifest_path.read_text())
    raw.setdefault("extra", {}).setdefault(SERVING_BACKEND_KEY, {})[component] = choice.as_dict()
    manifest_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    card_path = directory / MODEL_CARD_NAME
    card = card_path.read_text() if card_path.exists() else ""
    card_path.write_text(_with_card_section(card, component, backend_choice_markdown(component, choice)))


def recorded_backend(manifest: ArtifactManifest, component: str) -> str | None:
    """The backend an artifact's card chose for ``component``, or None if the card predates the record."""
    record = manifest.extra.get(SERVING_BACKEND_KEY, {}).get(component)
    return record.get("chosen") if isinstance(record, dict) else None


def backend_choice_markdown(component: str, choice: BackendChoice) -> str:
    """The card section: one row per candidate, latency per batch size, error against the reference."""
    sizes = sorted({size for m in choice.measurements for size in m.latency_ms})
    header = " | ".join(f"batch {size} ms" for size in sizes)
    rows = []
    for m in choice.measurements:
        if m.error:
            rows.append(f"| {m.name} | failed: {m.error} |")
            continue
        latencies = " | ".join(f"{m.latency_ms.get(size, float('nan')):.4f}" for size in sizes)
        rows.append(f"| {m.name} | {latencies} | {m.max_abs_error:.2e} | {'yes' if m.accurate else 'no'} |")
    conditions = ", ".join(f"{k} {v}" for k, v in choice.conditions.items())
    return (f"{BACKEND_SECTION}: {component}\n"
            f"Served: **{choice.name}** - the fastest candidate (geometric mean over batch sizes) whose outputs "
            f"stay within {choice.max_abs_error:g} of the reference's on the example batch ({conditions}).\n\n"
            f"| backend | {header} | max abs error | accurate |\n|---|{'---|' * len(sizes)}---|---|\n"
            + "\n".join(rows) + "\n")


def _with_card_section(card: str, component: str, section: str) -> str:
    """``card`` with the section of ``component`` replaced, or appended when absent."""
    heading = f"{BACKEND_SECTION}: {component}\n"
    if heading not in card:
        return card.rstrip("\n") + "\n\n" + section
    before, after = card.split(heading, 1)
    rest = after.split("\n## ", 1)
    return before + section + ("\n## " + rest[1] if len(rest) > 1 else "")
