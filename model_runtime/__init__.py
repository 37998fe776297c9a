"""Tessera's in-process model runtime: registry, dynamic batching, streaming sessions, devices, backends, artifacts.

Typical use from a vertical::

    from model_runtime import ModelSpec, get_runtime

    runtime = get_runtime()
    await runtime.load(ModelSpec(name="fraud", version="v3", loader=..., run_batch=..., prepare=...))
    answer = await runtime.predict("fraud", item)
"""

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
from model_runtime.runtime import LoadContext, ModelRuntime, ModelSpec, get_runtime
from model_runtime.sliding_window import (
    ProgressCallback,
    SlidingWindowConfig,
    SlidingWindowInferer,
    StudyInference,
    run_patch_batch,
)
from model_runtime.streaming import (
    Session,
    SessionClosed,
    StreamAlreadyOpen,
    StreamingModel,
    StreamingSessions,
    get_streaming_sessions,
)

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
    "run_collated",
    "save_artifact",
    "split_outputs",
]
