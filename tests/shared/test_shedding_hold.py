"""The gate's refusal hold grows with the refusals being held, so retrying clients get a bounded refusal rate."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest

from model_runtime.errors import RuntimeOverloaded
from shared import shedding
from shared.shedding import SheddingGate


async def refused_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("a refused request must not reach the app")


def gate(**options: Any) -> SheddingGate:
    return SheddingGate(refused_app, {("POST", "/predict"): lambda: RuntimeOverloaded("full", retry_after_s=1.0)},
                        **options)


def test_without_a_rate_bound_the_hold_is_fixed() -> None:
    fixed = gate(hold_s=0.2)
    fixed.held = 500
    assert fixed.hold_for() == 0.2


def test_the_hold_spreads_the_refusals_held_over_the_rate_bound_within_its_limits() -> None:
    bounded = gate(hold_s=0.2, max_refusals_per_s=500, max_hold_s=1.0)
    assert bounded.hold_for() == 0.2  # few refused: the base hold
    bounded.held = 127  # c=256 past saturation: ~128 clients in refusals, each back after its hold
    assert bounded.hold_for() == pytest.approx(128 / 500)  # -> ~500 refusals a second in all
    bounded.held = 383  # c=512
    assert bounded.hold_for() == pytest.approx(384 / 500)
    bounded.held = 10_000
    assert bounded.hold_for() == 1.0  # never past max_hold_s (the Retry-After it states is >= 1 s)


def test_concurrent_refusals_are_held_longer_as_more_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    holds: list[float] = []
    release = asyncio.Event()
    real_sleep = asyncio.sleep  # the gate's module is asyncio itself: the patch below is everyone's

    async def fake_sleep(seconds: float) -> None:  # records the hold, keeps the refusal held until released
        holds.append(seconds)
        await release.wait()

    monkeypatch.setattr(shedding.asyncio, "sleep", fake_sleep)
    bounded = gate(hold_s=0.001, max_refusals_per_s=100)
    sent: list[list[MutableMapping[str, Any]]] = [[] for _ in range(5)]

    async def one(messages: list[MutableMapping[str, Any]]) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            messages.append(message)

        await bounded({"type": "http", "method": "POST", "path": "/predict", "root_path": "", "headers": []},
                      receive, send)

    async def scenario() -> None:
        tasks = [asyncio.ensure_future(one(messages)) for messages in sent]
        while len(holds) < 5:
            await real_sleep(0)
        assert bounded.held == 5
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert holds == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert bounded.held == 0 and all(messages[0]["status"] == 503 for messages in sent)
