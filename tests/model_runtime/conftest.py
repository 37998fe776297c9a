"""Fixtures for the model runtime tests (helpers live in ``runtime_fakes``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from model_runtime import ModelRuntime


@pytest.fixture
def runtime() -> Iterator[ModelRuntime]:
    """A fresh runtime per test (not the process-wide one), closed afterwards."""
    fresh = ModelRuntime()
    yield fresh
    fresh.close_sync()
