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
from model_runtime.device import Placement, inference_context, resolve_placement
from model_runtime.runtime import LoadContext, ModelRuntime, ModelSpec, get_runtime
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
    "BatchOutputMismatch",
    "BatchPolicy",
    "DynamicBatcher",
    "LoadContext",
    "ModelRuntime",
    "ModelSpec",
    "OnnxRuntimeBackend",
    "Placement",
    "Session",
    "SessionClosed",
    "StreamAlreadyOpen",
    "StreamingModel",
    "StreamingSessions",
    "TorchBackend",
    "choose_cpu_backend",
    "export_onnx",
    "get_runtime",
    "get_streaming_sessions",
    "inference_context",
    "load_manifest",
    "resolve_placement",
    "save_artifact",
]
