"""Streaming sessions: stateful per-stream steps (a call's VAD or encoder state) batched across streams.

A streaming model is a pure step function over a batch of streams::

    outputs, new_states = step(model, states, chunks)

``states`` maps each state name to the stacked states of the B streams in the batch (batch axis 0
unless ``state_axes`` says otherwise, e.g. 1 for silero-vad's ``(2, B, 128)``), ``chunks`` is the
stacked new input of each stream (a tensor or a mapping of named tensors, batch axis 0). The step
returns B outputs and the B new states in the same layout. Because a step never mutates a stored
state (it gets stacked copies, and a stream keeps the new state only once its step succeeded), a
failed batch can be rerun stream by stream and a failed step leaves its stream where it was.

Use from a vertical (one event loop)::

    sessions = get_streaming_sessions()
    await sessions.load(StreamingModel(name="vad", version="v5", loader=..., step=...,
                                       initial_state=...))
    with sessions.open_session("vad", call_sid) as session:
        speech_probability = await session.step(frame)

Steps of one session run one at a time in the order :meth:`Session.step` was called (even when the
caller does not await one before sending the next); steps of different sessions go through the
model's ordinary :class:`~model_runtime.batcher.DynamicBatcher` (bounded queue, deadlines, bad
item failing alone), so concurrent streams share batches. A session idle for ``idle_timeout_s``
with no step pending is closed and its state freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from model_runtime.batcher import FillPolicy
from model_runtime.errors import ModelNotReady, ModelRuntimeError, RuntimeOverloaded
from model_runtime.runtime import LoadContext, ModelRuntime, ModelSpec, get_runtime
from shared.errors import Conflict, ProblemError, register_problem_mapping

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("tessera.model_runtime.streaming")

Array: TypeAlias = "torch.Tensor | np.ndarray"
"""One tensor of a state or chunk: torch (any device) or NumPy (ONNX Runtime models)."""
StreamState: TypeAlias = Mapping[str, Array]
"""One stream's state: named tensors without the batch axis."""
StepFunction: TypeAlias = Callable[[Any, dict[str, Array], Any], tuple[Any, Mapping[str, Array]]]

SESSIONS_OPEN = Gauge("tessera_stream_sessions_open", "Streaming sessions open", ["model"])
STEPS = Counter("tessera_stream_steps_total", "Streaming steps answered", ["model"])
STEP_ERRORS = Counter("tessera_stream_step_errors_total", "Streaming steps that failed", ["model"])
REAPED = Counter("tessera_stream_sessions_reaped_total", "Sessions closed for being idle", ["model"])
BATCH_STREAMS = Histogram("tessera_stream_batch_streams", "Streams stepped together in one batch",
                          ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class StreamingError(ModelRuntimeError):
    """Base class of the streaming session errors (409 ``conflict`` at an HTTP edge)."""


class SessionClosed(StreamingError):
    """The session was closed (by its owner, by idle reaping or by unloading) before the step ran."""


class StreamAlreadyOpen(StreamingError):
    """A session for this model and stream id is already open."""


def _problem_for(error: StreamingError) -> ProblemError:
    return Conflict(str(error))


register_problem_mapping(StreamingError, _problem_for)


class StreamingMetrics:
    """The labelled streaming series of one model, resolved once."""

    def __init__(self, model: str) -> None:
        self.sessions_open = SESSIONS_OPEN.labels(model)
        self.steps = STEPS.labels(model)
        self.step_errors = STEP_ERRORS.labels(model)
        self.reaped = REAPED.labels(model)
        self.batch_streams = BATCH_STREAMS.labels(model)


@dataclass(frozen=True)
class StreamingModel:
    """A model served as streaming sessions: a batched step over (state, chunk) pairs.

    Parameters
    ----------
    name, version : str
        Registry key and version label, as in :class:`~model_runtime.runtime.ModelSpec`.
    loader : callable
        ``(LoadContext) -> model``.
    step : callable
        ``(model, states, chunks) -> (outputs, new_states)`` for B streams. ``states``: ``{name:
        stacked tensor}`` (batch axis per ``state_axes``); ``chunks``: stacked chunks (batch axis 0;
        a mapping of named tensors is stacked per name). ``outputs``: a tensor or mapping of tensors
        with batch axis 0, or a list of B per-stream outputs; ``new_states``: same names and layout
        as ``states``. Runs in the model's worker thread (under ``torch.inference_mode`` when
        ``uses_torch``). It must not depend on which streams share the batch.
    initial_state : callable
        ``(model) -> {name: tensor}`` without the batch axis: the state of a stream's first step.
    prepare_chunk : callable, optional
        ``(raw chunk) -> chunk``: validates/decodes one chunk before it is queued; an exception
        fails that step alone (:class:`~model_runtime.errors.BadInput`).
    finalize : callable, optional
        ``(one stream's output) -> answer``, in the worker thread.
    state_axes : mapping, optional
        Batch axis of each stacked state (default 0).
    idle_timeout_s : float
        A session with no step for this long (and none pending) is closed and its state freed.
    max_sessions : int, optional
        Most sessions open at once on this model; beyond it :meth:`StreamingSessions.open_session`
        refuses with :class:`~model_runtime.errors.RuntimeOverloaded` (capacity is in streams).
    warmup_chunks : sequence
        Raw chunks stepped from the initial state before the model takes traffic.
    max_batch_size, max_wait_ms, max_queue, max_queue_delay_ms, timeout_s, fill, run_inline, device, uses_torch
        As in :class:`~model_runtime.runtime.ModelSpec`; ``max_batch_size`` counts streams.
    """

    name: str
    version: str
    loader: Callable[[LoadContext], Any]
    step: StepFunction
    initial_state: Callable[[Any], StreamState]
    prepare_chunk: Callable[[Any], Any] | None = None
    finalize: Callable[[Any], Any] | None = None
    state_axes: Mapping[str, int] = field(default_factory=dict)
    idle_timeout_s: float = 60.0
    max_sessions: int | None = None
    warmup_chunks: Sequence[Any] = ()
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    max_queue_delay_ms: float | None = None
    timeout_s: float | None = None
    fill: FillPolicy = "greedy"
    run_inline: bool = False
    device: str | None = None
    uses_torch: bool = True

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")

    def model_spec(self, metrics: StreamingMetrics | None = None) -> ModelSpec:
        """The runtime spec serving this model: items are :class:`StreamStep`, answers :class:`StepResult`.

        Failure isolation is always on: a step is a pure function of (state, chunk), so a failed
        batch is safely rerun stream by stream and only the failing stream's step fails. Each spec
        is one generation: a state left by another (an earlier version, before a swap) is not fed
        to this one's model; that stream starts again from this model's initial state.
        """
        generation = object()
        return ModelSpec(
            name=self.name, version=self.version, loader=self.loader,
            run_batch=lambda model, steps: run_steps(self, model, steps, metrics, generation=generation),
            prepare=self._prepare_step, finalize=self._finalize_result,
            max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms, max_queue=self.max_queue,
            max_queue_delay_ms=self.max_queue_delay_ms, timeout_s=self.timeout_s, isolate_failures=True,
            fill=self.fill, run_inline=self.run_inline, uses_torch=self.uses_torch, device=self.device,
            warmup_items=[StreamStep(None, chunk) for chunk in self.warmup_chunks],
        )

    def _prepare_step(self, step: StreamStep) -> StreamStep:
        if self.prepare_chunk is None:
            return step
        return dataclasses.replace(step, chunk=self.prepare_chunk(step.chunk))

    def _finalize_result(self, result: StepResult) -> StepResult:
        if self.finalize is None:
            return result
        return dataclasses.replace(result, output=self.finalize(result.output))


@dataclass(frozen=True, slots=True)
class StreamStep:
    """One queued step: the stream's current state (``None`` before its first step), its chunk, and
    the generation (model spec) that produced the state."""

    state: StreamState | None
    chunk: Any
    generation: object | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """One stream's answer to a step and its state after it (owned by this stream alone)."""

    output: Any
    state: StreamState
    generation: object | None = None


def run_steps(streaming: StreamingModel, model: Any, steps: list[StreamStep],
              metrics: StreamingMetrics | None = None, *, generation: object | None = None) -> list[StepResult]:
    """Stack the states and chunks of B streams, run ``streaming.step`` once, split the results.

    Parameters
    ----------
    streaming : StreamingModel
        The model's description (step function, initial state, state axes).
    model : Any
        What ``streaming.loader`` built.
    steps : list of StreamStep
        B prepared steps, at most one per stream.
    metrics : StreamingMetrics, optional
        Records how many streams shared the batch.
    generation : object, optional
        The spec's token: a state left by another generation is replaced by the initial state.

    Returns
    -------
    list of StepResult
        B results aligned with ``steps``; every state tensor is a copy owned by its stream.
    """
    states = [step.state if step.state is not None and step.generation is generation
              else streaming.initial_state(model) for step in steps]
    axes = {name: streaming.state_axes.get(name, 0) for name in states[0]}
    outputs, new_states = streaming.step(model, _stack_states(states, axes),
                                         _stack_chunks([step.chunk for step in steps]))
    if metrics is not None:
        metrics.batch_streams.observe(len(steps))
    per_stream_outputs = _split_outputs(outputs, len(steps))
    per_stream_states = _split_states(new_states, axes, len(steps))
    return [StepResult(output, state, generation)
            for output, state in zip(per_stream_outputs, per_stream_states, strict=True)]


def _stack_states(states: list[StreamState], axes: Mapping[str, int]) -> dict[str, Array]:
    """One tensor per state name, the streams stacked along that name's batch axis."""
    for state in states:
        if state.keys() != axes.keys():
            raise ValueError(f"stream states hold different names: {sorted(axes)} and {sorted(state)}")
    return {name: _stack([state[name] for state in states], axis) for name, axis in axes.items()}


def _split_states(new_states: Mapping[str, Array], axes: Mapping[str, int], count: int) -> list[StreamState]:
    """Each stream's own copy of its new state (read-only mapping)."""
    if new_states.keys() != axes.keys():
        raise ValueError(f"step returned states {sorted(new_states)}, expected {sorted(axes)}")
    per_stream: list[dict[str, Array]] = [{} for _ in range(count)]
    for name, axis in axes.items():
        for index, row in enumerate(_unstack(new_states[name], axis, count)):
            per_stream[index][name] = row
    return [MappingProxyType(state) for state in per_stream]


def _stack(rows: list[Array], axis: int) -> Array:
    if isinstance(rows[0], np.ndarray):
        return np.stack(rows, axis=axis)
    import torch  # rows are tensors: torch is already imported

    return torch.stack(cast(list[torch.Tensor], rows), dim=axis)


def _stack_chunks(chunks: list[Any]) -> Any:
    if isinstance(chunks[0], Mapping):
        return {name: _stack([chunk[name] for chunk in chunks], 0) for name in chunks[0]}
    return _stack(chunks, 0)


def _unstack(batched: Array, axis: int, count: int) -> list[Array]:
    """Rows of ``batched`` along ``axis`` as copies (a view would keep the whole batch alive)."""
    if batched.shape[axis] != count:
        raise ValueError(f"batch axis {axis} holds {batched.shape[axis]} rows for {count} streams")
    if isinstance(batched, np.ndarray):
        return [np.take(batched, index, axis=axis).copy() for index in range(count)]
    return [row.clone() for row in batched.unbind(axis)]


def _split_outputs(outputs: Any, count: int) -> list[Any]:
    if isinstance(outputs, list):
        if len(outputs) != count:
            raise ValueError(f"step returned {len(outputs)} outputs for {count} streams")
        return outputs
    if isinstance(outputs, Mapping):
        columns = {name: _unstack(value, 0, count) for name, value in outputs.items()}
        return [{name: column[index] for name, column in columns.items()} for index in range(count)]
    return _unstack(outputs, 0, count)


class Session:
    """One stream's context on one streaming model; obtained from :meth:`StreamingSessions.open_session`.

    Bound to the event loop that opened it. Usable as a context manager that closes it.
    """

    def __init__(self, owner: StreamingSessions, model: str, stream_id: str) -> None:
        self.model = model
        self.stream_id = stream_id
        self._owner = owner
        self._state: StreamState | None = None
        self._state_generation: object | None = None
        self._last_turn: asyncio.Future[None] | None = None
        self._pending = 0
        self._closed = False
        self.steps_answered = 0
        self.last_active = owner.clock()

    @property
    def state(self) -> StreamState | None:
        """The state after the last answered step (``None`` before the first one and once closed)."""
        return self._state

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (by the owner, idle reaping or unloading)."""
        return self._closed

    @property
    def pending(self) -> int:
        """Steps submitted and not yet answered."""
        return self._pending

    def step(self, chunk: Any, *, timeout_s: float | None = None) -> asyncio.Task[Any]:
        """Submit the next chunk of this stream; await the returned task for its output.

        Steps run in the order of the calls, one at a time, each from the state the previous
        answered step left. A failed step (bad chunk, model error, overload, deadline) leaves the
        state unchanged and the following steps run from it.

        Parameters
        ----------
        chunk : Any
            The stream's next input, before ``prepare_chunk``.
        timeout_s : float, optional
            Deadline (s) once the step is queued in the model's batcher (after earlier steps of
            this stream); defaults to the model's ``timeout_s``.

        Raises
        ------
        SessionClosed
            At once when the session is closed; from the task when it closes before the answer.
        """
        if self._closed:
            raise SessionClosed(f"stream {self.stream_id} on {self.model} is closed")
        loop = asyncio.get_running_loop()
        previous_turn, turn = self._last_turn, loop.create_future()
        self._last_turn = turn
        self._pending += 1
        self.last_active = self._owner.clock()
        task = loop.create_task(self._take_turn(previous_turn, chunk, timeout_s),
                                name=f"stream-{self.model}-{self.stream_id}")
        # a callback, not a finally: a task cancelled before it first runs never enters its coroutine
        task.add_done_callback(functools.partial(self._step_done, previous_turn, turn))
        return task

    async def _take_turn(self, previous_turn: asyncio.Future[None] | None, chunk: Any,
                         timeout_s: float | None) -> Any:
        if previous_turn is not None and not previous_turn.done():
            await asyncio.wait({previous_turn})
        return await self._run(chunk, timeout_s)

    def _step_done(self, previous_turn: asyncio.Future[None] | None, turn: asyncio.Future[None],
                   task: asyncio.Task[Any]) -> None:
        self._pending -= 1
        self.last_active = self._owner.clock()
        _end_turn_after(previous_turn, turn)
        metrics = self._owner.metrics_for(self.model)
        if task.cancelled():
            return
        if task.exception() is not None:
            metrics.step_errors.inc()
        else:
            self.steps_answered += 1
            metrics.steps.inc()

    async def _run(self, chunk: Any, timeout_s: float | None) -> Any:
        if self._closed:
            raise SessionClosed(f"stream {self.stream_id} on {self.model} closed before this step ran")
        step = StreamStep(self._state, chunk, self._state_generation)
        result: StepResult = await self._owner.runtime.predict(self.model, step, timeout_s=timeout_s)
        if self._closed:
            raise SessionClosed(f"stream {self.stream_id} on {self.model} closed during this step")
        self._state, self._state_generation = result.state, result.generation
        return result.output

    def close(self) -> None:
        """Free the state and leave the registry; steps not yet answered fail with :class:`SessionClosed`."""
        if self._closed:
            return
        self._closed = True
        self._state = None
        self._owner.forget(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _end_turn_after(previous_turn: asyncio.Future[None] | None, turn: asyncio.Future[None]) -> None:
    """End ``turn`` once ``previous_turn`` is over (a step cancelled while it waits must not let the next overtake)."""
    if previous_turn is None or previous_turn.done():
        turn.set_result(None)
    else:
        previous_turn.add_done_callback(lambda _: turn.set_result(None))


class StreamingSessions:
    """The streaming models of one :class:`ModelRuntime` and their open sessions, on one event loop.

    Parameters
    ----------
    runtime : ModelRuntime, optional
        Where the models are served (default: the process-wide one).
    clock : callable
        Monotonic seconds, for idle timeouts (tests pass a fake).
    reap_interval_s : float, optional
        How often idle sessions are looked for (default: a quarter of the shortest idle timeout,
        between 10 ms and 5 s).
    """

    def __init__(self, runtime: ModelRuntime | None = None, *, clock: Callable[[], float] = time.monotonic,
                 reap_interval_s: float | None = None) -> None:
        self.runtime = runtime if runtime is not None else get_runtime()
        self.clock = clock
        self._reap_interval_s = reap_interval_s
        self._models: dict[str, StreamingModel] = {}
        self._metrics: dict[str, StreamingMetrics] = {}
        self._sessions: dict[tuple[str, str], Session] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def load(self, streaming: StreamingModel) -> dict[str, Any]:
        """Serve ``streaming`` in the runtime (a swap when already served; open sessions keep their state).

        Returns
        -------
        dict
            The runtime's description of the model now served.
        """
        described = await self.runtime.load(streaming.model_spec(self.metrics_for(streaming.name)))
        self._models[streaming.name] = streaming
        return described

    async def unload(self, name: str) -> None:
        """Close every session of ``name`` and stop serving it."""
        for session in [s for (model, _), s in self._sessions.items() if model == name]:
            session.close()
        self._models.pop(name, None)
        await self.runtime.unload(name)

    def open_session(self, model: str, stream_id: str) -> Session:
        """Open the session of ``stream_id`` on streaming model ``model``; its first step starts from the initial state.

        Raises
        ------
        ModelNotReady
            ``model`` is not a loaded streaming model.
        StreamAlreadyOpen
            A session for this stream is open already.
        RuntimeOverloaded
            The model holds ``max_sessions`` sessions already.
        """
        streaming = self._models.get(model)
        if streaming is None:
            raise ModelNotReady(f"streaming model {model} is not loaded")
        key = (model, stream_id)
        if key in self._sessions:
            raise StreamAlreadyOpen(f"stream {stream_id} already has a session on {model}")
        if streaming.max_sessions is not None and self.open_count(model) >= streaming.max_sessions:
            raise RuntimeOverloaded(f"streaming model {model} holds {streaming.max_sessions} sessions",
                                    retry_after_s=min(streaming.idle_timeout_s, 5.0))
        session = Session(self, model, stream_id)
        self._sessions[key] = session
        self.metrics_for(model).sessions_open.inc()
        self._ensure_reaper()
        return session

    def session(self, model: str, stream_id: str) -> Session | None:
        """The open session of ``stream_id`` on ``model``, if any."""
        return self._sessions.get((model, stream_id))

    def open_count(self, model: str | None = None) -> int:
        """Sessions open (on ``model``, or on every model)."""
        return sum(1 for (name, _) in self._sessions if model is None or name == model)

    def forget(self, session: Session) -> None:
        """Drop a closed session from the registry (called by :meth:`Session.close`)."""
        if self._sessions.pop((session.model, session.stream_id), None) is session:
            self.metrics_for(session.model).sessions_open.dec()

    def reap_idle(self) -> list[Session]:
        """Close every session idle past its model's timeout with no step pending; return them."""
        now = self.clock()
        idle = [session for session in self._sessions.values()
                if session.pending == 0 and now - session.last_active >= self._idle_timeout(session.model)]
        for session in idle:
            logger.info("stream %s on %s idle for %.1f s: session closed", session.stream_id,
                        session.model, now - session.last_active)
            session.close()
            self.metrics_for(session.model).reaped.inc()
        return idle

    def metrics_for(self, model: str) -> StreamingMetrics:
        """The streaming series of ``model``."""
        if model not in self._metrics:
            self._metrics[model] = StreamingMetrics(model)
        return self._metrics[model]

    async def close(self) -> None:
        """Close every session and stop the reaper (the runtime and its models stay)."""
        for session in list(self._sessions.values()):
            session.close()
        if self._reaper is not None and not self._reaper.done():
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        self._reaper = None

    def _idle_timeout(self, model: str) -> float:
        streaming = self._models.get(model)
        return streaming.idle_timeout_s if streaming is not None else 0.0

    def _ensure_reaper(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reaper is not None and not self._reaper.done() and self._reaper.get_loop() is loop:
            return
        self._reaper = loop.create_task(self._reap_forever(), name="stream-session-reaper")

    async def _reap_forever(self) -> None:
        while self._sessions:
            await asyncio.sleep(self._interval_s())
            self.reap_idle()

    def _interval_s(self) -> float:
        if self._reap_interval_s is not None:
            return self._reap_interval_s
        shortest = min((m.idle_timeout_s for m in self._models.values()), default=60.0)
        return min(5.0, max(0.01, shortest / 4))


@functools.cache
def get_streaming_sessions() -> StreamingSessions:
    """The process-wide :class:`StreamingSessions` over :func:`~model_runtime.runtime.get_runtime`."""
    return StreamingSessions()
