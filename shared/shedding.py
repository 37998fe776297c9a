"""Load shedding in front of the HTTP stack: refuse at once what the model behind a route would refuse.

Past saturation most requests are refused, and a refusal that goes through FastAPI's middleware,
routing and exception handlers costs ~0.2-0.3 ms of the event loop's CPU: with clients that retry
at once (a closed loop), refusals then take the CPU the admitted requests need, and admitted
throughput falls (measured: 40 % of the peak at 256 connections). :class:`SheddingGate` asks a
cheap question first — would the model refuse an item now? — and answers 503 problem+json with
``Retry-After`` as plain ASGI, before the body is read; everything else goes to the app unchanged,
and the app's own check still decides for the requests that pass (the gate only answers early).

A check may also *admit*: it returns a ticket (anything with ``release()``, e.g. the model
runtime's :meth:`~model_runtime.runtime.ModelRuntime.admit_request`) that the request's handler
then uses instead of asking again, so the requests between the gate and the model's queue count
as admitted work; the gate releases it when the request ends, whether or not the handler used it.

A refusal can be held before it is answered (``hold_s``), so that a client retrying at once sends
one try per hold. With ``max_refusals_per_s`` the hold grows with the number of refusals being
held, so that refusals are answered at about that rate however many clients retry (256 or 512
connections cost the same CPU in refusals), up to ``max_hold_s`` (at most the ``Retry-After`` the
answer states, 1 s or more, so a client that honours it waits no longer than it was told). With
``max_refusal_share`` that rate is also bounded by a share of the requests the gate let through
and saw answered (a second each, moving), so refusals cost a bounded share of what the server
spends on its answers, whatever its speed.

::

    app = SheddingGate(app, {("POST", "/v1/score"): lambda: runtime.admit_request("scorer")})
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from shared.errors import EdgeMappedError, ProblemError, ServiceOverloaded, as_problem
from shared.hot_routes import problem_json, route_path, send_answer
from shared.rates import DecayingRate


class Admitted(Protocol):
    """An admission a gate check took for the request; released when the request ends."""

    def release(self) -> None:
        """Give the admission back (idempotent)."""


Refusal = Callable[[], ProblemError | EdgeMappedError | Admitted | None]
"""What a route's model answers an item now: ``None`` or an :class:`Admitted` ticket to take it,
else the error it would raise."""

ANSWERED_TAU_S = 1.0
"""Time constant (s) of the gate's moving rate of answered requests."""


class SheddingGate:
    """ASGI middleware: requests to a guarded ``(method, path)`` whose refusal check says no get their
    problem answer (usually 503 + Retry-After) without reaching ``app``.

    Parameters
    ----------
    app : ASGIApp
        The service app (FastAPI, or hot routes in front of it).
    refusals : mapping of (method, path) -> callable
        Paths relative to the app's mount point; each check must be cheap and must not record
        anything (it runs again, recording, for the requests it lets through).
    hold_s : float
        How long a refused request waits for its answer (0: at once). Clients that retry at once
        (a closed loop) then send one try per ``hold_s`` instead of as fast as refusals come back,
        which would take the CPU the admitted requests need (client and server share it on one box).
    max_refusals_per_s : float, optional
        Hold each refusal at least ``held / max_refusals_per_s`` seconds (``held``: refusals held now,
        this one included), so that retrying clients get about this many refusals a second in all.
    max_refusal_share : float, optional
        Also hold so that refusals are answered at no more than this share of the guarded requests
        answered a second (moving over ~1 s), but at least ``min_refusals_per_s``.
    min_refusals_per_s : float
        Floor of the share's bound (a server answering little still refuses this fast).
    max_hold_s : float
        Longest hold (s).
    latency_target_s : float, optional
        Also refuse while the guarded requests in flight (let through, not yet answered) reach the
        answered rate x this target (Little's law: the most that can be in flight if each is answered
        within the target on average), but never fewer than ``min_in_flight``. This bounds what is
        in flight by the server's measured end-to-end capacity (event loop, framework, model), where
        the model's own admission sees only the model.
    min_in_flight : int
        Floor of the in-flight bound (a server that has answered little yet still takes this many).
    """

    def __init__(self, app: ASGIApp, refusals: Mapping[tuple[str, str], Refusal], *, hold_s: float = 0.0,
                 max_refusals_per_s: float | None = None, max_refusal_share: float | None = None,
                 min_refusals_per_s: float = 20.0, max_hold_s: float = 1.0,
                 latency_target_s: float | None = None, min_in_flight: int = 8) -> None:
        if max_refusals_per_s is not None and max_refusals_per_s <= 0:
            raise ValueError("max_refusals_per_s must be > 0")
        if max_refusal_share is not None and (max_refusal_share <= 0 or min_refusals_per_s <= 0):
            raise ValueError("max_refusal_share and min_refusals_per_s must be > 0")
        self.app = app
        self.refusals = dict(refusals)
        self.hold_s = hold_s
        self.max_refusals_per_s = max_refusals_per_s
        self.max_refusal_share = max_refusal_share
        self.min_refusals_per_s = min_refusals_per_s
        self.max_hold_s = max_hold_s
        self.held = 0
        """Refusals being held now."""
        self.latency_target_s = latency_target_s
        self.min_in_flight = min_in_flight
        self.in_flight = 0
        """Guarded requests let through and not yet answered."""
        self._answered = DecayingRate(time.monotonic, ANSWERED_TAU_S)

    def in_flight_limit(self) -> float | None:
        """Most guarded requests in flight (``None``: no bound): answered a second x the latency target."""
        if self.latency_target_s is None:
            return None
        return max(float(self.min_in_flight), self._answered.per_second() * self.latency_target_s)

    def refusal_rate(self) -> float | None:
        """Refusals a second the hold aims at (``None``: no bound, a fixed ``hold_s``)."""
        bounds = [] if self.max_refusals_per_s is None else [self.max_refusals_per_s]
        if self.max_refusal_share is not None:
            bounds.append(max(self.min_refusals_per_s, self.max_refusal_share * self._answered.per_second()))
        return min(bounds) if bounds else None

    def hold_for(self) -> float:
        """Seconds the next refusal is held: ``hold_s``, longer when many are held (:meth:`refusal_rate`)."""
        rate = self.refusal_rate()
        if rate is None:
            return self.hold_s
        return min(self.max_hold_s, max(self.hold_s, (self.held + 1) / rate))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            check = self.refusals.get((scope["method"], route_path(scope)))
            if check is not None:
                limit = self.in_flight_limit()
                if limit is not None and self.in_flight >= limit:
                    await self._refuse(scope, send, ServiceOverloaded(
                        f"{self.in_flight} requests in flight, the most answered within the latency target"))
                    return
                answer = check()
                if isinstance(answer, BaseException):
                    await self._refuse(scope, send, answer)
                    return
                self.in_flight += 1
                try:
                    await self.app(scope, receive, send)
                finally:
                    self.in_flight -= 1
                    if answer is not None:
                        answer.release()
                    self._answered.add()
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, refusal: ProblemError | EdgeMappedError) -> None:
        """Answer a refused request with its problem, after the hold."""
        problem = as_problem(refusal)
        if problem is None:  # not an error the edge maps: refuse as unavailable, never a 500 here
            problem = ServiceOverloaded(str(refusal) or None)
        hold_s = self.hold_for()
        if hold_s > 0:
            self.held += 1
            try:
                await asyncio.sleep(hold_s)
            finally:
                self.held -= 1
        await send_answer(send, problem.status, problem_json(scope, problem), problem.headers)
