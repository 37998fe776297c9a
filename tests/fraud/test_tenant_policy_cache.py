"""Pure logic of the per-process tenant policy cache (the database read is replaced by a counter)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from services.fraud import scoring
from services.fraud.rules import ActiveRules
from services.fraud.schemas import TenantSettingsIn
from services.fraud.scoring import TenantPolicy, TenantPolicyCache
from shared.errors import NotReady


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every simulated database read, in order; each takes 50 ms and returns a new secret."""
    calls: list[str] = []
    lock = threading.Lock()

    def slow_read(tenant_id: str) -> TenantPolicy:
        time.sleep(0.05)
        with lock:
            calls.append(tenant_id)
            secret = f"secret-{len(calls)}"
        return TenantPolicy((secret,), TenantSettingsIn(), ActiveRules(version=0, rules=()))

    monkeypatch.setattr(scoring, "load_tenant_policy", slow_read)
    return calls


def test_concurrent_first_reads_share_one_database_visit(reads: list[str]) -> None:
    async def scenario() -> list[TenantPolicy]:
        cache = TenantPolicyCache()
        return await asyncio.gather(*(cache.get("bank") for _ in range(20)))

    policies = asyncio.run(scenario())
    assert reads == ["bank"]
    assert {p.webhook_secrets for p in policies} == {("secret-1",)}


def _age_entry(cache: TenantPolicyCache, tenant_id: str, age_s: float) -> None:
    entry = cache._entries[tenant_id]
    cache._entries[tenant_id] = dataclasses.replace(entry, read_started=time.monotonic() - age_s)


def test_an_aging_entry_is_answered_at_once_and_refreshed_once(reads: list[str]) -> None:
    async def scenario() -> tuple[list[TenantPolicy], TenantPolicy]:
        cache = TenantPolicyCache()
        await cache.get("bank")
        _age_entry(cache, "bank", (scoring.TENANT_CACHE_REFRESH_AFTER_S + scoring.TENANT_CACHE_MAX_AGE_S) / 2)
        started = time.monotonic()
        aging = await asyncio.gather(*(cache.get("bank") for _ in range(20)))
        assert time.monotonic() - started < 0.04  # nobody waited for the database
        await asyncio.sleep(0.1)
        return aging, await cache.get("bank")

    aging, refreshed = asyncio.run(scenario())
    assert {p.webhook_secrets for p in aging} == {("secret-1",)}
    assert reads == ["bank", "bank"] and refreshed.webhook_secrets == ("secret-2",)


def test_an_entry_past_its_age_limit_is_never_answered(reads: list[str]) -> None:
    async def scenario() -> list[TenantPolicy]:
        cache = TenantPolicyCache()
        await cache.get("bank")
        _age_entry(cache, "bank", scoring.TENANT_CACHE_MAX_AGE_S)
        return await asyncio.gather(*(cache.get("bank") for _ in range(20)))

    assert {p.webhook_secrets for p in asyncio.run(scenario())} == {("secret-2",)}  # all waited for one read
    assert reads == ["bank", "bank"]


def test_a_database_that_cannot_be_read_is_a_503(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(tenant_id: str) -> TenantPolicy:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("database down"))

    monkeypatch.setattr(scoring, "load_tenant_policy", unreachable)
    with pytest.raises(NotReady, match="cannot be read") as caught:
        asyncio.run(TenantPolicyCache().get("bank"))
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}


def test_invalidate_drops_a_read_started_before_the_change(reads: list[str]) -> None:
    async def scenario() -> TenantPolicy:
        cache = TenantPolicyCache()
        first = asyncio.ensure_future(cache.get("bank"))
        await asyncio.sleep(0.01)  # the read is in flight
        cache.invalidate("bank")
        await first
        return await cache.get("bank")

    after = asyncio.run(scenario())
    assert after.webhook_secrets == ("secret-2",)  # read again after the change, not the old read
    assert reads == ["bank", "bank"]
