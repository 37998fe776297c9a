"""The process-wide model runtime: a registry of loaded models, each behind its own dynamic batcher.

A vertical describes a model with a :class:`ModelSpec` and loads it once (FastAPI lifespan, Celery
worker start-up)::

    runtime = get_runtime()
    await runtime.load(spec)                      # verify artifact, build, warm up, start batching
    label = await runtime.predict("fraud", txn)   # BadInput / RuntimeOverloaded / RuntimeTimeout
    await runtime.swap("fraud", spec_v2)          # hot swap: v2 warmed first, v1 drains
    rows = runtime.predict_many_sync("fraud", txns)  # Celery / batch jobs, no event loop

Nothing here is bound to an event loop until the first ``load``/``predict`` inside one, so the
runtime can be created at import time, used from a Celery worker, or inside uvicorn. A batcher
belongs to the loop that created it; a later loop (e.g. a second ``asyncio.run``) gets a new one.

What a spec can declare beyond a function over a list of items:

- cost-aware batches: ``cost`` per item, ``max_batch_cost``, shape ``bucket`` (padding and masks:
  :mod:`model_runtime.collate`); an item over the budget fails alone with :class:`BadInput`;
- named inputs and outputs: items as dicts of arrays, ``run_batch`` returning a dict of batched
  outputs (split per item here), or :func:`~model_runtime.collate.run_collated`;
- ``prepare_in``: ``prepare`` in a thread or process pool, off the loop (:mod:`model_runtime.prepare`);
- ``latency_target_ms``: admission by measured capacity (:mod:`model_runtime.admission`).

Errors are the runtime's own (:mod:`model_runtime.errors`); the HTTP edge maps them to 422/503/504.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_runtime.artifacts import ArtifactError, ArtifactManifest, load_manifest
from model_runtime.backends import OnnxRuntimeBackend, TorchBackend
from model_runtime.batcher import (
    AdmissionTicket,
    BatchPolicy,
    BucketOf,
    CostOf,
    DynamicBatcher,
    FillPolicy,
    Outcome,
    execute_batch,
    split_batch,
)
from model_runtime.collate import split_outputs
from model_runtime.device import Placement, configure_threads, inference_context, resolve_placement
from model_runtime.errors import ModelNotReady, ModelRuntimeError, RuntimeOverloaded, RuntimeTimeout
from model_runtime.lazy_torch import is_torch_module, torch_loaded
from model_runtime.memory import MemoryBudget, run_with_oom_split
from model_runtime.metrics import OOM_SPLITS, OUT_OF_MEMORY, ModelMetrics
from model_runtime.prepare import PrepareIn, PreparePools, check_process_safe, checked_prepare, resolve_prepare_in
from model_runtime.process_model import ModelProcess
from shared.errors import ProblemError

logger = logging.getLogger("tessera.model_runtime")

_request_ticket: contextvars.ContextVar[AdmissionTicket | None] = contextvars.ContextVar(
    "tessera_request_admission", default=None)
"""The admission the HTTP edge took for the request being served (:meth:`ModelRuntime.admit_request`)."""


def _claim_request_ticket(batcher: DynamicBatcher) -> AdmissionTicket | None:
    """The request's edge admission for ``batcher``, taken (a second predict in the request asks anew)."""
    ticket = _request_ticket.get()
    if ticket is None or ticket.batcher is not batcher or not ticket.held:
        return None
    _request_ticket.set(None)
    return ticket


@dataclass(frozen=True)
class LoadContext:
    """What a loader gets to build its model.

    Attributes
    ----------
    artifact_dir : Path or None
        The verified artifact directory (``None`` for models built in code, e.g. in tests).
    manifest : ArtifactManifest or None
        Its manifest, already checked against the sha256 digests.
    placement : Placement
        Device and precision to build on.
    """

    artifact_dir: Path | None
    manifest: ArtifactManifest | None
    placement: Placement


@dataclass(frozen=True)
class ModelSpec:
    """Everything the runtime needs to serve one version of one model.

    Parameters
    ----------
    name, version : str
        Registry key and version label. An empty version takes the artifact manifest's.
    loader : callable
        ``(LoadContext) -> model``: builds the model object (torch module, backend, anything).
    run_batch : callable
        ``(model, prepared_items: list) -> list`` of outputs, same length and order, or a dict of
        named batched outputs ``{name: array (N, ...)}``, split back into one ``{name: row}`` per
        item. Runs in the model's worker thread under ``torch.inference_mode`` (and autocast on
        CUDA). Items may be dicts of named arrays: :func:`~model_runtime.collate.collate` pads and
        masks them.
    prepare : callable, optional
        ``(item) -> prepared``: validates/decodes ONE item before it is queued, in a worker pool
        (``prepare_in``); any exception fails that caller alone with :class:`BadInput` (422 at the edge).
    prepare_in : {"auto", "thread", "process", "loop"}
        Where ``prepare`` runs (:mod:`model_runtime.prepare`); ``auto``: the thread pool, or the
        loop itself for a ``run_inline`` model (microsecond checks, where a hand-off costs more).
    finalize : callable, optional
        ``(output) -> answer`` per item, in the worker thread (e.g. tensor row -> dict).
    artifact_dir : Path, optional
        Versioned artifact directory; verified with :func:`load_manifest` before ``loader`` runs.
    max_batch_size, max_wait_ms, max_queue, max_queue_delay_ms, timeout_s, isolate_failures, fill, run_inline
        Batching policy, see :class:`~model_runtime.batcher.BatchPolicy`.
    inline_below_ms
        Run a batch on the event loop when its fitted time is under this (ms), saving the hand-off
        to the worker thread (see :class:`~model_runtime.batcher.BatchPolicy`).
    latency_target_ms
        Admission by measured capacity (:mod:`model_runtime.admission`): past saturation, refuse
        at once what would be answered later than this, instead of queueing it (when two full
        batches take longer than this, what may wait is the batch that, run twice, fits in it, but
        never a batch too small to keep the model's throughput).
    cost, max_batch_cost, bucket
        Cost-aware batching: ``cost(prepared) -> float`` per item (tokens, samples, voxels), the
        batch budget, and an optional shape bucket per item (see :mod:`model_runtime.collate`).
    warmup_items : sequence
        Raw example items run (batch 1, then all together) before the model takes traffic.
    device : {"auto", "cpu", "cuda", "cuda:<n>"}, optional
        Overrides ``settings.device`` for this model.
    precision : {"fp32", "fp16", "bf16"}, optional
        fp32 (default) runs without autocast; fp16/bf16 under autocast (:mod:`model_runtime.device`).
    memory_budget : MemoryBudget, optional
        Batches over it, or that run out of device memory, run in halves (:mod:`model_runtime.memory`).
    uses_torch : bool
        Run batches under ``torch.inference_mode`` (and autocast); ``False`` for models that never
        touch torch (ONNX Runtime, LightGBM), which then skip entering torch's modes every batch;
        with ``device="cpu"`` such a model loads and serves without importing torch.
    run_in_process : bool
        Serve the model from a child process of its own (:mod:`model_runtime.process_model`):
        batches go to it over a pipe from the event loop, which keeps serving meanwhile, and the
        model's CPU lands on another core. Applies to models loaded with :meth:`ModelRuntime.load`
        (a server's loop); :meth:`ModelRuntime.load_sync` (workers, scripts) serves in-process.
        ``loader``, ``run_batch`` and ``finalize`` must be module-level functions, items and
        outputs picklable.
    release : callable, optional
        ``release(model)`` frees what the loaded model holds outside this process's memory (worker
        processes, open files) once it stops serving: unloaded, replaced by a new version (after
        the old one drained) or the runtime closed.
    """

    name: str
    version: str
    loader: Callable[[LoadContext], Any]
    run_batch: Callable[[Any, list[Any]], Sequence[Any] | Mapping[str, Any]]
    prepare: Callable[[Any], Any] | None = None
    finalize: Callable[[Any], Any] | None = None
    artifact_dir: Path | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_queue_delay_ms: float | None = None
    timeout_s: float | None = None
    isolate_failures: bool = True
    fill: FillPolicy = "greedy"
    run_inline: bool = False
    inline_below_ms: float | None = None
    uses_torch: bool = True
    warmup_items: Sequence[Any] = ()
    device: str | None = None
    precision: str | None = None
    memory_budget: MemoryBudget | None = None
    cost: CostOf | None = None
    max_batch_cost: float | None = None
    bucket: BucketOf | None = None
    prepare_in: PrepareIn = "auto"
    latency_target_ms: float | None = None
    run_in_process: bool = False
    release: Callable[[Any], None] | None = None

    def prepare_where(self, measured_s: float | None = None) -> PrepareIn:
        """Where ``prepare`` runs: ``prepare_in``, with ``auto`` resolved from ``measured_s`` (the
        prepare's seconds per item at warm-up; see :mod:`model_runtime.prepare`)."""
        return resolve_prepare_in(self.prepare_in, has_prepare=self.prepare is not None, run_inline=self.run_inline,
                                  measured_s=measured_s)

    @property
    def policy(self) -> BatchPolicy:
        """The batching policy of this spec."""
        return BatchPolicy(max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms,
                           max_queue=self.max_queue, max_queue_delay_ms=self.max_queue_delay_ms,
                           timeout_s=self.timeout_s,
                           isolate_failures=self.isolate_failures, fill=self.fill, run_inline=self.run_inline,
                           cost=self.cost, max_batch_cost=self.max_batch_cost, bucket=self.bucket,
                           latency_target_ms=self.latency_target_ms, inline_below_ms=self.inline_below_ms)


@dataclass(frozen=True, slots=True)
class _Ready:
    """One prepared item of a synchronous call, with its place in the answer."""

    index: int
    prepared: Any
    cost: float
    bucket: Hashable

    def cost_of(self) -> float:
        return self.cost

    def bucket_of(self) -> Hashable:
        return self.bucket


@dataclass
class _LoadedModel:
    spec: ModelSpec
    model: Any
    version: str
    digest: str | None
    placement: Placement
    backend: str
    run: Callable[[list[Any]], Sequence[Any]]
    per_item_s: float | None
    prepare_where: PrepareIn = "thread"
    process: ModelProcess | None = None
    """The child process serving the model (``run_in_process``), else None."""
    loaded_at: float = field(default_factory=time.time)
    batcher: DynamicBatcher | None = None

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest, "device": self.placement.describe(),
                "backend": self.backend}


def describe_backend(model: Any) -> str:
    """Label of what runs a model: a backend's name, ``eager`` for a torch module, else its type."""
    explicit = getattr(model, "backend_name", None)
    if isinstance(explicit, str):
        return explicit
    if isinstance(model, TorchBackend | OnnxRuntimeBackend):
        return model.name
    if is_torch_module(model):
        return "eager"
    return type(model).__name__


class ModelRuntime:
    """Every loaded model of this process; use :func:`get_runtime` rather than constructing one."""

    def __init__(self, *, prepare_threads: int | None = None, prepare_processes: int | None = None) -> None:
        self._models: dict[str, _LoadedModel] = {}
        self._metrics: dict[str, ModelMetrics] = {}
        self._lock = threading.Lock()
        self._prepare_pools = PreparePools(prepare_threads, prepare_processes)

    # -- loading ---------------------------------------------------------------------------------
    async def load(self, spec: ModelSpec) -> dict[str, Any]:
        """Verify, build and warm up ``spec`` off the event loop, then start serving it.

        Loading a name that is already served is a :meth:`swap`.

        Returns
        -------
        dict
            ``{"version", "digest", "device", "backend"}`` of the model now served.

        Raises
        ------
        ArtifactError
            The artifact is missing or its files do not match the manifest's sha256.
        """
        if spec.name in self._models:
            return await self.swap(spec.name, spec)
        return await self._install(await asyncio.to_thread(self._build, spec, from_loop=True))

    def load_sync(self, spec: ModelSpec) -> dict[str, Any]:
        """Blocking :meth:`load` for processes without an event loop (Celery workers, batch jobs)."""
        loaded = self._build(spec)
        with self._lock:
            previous = self._models.get(spec.name)
            self._models[spec.name] = loaded
        if previous is not None and previous.batcher is not None:
            previous.batcher.abandon()
        return loaded.describe()

    async def swap(self, name: str, new_spec: ModelSpec) -> dict[str, Any]:
        """Serve ``new_spec`` instead of the current version without dropping a request.

        The new version is built and warmed up first; then new requests go to it while the old
        version's batcher finishes everything already queued, and its thread stops.
        """
        if new_spec.name != name:
            raise ValueError(f"swap({name!r}) was given a spec named {new_spec.name!r}")
        return await self._install(await asyncio.to_thread(self._build, new_spec, from_loop=True))

    async def _install(self, fresh: _LoadedModel) -> dict[str, Any]:
        """Route new requests to ``fresh``, then let whatever it replaces drain."""
        name = fresh.spec.name
        previous = self._models.get(name)
        self._models[name] = fresh
        self._batcher_for(fresh)
        if previous is not None:
            logger.info("model %s: now serving %s (was %s)", name, fresh.version, previous.version)
            if previous.batcher is not None:
                await self._retire(previous.batcher, drain=True)
            _release(previous)
        return fresh.describe()

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; its waiting callers get :class:`ModelNotReady`."""
        loaded = self._models.pop(name, None)
        if loaded is not None and loaded.batcher is not None:
            await self._retire(loaded.batcher, drain=False)
        if loaded is not None:
            _release(loaded)

    def unload_sync(self, name: str) -> None:
        """Blocking :meth:`unload` for processes without an event loop (Celery workers)."""
        with self._lock:
            loaded = self._models.pop(name, None)
        if loaded is not None and loaded.batcher is not None:
            loaded.batcher.abandon()
        if loaded is not None:
            _release(loaded)

    def _build(self, spec: ModelSpec, *, from_loop: bool = False) -> _LoadedModel:
        if spec.prepare_where() == "process":
            check_process_safe(spec.name, spec.prepare)
        manifest = load_manifest(spec.artifact_dir) if spec.artifact_dir is not None else None
        version = _resolve_version(spec, manifest)
        placement = resolve_placement(spec.device, spec.precision)
        context = LoadContext(spec.artifact_dir, manifest, placement)
        process: ModelProcess | None = None
        if spec.run_in_process and from_loop:
            model = process = ModelProcess(dataclasses.replace(spec, version=version), context)
            run: Callable[[list[Any]], Sequence[Any]] = process.run_batch
        else:
            if _sets_torch_threads(spec):
                configure_threads()
            model = spec.loader(context)
            run = _bind_run(spec, model, placement)
        started = time.perf_counter()
        # A child process finalizes its outputs itself: the parent must not finalize them again.
        per_item_s, prepare_s = _warm_up(spec, run, finalize=None if process is not None else spec.finalize)
        prepare_where = spec.prepare_where(prepare_s)
        logger.info("model %s %s loaded on %s (warm-up %.1f ms; prepare on the %s)", spec.name, version,
                    placement.describe(), (time.perf_counter() - started) * 1000, prepare_where)
        return _LoadedModel(spec=spec, model=model, version=version,
                            digest=manifest.digest if manifest else None, placement=placement,
                            backend=describe_backend(model), run=run, per_item_s=per_item_s,
                            prepare_where=prepare_where, process=process)

    # -- serving ---------------------------------------------------------------------------------
    async def predict(self, name: str, item: Any, *, timeout_s: float | None = None) -> Any:
        """Answer one item through the model's batcher.

        Parameters
        ----------
        name : str
            A loaded model.
        item : Any
            One raw input; the spec's ``prepare`` validates it before it is queued.
        timeout_s : float, optional
            Deadline from now (s); defaults to the spec's ``timeout_s``.

        Raises
        ------
        ModelNotReady
            ``name`` is not loaded (503 at the HTTP edge).
        BadInput
            ``prepare`` refused the item (422).
        RuntimeOverloaded
            The model cannot take it in time (503 + Retry-After).
        RuntimeTimeout
            No answer within the deadline (504).
        """
        arrived = time.monotonic()
        loaded = self._serving(name)
        batcher = self._batcher_for(loaded)
        ticket = _claim_request_ticket(batcher)  # admitted at the HTTP edge (admit_request), or now:
        if ticket is None:
            ticket = batcher.admit()  # before any work, so a refusal costs almost nothing
        try:
            spec = loaded.spec
            where = loaded.prepare_where
            if where == "loop":
                return await batcher.submit(_prepare(spec, item), timeout_s, ticket=ticket)
            prepared = await self._prepare_pools.run(where, spec.name, spec.prepare, item)
            timeout_s = spec.timeout_s if timeout_s is None else timeout_s
            remaining_s = None if timeout_s is None else timeout_s - (time.monotonic() - arrived)
            if remaining_s is not None and remaining_s <= 0:
                raise RuntimeTimeout(f"model {name}: prepare took the whole {timeout_s:.3f} s deadline")
            serving = self._batcher_for(self._serving(name))  # swapped meanwhile: admitted there anew
            return await serving.submit(prepared, remaining_s, ticket=ticket)
        finally:
            ticket.release()  # queued (released then), or failed before it

    def admit_request(self, name: str) -> AdmissionTicket | RuntimeOverloaded | ModelNotReady:
        """Admit one item of ``name`` for the request being served, before its body is read.

        For a gate in front of the HTTP stack (:class:`shared.shedding.SheddingGate`): the answer is
        the error :meth:`predict` would raise (refused requests skip the framework's cost), or a
        ticket that the same request's :meth:`predict` then uses instead of asking again, so the
        requests between the gate and the queue count as admitted work. The gate releases the
        ticket when the request ends, whether or not it reached :meth:`predict`.
        """
        loaded = self._models.get(name)
        if loaded is None:
            return ModelNotReady(f"model {name} is not loaded")
        try:
            ticket = self._batcher_for(loaded).admit()
        except (RuntimeOverloaded, ModelNotReady) as refused:
            # Answered as a value: without its traceback, whose frames (through f_back, up to the
            # gate's frame that holds the answer) would make each refusal a reference cycle, left
            # for the garbage collector (~20 objects a refusal: collections of tens of ms under overload).
            return refused.with_traceback(None)
        _request_ticket.set(ticket)
        return ticket

    def refusal(self, name: str) -> RuntimeOverloaded | ModelNotReady | None:
        """What :meth:`predict` would refuse an item of ``name`` with now (``None``: it would be taken).

        Only asks: nothing is counted. For a gate in front of the HTTP stack
        (:class:`shared.shedding.SheddingGate`), so refused requests skip the framework's cost.
        """
        loaded = self._models.get(name)
        if loaded is None:
            return ModelNotReady(f"model {name} is not loaded")
        return self._batcher_for(loaded).refusal(record=False)

    def _serving(self, name: str) -> _LoadedModel:
        loaded = self._models.get(name)
        if loaded is None:
            raise ModelNotReady(f"model {name} is not loaded")
        return loaded

    def predict_many_sync(self, name: str, items: Sequence[Any], *,
                          return_exceptions: bool = False) -> list[Any]:
        """Run ``items`` in batches of ``max_batch_size`` in the calling thread, no event loop needed.

        Parameters
        ----------
        name : str
            A loaded model.
        items : sequence
            Raw inputs, length N.
        return_exceptions : bool
            Put each failed item's exception in its slot instead of raising the first one.

        Returns
        -------
        list
            N answers, in input order.
        """
        loaded = self._serving(name)
        outcomes: list[Outcome | None] = [None] * len(items)
        ready: list[_Ready] = []
        policy = loaded.spec.policy
        for index, item in enumerate(items):
            try:
                prepared = _prepare(loaded.spec, item)
                ready.append(_Ready(index, prepared, policy.cost_of(prepared), policy.bucket_of(prepared)))
            except (ProblemError, ModelRuntimeError) as exc:
                outcomes[index] = Outcome(False, error=exc)
        self._run_sync_batches(loaded, ready, outcomes)
        return _unwrap(outcomes, return_exceptions)

    def _run_sync_batches(self, loaded: _LoadedModel, ready: list[_Ready],
                          outcomes: list[Outcome | None]) -> None:
        metrics = self._metrics_for(loaded.spec.name)
        waiting: Iterable[_Ready] = ready
        while waiting:
            chunk, waiting = split_batch(waiting, loaded.spec.policy, _Ready.cost_of, _Ready.bucket_of)
            started = time.monotonic()
            results = execute_batch(loaded.run, [entry.prepared for entry in chunk],
                                    finalize=loaded.spec.finalize,
                                    isolate_failures=loaded.spec.isolate_failures)
            metrics.inference.observe(time.monotonic() - started)
            metrics.batch_size.observe(len(chunk))
            for entry, outcome in zip(chunk, results, strict=True):
                outcomes[entry.index] = outcome
                if not outcome.ok:
                    metrics.errors.inc()

    def _batcher_for(self, loaded: _LoadedModel) -> DynamicBatcher:
        loop = asyncio.get_running_loop()
        current = loaded.batcher
        if current is not None and current.loop is loop:
            return current
        if current is not None:
            if not current.loop.is_closed():
                logger.warning("model %s: batcher of a still-open event loop replaced", loaded.spec.name)
            current.abandon()
        batcher = DynamicBatcher(loaded.spec.name, loaded.run, loaded.spec.policy,
                                 self._metrics_for(loaded.spec.name), finalize=loaded.spec.finalize,
                                 thread_initializer=configure_threads if _sets_torch_threads(loaded.spec) else None,
                                 per_item_s=loaded.per_item_s,
                                 run_async=loaded.process.run_async if loaded.process is not None else None)
        batcher.start()
        loaded.batcher = batcher
        return batcher

    def _metrics_for(self, name: str) -> ModelMetrics:
        with self._lock:
            if name not in self._metrics:
                self._metrics[name] = ModelMetrics(name)
            return self._metrics[name]

    # -- introspection ---------------------------------------------------------------------------
    def loaded(self) -> dict[str, dict[str, Any]]:
        """``{name: {"version", "digest", "device", "backend"}}`` of every served model."""
        return {name: loaded.describe() for name, loaded in self._models.items()}

    def version(self, name: str) -> str:
        """The served version of model ``name`` (KeyError when not loaded); cheap enough per request."""
        return self._models[name].version

    def placement(self, name: str) -> Placement:
        """Where the served version of model ``name`` runs: device and precision (KeyError when not loaded)."""
        return self._models[name].placement

    def is_ready(self, names: Iterable[str]) -> bool:
        """True when every model in ``names`` is loaded (for ``/readyz``)."""
        return all(name in self._models for name in names)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: version, p50/p99 end-to-end latency (ms) over recent items, queue depth."""
        report: dict[str, dict[str, Any]] = {}
        for name, loaded in self._models.items():
            metrics = self._metrics_for(name)
            p50, p99 = metrics.latency.percentiles(0.5, 0.99)
            batcher = loaded.batcher
            report[name] = {
                "version": loaded.version, "p50_ms": p50, "p99_ms": p99, "samples": len(metrics.latency),
                "queue_depth": batcher.depth if batcher else 0,
                "per_item_ms": (batcher.per_item_seconds if batcher else loaded.per_item_s or 0.0) * 1000,
                "admission": batcher.admission_state() if batcher else None,
            }
        return report

    # -- shutdown --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop every batcher: waiting callers get :class:`ModelNotReady`, worker threads are joined."""
        models, self._models = self._models, {}
        for loaded in models.values():
            if loaded.batcher is not None:
                await self._retire(loaded.batcher, drain=False)
            _release(loaded)
        await asyncio.to_thread(self._prepare_pools.shutdown)

    def close_sync(self) -> None:
        """Blocking :meth:`close` for processes without a running event loop."""
        models, self._models = self._models, {}
        for loaded in models.values():
            if loaded.batcher is not None:
                loaded.batcher.abandon()
            _release(loaded)
        self._prepare_pools.shutdown()

    @staticmethod
    async def _retire(batcher: DynamicBatcher, *, drain: bool) -> None:
        if batcher.loop is not asyncio.get_running_loop():
            batcher.abandon()
        elif drain:
            await batcher.drain()
        else:
            await batcher.close()


def _release(loaded: _LoadedModel) -> None:
    """Stop a model's child process, or run its spec's ``release``; a failure is logged, not raised."""
    if loaded.process is not None:
        loaded.process.close()
        return
    if loaded.spec.release is None:
        return
    try:
        loaded.spec.release(loaded.model)
    except Exception:
        logger.exception("model %s %s: release failed", loaded.spec.name, loaded.version)


def _sets_torch_threads(spec: ModelSpec) -> bool:
    """Whether loading or serving ``spec`` sets torch's thread count: a model that uses torch, or any
    model once torch is imported (a non-torch model in a process without torch leaves it unimported)."""
    return spec.uses_torch or torch_loaded()


def _resolve_version(spec: ModelSpec, manifest: ArtifactManifest | None) -> str:
    if manifest is None or manifest.version == "local":
        return spec.version or (manifest.version if manifest else "unversioned")
    if spec.version and spec.version != manifest.version:
        raise ArtifactError(f"{spec.name}: spec version {spec.version} but artifact holds {manifest.version}")
    return manifest.version


def _prepare(spec: ModelSpec, item: Any) -> Any:
    return checked_prepare(spec.name, spec.prepare, item)


def _bind_run(spec: ModelSpec, model: Any, placement: Placement) -> Callable[[list[Any]], Sequence[Any]]:
    """The batch function the batcher calls: ``run_batch`` under torch's modes, named outputs split per item."""

    def run(items: list[Any]) -> Sequence[Any]:
        if spec.uses_torch:
            with inference_context(placement):
                outputs = spec.run_batch(model, items)
        else:
            outputs = spec.run_batch(model, items)
        return split_outputs(outputs, len(items)) if isinstance(outputs, Mapping) else outputs

    if spec.memory_budget is None and placement.device_type != "cuda":
        return run  # CPU without a budget: nothing to split (fraud's hot path unchanged)
    budget, on_split, on_oom = spec.memory_budget, OOM_SPLITS.labels(spec.name).inc, OUT_OF_MEMORY.labels(spec.name).inc
    return lambda items: run_with_oom_split(run, items, budget=budget, on_split=on_split, on_out_of_memory=on_oom)


def _timed_prepare(spec: ModelSpec, item: Any, repeat_below_s: float = 1e-3) -> tuple[Any, float]:
    """Prepare ``item`` and return it with the seconds that took.

    A prepare under ``repeat_below_s`` runs twice more and the fastest run counts: on a busy host
    one preempted call must not make a shape check look like decoding (costly prepares run once).
    """
    started = time.perf_counter()
    prepared = _prepare(spec, item)
    seconds = time.perf_counter() - started
    if seconds < repeat_below_s:
        for _ in range(2):
            started = time.perf_counter()
            _prepare(spec, item)
            seconds = min(seconds, time.perf_counter() - started)
    return prepared, seconds


def _warm_up(spec: ModelSpec, run: Callable[[list[Any]], Sequence[Any]], *,
             finalize: Callable[[Any], Any] | None) -> tuple[float | None, float | None]:
    """Run the warm-up items (batch 1, then all), ``finalize`` applied to each output.

    Returns seconds per item of the larger batch, and the median seconds ``prepare`` took per item
    (see :func:`_timed_prepare`; ``None`` without warm-up items, or without ``prepare``).
    """
    if not spec.warmup_items:
        return None, None
    prepared, prepare_seconds = [], []
    for item in spec.warmup_items:
        item_prepared, item_seconds = _timed_prepare(spec, item)
        prepared.append(item_prepared)
        prepare_seconds.append(item_seconds)
    prepare_s = statistics.median(prepare_seconds) if spec.prepare is not None else None
    per_item_s = None
    for batch in ([prepared[0]], prepared) if len(prepared) > 1 else ([prepared[0]],):
        started = time.perf_counter()
        outcomes = execute_batch(run, batch, finalize=finalize, isolate_failures=False)
        per_item_s = (time.perf_counter() - started) / len(batch)
        failed = next((outcome.error for outcome in outcomes if not outcome.ok), None)
        if failed is not None:
            raise RuntimeError(f"model {spec.name} {spec.version}: warm-up failed: {failed!r}") from failed
    return per_item_s, prepare_s


def _unwrap(outcomes: list[Outcome | None], return_exceptions: bool) -> list[Any]:
    answers: list[Any] = []
    for outcome in outcomes:
        assert outcome is not None
        if outcome.ok:
            answers.append(outcome.value)
        elif return_exceptions:
            answers.append(outcome.error)
        else:
            raise outcome.error or RuntimeError("inference failed")
    return answers


_RUNTIME: ModelRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def get_runtime() -> ModelRuntime:
    """The process-wide :class:`ModelRuntime` (created on first use; binds to no event loop)."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = ModelRuntime()
        return _RUNTIME
