"""Load shedding in front of the HTTP stack: refuse at once what the model behind a route would refuse.

Past saturation most requests are refused, and a refusal that goes through FastAPI's middleware,
routing and exception handlers costs ~0.2-0.3 ms of the event loop's CPU: with clients that retry
at once (a closed loop), refusals then take the CPU the admitted requests need, and admitted
throughput falls (measured: 40 % of the peak at 256 connections). :class:`SheddingGate` asks a
cheap question first — would the model refuse an item now? — and answers 503 problem+json with
``Retry-After`` as plain ASGI, before the body is read; everything else goes to the app unchanged,
and the app's own check still decides for the requests that pass (the gate only answers early).

A refusal can be held before it is answered (``hold_s``), so that a client retrying at once sends
one try per hold. With ``max_refusals_per_s`` the hold grows with the number of refusals being
held, so that refusals are answered at about that rate however many clients retry (256 or 512
connections cost the same CPU in refusals), up to ``max_hold_s`` (at most the ``Retry-After`` the
answer states, 1 s or more, so a client that honours it waits no longer than it was told).

::

    app = SheddingGate(app, {("POST", "/v1/score"): lambda: runtime.refusal("scorer")})
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from shared.errors import EdgeMappedError, ProblemError, as_problem
from shared.hot_routes import problem_json, route_path, send_answer

Refusal = Callable[[], ProblemError | EdgeMappedError | None]
"""What a route's model would answer an item now: ``None`` to take it, else the error it would raise."""


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
    max_hold_s : float
        Longest hold (s).
    """

    def __init__(self, app: ASGIApp, refusals: Mapping[tuple[str, str], Refusal], *, hold_s: float = 0.0,
                 max_refusals_per_s: float | None = None, max_hold_s: float = 1.0) -> None:
        if max_refusals_per_s is not None and max_refusals_per_s <= 0:
            raise ValueError("max_refusals_per_s must be > 0")
        self.app = app
        self.refusals = dict(refusals)
        self.hold_s = hold_s
        self.max_refusals_per_s = max_refusals_per_s
        self.max_hold_s = max_hold_s
        self.held = 0
        """Refusals being held now."""

    def hold_for(self) -> float:
        """Seconds the next refusal is held: ``hold_s``, longer when many are held (``max_refusals_per_s``)."""
        if self.max_refusals_per_s is None:
            return self.hold_s
        return min(self.max_hold_s, max(self.hold_s, (self.held + 1) / self.max_refusals_per_s))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            check = self.refusals.get((scope["method"], route_path(scope)))
            refusal = check() if check is not None else None
            problem = as_problem(refusal) if refusal is not None else None
            if problem is not None:
                hold_s = self.hold_for()
                if hold_s > 0:
                    self.held += 1
                    try:
                        await asyncio.sleep(hold_s)
                    finally:
                        self.held -= 1
                await send_answer(send, problem.status, problem_json(scope, problem), problem.headers)
                return
        await self.app(scope, receive, send)
