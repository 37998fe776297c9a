"""The model runtime's own errors: plain Python exceptions, with no HTTP meaning of their own.

A Celery task or a script calling the runtime catches these. At the HTTP edge,
``shared.errors.install_problem_handlers`` answers them through the mapping this module registers
with :func:`shared.errors.register_problem_mapping` when it is imported (``shared`` never imports
the runtime):

=====================  ===================================================
error                  answer at the edge
=====================  ===================================================
RuntimeOverloaded      503 ``overloaded``, ``Retry-After: <retry_after_s>``
ModelNotReady          503 ``not-ready``
RuntimeTimeout         504 ``deadline-exceeded``
BadInput               422 ``validation-error``
=====================  ===================================================
"""

from __future__ import annotations

from typing import Any

from shared.errors import (
    DeadlineExceeded,
    EdgeMappedError,
    NotReady,
    ProblemError,
    ServiceOverloaded,
    UnprocessableContent,
    register_problem_mapping,
)


class ModelRuntimeError(EdgeMappedError):
    """Base of every error the runtime raises about serving (not the model's own failures)."""


class RuntimeOverloaded(ModelRuntimeError):
    """Refused at admission: the model cannot take this item in time. Retry after ``retry_after_s``.

    Attributes
    ----------
    retry_after_s : float
        The runtime's estimate of when capacity frees up (s).
    """

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RuntimeTimeout(ModelRuntimeError, TimeoutError):
    """An item was not answered within its deadline; it was dropped rather than answered late."""


class BadInput(ModelRuntimeError, ValueError):
    """One item was refused (``prepare`` failed, or its cost exceeds the batch budget); it fails alone.

    Attributes
    ----------
    extensions : dict
        Extra members for the problem document (e.g. ``cost`` and ``budget``).
    """

    def __init__(self, message: str, **extensions: Any) -> None:
        super().__init__(message)
        self.extensions = extensions


class ModelNotReady(ModelRuntimeError):
    """The model is not loaded, or is being unloaded."""


def problem_for(error: ModelRuntimeError) -> ProblemError | None:
    """The problem+json error the HTTP edge answers ``error`` with (see the module docstring); ``None``
    for any other runtime error: an unexpected one, logged and answered with a generic 500."""
    if isinstance(error, RuntimeOverloaded):
        return ServiceOverloaded(str(error), retry_after_s=error.retry_after_s)
    if isinstance(error, RuntimeTimeout):
        return DeadlineExceeded(str(error))
    if isinstance(error, BadInput):
        return UnprocessableContent(str(error), **error.extensions)
    if isinstance(error, ModelNotReady):
        return NotReady(str(error))
    return None


register_problem_mapping(ModelRuntimeError, problem_for)
