"""A model served from a child process of its own, its batches sent from the event loop.

A model that runs on the event loop (``run_inline``) costs the loop its CPU; one in the batcher's
worker thread shares the loop's GIL, so each batch's Python work (features, a small ONNX graph, a
tree walk) and the loop's HTTP and database work wait for each other, and a thread that wants the
GIL back can wait up to the interpreter's switch interval (5 ms). With ``run_in_process`` the model
lives in a child process (``spawn``): the parent pickles a batch onto a pipe and awaits the answer
with a reader on the loop, which goes on serving meanwhile; the model's CPU lands on another core.
On fraud's webhook (embedded SQLite, 400 tx/s, a 2-core box) that moved ~40 % of a request's CPU
off the serving process (``bench/fraud_sqlite_wrk.py``; README).

Protocol: one duplex pipe, one batch in flight. The parent sends a list of prepared items; the
child answers with one :class:`~model_runtime.batcher.Outcome` per item (it runs
:func:`~model_runtime.batcher.execute_batch`, so a bad item fails alone and ``finalize`` runs there
too); ``None`` asks it to exit. What crosses the pipe is pickled: the spec's ``loader``,
``run_batch`` and ``finalize`` must be importable module-level functions, items and outputs
picklable. An error that cannot be pickled comes back as a :class:`RuntimeError` with its text.

A child that dies (killed, out of memory) fails the batch it held with :class:`ModelProcessExited`
(a :class:`~model_runtime.errors.ModelNotReady`: 503 at the HTTP edge, so a webhook's sender
retries) and is replaced in the background; calls meanwhile fail the same way at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from model_runtime.batcher import Outcome, execute_batch
from model_runtime.errors import ModelNotReady

if TYPE_CHECKING:
    from model_runtime.runtime import LoadContext, ModelSpec

logger = logging.getLogger("tessera.model_runtime.process")

PROCESS_RESTARTS = Counter("tessera_model_process_restarts_total",
                           "Model child processes replaced after they exited unexpectedly", ["model"])
START_TIMEOUT_S = 300.0
"""How long a child may take to import, load and report ready."""
STOP_TIMEOUT_S = 10.0


class ModelProcessExited(ModelNotReady):
    """The model's child process exited; it is being replaced (retry shortly)."""


@dataclass(frozen=True)
class ChildSpec:
    """What the child needs of a :class:`~model_runtime.runtime.ModelSpec` (all picklable by reference)."""

    name: str
    version: str
    loader: Callable[[LoadContext], Any]
    run_batch: Callable[[Any, list[Any]], Any]
    finalize: Callable[[Any], Any] | None
    uses_torch: bool
    isolate_failures: bool
    memory_budget: Any

    @classmethod
    def of(cls, spec: ModelSpec) -> ChildSpec:
        """The child's part of ``spec``."""
        return cls(spec.name, spec.version, spec.loader, spec.run_batch, spec.finalize, spec.uses_torch,
                   spec.isolate_failures, spec.memory_budget)


@dataclass(frozen=True)
class _Started:
    backend: str


@dataclass(frozen=True)
class _LoadFailed:
    error: BaseException


def _picklable(error: BaseException) -> BaseException:
    """``error`` if it survives a pickle round trip, else a RuntimeError with its type and text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _child_main(conn: Connection, child: ChildSpec, context: LoadContext) -> None:
    """The child: load the model, then answer batches until ``None`` or the pipe closes."""
    from model_runtime.device import configure_threads
    from model_runtime.runtime import ModelSpec, _bind_run, _sets_torch_threads, describe_backend

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    try:
        spec = ModelSpec(name=child.name, version=child.version, loader=child.loader, run_batch=child.run_batch,
                         finalize=child.finalize, uses_torch=child.uses_torch,
                         isolate_failures=child.isolate_failures, memory_budget=child.memory_budget)
        if _sets_torch_threads(spec):
            configure_threads()
        model = spec.loader(context)
        run = _bind_run(spec, model, context.placement)
    except BaseException as exc:  # reported to the parent, which raises it from load()
        conn.send(_LoadFailed(_picklable(exc)))
        return
    conn.send(_Started(describe_backend(model)))
    while True:
        try:
            items = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if items is None:
            return
        outcomes = execute_batch(run, items, finalize=spec.finalize, isolate_failures=spec.isolate_failures)
        conn.send([outcome if outcome.ok or outcome.error is None
                   else Outcome(False, error=_picklable(outcome.error)) for outcome in outcomes])


class ModelProcess:
    """A child process serving one model version; see the module docstring.

    Parameters
    ----------
    spec : ModelSpec
        Its ``loader``, ``run_batch`` and ``finalize`` are called in the child.
    context : LoadContext
        Passed to the loader in the child.

    Raises
    ------
    RuntimeError
        The child failed to load the model (the loader's error is the cause) or to start.
    """

    def __init__(self, spec: ModelSpec, context: LoadContext) -> None:
        self.name = spec.name
        self._child = ChildSpec.of(spec)
        self._context = context
        self._lock = threading.Lock()  # one batch in flight, whoever sends it
        self._unread = False  # a cancelled call left the child's answer in the pipe
        self._closed = False
        self._restarting: threading.Thread | None = None
        self._conn, self._process, self.backend = self._spawn()

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    @property
    def backend_name(self) -> str:
        """What runs the model, as the runtime describes it."""
        return f"{self.backend} (child process)"

    def _spawn(self) -> tuple[Connection, BaseProcess, str]:
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(target=_child_main, args=(child_end, self._child, self._context),
                                  name=f"model-{self.name}", daemon=True)
        process.start()
        child_end.close()
        try:
            if not parent_end.poll(START_TIMEOUT_S):
                raise RuntimeError(f"model {self.name}: child process not ready after {START_TIMEOUT_S:.0f} s")
            hello = parent_end.recv()
        except EOFError:
            process.join(STOP_TIMEOUT_S)
            raise RuntimeError(f"model {self.name}: child process exited while loading "
                               f"(exit code {process.exitcode})") from None
        except BaseException:
            _stop(process, parent_end)
            raise
        if isinstance(hello, _LoadFailed):
            _stop(process, parent_end)
            raise RuntimeError(f"model {self.name}: loading failed in its child process: {hello.error!r}") \
                from hello.error
        logger.info("model %s: serving from child process %s (%s)", self.name, process.pid, hello.backend)
        return parent_end, process, hello.backend

    # -- calls -----------------------------------------------------------------------------------
    def run(self, items: list[Any]) -> list[Outcome]:
        """Blocking: one batch through the child, one outcome per item."""
        self._refuse_while_restarting()
        with self._lock:
            self._drain_unread()
            try:
                self._conn.send(items)
                return self._conn.recv()  # type: ignore[no-any-return]
            except (EOFError, OSError) as exc:
                raise self._exited() from exc

    def run_batch(self, items: list[Any]) -> Sequence[Any]:
        """:meth:`run` as a ``run_batch``: the outputs, or the first item's error raised."""
        outcomes = self.run(items)
        failed = next((outcome for outcome in outcomes if not outcome.ok), None)
        if failed is not None:
            raise failed.error or RuntimeError("inference failed")
        return [outcome.value for outcome in outcomes]

    async def run_async(self, items: list[Any]) -> list[Outcome]:
        """One batch through the child without blocking the loop: the answer is read when it arrives."""
        self._refuse_while_restarting()
        if not self._lock.acquire(blocking=False):
            await asyncio.to_thread(self._lock.acquire)
        try:
            self._drain_unread()
            loop = asyncio.get_running_loop()
            answered: asyncio.Future[list[Outcome]] = loop.create_future()
            try:
                self._conn.send(items)
            except OSError as exc:
                raise self._exited() from exc
            fd = self._conn.fileno()
            loop.add_reader(fd, self._on_readable, answered)
            try:
                return await answered
            except asyncio.CancelledError:
                self._unread = not answered.done()
                raise
            finally:
                loop.remove_reader(fd)
        finally:
            self._lock.release()

    def _on_readable(self, answered: asyncio.Future[list[Outcome]]) -> None:
        if answered.done():
            return
        try:
            answered.set_result(self._conn.recv())
        except (EOFError, OSError) as exc:
            error = self._exited()
            error.__cause__ = exc
            answered.set_exception(error)

    def _drain_unread(self) -> None:
        if self._unread:
            self._unread = False
            with contextlib.suppress(EOFError, OSError):
                self._conn.recv()

    def _refuse_while_restarting(self) -> None:
        if self._closed:
            raise ModelNotReady(f"model {self.name} was unloaded")
        if self._restarting is not None:
            raise ModelProcessExited(f"model {self.name}: its child process is restarting")

    def _exited(self) -> ModelProcessExited:
        """The error for a call whose child died; starts its replacement (once)."""
        code = self._process.exitcode if not self._process.is_alive() else None
        if not self._closed and self._restarting is None:
            PROCESS_RESTARTS.labels(self.name).inc()
            logger.error("model %s: child process %s exited (code %s); starting a new one",
                         self.name, self._process.pid, code)
            self._restarting = threading.Thread(target=self._replace, name=f"model-{self.name}-restart", daemon=True)
            self._restarting.start()
        return ModelProcessExited(f"model {self.name}: its child process exited (code {code}); retry shortly")

    def _replace(self) -> None:
        with self._lock:
            _stop(self._process, self._conn)
            self._unread = False
            try:
                self._conn, self._process, self.backend = self._spawn()
            except Exception:
                logger.exception("model %s: the replacement child process failed to start", self.name)
                self._closed = True
            finally:
                self._restarting = None

    def close(self) -> None:
        """Stop the child (it finishes the batch it holds); idempotent."""
        self._closed = True
        restarting = self._restarting
        if restarting is not None:
            restarting.join(START_TIMEOUT_S)
        if self._lock.acquire(timeout=STOP_TIMEOUT_S):
            try:
                with contextlib.suppress(OSError):
                    self._conn.send(None)
            finally:
                self._lock.release()
        _stop(self._process, self._conn)


def _stop(process: BaseProcess, conn: Connection) -> None:
    """Wait briefly for ``process`` to exit, then terminate (and kill) it; close ``conn``."""
    process.join(STOP_TIMEOUT_S if process.is_alive() else 0)
    if process.is_alive():
        process.terminate()
        process.join(STOP_TIMEOUT_S)
    if process.is_alive() and process.pid is not None:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    with contextlib.suppress(OSError):
        conn.close()
