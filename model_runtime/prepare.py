"""Where a model's ``prepare`` step runs: a worker pool, never the event loop that serves traffic.

``ModelSpec.prepare_in`` picks one of:

- ``"thread"`` (the default for a spec with ``prepare``): the runtime's shared thread pool. Right for
  work that releases the GIL: numpy and torch operations, audio resampling, image and DICOM pixel
  decoding in C (pydicom's handlers, Pillow, soundfile). Items and results are passed by reference.
- ``"process"``: the runtime's shared process pool (``spawn``ed workers). It pays only for
  pure-Python work that holds the GIL for milliseconds (hand-written parsers, per-sample loops)
  and whose inputs and outputs are small next to that work: both are pickled across, and a worker
  starts with an import of the prepare function's module (seconds with torch). ``prepare`` must
  be a module-level function; the spec is refused at load otherwise.
- ``"loop"``: on the caller's event loop, as before. Only for validation that costs microseconds
  (the default with ``run_inline``, e.g. fraud's checks), where a hand-off costs more than the work.

``"auto"`` (the default) decides at load: the runtime times ``prepare`` on the spec's warm-up items
and keeps it on the loop when it costs at most :data:`CHEAP_PREPARE_S` an item (a shape check),
else sends it to the thread pool; without warm-up items it cannot tell, and uses the thread pool.

Any exception ``prepare`` raises fails that caller alone with :class:`BadInput` (a
``ProblemError`` or runtime error passes through as it is).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal

from model_runtime.errors import BadInput, ModelRuntimeError
from shared.errors import ProblemError

PrepareIn = Literal["auto", "loop", "thread", "process"]
Prepare = Callable[[Any], Any]


CHEAP_PREPARE_S = 20e-6
"""A ``prepare`` measured at or below this (s per item) runs on the loop under ``auto``: handing it to
a pool costs more than the work, and the round trip splits batches that would have formed together."""


def resolve_prepare_in(prepare_in: PrepareIn, *, has_prepare: bool, run_inline: bool,
                       measured_s: float | None = None) -> PrepareIn:
    """``auto`` made concrete.

    ``loop`` for no prepare, a ``run_inline`` model, or a prepare measured (``measured_s``, seconds
    per item over the warm-up items) at most :data:`CHEAP_PREPARE_S`; ``thread`` otherwise,
    including when it was never measured.
    """
    if prepare_in != "auto":
        return prepare_in
    cheap = measured_s is not None and measured_s <= CHEAP_PREPARE_S
    return "loop" if run_inline or not has_prepare or cheap else "thread"


def check_process_safe(name: str, prepare: Prepare | None) -> None:
    """Refuse (``ValueError``) a ``prepare`` that cannot be sent to a worker process."""
    try:
        pickle.dumps(prepare)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ValueError(f"model {name}: prepare_in='process' needs a module-level prepare function ({exc})") from exc


def checked_prepare(name: str, prepare: Prepare | None, item: Any) -> Any:
    """``prepare(item)``, any failure of the item turned into :class:`BadInput`."""
    if prepare is None:
        return item
    try:
        return prepare(item)
    except (ProblemError, ModelRuntimeError):
        raise
    except Exception as exc:
        raise BadInput(f"{name}: {exc}") from exc


class PreparePools:
    """The runtime's prepare workers: one thread pool and one process pool, each started on first use.

    Parameters
    ----------
    threads, processes : int, optional
        Pool sizes; default the CPU count.
    """

    def __init__(self, threads: int | None = None, processes: int | None = None) -> None:
        self._sizes = (threads or os.cpu_count() or 2, processes or os.cpu_count() or 2)
        self._threads: ThreadPoolExecutor | None = None
        self._processes: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    async def run(self, where: PrepareIn, name: str, prepare: Prepare | None, item: Any) -> Any:
        """The prepared item, computed where ``where`` says (``loop``, ``thread`` or ``process``)."""
        if prepare is None or where in ("loop", "auto"):
            return checked_prepare(name, prepare, item)
        loop = asyncio.get_running_loop()
        if where == "thread":
            return await loop.run_in_executor(self._thread_pool(), checked_prepare, name, prepare, item)
        pool = self._process_pool()
        try:
            return await loop.run_in_executor(pool, prepare, item)
        except BrokenProcessPool as exc:  # a worker died (e.g. killed for memory): start afresh next time
            self._drop_process_pool(pool)
            raise ModelRuntimeError(f"model {name}: a prepare worker process died") from exc
        except (ProblemError, ModelRuntimeError):
            raise
        except Exception as exc:
            raise BadInput(f"{name}: {exc}") from exc

    def _thread_pool(self) -> Executor:
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=self._sizes[0], thread_name_prefix="prepare")
            return self._threads

    def _process_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._processes is None:
                self._processes = ProcessPoolExecutor(max_workers=self._sizes[1],
                                                      mp_context=multiprocessing.get_context("spawn"))
            return self._processes

    def _drop_process_pool(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._processes is pool:
                self._processes = None
        pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        """Stop both pools (waiting for work in progress); they start again on next use."""
        with self._lock:
            threads, processes = self._threads, self._processes
            self._threads = self._processes = None
        for pool in (threads, processes):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
