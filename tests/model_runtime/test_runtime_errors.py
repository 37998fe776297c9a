"""The runtime's own errors: plain Python exceptions for Celery callers, problem+json at the HTTP edge."""

from __future__ import annotations

import pytest

from model_runtime.errors import (
    BadInput,
    ModelNotReady,
    ModelRuntimeError,
    RuntimeOverloaded,
    RuntimeTimeout,
    problem_for,
)
from shared.errors import ProblemError, as_problem


@pytest.mark.parametrize(("error", "status", "slug"), [
    (RuntimeOverloaded("queue full", retry_after_s=2.4), 503, "overloaded"),
    (ModelNotReady("not loaded"), 503, "not-ready"),
    (RuntimeTimeout("too late"), 504, "deadline-exceeded"),
    (BadInput("not a number", cost=9, budget=4), 422, "validation-error"),
])
def test_runtime_errors_are_not_http_errors_but_map_to_problems_at_the_edge(
        error: ModelRuntimeError, status: int, slug: str) -> None:
    assert not isinstance(error, ProblemError)  # a Celery caller sees a plain Python error
    problem = as_problem(error)  # what shared.errors' handlers answer with
    assert problem is not None and problem.status == status and problem.type_slug == slug
    assert problem.detail == str(error)


def test_overloaded_carries_retry_after_and_bad_input_its_details() -> None:
    overloaded = problem_for(RuntimeOverloaded("busy", retry_after_s=2.4))
    assert overloaded is not None and overloaded.headers == {"Retry-After": "2"}
    too_big = problem_for(BadInput("too big", cost=9, budget=4))
    assert too_big is not None and too_big.to_problem()["budget"] == 4


def test_python_idioms_still_catch_them() -> None:
    assert isinstance(RuntimeTimeout("late"), TimeoutError)
    assert isinstance(BadInput("bad"), ValueError)


def test_any_other_runtime_error_is_unexpected_at_the_edge() -> None:
    assert as_problem(ModelRuntimeError("a prepare worker process died")) is None  # logged, a generic 500
