"""Choosing the window-state store: once per process from the settings, again only when told."""

from __future__ import annotations

import pytest

from shared.config import get_settings
from shared.window_state import WindowBackend, WindowStoreSelector, configured_backend, reset_window_stores


class Built:
    """A stand-in store that remembers which builder made it."""

    def __init__(self, backend: WindowBackend) -> None:
        self.backend = backend


def counting_selector(built: list[Built]) -> WindowStoreSelector[Built]:
    def build(backend: WindowBackend) -> Built:
        built.append(Built(backend))
        return built[-1]

    return WindowStoreSelector(database=lambda: build(WindowBackend.DATABASE),
                               redis=lambda: build(WindowBackend.REDIS))


def test_the_database_store_without_a_redis_url_and_the_redis_store_with_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESSERA_REDIS_URL", raising=False)
    get_settings.cache_clear()
    assert configured_backend() is WindowBackend.DATABASE
    assert counting_selector([])().backend is WindowBackend.DATABASE
    monkeypatch.setenv("TESSERA_REDIS_URL", "redis://127.0.0.1:6379/0")
    get_settings.cache_clear()
    assert configured_backend() is WindowBackend.REDIS
    assert counting_selector([])().backend is WindowBackend.REDIS


def test_the_store_is_built_once_and_again_after_a_reset_or_new_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Built] = []
    selector = counting_selector(built)
    store = selector()
    assert all(selector() is store for _ in range(3)) and len(built) == 1
    selector.reset()
    assert selector() is not store and len(built) == 2
    reset_window_stores()
    selector()
    assert len(built) == 3
    monkeypatch.setenv("TESSERA_REDIS_URL", "redis://127.0.0.1:6379/0")
    get_settings.cache_clear()  # what a test switching stacks does
    assert selector().backend is WindowBackend.REDIS and len(built) == 4
