"""Dynamic batching for one model: a bounded queue drained into one worker thread.

Each caller's item carries its own future. When the model is idle, the drain task (on the event
loop) takes what is waiting (up to ``max_batch_size``) and hands it to the model's dedicated thread
(torch releases the GIL, so the event loop keeps serving); when that batch ends, the worker thread
takes the next batch from the queue itself and goes on, posting each batch's answers to the loop.
The model therefore never waits for the loop between batches: a loop busy with other work
(thousands of refusals a second past saturation, or a box whose other processes take its CPU)
answers late, but does not idle the model. With ``run_inline`` batches run on the loop itself
(items that arrive in one loop turn still share a batch); with ``inline_below_ms`` only the batches
the fitted batch time predicts shorter than that do, the others go to the worker. Policies:

- ``greedy`` (default): never wait for a batch to fill. At concurrency 1 an item runs at once, so
  latency equals the unbatched call; under load, items pile up while the worker is busy and the
  next batch takes them all, so batch size follows load by itself.
- ``window``: Ray Serve / LitServe habit: wait up to ``max_wait_ms`` from the first item's
  arrival (monotonic clock) for a full batch. Kept for comparison; ``bench/runtime.py`` measures both.
  The worker thread goes on by itself only with a full batch waiting; otherwise the drain task
  waits for the window, as for the first batch.

Cost: a batch is bounded by ``max_batch_size`` items and, when the policy sets ``max_batch_cost``,
by the sum of its items' ``cost`` (tokens, audio samples, voxels...); an item whose cost alone
exceeds the budget fails with :class:`BadInput` before it is queued. With a ``bucket`` function a
batch takes only items of the oldest waiting item's bucket (similar lengths pad little), in
arrival order; other buckets wait for the next batch.

Failure rules: a full queue raises :class:`RuntimeOverloaded` with a Retry-After estimated from
queue depth x recent per-item time; an item past its deadline fails with :class:`RuntimeTimeout`
without running; cancelled callers are skipped; an exception from ``run_batch`` fails only its
batch (and, with isolation on, the batch is retried item by item so one poison item fails alone);
an output count that differs from the input count fails every item of that batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from model_runtime.admission import BatchTimeModel, CapacityAdmission
from model_runtime.errors import BadInput, ModelNotReady, RuntimeOverloaded, RuntimeTimeout
from model_runtime.metrics import ModelMetrics

logger = logging.getLogger("tessera.model_runtime.batcher")

FillPolicy = Literal["greedy", "window"]
RunBatch = Callable[[list[Any]], Sequence[Any]]
RunBatchAsync = Callable[[list[Any]], Awaitable[list["Outcome"]]]
Finalize = Callable[[Any], Any]
CostOf = Callable[[Any], float]
BucketOf = Callable[[Any], Hashable]


class AdmissionTicket:
    """An item a batcher admitted that is not queued yet (an HTTP layer, a prepare pool): until
    :meth:`release`, admission counts it as waiting work, so what is between the admission check
    and the queue is not admitted twice over. Release is idempotent; :meth:`DynamicBatcher.submit` with
    the ticket releases it as the item is queued."""

    __slots__ = ("batcher", "_held")

    def __init__(self, batcher: DynamicBatcher) -> None:
        self.batcher = batcher
        self._held = True

    @property
    def held(self) -> bool:
        """True until released (queued, or given up)."""
        return self._held

    def release(self) -> None:
        """Stop counting the item as admitted work (its request ended, or it was queued)."""
        if self._held:
            self._held = False
            self.batcher._in_transit -= 1


class BatchOutputMismatch(RuntimeError):
    """``run_batch`` returned a different number of outputs than it was given items."""


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's queue is batched and bounded.

    Parameters
    ----------
    max_batch_size : int
        Most items handed to one ``run_batch`` call.
    max_wait_ms : float
        ``window`` policy only: longest wait, from the first item's arrival, for a batch to fill (ms).
    max_queue : int
        Most items waiting (not counting the batch running); beyond it callers get 503.
    max_queue_delay_ms : float or None
        Also refuse (503) when the expected wait of a new item (running batch + queued batches, in
        recent batch wall time) exceeds this (ms), while anything is queued. It bounds admitted
        latency in time rather than count, so the bound holds when the model slows down.
    timeout_s : float or None
        Default per-item deadline from arrival (s); ``None`` waits as long as it takes.
    isolate_failures : bool
        Retry a failed batch one item at a time, so one bad item fails alone.
    fill : {"greedy", "window"}
        Batch-forming policy (see module docstring).
    run_inline : bool
        Run batches on the event loop's thread instead of the model's worker thread. For a model
        whose batch costs well under a millisecond of CPU the hand-off (a thread wake-up each
        way, GIL switches) costs more than it overlaps; the loop is busy for each batch instead.
    cost : callable or None
        ``(prepared item) -> float``: what one item costs (tokens, samples, voxels); 1 when ``None``.
    max_batch_cost : float or None
        Most total cost in one batch; an item costing more fails alone with :class:`BadInput`.
    bucket : callable or None
        ``(prepared item) -> hashable``: shape bucket (e.g. :func:`~model_runtime.collate.length_bucket`);
        a batch holds items of one bucket only.
    latency_target_ms : float or None
        Admission by measured capacity (:mod:`model_runtime.admission`): refuse (503) an item whose
        predicted answer time, from the fitted batch time and the work ahead of it, exceeds this;
        when two full batches take longer than this, bound the work waiting behind the running batch
        to the waiting limit derived from the fit instead.
    inline_below_ms : float or None
        Run a batch the loop forms on the loop itself (as ``run_inline``) when the batch time fitted
        over recent batches predicts it under this many ms; longer batches go to the worker thread.
        A hand-off costs two thread wake-ups (0.1-0.2 ms on a VM, measured), a large share of a
        sub-millisecond batch, while a batch that short delays the loop's other work by less.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 256
    timeout_s: float | None = None
    isolate_failures: bool = True
    fill: FillPolicy = "greedy"
    max_queue_delay_ms: float | None = None
    run_inline: bool = False
    cost: CostOf | None = None
    max_batch_cost: float | None = None
    bucket: BucketOf | None = None
    latency_target_ms: float | None = None
    inline_below_ms: float | None = None

    @property
    def batch_capacity(self) -> float:
        """Most cost one batch holds: the budget, or ``max_batch_size`` when items cost 1."""
        return self.max_batch_cost if self.max_batch_cost is not None else float(self.max_batch_size)

    def cost_of(self, prepared: Any) -> float:
        """One prepared item's cost; :class:`BadInput` when it alone exceeds ``max_batch_cost``."""
        cost = 1.0 if self.cost is None else float(self.cost(prepared))
        if self.max_batch_cost is not None and cost > self.max_batch_cost:
            raise BadInput(f"item cost {cost:g} exceeds the batch budget {self.max_batch_cost:g}",
                           cost=cost, budget=self.max_batch_cost)
        return cost

    def bucket_of(self, prepared: Any) -> Hashable:
        """One prepared item's shape bucket (``None`` without a ``bucket`` function)."""
        return None if self.bucket is None else self.bucket(prepared)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if self.max_batch_cost is not None and self.max_batch_cost <= 0:
            raise ValueError("max_batch_cost must be > 0")
        if self.latency_target_ms is not None and self.latency_target_ms <= 0:
            raise ValueError("latency_target_ms must be > 0")
        if self.inline_below_ms is not None and self.inline_below_ms <= 0:
            raise ValueError("inline_below_ms must be > 0")
        if self.max_wait_ms < 0 or (self.timeout_s is not None and self.timeout_s <= 0):
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")


@dataclass(slots=True)
class _Pending:
    prepared: Any
    future: asyncio.Future[Any]
    enqueued_at: float
    deadline: float | None
    cost: float = 1.0
    bucket: Hashable = None


@dataclass(slots=True)
class Outcome:
    """The result of one item: ``value`` when ``ok``, else the exception in ``error``."""

    ok: bool
    value: Any = None
    error: BaseException | None = None


Entry = TypeVar("Entry")


def split_batch(entries: Iterable[Entry], policy: BatchPolicy, cost: Callable[[Entry], float],
                bucket: Callable[[Entry], Hashable]) -> tuple[list[Entry], deque[Entry]]:
    """The next batch out of ``entries`` (in arrival order) and what stays queued, in order.

    The batch takes the first entry's bucket only, and entries of it in order until
    ``max_batch_size`` or ``max_batch_cost`` is reached (the first entry that does not fit ends
    it, so a bucket is served first come, first served).
    """
    taken: list[Entry] = []
    rest: deque[Entry] = deque()
    total, full, key = 0.0, False, None
    for entry in entries:
        if taken and (full or bucket(entry) != key):
            rest.append(entry)
            continue
        entry_cost = cost(entry)
        over_budget = policy.max_batch_cost is not None and total + entry_cost > policy.max_batch_cost
        if taken and (len(taken) >= policy.max_batch_size or over_budget):
            full = True
            rest.append(entry)
            continue
        if not taken:
            key = bucket(entry)
        taken.append(entry)
        total += entry_cost
    return taken, rest


def execute_batch(run_batch: RunBatch, items: list[Any], *, finalize: Finalize | None = None,
                  isolate_failures: bool = True) -> list[Outcome]:
    """Run one batch and return one :class:`Outcome` per item, never raising.

    Parameters
    ----------
    run_batch : callable
        ``(items) -> outputs``, one output per item, in order.
    items : list
        Prepared items, length N.
    finalize : callable, optional
        Applied to each output; a failure fails that item alone.
    isolate_failures : bool
        When the batch raises and N > 1, rerun each item alone.

    Returns
    -------
    list of Outcome
        Length N, aligned with ``items``.
    """
    try:
        outputs = list(run_batch(items))
    except Exception as exc:
        if not isolate_failures or len(items) == 1:
            return [Outcome(False, error=exc) for _ in items]
        logger.warning("batch of %d failed (%r); retrying items one by one", len(items), exc)
        return [_run_alone(run_batch, item, finalize) for item in items]
    if len(outputs) != len(items):
        mismatch = BatchOutputMismatch(f"run_batch returned {len(outputs)} outputs for {len(items)} items")
        logger.error("%s", mismatch)
        return [Outcome(False, error=mismatch) for _ in items]
    return [_finalize(output, finalize) for output in outputs]


def _run_alone(run_batch: RunBatch, item: Any, finalize: Finalize | None) -> Outcome:
    outcome = execute_batch(run_batch, [item], finalize=finalize, isolate_failures=False)
    return outcome[0]


def _finalize(output: Any, finalize: Finalize | None) -> Outcome:
    if finalize is None:
        return Outcome(True, value=output)
    try:
        return Outcome(True, value=finalize(output))
    except Exception as exc:
        return Outcome(False, error=exc)


@dataclass
class _Recent:
    """Exponential moving averages of batch wall time and per-item time (s), for load estimates."""

    per_item_s: float = 0.001
    batch_s: float = 0.001
    alpha: float = 0.2
    samples: int = field(default=0)

    def update(self, batch_seconds: float, batch_size: int) -> None:
        weight = 1.0 if self.samples == 0 else self.alpha
        self.per_item_s += weight * (batch_seconds / batch_size - self.per_item_s)
        self.batch_s += weight * (batch_seconds - self.batch_s)
        self.samples += 1


class DynamicBatcher:
    """Queue, drain task and worker thread of one model version, bound to one event loop.

    Parameters
    ----------
    name : str
        Model name (log messages, thread name).
    run_batch : callable
        ``(items: list) -> list`` of the same length; runs in the worker thread.
    policy : BatchPolicy
        Batch size, wait, queue bound, deadline and isolation settings.
    metrics : ModelMetrics
        Series to record into (shared across versions of the model).
    finalize : callable, optional
        Per-output post-processing, run in the worker thread.
    thread_initializer : callable, optional
        Run once in the worker thread (e.g. ``torch.set_num_threads``).
    per_item_s : float, optional
        Initial per-item time estimate (s), e.g. measured at warm-up.
    run_async : callable, optional
        ``(items) -> awaitable of outcomes``: batches are awaited on the loop instead of run in the
        worker thread (a model in a child process, :mod:`model_runtime.process_model`, which
        isolates failures and finalizes outputs itself).

    Notes
    -----
    Construct and use it inside a running event loop; :meth:`start` creates the drain task there.
    """

    def __init__(self, name: str, run_batch: RunBatch, policy: BatchPolicy, metrics: ModelMetrics, *,
                 finalize: Finalize | None = None, thread_initializer: Callable[[], None] | None = None,
                 per_item_s: float | None = None, run_async: RunBatchAsync | None = None) -> None:
        self.name = name
        self._run_async = run_async
        self.policy = policy
        self.metrics = metrics
        self._run_batch = run_batch
        self._finalize = finalize
        self._queue: deque[_Pending] = deque()
        self._queued_cost = 0.0
        self._lock = threading.Lock()  # the queue, its cost and the running batch: the loop and the worker share them
        self._in_transit = 0  # admitted (AdmissionTicket held), not yet queued
        self._mean_cost = 1.0
        self._batch_time = BatchTimeModel()  # batch seconds against cost: admission's fit and inline_below_ms's
        self._admission = (None if policy.latency_target_ms is None
                           else CapacityAdmission(policy.latency_target_ms / 1000.0, policy.batch_capacity,
                                                  model=self._batch_time))
        self._running: list[_Pending] | None = None  # the batch the model is running (set when it is taken)
        self._worker: asyncio.Future[None] | None = None  # the worker thread's job: batches until the queue is empty
        self._recent = _Recent(per_item_s=per_item_s or 0.001, batch_s=per_item_s or 0.001,
                               samples=1 if per_item_s else 0)
        self._thread_initializer = thread_initializer
        self._loop_thread_initialized = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}",
                                            initializer=thread_initializer)
        self.loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the drain task on the current loop."""
        self._task = self.loop.create_task(self._drain_forever(), name=f"batcher-{self.name}")

    @property
    def depth(self) -> int:
        """Items waiting (not counting the batch being run)."""
        return len(self._queue)

    def _waiting_cost(self) -> float:
        return self._queued_cost + self._in_transit * self._mean_cost

    def admit(self, *, record: bool = True) -> AdmissionTicket:
        """Admit one item now, or raise what :meth:`refusal` says.

        The ticket counts the item as waiting work until it is queued (``submit(..., ticket=)``)
        or released, so work admitted and still on its way (an HTTP stack, a prepare pool) is seen
        by every later admission decision, and is not checked again when it is queued.
        """
        refusal = self.refusal(record=record)
        if refusal is not None:
            raise refusal
        self._in_transit += 1
        return AdmissionTicket(self)

    def admission_state(self) -> dict[str, float | bool] | None:
        """Admission by measured capacity, as it stands (``None`` without a latency target): the admitted
        rate (cost a second), whether it counts as saturated, the cost waiting."""
        if self._admission is None:
            return None
        return {"admitted_per_s": self._admission.admitted_rate(),
                "saturated": self._admission.saturated(), "waiting_cost": self._waiting_cost()}

    @property
    def per_item_seconds(self) -> float:
        """Recent run time per item (s), a moving average over batches."""
        return self._recent.per_item_s

    def expected_wait_s(self) -> float:
        """Expected wait of a new item (s): the batch running plus the batches queued ahead of it.

        Counted in batches of recent wall time, not items x per-item time: small batches cost more
        per item, and an item-based estimate would refuse more as batches shrink (a feedback loop
        that collapses throughput). In batches, shrinking batches lower the estimate instead.
        """
        by_cost = math.ceil(self._waiting_cost() / self.policy.max_batch_cost) if self.policy.max_batch_cost else 0
        queued_batches = max(-(-self.depth // self.policy.max_batch_size), by_cost)
        running = 1 if self._running else 0
        return (running + queued_batches) * self._recent.batch_s

    def check_capacity(self) -> None:
        """Raise :class:`RuntimeOverloaded` (or :class:`ModelNotReady` when closing) if an item would be refused.

        Called before an item is decoded, so a refused caller costs almost nothing.
        """
        refusal = self.refusal()
        if refusal is not None:
            raise refusal

    def refusal(self, *, record: bool = True) -> RuntimeOverloaded | ModelNotReady | None:
        """The error an item arriving now gets, or ``None`` if it is taken.

        ``record=False`` only asks (a gate in front of the HTTP stack): no refusal is counted and
        no arrival enters the admission's rate, since the item asks again when it is submitted.
        """
        if not self._accepting:
            return ModelNotReady(f"model {self.name} is shutting down")
        depth = self.depth
        expected_wait_s = self.expected_wait_s()
        too_slow = (self.policy.max_queue_delay_ms is not None and depth > 0
                    and expected_wait_s * 1000.0 > self.policy.max_queue_delay_ms)
        if depth >= self.policy.max_queue or too_slow:
            if record:
                self.metrics.rejected.inc()
            return RuntimeOverloaded(f"model {self.name}: {depth} requests queued, expected wait "
                                     f"{expected_wait_s:.3f} s", retry_after_s=expected_wait_s)
        if self._admission is not None:
            decision = self._admission.decide(self._waiting_cost(), self._mean_cost, record=record)
            if not decision.admitted:
                if record:
                    self.metrics.rejected.inc()
                return RuntimeOverloaded(f"model {self.name}: an answer expected in {decision.expected_s:.3f} s, "
                                         f"past the {self._admission.target_s:.3f} s target",
                                         retry_after_s=decision.retry_after_s)
        return None

    async def submit(self, prepared: Any, timeout_s: float | None = None, *,
                     ticket: AdmissionTicket | None = None) -> Any:
        """Queue one prepared item and wait for its output.

        Parameters
        ----------
        prepared : Any
            One item already validated/decoded by the model's ``prepare``.
        timeout_s : float, optional
            Deadline from now (s); defaults to the policy's ``timeout_s``.
        ticket : AdmissionTicket, optional
            This batcher's admission of the item (:meth:`admit`): capacity is not checked again,
            and the ticket is released as the item is queued. Without one, capacity is checked now.

        Raises
        ------
        RuntimeOverloaded
            The queue is full.
        BadInput
            The item's cost alone exceeds the batch budget.
        RuntimeTimeout
            The item was not answered within its deadline.
        """
        admitted = ticket is not None and ticket.held and ticket.batcher is self
        if not admitted:
            self.check_capacity()
        cost = self.policy.cost_of(prepared)
        timeout_s = self.policy.timeout_s if timeout_s is None else timeout_s
        now = time.monotonic()
        pending = _Pending(prepared, self.loop.create_future(), now,
                           None if timeout_s is None else now + timeout_s, cost, self.policy.bucket_of(prepared))
        with self._lock:
            self._queue.append(pending)
            self._queued_cost += cost
        if admitted and ticket is not None:
            ticket.release()  # counted in the queue from now on
        self._mean_cost += 0.05 * (cost - self._mean_cost)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        timer = None if timeout_s is None else self.loop.call_later(timeout_s, self._expire, pending)
        try:
            return await pending.future
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        waited = time.monotonic() - pending.enqueued_at
        self.metrics.deadline_exceeded.inc()
        pending.future.set_exception(RuntimeTimeout(f"model {self.name}: no answer within {waited:.3f} s"))

    async def _drain_forever(self) -> None:
        """Start the worker thread on a batch whenever the model is idle and work waits.

        The worker goes on by itself while there is work (:meth:`_work`), so this task only wakes
        up when the model fell idle: a loop busy with other work does not delay the next batch.
        """
        while True:
            if self._worker is not None:
                try:
                    await self._worker
                except asyncio.CancelledError:
                    raise
                except Exception:  # _work catches per batch; this is a bug, and the loop must survive it
                    logger.exception("batcher %s: worker failed", self.name)
                self._worker = None
                continue
            batch = await self._next_batch()
            if batch is None:
                return
            if self._run_async is not None:
                self._settle(*await self._run_awaited(batch))
                continue
            if self.policy.run_inline or self._short_enough_to_run_inline(batch):
                self._initialize_loop_thread()
                self._settle(*self._run_guarded(batch, inline=True))
                continue
            # handed over in a list the worker empties: neither this frame nor the executor's work item
            # holds the first batch (and, through its futures, its answers) while the worker goes on
            self._worker = self.loop.run_in_executor(self._executor, self._work, [batch])
            del batch

    def _short_enough_to_run_inline(self, batch: list[_Pending]) -> bool:
        """Whether ``inline_below_ms`` sends this batch to the loop: its fitted time is under the bound."""
        if self.policy.inline_below_ms is None or self._batch_time.samples == 0:
            return False
        predicted_s = self._batch_time.seconds(sum(pending.cost for pending in batch))
        return predicted_s * 1000.0 < self.policy.inline_below_ms

    def _initialize_loop_thread(self) -> None:
        """Before the first batch run on the loop: the worker's thread initializer (torch's thread count) here too."""
        if not self._loop_thread_initialized:
            self._loop_thread_initialized = True
            if self._thread_initializer is not None:
                self._thread_initializer()

    def _full_batch_waiting(self) -> bool:
        return (len(self._queue) >= self.policy.max_batch_size
                or (self.policy.max_batch_cost is not None and self._queued_cost >= self.policy.max_batch_cost))

    async def _next_batch(self) -> list[_Pending] | None:
        while True:
            if not self._queue:
                if not self._accepting:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.policy.fill == "window":
                await self._wait_for_fill()
            batch = self._take_live(on_loop=True)
            if batch:
                return batch

    async def _wait_for_fill(self) -> None:
        until = self._queue[0].enqueued_at + self.policy.max_wait_ms / 1000.0
        budget = self.policy.max_batch_cost or float("inf")
        while len(self._queue) < self.policy.max_batch_size and self._queued_cost < budget and self._accepting:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_live(self, *, on_loop: bool) -> list[_Pending]:
        """Take the next batch (:func:`split_batch`) as the running one, dropping cancelled and expired items.

        On the loop an expired item fails at once; in the worker thread it is only dropped (its
        deadline timer, on the loop, fails it).
        """
        now = time.monotonic()
        with self._lock:
            live = [pending for pending in self._queue if not pending.future.done()
                    and (pending.deadline is None or now < pending.deadline)]
            expired = ([pending for pending in self._queue if not pending.future.done()
                        and pending.deadline is not None and now >= pending.deadline] if on_loop else [])
            batch, self._queue = split_batch(live, self.policy, _cost_of_pending, _bucket_of_pending)
            self._queued_cost = sum(pending.cost for pending in self._queue)
            if batch:
                self._running = batch
        for pending in expired:
            self._expire(pending)
        for pending in batch:
            self.metrics.queue_wait.observe(now - pending.enqueued_at)
        self.metrics.queue_depth.set(len(self._queue))
        return batch

    def _work(self, handed: list[list[_Pending]]) -> None:
        """The worker thread's job: run the batch in ``handed``, then each next batch it takes itself, until none waits.

        When a batch ends, what waited while it ran is taken as the next batch *before* its answers
        are posted to the loop: items sent in reaction to those answers join a later batch, as they
        would if the loop formed it (callers that send one item after another, such as the
        sliding-window lanes, keep the batches they had). With the ``window`` policy only a full
        batch is taken here (a smaller one waits, on the loop, for its window).
        """
        current: list[_Pending] | None = handed.pop()
        while current:
            settled = self._run_guarded(current)
            current = self._take_next_in_worker()
            self._post(self._settle, *settled)
            del settled

    def _take_next_in_worker(self) -> list[_Pending] | None:
        """The next batch for the worker to run at once, or ``None`` (then the model is idle)."""
        while True:
            with self._lock:
                waiting = bool(self._queue) if self.policy.fill == "greedy" else self._full_batch_waiting()
                if not waiting:
                    self._running = None
                    return None
            batch = self._take_live(on_loop=False)
            if batch:
                return batch

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop (from the worker thread); dropped once the loop is closed."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def _run_guarded(self, batch: list[_Pending], *,
                     inline: bool = False) -> tuple[list[_Pending], list[_Pending], list[Outcome]]:
        """Run one batch in this thread and record it: ``(batch, items run, their outcomes)``; never raises.

        ``inline``: this thread is the loop's, and the model is idle again once the batch ends.
        """
        try:
            ran, outcomes, elapsed = self._execute(batch)
            self._record(ran, elapsed)
        except Exception as exc:  # the worker (and the loop, inline) must survive anything a batch does
            logger.exception("batcher %s: unexpected failure", self.name)
            ran, outcomes = batch, [Outcome(False, error=exc) for _ in batch]
        finally:
            if inline:
                self._running = None
        return batch, ran, outcomes

    async def _run_awaited(self, batch: list[_Pending]) -> tuple[list[_Pending], list[_Pending], list[Outcome]]:
        """:meth:`_run_guarded` for ``run_async``: the batch awaited on the loop; never raises but when cancelled."""
        assert self._run_async is not None
        ran = self._live(batch)
        outcomes: list[Outcome] = []
        try:
            if ran:
                started = self._started(ran)
                try:
                    outcomes = await self._run_async([pending.prepared for pending in ran])
                except Exception as exc:  # the child process died: every item of its batch fails
                    outcomes = [Outcome(False, error=exc) for _ in ran]
                self._record(ran, time.monotonic() - started)
        finally:
            self._running = None
        return batch, ran, outcomes

    def _record(self, ran: list[_Pending], elapsed: float) -> None:
        if not ran:
            return
        cost = sum(pending.cost for pending in ran)
        self._recent.update(elapsed, len(ran))
        if self._admission is not None:
            self._admission.batch_finished(cost, elapsed)  # refits self._batch_time, the fit it was given
        else:
            self._batch_time.observe(cost, elapsed)
        self.metrics.inference.observe(elapsed)
        self.metrics.batch_size.observe(len(ran))

    def _settle(self, batch: list[_Pending], ran: list[_Pending], outcomes: list[Outcome]) -> None:
        """On the loop: answer the items run, and fail those skipped because their deadline passed."""
        self._deliver(ran, outcomes)
        now = time.monotonic()
        for pending in batch:  # skipped in the worker: expired while waiting (cancelled ones are done)
            if not pending.future.done() and pending.deadline is not None and now >= pending.deadline:
                self._expire(pending)

    def _execute(self, batch: list[_Pending]) -> tuple[list[_Pending], list[Outcome], float]:
        """Run the live items of one batch (in the worker thread unless inline): them, their outcomes, run time (s).

        Items whose caller went away or whose deadline passed while the batch waited are skipped
        (reading ``done()`` from this thread is a plain state check).
        """
        ran = self._live(batch)
        if not ran:
            return ran, [], 0.0
        started = self._started(ran)
        outcomes = execute_batch(self._run_batch, [pending.prepared for pending in ran], finalize=self._finalize,
                                 isolate_failures=self.policy.isolate_failures)
        return ran, outcomes, time.monotonic() - started

    @staticmethod
    def _live(batch: list[_Pending]) -> list[_Pending]:
        """The items of ``batch`` still worth running: caller waiting, deadline not passed."""
        now = time.monotonic()
        return [pending for pending in batch if not pending.future.done()
                and (pending.deadline is None or now < pending.deadline)]

    def _started(self, ran: list[_Pending]) -> float:
        """Tell admission a batch of ``ran`` started; its start time."""
        if self._admission is not None:
            self._admission.batch_started(sum(pending.cost for pending in ran))
        return time.monotonic()

    def _deliver(self, batch: list[_Pending], outcomes: list[Outcome]) -> None:
        now = time.monotonic()
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if outcome.ok:
                pending.future.set_result(outcome.value)
                self.metrics.latency.record(now - pending.enqueued_at)
            else:
                self.metrics.errors.inc()
                pending.future.set_exception(outcome.error or RuntimeError("inference failed"))

    async def drain(self) -> None:
        """Stop accepting, finish every queued and running item, then stop the thread."""
        self._accepting = False
        self._wakeup.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        self._executor.shutdown(wait=True)

    async def close(self) -> None:
        """Stop now: queued and running items fail with :class:`ModelNotReady`; the thread is joined."""
        self._accepting = False
        self._fail_all(ModelNotReady(f"model {self.name} was unloaded"))
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._executor.shutdown, True)

    def abandon(self) -> None:
        """Release the thread of a batcher whose event loop is gone (no awaiting possible)."""
        self._accepting = False
        with self._lock:
            self._queue.clear()
            self._queued_cost = 0.0
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            waiting = [*(self._running or ()), *self._queue]
            self._queue.clear()
            self._queued_cost = 0.0
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(error)
        self.metrics.queue_depth.set(0)


def _cost_of_pending(pending: _Pending) -> float:
    return pending.cost


def _bucket_of_pending(pending: _Pending) -> Hashable:
    return pending.bucket
