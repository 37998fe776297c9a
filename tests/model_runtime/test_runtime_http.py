"""The runtime behind a real uvicorn server: concurrent HTTP callers are batched, overload is a 503."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pydantic import BaseModel
from runtime_fakes import GatedModel, make_spec

from model_runtime import ModelRuntime, ModelRuntimeError
from shared.errors import install_problem_handlers

MODEL = "http-double"
MAX_QUEUE = 4


class Item(BaseModel):
    x: float


def _positive(x: float) -> float:
    if x < 0:
        raise ValueError("x must be >= 0")
    return x


def build_app(runtime: ModelRuntime, model: GatedModel) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runtime.load(make_spec(model, name=MODEL, max_batch_size=16, max_queue=MAX_QUEUE,
                                     prepare=_positive, warmup_items=[0.0]))
        yield
        await runtime.close()

    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)

    @app.post("/predict")
    async def predict(item: Item) -> dict[str, float]:
        return {"y": await runtime.predict(MODEL, item.x)}

    @app.post("/predict-soon")
    async def predict_soon(item: Item) -> dict[str, float]:
        return {"y": await runtime.predict(MODEL, item.x, timeout_s=0.05)}

    @app.post("/broken")
    async def broken() -> None:
        raise ModelRuntimeError("internal detail of the runtime")

    return app


@pytest.fixture
def served() -> Iterator[tuple[str, ModelRuntime, GatedModel]]:
    """A real uvicorn server on a free loopback port, in a background thread."""
    runtime, model = ModelRuntime(), GatedModel()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(runtime, model), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", runtime, model
    model.release()
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _batch_histogram() -> tuple[float, float]:
    labels = {"model": MODEL}
    return (REGISTRY.get_sample_value("tessera_model_batch_size_count", labels) or 0.0,
            REGISTRY.get_sample_value("tessera_model_batch_size_sum", labels) or 0.0)


async def _until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_http_callers_are_batched_and_overload_is_503(served: tuple[str, ModelRuntime, GatedModel]) -> None:
    base_url, runtime, model = served
    count_before, sum_before = _batch_histogram()

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            model.hold()
            first = asyncio.create_task(client.post("/predict", json={"x": 100}))
            await _until(model.entered.is_set)
            queued = [asyncio.create_task(client.post("/predict", json={"x": x})) for x in range(MAX_QUEUE)]
            await _until(lambda: runtime.stats()[MODEL]["queue_depth"] == MAX_QUEUE)
            refused = await asyncio.gather(*(client.post("/predict", json={"x": 9}) for _ in range(3)))
            model.release()
            admitted = [await first, *await asyncio.gather(*queued)]
            invalid = await client.post("/predict", json={"x": -1})
        return admitted, refused, invalid

    admitted, refused, invalid = asyncio.run(scenario())
    assert [r.status_code for r in admitted] == [200] * (MAX_QUEUE + 1)
    assert [r.json()["y"] for r in admitted] == [200.0, *(2.0 * x for x in range(MAX_QUEUE))]
    for response in refused:
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert int(response.headers["retry-after"]) >= 1
    assert invalid.status_code == 422
    count_after, sum_after = _batch_histogram()
    assert sum_after - sum_before > count_after - count_before  # at least one batch held > 1 item


def test_http_concurrent_load_forms_batches(served: tuple[str, ModelRuntime, GatedModel]) -> None:
    base_url, _runtime, model = served
    count_before, sum_before = _batch_histogram()

    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=limits) as client:
            async def call(x: int) -> httpx.Response:
                for _ in range(20):  # the queue bound is tiny here: honour Retry-After quickly
                    response = await client.post("/predict", json={"x": x})
                    if response.status_code != 503:
                        return response
                    await asyncio.sleep(0.01)
                return response

            return await asyncio.gather(*(call(x) for x in range(64)))

    responses = asyncio.run(scenario())
    assert [r.json()["y"] for r in responses] == [2.0 * x for x in range(64)]
    count_after, sum_after = _batch_histogram()
    assert sum_after - sum_before >= 64 and count_after - count_before < 64
    assert max(len(batch) for batch in model.batches) > 1


def test_http_deadline_is_504_and_an_unexpected_runtime_error_a_bare_500(
        served: tuple[str, ModelRuntime, GatedModel]) -> None:
    base_url, _runtime, model = served

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            model.hold()
            first = asyncio.create_task(client.post("/predict", json={"x": 1}))
            await _until(model.entered.is_set)
            late = await client.post("/predict-soon", json={"x": 2})
            model.release()
            return await first, late, await client.post("/broken")

    first, late, broken = asyncio.run(scenario())
    assert first.status_code == 200
    assert late.status_code == 504 and late.json()["type"].endswith("/deadline-exceeded")
    assert broken.status_code == 500 and broken.headers["content-type"].startswith("application/problem+json")
    assert "internal detail" not in broken.text
