"""Listeners: a vertical's non-HTTP servers (DICOM C-STORE, MQTT), run and stopped like the API.

A vertical declares a :class:`shared.verticals.Listener` whose target is
``serve(stop: threading.Event) -> None``: it binds, serves until ``stop`` is set, closes and
returns. ``tessera up`` starts each enabled listener as its own process
(``tessera listen <vertical> <listener>``, i.e. :func:`run_listener`) and sends it SIGTERM on
shutdown, as it does the API and the worker; a listener that exits on its own stops the suite,
as a crashed API would. The process exits 0 after a clean stop, 1 if ``serve`` raised.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence

ListenerServe = Callable[[threading.Event], None]
"""What a listener target is: serve until the event is set, then return."""

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

logger = logging.getLogger("tessera.listeners")


def stop_on_signals(stop: threading.Event, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
    """Make each of ``signals`` set ``stop`` (main thread only, as Python's signal handlers are)."""
    for signum in signals:
        signal.signal(signum, lambda received, _frame: _request_stop(stop, received))


def _request_stop(stop: threading.Event, signum: int) -> None:
    if not stop.is_set():
        logger.info("listener stopping", extra={"signal": signal.Signals(signum).name})
    stop.set()


def run_listener(name: str, serve: ListenerServe) -> int:
    """Run ``serve`` in this (main) thread until a stop signal; the process exit code."""
    stop = threading.Event()
    stop_on_signals(stop)
    logger.info("listener starting", extra={"listener": name})
    try:
        serve(stop)
    except Exception:
        logger.exception("listener failed", extra={"listener": name})
        return 1
    if not stop.is_set():
        logger.error("listener returned without being asked to stop", extra={"listener": name})
        return 1
    logger.info("listener stopped", extra={"listener": name})
    return 0
