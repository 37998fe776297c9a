"""The load-shedding gate answers a refused request before the app, as the app itself would answer it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import Request

from model_runtime.errors import RuntimeOverloaded
from shared.errors import ProblemError
from shared.shedding import SheddingGate


async def call(app: Any, method: str, path: str) -> list[dict[str, Any]]:
    """One request through ``app``; the messages it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "root_path": "", "headers": []}, receive, send)
    return sent


def test_a_refused_request_gets_the_runtime_overload_problem_without_reaching_the_app() -> None:
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    full: list[ProblemError | RuntimeOverloaded | None] = [RuntimeOverloaded("queue full", retry_after_s=0.4)]
    gate = SheddingGate(app, {("POST", "/predict"): lambda: full[0]})
    refused = asyncio.run(call(gate, "POST", "/predict"))
    assert reached == []
    assert refused[0]["status"] == 503
    headers = dict(refused[0]["headers"])
    assert headers[b"content-type"] == b"application/problem+json" and b"retry-after" in headers
    assert b'"status":503' in refused[1]["body"]

    full[0] = None
    taken = asyncio.run(call(gate, "POST", "/predict"))
    other = asyncio.run(call(gate, "GET", "/predict"))
    assert taken[0]["status"] == other[0]["status"] == 200 and reached == ["/predict", "/predict"]


def test_the_runtime_answers_the_gate_without_counting_anything() -> None:
    import torch

    from model_runtime import ModelNotReady, ModelRuntime, ModelSpec

    runtime = ModelRuntime()

    async def scenario() -> tuple[object, object, float]:
        unknown = runtime.refusal("absent")
        await runtime.load(ModelSpec(name="tiny", version="v1", loader=lambda _ctx: torch.nn.Identity(),
                                     run_batch=lambda model, items: list(model(torch.stack(items))),
                                     max_queue=1, latency_target_ms=50))
        idle = runtime.refusal("tiny")
        await runtime.predict("tiny", torch.zeros(2))
        await runtime.close()
        return unknown, idle, runtime.stats().get("tiny", {}).get("rejected", 0.0)

    unknown, idle, rejected = asyncio.run(scenario())
    assert isinstance(unknown, ModelNotReady) and idle is None and not rejected


def test_a_held_refusal_is_answered_after_the_hold() -> None:
    import time

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a refused request must not reach the app")

    gate = SheddingGate(app, {("POST", "/predict"): lambda: RuntimeOverloaded("full", retry_after_s=1.0)},
                        hold_s=0.05)
    started = time.perf_counter()
    answer = asyncio.run(call(gate, "POST", "/predict"))
    assert answer[0]["status"] == 503 and time.perf_counter() - started >= 0.05


def test_an_admitting_check_hands_its_ticket_to_the_request_and_gets_it_back_at_its_end() -> None:
    released: list[str] = []
    seen_in_app: list[bool] = []

    class Ticket:
        def release(self) -> None:
            released.append("released")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen_in_app.append(released == [])  # still held while the app serves the request
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = SheddingGate(app, {("POST", "/predict"): Ticket})
    answer = asyncio.run(call(gate, "POST", "/predict"))
    assert answer[0]["status"] == 200 and seen_in_app == [True] and released == ["released"]


def test_refusals_are_held_to_a_share_of_the_answered_rate() -> None:
    """Before, the bound was absolute (~500 refusals a second): on a server answering 3,000 a second
    that took a tenth of its CPU in refusals and their clients' retries."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = SheddingGate(app, {("POST", "/predict"): lambda: None}, hold_s=0.01, max_refusals_per_s=500,
                        max_refusal_share=0.05, min_refusals_per_s=5, max_hold_s=5.0)
    assert gate.refusal_rate() == 5  # nothing answered yet: the floor

    async def answer_many() -> None:
        for _ in range(400):
            await call(gate, "POST", "/predict")

    asyncio.run(answer_many())  # 400 answered within well under a second: a moving rate of 200-400 a second
    rate = gate.refusal_rate()
    assert rate is not None and 0.05 * 200 < rate <= 0.05 * 400
    gate.held = 49
    assert gate.hold_for() == pytest.approx(50 / rate, rel=0.01)  # 50 refusals held share the rate


def test_through_fastapi_the_gates_admission_is_the_one_predict_uses() -> None:
    """The ticket reaches the route's ``predict`` through FastAPI's routing (the request's context):
    the model is asked once per request, and nothing stays counted after the answers."""
    import httpx
    import torch
    from fastapi import FastAPI

    from model_runtime import ModelRuntime, ModelSpec

    runtime = ModelRuntime()
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, float]:
        await request.body()
        return {"y": float(await runtime.predict("tiny", torch.ones(2)))}

    gate = SheddingGate(app, {("POST", "/predict"): lambda: runtime.admit_request("tiny")})

    async def scenario() -> tuple[list[int], int, float]:
        await runtime.load(ModelSpec(name="tiny", version="v1", loader=lambda _ctx: torch.nn.Identity(),
                                     run_batch=lambda model, items: [float(x.sum()) for x in items],
                                     latency_target_ms=50))
        batcher = runtime._models["tiny"].batcher
        assert batcher is not None
        asked: list[int] = []
        original = batcher.refusal

        def counting(**kwargs: bool) -> object:
            asked.append(1)
            return original(**kwargs)

        batcher.refusal = counting  # type: ignore[method-assign,assignment]
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answers = await asyncio.gather(*(client.post("/predict", content=b"{}") for _ in range(5)))
        waiting = batcher._waiting_cost()
        await runtime.close()
        return [answer.status_code for answer in answers], len(asked), waiting

    statuses, asked, waiting = asyncio.run(scenario())
    assert statuses == [200] * 5 and asked == 5 and waiting == 0


def test_requests_in_flight_are_bounded_by_the_answered_rate_times_the_latency_target() -> None:
    """Little's law at the edge: past the answered rate x the target in flight, a request waits
    longer than the target on average, wherever it waits (event loop, framework or model)."""
    release = asyncio.Event()
    statuses: list[int] = []

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = SheddingGate(slow_app, {("POST", "/predict"): lambda: None}, latency_target_s=0.05, min_in_flight=3)
    assert gate.in_flight_limit() == 3  # nothing answered yet: the floor

    async def scenario() -> None:
        waiting = [asyncio.create_task(call(gate, "POST", "/predict")) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert gate.in_flight == 3
        refused = await call(gate, "POST", "/predict")  # a fourth: over the bound, refused at once
        statuses.append(refused[0]["status"])
        release.set()
        for task in waiting:
            statuses.append((await task)[0]["status"])

    asyncio.run(scenario())
    assert statuses == [503, 200, 200, 200] and gate.in_flight == 0
    limit = gate.in_flight_limit()
    assert limit is not None and limit == 3  # 3 answered in ~10 ms: a moving rate of ~3 a second, x 0.05 s
