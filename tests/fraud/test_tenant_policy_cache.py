"""Pure logic of the per-process tenant policy cache (the database read is replaced by a counter)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.fraud import scoring
from services.fraud.rules import ActiveRules
from services.fraud.schemas import TenantSettingsIn
from services.fraud.scoring import TenantPolicy, TenantPolicyCache


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


def test_a_stale_entry_is_answered_at_once_and_refreshed_once(reads: list[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> tuple[list[TenantPolicy], TenantPolicy]:
        cache = TenantPolicyCache()
        await cache.get("bank")
        monkeypatch.setattr(scoring, "TENANT_CACHE_TTL_S", 0.0)  # the next refresh expires at once too
        cache._entries["bank"] = (0.0, cache._entries["bank"][1])  # expired
        started = time.monotonic()
        stale = await asyncio.gather(*(cache.get("bank") for _ in range(20)))
        assert time.monotonic() - started < 0.04  # nobody waited for the database
        await asyncio.sleep(0.1)
        monkeypatch.setattr(scoring, "TENANT_CACHE_TTL_S", 10.0)
        return stale, cache._entries["bank"][1]

    stale, refreshed = asyncio.run(scenario())
    assert {p.webhook_secrets for p in stale} == {("secret-1",)}
    assert reads == ["bank", "bank"] and refreshed.webhook_secrets == ("secret-2",)


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
