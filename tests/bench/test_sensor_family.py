"""The sensor-window family of ``bench/families/sensor.py``: the runtime's batched answers are the naive ones."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from bench.families.sensor import (
    SENSORS,
    STEPS,
    Answer,
    build_model,
    load_chosen,
    load_eager,
    make_windows,
    parameter_count,
    predict_many,
    score_one,
    score_runtime,
)
from model_runtime import BadInput, ModelRuntime

TOLERANCE = 1e-5


def assert_close(answers: list[Answer], expected: list[Answer]) -> None:
    assert len(answers) == len(expected)
    for ours, theirs in zip(answers, expected, strict=True):
        assert ours.keys() == theirs.keys() == {"p_failure", "rul_hours"}
        for name in ours:
            assert ours[name] == pytest.approx(theirs[name], abs=TOLERANCE)


def with_runtime(work: Callable[[ModelRuntime], Awaitable[Any]]) -> Any:
    """Run ``work`` on a fresh runtime (not the process-wide one) in a new loop, closing it after."""

    async def run() -> Any:
        runtime = ModelRuntime()
        try:
            return await work(runtime)
        finally:
            await runtime.close()

    return asyncio.run(run())


def test_the_model_answers_a_probability_and_a_non_negative_life() -> None:
    model = build_model()
    answer = score_one(model, make_windows(1)[0])
    assert 0.0 < answer["p_failure"] < 1.0 and answer["rul_hours"] >= 0.0
    assert parameter_count(model) == parameter_count(build_model(seed=5)) > 50_000


def test_batched_answers_equal_unbatched_and_every_caller_is_answered() -> None:
    model = build_model()
    windows = make_windows(48)
    expected = [score_one(model, window) for window in windows]

    async def work(runtime: ModelRuntime) -> tuple[list[Answer], float | None, list[Answer]]:
        served = await load_eager(runtime, model)
        answers, latencies, _wall = await score_runtime(runtime, served.name, windows, callers=8)
        assert len(latencies) == len(windows)
        bulk = await asyncio.to_thread(predict_many, runtime, served.name, windows)
        return answers, served.counter.mean, bulk

    answers, mean_batch, bulk = with_runtime(work)
    assert_close(answers, expected)
    assert_close(bulk, expected)
    assert mean_batch is not None and mean_batch > 1.0  # the callers really shared batches


def test_the_chosen_backend_answers_as_eager() -> None:
    model = build_model()
    windows = make_windows(24, seed=4)
    expected = [score_one(model, window) for window in windows]

    async def work(runtime: ModelRuntime) -> tuple[str, list[Answer]]:
        served = await load_chosen(runtime, model, repeats=2, candidates=("eager", "onnx"))
        answers, _latencies, _wall = await score_runtime(runtime, served.name, windows, callers=4)
        return served.backend, answers

    backend, answers = with_runtime(work)
    assert backend in {"eager", "onnx"}
    assert_close(answers, expected)


def test_a_bad_window_fails_alone() -> None:
    model = build_model()
    good = make_windows(6, seed=9)
    with_nan = good[0].copy()
    with_nan[3, 5] = np.nan
    bad = [with_nan, np.zeros((STEPS + 1, SENSORS), dtype=np.float32), good[1].astype(np.float64), good[2].tolist()]

    async def work(runtime: ModelRuntime) -> list[Any]:
        served = await load_eager(runtime, model)
        calls = [runtime.predict(served.name, window) for window in [*good, *bad]]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    outcomes = with_runtime(work)
    assert_close(outcomes[:len(good)], [score_one(model, window) for window in good])
    assert all(isinstance(outcome, BadInput) for outcome in outcomes[len(good):])
