"""Tessera's in-process model runtime: registry, dynamic batching, streaming sessions, devices, backends, artifacts.

Typical use from a vertical::

    from model_runtime import ModelSpec, get_runtime

    runtime = get_runtime()
    await runtime.load(ModelSpec(name="fraud", version="v3", loader=..., run_batch=..., prepare=...))
    answer = await runtime.predict("fraud", item)

Importing the package does not import torch: the sliding-window names (:mod:`model_runtime.sliding_window`,
torch throughout) are imported on first use, and the rest imports torch only where a torch model
needs it, so a process serving only ONNX Runtime models (``tessera edge``) never loads it.
"""

from typing import TYPE_CHECKING

from model_runtime.artifacts import ArtifactError, ArtifactManifest, load_manifest, save_artifact
from model_runtime.backends import (
    BackendChoice,
    BackendMeasurement,
    OnnxRuntimeBackend,
    TorchBackend,
    choose_cpu_backend,
    export_onnx,
)
from model_runtime.batcher import BatchOutputMismatch, BatchPolicy, DynamicBatcher
from model_runtime.collate import Collated, collate, length_bucket, pad_stack, run_collated, split_outputs
from model_runtime.device import Placement, inference_context, resolve_device, resolve_placement
from model_runtime.errors import BadInput, ModelNotReady, ModelRuntimeError, RuntimeOverloaded, RuntimeTimeout
from model_runtime.lazy_torch import imported_on_use
from model_runtime.runtime import LoadContext, ModelRuntime, ModelSpec, get_runtime
from model_runtime.streaming import (
    Session,
    SessionClosed,
    StreamAlreadyOpen,
    StreamingModel,
    StreamingSessions,
    get_streaming_sessions,
)

if TYPE_CHECKING:
    from model_runtime.sliding_window import (
        ProgressCallback,
        SlidingWindowConfig,
        SlidingWindowInferer,
        StudyInference,
        run_patch_batch,
        run_patch_batch_on_device,
    )

__getattr__ = imported_on_use(__name__, {name: "model_runtime.sliding_window" for name in (
    "ProgressCallback", "SlidingWindowConfig", "SlidingWindowInferer", "StudyInference", "run_patch_batch",
    "run_patch_batch_on_device")})
"""The sliding-window names, imported (with torch) the first time one is asked for."""

__all__ = [
    "ArtifactError",
    "ArtifactManifest",
    "BackendChoice",
    "BackendMeasurement",
    "BadInput",
    "BatchOutputMismatch",
    "BatchPolicy",
    "Collated",
    "DynamicBatcher",
    "LoadContext",
    "ModelNotReady",
    "ModelRuntime",
    "ModelRuntimeError",
    "ModelSpec",
    "OnnxRuntimeBackend",
    "Placement",
    "ProgressCallback",
    "RuntimeOverloaded",
    "RuntimeTimeout",
    "Session",
    "SlidingWindowConfig",
    "SlidingWindowInferer",
    "SessionClosed",
    "StreamAlreadyOpen",
    "StreamingModel",
    "StreamingSessions",
    "StudyInference",
    "TorchBackend",
    "choose_cpu_backend",
    "collate",
    "export_onnx",
    "get_runtime",
    "get_streaming_sessions",
    "inference_context",
    "length_bucket",
    "load_manifest",
    "pad_stack",
    "resolve_device",
    "resolve_placement",
    "run_patch_batch",
    "run_patch_batch_on_device",
    "run_collated",
    "save_artifact",
    "split_outputs",
]
