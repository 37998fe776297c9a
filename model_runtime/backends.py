"""Execution backends for one torch model, and a measured choice between them on CPU.

A backend is a callable with a ``name``: ``(batch) -> outputs`` on CPU, where ``batch`` is one
``Tensor[N, ...]`` or a mapping of named tensors (``{"tokens": Tensor[N, T], "mask": Tensor[N, T]}``),
and the outputs are one ``Tensor[N, ...]`` or a mapping of named tensors, floats as float32.
Candidates:

- ``eager``: the torch module itself (on the placement's device, autocast when it asks for it);
- ``torch-compile``: the module under ``torch.compile`` (inductor, dynamic shapes); CPU needs a C++
  compiler. Compiling happens when the backend is built, capped by ``compile_timeout_s``, and is not
  part of the measured latency;
- ``onnx``: the module exported with the TorchScript-based exporter (``dynamo=False``: the dynamo
  exporter needs ``onnxscript``, not installed) and run by ONNX Runtime (its CUDA provider for a
  GPU placement when the build has it);
- ``onnx-int8``: that graph with weights quantized to int8 by ONNX Runtime's dynamic quantizer
  (chosen over ``torch.ao.quantize_dynamic``, deprecated in torch 2.13 and unsafe on
  ``nn.TransformerEncoder`` unless the process-wide MHA fast path is switched off);
- ``openvino``: the same ONNX graph compiled by OpenVINO for the CPU, in f32 unless asked, when
  ``openvino`` is installed (the ``openvino`` extra: ``pip install -e '.[openvino]'``);
- ``onnx-int8-static``: that graph with weights *and activations* in int8 (ONNX Runtime's static
  quantizer, QDQ, activation ranges calibrated on representative batches: integer convolutions and
  matrix products, where the dynamic quantizer keeps float convolutions). Its error is quantisation
  error, not rounding: it is only measured when asked for by name (:data:`QUANTIZED_CPU_CANDIDATES`),
  with a tolerance stated in the answer's own terms (``compare_as``, e.g. probabilities).

:func:`export_onnx` exports several named inputs and outputs with dynamic axes (batch always,
sequence length or spatial size when asked). :func:`available_cpu_candidates` lists the candidates
this machine can build (the optional ones skipped cleanly when absent). :func:`choose_cpu_backend`
exports and measures latency and accuracy against eager; :func:`compare_backends` measures backends a vertical
built itself (e.g. from the graphs in its artifact). A vertical measures at training time and
records the choice in its artifact (:func:`record_backend_choice`: manifest ``extra`` and model
card), and its loader serves :func:`recorded_backend`.
Every ONNX Runtime session is made by :func:`onnx_session`, which first folds the export's shape
plumbing away (:func:`simplified_onnx`).

torch is imported only by what needs it (the torch backends, export, measurement): a process that
serves ONNX Runtime graphs with NumPy arrays (:class:`OnnxRuntimeBackend`) never imports it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

from model_runtime.artifacts import MANIFEST_NAME, MODEL_CARD_NAME, ArtifactManifest
from model_runtime.device import Placement, inference_context, onnx_providers
from model_runtime.lazy_torch import is_tensor, torch_loaded
from shared.config import get_settings

if TYPE_CHECKING:
    import torch

CPU_CANDIDATES: tuple[str, ...] = ("eager", "onnx", "onnx-int8")
"""The default candidates (always buildable)."""
OPTIONAL_CPU_CANDIDATES: tuple[str, ...] = ("torch-compile", "openvino")
"""Candidates measured only where this machine can build them (see :func:`available_cpu_candidates`)."""
QUANTIZED_CPU_CANDIDATES: tuple[str, ...] = ("onnx-int8-static",)
"""Candidates whose outputs carry quantisation error: never a default, asked for by a model whose tolerance
(in the answer's terms, see ``compare_as`` of :func:`compare_backends`) admits it."""
CALIBRATION_OPTION = "calibration"
"""``backend_options["onnx-int8-static"][CALIBRATION_OPTION]``: the batches that calibrate activation ranges."""
DEFAULT_COMPILE_TIMEOUT_S = 300.0
Inputs: TypeAlias = "torch.Tensor | Mapping[str, torch.Tensor]"
"""One batch: a tensor, or named tensors (all with the batch on axis 0)."""
Outputs: TypeAlias = "torch.Tensor | Mapping[str, torch.Tensor]"
SERVING_BACKEND_KEY = "serving_backend"
"""Manifest ``extra`` key of the measured choices: ``{component: BackendChoice.as_dict()}``."""
logger = logging.getLogger("tessera.model_runtime.backends")


class Backend(Protocol):
    """Runs a batch: a tensor or named tensors in, a tensor or named tensors out, on CPU."""

    name: str

    def __call__(self, batch: Any) -> Any: ...


def _to_host(output: Any) -> Any:
    """Outputs on CPU with floating tensors as float32, keeping their structure (tensor, tuple, mapping)."""
    if is_tensor(output):
        return (output.float() if output.is_floating_point() else output).cpu()
    if isinstance(output, Mapping):
        return {name: _to_host(value) for name, value in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_to_host(value) for value in output)
    return output


class TorchBackend:
    """A torch module under ``inference_mode`` (and autocast when the placement asks for it).

    Parameters
    ----------
    module : torch.nn.Module
        Put in eval mode and moved to ``placement.device``. Named inputs are passed as keyword
        arguments (``module(**batch)``).
    placement : Placement, optional
        Defaults to CPU, fp32.
    """

    def __init__(self, module: torch.nn.Module, placement: Placement | None = None) -> None:
        self.placement = placement or Placement("cpu")
        self.module = module.eval().to(self.placement.device)
        self.name = "eager" if self.placement.device_type == "cpu" else f"eager/{self.placement.describe()}"

    def __call__(self, batch: Inputs) -> Any:
        device = self.placement.device
        with inference_context(self.placement):
            if isinstance(batch, Mapping):
                output = self.module(**{name: value.to(device, non_blocking=True) for name, value in batch.items()})
            else:
                output = self.module(batch.to(device, non_blocking=True))
        return _to_host(output)


def torch_compile_available() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here (inductor needs a C++ compiler)."""
    compiler = os.environ.get("CXX") or "g++"
    return shutil.which(compiler) is not None or shutil.which("c++") is not None


class CompiledTorchBackend(TorchBackend):
    """A torch module under ``torch.compile`` (inductor, dynamic shapes), compiled when built.

    Parameters
    ----------
    module : torch.nn.Module
        As for :class:`TorchBackend`.
    example_batch : Tensor or mapping of tensors
        Run once to compile (and again at another batch size, so serving never compiles).
    placement : Placement, optional
        Defaults to CPU, fp32.
    compile_timeout_s : float
        Most seconds the compile may take; past it the backend is refused (``TimeoutError``). The
        compiling thread cannot be interrupted: it finishes in the background (the process waits
        for it at exit), its result unused.
    """

    def __init__(self, module: torch.nn.Module, example_batch: Inputs, placement: Placement | None = None, *,
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S) -> None:
        import torch

        super().__init__(module, placement)
        eager = self.module
        self.module = torch.compile(eager, dynamic=True)  # type: ignore[assignment]
        on_cpu = self.placement.device_type == "cpu"
        self.name = "torch-compile" if on_cpu else f"torch-compile/{self.placement.describe()}"
        started = time.perf_counter()
        _within(compile_timeout_s, lambda: [self(_tile(example_batch, size)) for size in (1, 2)],
                what="torch.compile")
        self.compile_s = time.perf_counter() - started


def _within(timeout_s: float, work: Callable[[], Any], *, what: str) -> None:
    """Run ``work`` in a thread; raise ``TimeoutError`` if it is not done within ``timeout_s`` (it goes on)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    # not a daemon: a compile abandoned past its cap still finishes before the interpreter exits
    # (a daemon thread inside inductor's C++ at exit aborts the process: "terminate called...")
    thread = threading.Thread(target=target, name=f"tessera-{what}", daemon=False)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} took longer than {timeout_s:g} s")
    if failure:
        raise failure[0]


_ORT_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _host_array(value: Any, dtype: Any) -> np.ndarray:
    """A tensor or array as a contiguous numpy array of ``dtype``."""
    return np.ascontiguousarray(value.detach().cpu().numpy() if is_tensor(value) else value, dtype=dtype)


def _named_arrays(batch: Any, input_types: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The batch (tensors or numpy arrays) as contiguous numpy arrays of the graph's input types, by input name."""
    if not isinstance(batch, Mapping):
        if len(input_types) != 1:
            raise ValueError(f"the graph takes {len(input_types)} named inputs {sorted(input_types)}; got one tensor")
        batch = {next(iter(input_types)): batch}
    missing = set(input_types) - set(batch)
    if missing:
        raise ValueError(f"missing inputs {sorted(missing)} (the graph takes {sorted(input_types)})")
    return {name: _host_array(batch[name], input_types[name]) for name in input_types}


def _fed_tensors(batch: Any) -> bool:
    """Whether a batch holds torch tensors (answered in tensors) rather than numpy arrays (answered in arrays)."""
    return is_tensor(batch) or (isinstance(batch, Mapping) and any(is_tensor(value) for value in batch.values()))


def _named_outputs(batch: Any, names: Sequence[str], arrays: Sequence[Any]) -> Any:
    """One output for a one-output graph fed one tensor (or array); otherwise ``{output name: output}``;
    tensors when ``batch`` held tensors, else numpy arrays (torch not imported)."""
    outputs: list[Any] = [np.asarray(array) for array in arrays]
    if _fed_tensors(batch):
        import torch

        outputs = [torch.from_numpy(array) for array in outputs]
    if not isinstance(batch, Mapping) and len(outputs) == 1:
        return outputs[0]
    return dict(zip(names, outputs, strict=True))


class OnnxRuntimeBackend:
    """An ONNX graph run by ONNX Runtime, on CUDA when the placement is a GPU and the provider exists.

    Called with one tensor (a one-input graph) or named tensors; answers one tensor when a
    one-output graph was fed one tensor, else ``{output name: tensor}``. Inputs are converted to
    the graph's input types (float32, int64 token ids, bool masks...). Fed numpy arrays instead of
    tensors, it answers numpy arrays, and never imports torch.

    Parameters
    ----------
    model : Path or bytes
        ``.onnx`` file or its serialized bytes (e.g. from :func:`export_onnx`).
    threads : int, optional
        Intra-op threads (default ``settings.torch_threads``).
    name : str
        Label reported by ``runtime.loaded()``.
    placement : Placement, optional
        Chooses the execution providers (:func:`~model_runtime.device.onnx_providers`); CPU by default.
        The graph runs in its own precision (the placement's autocast applies to torch only).
    spinning : bool
        Whether idle intra-op threads busy-wait (see :func:`onnx_session`).
    """

    def __init__(self, model: Path | bytes, *, threads: int | None = None, name: str = "onnx",
                 placement: Placement | None = None, spinning: bool = True) -> None:
        self.session = onnx_session(model, threads=threads, placement=placement, spinning=spinning)
        self.input_types = _input_types(self.session)
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.name = name

    def __call__(self, batch: Inputs | np.ndarray | Mapping[str, np.ndarray]) -> Any:
        if is_tensor(batch) and len(self.input_types) == 1 and len(self.output_names) == 1:
            # the one-tensor model on the hot path (fraud's sequence model): no dict building
            import torch

            name, dtype = next(iter(self.input_types.items()))
            array: np.ndarray = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=dtype)
            return torch.from_numpy(self.session.run(None, {name: array})[0])
        arrays = self.session.run(None, _named_arrays(batch, self.input_types))
        return _named_outputs(batch, self.output_names, arrays)


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed."""
    return importlib.util.find_spec("openvino") is not None


class OpenVinoBackend:
    """An ONNX graph compiled by OpenVINO for the CPU (inputs and outputs as for :class:`OnnxRuntimeBackend`).

    Parameters
    ----------
    model : Path
        ``.onnx`` file (OpenVINO reads ONNX directly; dynamic axes stay dynamic).
    threads : int, optional
        ``INFERENCE_NUM_THREADS``, all streams together (default ``settings.torch_threads``).
    precision : {"f32", "bf16"}
        ``INFERENCE_PRECISION_HINT``. OpenVINO's own default on a CPU with AMX or AVX512-BF16 is
        bf16 (measured on this box's Sapphire Rapids: a 3D U-Net's logits 0.058 from torch's), so a
        float32 model is run in f32 unless bf16 is asked for.
    streams : int
        OpenVINO CPU streams (``NUM_STREAMS``), the threads shared between them: with more than
        one, a batch of at least ``streams`` rows is split into that many parts run at once, each
        on its own stream's threads, and the outputs concatenated in order. Several one-thread
        streams spend no time synchronising threads inside an operator; one stream of every
        thread answers a single row sooner.

    Notes
    -----
    One call at a time (the runtime's batcher runs one batch at a time per model).
    """

    def __init__(self, model: Path, *, threads: int | None = None, name: str = "openvino",
                 precision: str = "f32", streams: int = 1) -> None:
        import openvino

        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        core = openvino.Core()
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads or get_settings().torch_threads,
                                  "INFERENCE_PRECISION_HINT": precision}
        config.update({"PERFORMANCE_HINT": "LATENCY"} if streams == 1 else {"NUM_STREAMS": streams})
        self.compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.streams = streams
        self.requests = [self.compiled.create_infer_request() for _ in range(streams)]
        self.request = self.requests[0]
        self.input_types = {node.get_any_name(): node.get_element_type().to_dtype() for node in self.compiled.inputs}
        self.output_names = [node.get_any_name() for node in self.compiled.outputs]
        self.name = name

    def __call__(self, batch: Inputs) -> Any:
        arrays = _named_arrays(batch, self.input_types)
        rows = len(next(iter(arrays.values())))
        if self.streams == 1 or rows < 2:
            results = self.request.infer(arrays)
            return _named_outputs(batch, self.output_names, [results[output] for output in self.compiled.outputs])
        parts = min(self.streams, rows)
        bounds = np.linspace(0, rows, parts + 1).astype(int)
        used = self.requests[:parts]
        for request, start, stop in zip(used, bounds[:-1], bounds[1:], strict=True):
            request.start_async({name: array[start:stop] for name, array in arrays.items()})
        for request in used:
            request.wait()
        outputs = [np.concatenate([request.get_tensor(output).data for request in used])
                   for output in self.compiled.outputs]
        return _named_outputs(batch, self.output_names, outputs)


def simplified_onnx(model: Path | bytes) -> bytes:
    """The graph with constant shape computations folded away (onnxsim), checked on random inputs.

    A TorchScript export of a transformer carries hundreds of Shape/Gather/Unsqueeze/Concat nodes
    that ONNX Runtime runs one by one on every call, constant folding notwithstanding. Measured on
    the fraud card-sequence ensemble: 387 -> 123 nodes, a batch of one 150 -> 102 us, outputs equal
    to 5e-7. The graph is returned unchanged (with a warning) if onnxsim fails or its check does.
    Either way, scalar-slope ``PRelu`` nodes become ``LeakyRelu`` (:func:`scalar_prelu_as_leaky_relu`).
    """
    import onnx

    proto = onnx.load(str(model)) if isinstance(model, Path) else onnx.load_from_string(model)
    try:
        onnxsim = _import_onnxsim()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints progress
            warnings.simplefilter("ignore")
            simplified, checked = onnxsim.simplify(proto, check_n=3, test_input_shapes=_check_shapes(proto))
    except Exception as exc:  # an exotic graph: serve it as exported rather than not at all
        logger.warning("ONNX graph not simplified (%r); serving it as exported", exc)
        return scalar_prelu_as_leaky_relu(proto).SerializeToString()
    if not checked:
        logger.warning("simplified ONNX graph failed its output check; serving it as exported")
        return scalar_prelu_as_leaky_relu(proto).SerializeToString()
    return scalar_prelu_as_leaky_relu(simplified).SerializeToString()


class _RefuseTorch(importlib.abc.MetaPathFinder):
    """A finder that makes ``import torch`` fail in the thread that made it, as if torch were not installed."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == "torch" and threading.get_ident() == self.thread:
            raise ModuleNotFoundError("torch is not imported for onnxsim", name="torch")
        return None


def _import_onnxsim() -> Any:
    """``onnxsim``, imported without torch in a process that has not imported torch.

    onnxsim (0.8) tries ``import torch`` as it is imported, for an optional quantizer (PPQ, not
    installed: it never loads here). That import alone costs seconds and hundreds of MB, which a
    process serving only ONNX Runtime graphs (``tessera edge``) must not pay. The import is refused
    in this thread only, while onnxsim is imported (it then takes its own "no torch" path); other
    threads import torch as usual.
    """
    if "onnxsim" in sys.modules or torch_loaded():
        import onnxsim

        return onnxsim
    refuse = _RefuseTorch()
    sys.meta_path.insert(0, refuse)
    try:
        import onnxsim
    finally:
        sys.meta_path.remove(refuse)
    return onnxsim


def scalar_prelu_as_leaky_relu(proto: Any) -> Any:
    """The graph with every ``PRelu`` whose slope is one constant number replaced by ``LeakyRelu(alpha=slope)``.

    The two compute the same thing (``x`` where ``x >= 0``, else ``slope * x``; the float32 slope
    is kept exactly as the float attribute), but ONNX Runtime's ``PRelu`` goes through its
    broadcasting kernel while ``LeakyRelu`` is one vectorised loop. ``torch.nn.PReLU()`` (one
    slope, MONAI's default activation) exports as such a ``PRelu``. Measured on the volume
    benchmark's MONAI U-Net (17 PReLU, 64^3 patches, batch 4, 2 threads, box under load): PRelu
    was 19 % of the graph's kernel time; per patch 228 -> 192 ms, outputs identical (max |diff| 0).
    Per-channel slopes are left as they are. ``proto`` is changed in place and returned.
    """
    from onnx import helper, numpy_helper

    initializers = {initializer.name: initializer for initializer in proto.graph.initializer}
    replaced = 0
    for index, node in enumerate(list(proto.graph.node)):
        if node.op_type != "PRelu" or node.input[1] not in initializers:
            continue
        slope = numpy_helper.to_array(initializers[node.input[1]])
        if slope.size != 1 or slope.dtype != np.float32:
            continue
        leaky = helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name or None,
                                 alpha=float(slope.reshape(-1)[0]))
        proto.graph.node.remove(node)
        proto.graph.node.insert(index, leaky)
        replaced += 1
    if replaced:
        used = {name for node in proto.graph.node for name in node.input}
        unused = [initializer for initializer in proto.graph.initializer
                  if initializer.name not in used and initializer.name not in {i.name for i in proto.graph.input}]
        for initializer in unused:
            proto.graph.initializer.remove(initializer)
    return proto


CHECK_AXIS_SIZE = 16
"""Size given to a dynamic non-batch axis when onnxsim checks a graph (a multiple of 16 suits strided convs)."""


def _check_shapes(proto: Any) -> dict[str, list[int]]:
    """Concrete input shapes for onnxsim's output check: batch 1, other dynamic axes :data:`CHECK_AXIS_SIZE`.

    Only the check runs at these shapes; the simplified graph keeps its dynamic axes.
    """
    initializers = {initializer.name for initializer in proto.graph.initializer}
    return {node.name: [dim.dim_value or (1 if axis == 0 else CHECK_AXIS_SIZE)
                        for axis, dim in enumerate(node.type.tensor_type.shape.dim)]
            for node in proto.graph.input if node.name not in initializers}


def onnx_session(model: Path | bytes, *, threads: int | None = None, placement: Placement | None = None,
                 simplify: bool = True, spinning: bool = True) -> Any:
    """An ONNX Runtime session of :func:`simplified_onnx` ``(model)``.

    ``threads``: intra-op threads (default ``settings.torch_threads``); one inter-op thread.
    ``spinning=False``: the intra-op threads sleep as soon as they run out of work instead of
    busy-waiting for the next operator (``session.intra_op.allow_spinning``). Spinning saves the
    wake-up of a sub-millisecond model (fraud's); for a model of tens of ms an operator, served
    beside other CPU work of its own (the sliding window's stitching), it only takes the cores
    that work needs.
    ``placement``: a CUDA placement runs on ONNX Runtime's CUDA provider when this build has it
    (:func:`~model_runtime.device.onnx_providers`), else on CPU. ``simplify=False`` loads the graph
    as it is: for a third party's shipped graph that onnxsim cannot process (silero-vad's STFT
    branch fails its random-input check, after ~5 s).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or get_settings().torch_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = onnx_providers(placement)
    graph = simplified_onnx(model) if simplify else (str(model) if isinstance(model, Path) else model)
    session = ort.InferenceSession(graph, options, providers=providers)
    if providers[0] != "CPUExecutionProvider" and "CUDAExecutionProvider" not in session.get_providers():
        # ONNX Runtime falls back to CPU when the CUDA provider cannot load (CUDA/cuDNN libraries missing)
        logger.warning("ONNX Runtime could not start its CUDA provider; this graph runs on %s", session.get_providers())
    return session


def _ordered_inputs(module: torch.nn.Module, example_batch: Inputs) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and positional example tensors: ``input`` for one tensor, else the forward's order."""
    if is_tensor(example_batch):
        return ["input"], (example_batch.cpu(),)
    parameters = list(inspect.signature(module.forward).parameters)
    unknown = set(example_batch) - set(parameters)
    if unknown:
        raise ValueError(f"inputs {sorted(unknown)} are not parameters of {type(module).__name__}.forward")
    names = [name for name in parameters if name in example_batch]
    if parameters[:len(names)] != names:
        raise ValueError(f"named inputs must be the first parameters of forward, in order: {parameters}")
    return names, tuple(example_batch[name].cpu() for name in names)


def _output_names(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> list[str]:
    """``output`` for one tensor, the keys of a mapping, ``output_<i>`` for a tuple."""
    import torch

    with torch.inference_mode():
        sample = module(*args)
    if isinstance(sample, torch.Tensor):
        return ["output"]
    if isinstance(sample, Mapping):
        return [str(name) for name in sample]
    return [f"output_{index}" for index in range(len(sample))]


class OnnxExportError(ValueError):
    """The exported graph does not honour its dynamic axes (it fails or differs at another size)."""


def _grown(input_names: Sequence[str], args: tuple[torch.Tensor, ...],
           axes: Mapping[str, Mapping[int, str]]) -> tuple[torch.Tensor, ...]:
    """One row of the example with every dynamic non-batch axis doubled (values cycled, ids stay valid)."""
    import torch

    grown = []
    for name, tensor in zip(input_names, args, strict=True):
        row = tensor[:1]
        for axis in (axis for axis in axes[name] if axis != 0):
            row = row.index_select(axis, torch.arange(2 * row.shape[axis]) % row.shape[axis])
        grown.append(row.contiguous())
    return tuple(grown)


def _check_dynamic_axes(module: torch.nn.Module, path: Path, input_names: Sequence[str],
                        args: tuple[torch.Tensor, ...], axes: Mapping[str, Mapping[int, str]]) -> None:
    """Run the graph at doubled sizes along its dynamic non-batch axes; raise if it fails or disagrees."""
    import onnxruntime as ort
    import torch

    grown = _grown(input_names, args, axes)
    with torch.inference_mode():
        expected = _flat_tensors(module(*grown))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hint = ("torch.nn.MultiheadAttention (and nn.Transformer*) under the TorchScript exporter fixes the "
            "sequence length it was traced with (pytorch/pytorch#117209); write the attention with "
            "shape-agnostic reshapes, e.g. view(batch, -1, heads, head_dim)")
    try:
        arrays = session.run(None, {name: tensor.numpy() for name, tensor in zip(input_names, grown, strict=True)})
    except Exception as exc:
        raise OnnxExportError(f"the exported graph fails at other sizes of its dynamic axes: {exc}. {hint}") from exc
    for array, reference in zip(arrays, expected, strict=True):
        got = torch.from_numpy(np.asarray(array))
        if got.shape != reference.shape or not torch.allclose(got.double(), reference.double(), atol=1e-4, rtol=1e-3):
            raise OnnxExportError(f"the exported graph's output differs from torch at other sizes of its dynamic "
                                  f"axes (shape {tuple(got.shape)} vs {tuple(reference.shape)}). {hint}")


def export_onnx(module: torch.nn.Module, example_batch: Inputs, path: Path, *, opset: int = 17,
                output_names: Sequence[str] | None = None,
                dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """Export ``module`` to ``path`` with a dynamic batch axis on every input and output.

    Parameters
    ----------
    module : torch.nn.Module
        Exported in eval mode on CPU. Returns one tensor, a tuple of tensors or a mapping of them.
    example_batch : Tensor[N, ...] or mapping of name -> Tensor[N, ...]
        Example input (any N >= 1). One tensor becomes the graph input ``input``; named tensors
        become inputs of those names, which must be the first parameters of ``forward``.
    path : Path
        Destination ``.onnx`` file.
    output_names : sequence of str, optional
        Graph output names; default ``output`` for one tensor, the keys of a returned mapping,
        else ``output_0``, ``output_1``...
    dynamic_axes : mapping of name -> {axis: label}, optional
        Axes besides the batch that vary between calls, e.g. ``{"tokens": {1: "sequence"},
        "mask": {1: "sequence"}, "hidden": {1: "sequence"}}``; axis 0 is always ``batch``.
        Use the same label where two axes must agree. When given, the graph is run once more at
        doubled sizes along these axes and compared with torch.

    Raises
    ------
    OnnxExportError
        The graph fails, or differs from torch, at other sizes of ``dynamic_axes``.
    """
    import torch

    module = module.eval().cpu()
    input_names, args = _ordered_inputs(module, example_batch)
    names_out = list(output_names) if output_names is not None else _output_names(module, args)
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in [*input_names, *names_out]}
    for name, extra in (dynamic_axes or {}).items():
        if name not in axes:
            raise ValueError(f"dynamic_axes names {name!r}, not an input or output ({sorted(axes)})")
        axes[name].update(extra)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The fused transformer fast path (aten::_transformer_encoder_layer_fwd) has no ONNX symbolic;
    # it is process-wide, so it is off only for the export (other threads just run unfused meanwhile).
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice, once per export
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                              output_names=names_out, opset_version=opset, dynamic_axes=axes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if dynamic_axes:
        _check_dynamic_axes(module, path, input_names, args, axes)
    return path


def quantize_onnx_int8(source: Path, destination: Path) -> Path:
    """Write an int8-weight copy of an ONNX graph (dynamic activation quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quantizer_quiet():
        quantize_dynamic(str(source), str(destination), weight_type=QuantType.QInt8)
    return destination


@contextlib.contextmanager
def _quantizer_quiet() -> Iterator[None]:
    """Root logging at ERROR for the block: ONNX Runtime's quantizers log a "run pre-processing" hint on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _input_types(session: Any) -> dict[str, Any]:
    """An ONNX Runtime session's inputs: name -> the numpy type fed to it."""
    return {node.name: _ORT_NUMPY_TYPES.get(node.type, np.float32) for node in session.get_inputs()}


def quantize_onnx_int8_static(source: Path, destination: Path, calibration: Sequence[Inputs]) -> Path:
    """Write an int8 copy of an ONNX graph, weights and activations (QDQ), calibrated on ``calibration``.

    Each calibration batch is fed as the graph's inputs (a tensor, or named tensors as at serving);
    activation ranges are the min/max seen over all of them, so they should look like served traffic
    (lengths, levels) and not be the rows accuracy is judged on. Convolutions, matrix products and
    ``Gemm`` are quantized; everything else stays float.
    """
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("static int8 quantization needs at least one calibration batch")
    input_types = _input_types(onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"]))
    feeds = [_named_arrays(batch, input_types) for batch in calibration]

    class _Batches(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    prepared = destination.with_suffix(".pre.onnx")
    try:
        with _quantizer_quiet():
            # shape inference and graph optimisation first, as the quantizer asks; symbolic shape inference
            # is skipped because it cannot follow the arithmetic of a dynamic length through a conv stack
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(destination), _Batches(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    finally:
        prepared.unlink(missing_ok=True)
    return destination


def calibration_rows(example_batch: Inputs) -> list[Inputs]:
    """Each row of the example batch as a batch of one: the default calibration of ``onnx-int8-static``."""
    rows = _rows(example_batch)
    if is_tensor(example_batch):
        return [example_batch[index:index + 1] for index in range(rows)]  # type: ignore[index]
    named = dict(example_batch)  # type: ignore[arg-type]
    return [{name: value[index:index + 1] for name, value in named.items()} for index in range(rows)]


def available_cpu_candidates() -> tuple[str, ...]:
    """:data:`CPU_CANDIDATES` plus the optional ones this machine can build (``torch-compile``, ``openvino``)."""
    optional = {"torch-compile": torch_compile_available, "openvino": openvino_available}
    return CPU_CANDIDATES + tuple(name for name in OPTIONAL_CPU_CANDIDATES if optional[name]())


def build_cpu_backend(kind: str, module: torch.nn.Module, example_batch: Inputs, workdir: Path, *,
                      export_options: Mapping[str, Any] | None = None,
                      compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                      backend_options: Mapping[str, Mapping[str, Any]] | None = None) -> Backend:
    """Build one CPU backend by name (see the module docstring), exporting into ``workdir``.

    ``export_options``: keyword arguments for :func:`export_onnx` (``output_names``, ``dynamic_axes``).
    ``backend_options``: keyword arguments per backend name for its class, e.g.
    ``{"onnx": {"spinning": False}, "openvino": {"streams": 2}}``; ``onnx-int8-static`` also takes
    ``calibration`` (:data:`CALIBRATION_OPTION`: batches for its activation ranges; each example row
    by default).

    Raises
    ------
    ModuleNotFoundError
        ``openvino`` asked for but not installed.
    TimeoutError
        ``torch-compile`` took longer than ``compile_timeout_s``.
    """
    if kind == "eager":
        return TorchBackend(module)
    if kind == "torch-compile":
        return CompiledTorchBackend(module, example_batch, compile_timeout_s=compile_timeout_s)
    if kind == "openvino" and not openvino_available():
        raise ModuleNotFoundError("openvino is not installed")
    known = CPU_CANDIDATES + OPTIONAL_CPU_CANDIDATES + QUANTIZED_CPU_CANDIDATES
    if kind not in known:
        raise ValueError(f"unknown CPU backend {kind!r}; expected one of {known}")
    onnx_path = workdir / "model.onnx"
    if not onnx_path.exists():
        export_onnx(module, example_batch, onnx_path, **(export_options or {}))
    options = dict((backend_options or {}).get(kind, {}))
    if kind == "onnx":
        return OnnxRuntimeBackend(onnx_path, name="onnx", **options)
    if kind == "openvino":
        return OpenVinoBackend(onnx_path, **options)
    if kind == "onnx-int8-static":
        calibration = options.pop(CALIBRATION_OPTION, None) or calibration_rows(example_batch)
        static = quantize_onnx_int8_static(onnx_path, workdir / "model.int8-static.onnx", calibration)
        return OnnxRuntimeBackend(static, name="onnx-int8-static", **options)
    quantized = quantize_onnx_int8(onnx_path, workdir / "model.int8.onnx")
    return OnnxRuntimeBackend(quantized, name="onnx-int8", **options)


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
    build_ms : float or None
        Time to build the candidate (export, quantize, compile), kept out of its latency; ``None``
        when it was built elsewhere (:func:`compare_backends` given built backends).
    """

    name: str
    latency_ms: dict[int, float] = field(default_factory=dict)
    per_item_ms: dict[int, float] = field(default_factory=dict)
    max_abs_error: float = 0.0
    accurate: bool = True
    error: str | None = None
    build_ms: float | None = None

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


def time_call(call: Callable[[Any], Any], batch: Inputs, *, repeats: int = 30,
              warmup: int = 3) -> float:
    """Median wall time of ``call(batch)`` in milliseconds."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            call(batch)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call(batch)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def _rows(batch: Inputs) -> int:
    """The batch size (axis 0) of a tensor or of named tensors."""
    return int(batch.shape[0] if is_tensor(batch) else next(iter(batch.values())).shape[0])


def _tile(example_batch: Inputs, size: int) -> Inputs:
    """``size`` rows cycled from the example (every named tensor takes the same rows)."""
    import torch

    rows = torch.arange(size) % _rows(example_batch)
    if isinstance(example_batch, torch.Tensor):
        return example_batch[rows].contiguous()
    return {name: value[rows].contiguous() for name, value in example_batch.items()}


def _flat_tensors(outputs: Any) -> list[torch.Tensor]:
    if is_tensor(outputs):
        return [outputs]
    values = outputs.values() if isinstance(outputs, Mapping) else outputs
    return [tensor for value in values for tensor in _flat_tensors(value)]


def max_abs_difference(outputs: Any, reference: Any) -> float:
    """Largest absolute difference between two outputs of the same structure (tensors, tuples, mappings)."""
    ours, theirs = _flat_tensors(outputs), _flat_tensors(reference)
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} output tensors against the reference's {len(theirs)}")
    return max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
               for a, b in zip(ours, theirs, strict=True))


def _measure(name: str, backend: Backend, example_batch: Inputs, reference: Any,
             batch_sizes: Sequence[int], max_abs_error: float, repeats: int,
             compare_as: Callable[[Any], Any] | None = None) -> BackendMeasurement:
    import torch

    with torch.inference_mode():
        outputs = backend(example_batch)
        error = max_abs_difference(compare_as(outputs) if compare_as else outputs, reference)
    measurement = BackendMeasurement(name, max_abs_error=error, accurate=error <= max_abs_error)
    for size in batch_sizes:
        latency = time_call(backend, _tile(example_batch, size), repeats=repeats)
        measurement.latency_ms[size] = round(latency, 4)
        measurement.per_item_ms[size] = round(latency / size, 4)
    return measurement


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``threads`` (unchanged when None)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compare_backends(reference: Backend, candidates: Mapping[str, Backend], example_batch: Inputs,
                     max_abs_error: float = 1e-3, *, batch_sizes: Sequence[int] = (1, 32), repeats: int = 30,
                     threads: int | None = None,
                     failed: Sequence[BackendMeasurement] = (),
                     compare_as: Callable[[Any], Any] | None = None) -> BackendChoice:
    """Measure built backends against ``reference`` and choose the fastest accurate one.

    Parameters
    ----------
    reference : Backend
        Whose outputs are the truth (eager torch); chosen when no candidate is usable.
    candidates : mapping of name -> Backend
        The backends to measure (the reference may be one of them, under its own name).
    example_batch : Tensor[N, ...] or mapping of name -> Tensor[N, ...]
        Representative inputs; accuracy is checked on all N, latency on tiles of it.
    max_abs_error : float
        Largest allowed absolute difference from the reference's outputs (output units, over
        every output tensor).
    batch_sizes : sequence of int
        Batch sizes to time; the score is the geometric mean of their latencies.
    repeats : int
        Timed calls per batch size (median kept).
    threads : int, optional
        Torch intra-op threads while measuring (match what serving uses, e.g. 1).
    failed : sequence of BackendMeasurement
        Candidates that could not be built, recorded as they are.
    compare_as : callable, optional
        Maps outputs (a backend's and the reference's alike) to what ``max_abs_error`` is stated in,
        e.g. logits to the probabilities a caller is answered with. Without it, raw output units.
    """
    import torch

    with torch_threads(threads), torch.inference_mode():
        reference_output = reference(example_batch)
        if compare_as is not None:
            reference_output = compare_as(reference_output)
        measurements = list(failed)
        for name, backend in candidates.items():
            try:
                measurements.append(_measure(name, backend, example_batch, reference_output, batch_sizes,
                                             max_abs_error, repeats, compare_as))
            except Exception as exc:  # a candidate that cannot run is recorded, not fatal
                measurements.append(BackendMeasurement(name, accurate=False, error=repr(exc)))
    best = min(measurements, key=lambda m: m.score)
    chosen = candidates.get(best.name, reference) if math.isfinite(best.score) else reference
    conditions = {"torch_threads": threads or torch.get_num_threads(), "example_rows": _rows(example_batch),
                  "repeats": repeats, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "error_in": getattr(compare_as, "__name__", "compare_as") if compare_as else "outputs"}
    return BackendChoice(backend=chosen, measurements=measurements, max_abs_error=max_abs_error,
                         conditions=conditions)


def choose_cpu_backend(model: torch.nn.Module, example_batch: Inputs,
                       candidates: Sequence[str] = CPU_CANDIDATES, max_abs_error: float = 1e-3, *,
                       batch_sizes: Sequence[int] = (1, 32), repeats: int = 30,
                       workdir: Path | None = None, export_options: Mapping[str, Any] | None = None,
                       compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                       backend_options: Mapping[str, Mapping[str, Any]] | None = None,
                       compare_as: Callable[[Any], Any] | None = None) -> BackendChoice:
    """Export, measure each CPU backend and return the fastest one whose outputs stay close to eager.

    Parameters
    ----------
    model : torch.nn.Module
        float32 module; one tensor or named tensors in (see :func:`export_onnx`).
    example_batch : Tensor[N, ...] or mapping of name -> Tensor[N, ...]
        Representative inputs; accuracy is checked on all N, latency on tiles of it.
    candidates : sequence of str
        Backend names from :data:`CPU_CANDIDATES`, :data:`OPTIONAL_CPU_CANDIDATES` and
        :data:`QUANTIZED_CPU_CANDIDATES`;
        :func:`available_cpu_candidates` gives every one this machine can build. One that cannot be
        built (not installed, compile over ``compile_timeout_s``) is recorded as failed.
    max_abs_error, batch_sizes, repeats, compare_as
        As in :func:`compare_backends`.
    workdir : Path, optional
        Where exported graphs are written (a temporary directory by default; keep it if the
        chosen backend is ONNX, since ONNX Runtime has already loaded the graph into memory).
    export_options : mapping, optional
        Keyword arguments for :func:`export_onnx` (``output_names``, ``dynamic_axes``).
    compile_timeout_s : float
        Cap on ``torch-compile``'s compile time (never counted in its latency).
    backend_options : mapping, optional
        Keyword arguments per backend name (see :func:`build_cpu_backend`).

    Returns
    -------
    BackendChoice
        The chosen backend (eager when nothing beats it accurately) and all measurements.
    """
    eager = TorchBackend(model)
    built: dict[str, Backend] = {}
    failed: list[BackendMeasurement] = []
    build_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tessera-backend-") as scratch:
        folder = workdir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name in candidates:
            started = time.perf_counter()
            try:
                built[name] = eager if name == "eager" else build_cpu_backend(
                    name, model, example_batch, folder, export_options=export_options,
                    compile_timeout_s=compile_timeout_s, backend_options=backend_options)
            except Exception as exc:  # a candidate that cannot be built is recorded, not fatal
                failed.append(BackendMeasurement(name, accurate=False, error=repr(exc)))
            build_ms[name] = round((time.perf_counter() - started) * 1000.0, 1)
        choice = compare_backends(eager, built, example_batch, max_abs_error, batch_sizes=batch_sizes,
                                  repeats=repeats, failed=failed, compare_as=compare_as)
    for measurement in choice.measurements:
        measurement.build_ms = build_ms.get(measurement.name)
    return choice


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
