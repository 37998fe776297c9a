"""Pure logic of the per-process tenant policy cache (the database read is replaced by a counter
that can be held open: what callers get while a read is in flight is seen on events, not timed)."""

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
from tests.support import wait_until_async

WAIT_S = 10.0
"""Generous: how long a test waits for what it knows will happen (a read to start or land)."""


class PolicyReads:
    """Every simulated database read, in order; each returns a new secret; :meth:`hold` keeps them in flight."""

    def __init__(self) -> None:
        self.tenants: list[str] = []
        self.released = threading.Event()
        self.released.set()
        self._lock = threading.Lock()

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def read(self, tenant_id: str) -> TenantPolicy:
        with self._lock:
            self.tenants.append(tenant_id)
            secret = f"secret-{len(self.tenants)}"
        assert self.released.wait(WAIT_S), "a held read was never released"
        return TenantPolicy((secret,), TenantSettingsIn(), ActiveRules(version=0, rules=()))

    async def wait_started(self, count: int) -> None:
        await wait_until_async(lambda: len(self.tenants) == count, WAIT_S, f"database read {count} to start")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> PolicyReads:
    database = PolicyReads()
    monkeypatch.setattr(scoring, "load_tenant_policy", database.read)
    return database


def test_concurrent_first_reads_share_one_database_visit(reads: PolicyReads) -> None:
    async def scenario() -> list[TenantPolicy]:
        cache = TenantPolicyCache()
        reads.hold()
        callers = asyncio.gather(*(cache.get("bank") for _ in range(20)))
        await reads.wait_started(1)
        reads.release()
        return await callers

    policies = asyncio.run(scenario())
    assert reads.tenants == ["bank"]
    assert {p.webhook_secrets for p in policies} == {("secret-1",)}


def _age_entry(cache: TenantPolicyCache, tenant_id: str, age_s: float) -> None:
    entry = cache._entries[tenant_id]
    cache._entries[tenant_id] = dataclasses.replace(entry, read_started=time.monotonic() - age_s)


def test_an_aging_entry_is_answered_at_once_and_refreshed_once(reads: PolicyReads) -> None:
    async def scenario() -> tuple[list[TenantPolicy], TenantPolicy]:
        cache = TenantPolicyCache()
        await cache.get("bank")
        _age_entry(cache, "bank", (scoring.TENANT_CACHE_REFRESH_AFTER_S + scoring.TENANT_CACHE_MAX_AGE_S) / 2)
        reads.hold()
        callers = asyncio.gather(*(cache.get("bank") for _ in range(20)))
        aging = await asyncio.wait_for(callers, WAIT_S)  # nobody waited for the read held in flight
        await reads.wait_started(2)
        reads.release()
        await wait_until_async(lambda: cache._entries["bank"].value.webhook_secrets == ("secret-2",), WAIT_S,
                               "the background read to refresh the entry")
        return aging, await cache.get("bank")

    aging, refreshed = asyncio.run(scenario())
    assert {p.webhook_secrets for p in aging} == {("secret-1",)}
    assert reads.tenants == ["bank", "bank"] and refreshed.webhook_secrets == ("secret-2",)


def test_an_entry_past_its_age_limit_is_never_answered(reads: PolicyReads) -> None:
    async def scenario() -> list[TenantPolicy]:
        cache = TenantPolicyCache()
        await cache.get("bank")
        _age_entry(cache, "bank", scoring.TENANT_CACHE_MAX_AGE_S)
        return await asyncio.gather(*(cache.get("bank") for _ in range(20)))

    assert {p.webhook_secrets for p in asyncio.run(scenario())} == {("secret-2",)}  # all waited for one read
    assert reads.tenants == ["bank", "bank"]


def test_a_database_that_cannot_be_read_is_a_503(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(tenant_id: str) -> TenantPolicy:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("database down"))

    monkeypatch.setattr(scoring, "load_tenant_policy", unreachable)
    with pytest.raises(NotReady, match="cannot be read") as caught:
        asyncio.run(TenantPolicyCache().get("bank"))
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}


def test_invalidate_drops_a_read_started_before_the_change(reads: PolicyReads) -> None:
    async def scenario() -> TenantPolicy:
        cache = TenantPolicyCache()
        reads.hold()
        first = asyncio.ensure_future(cache.get("bank"))
        await reads.wait_started(1)  # the read is in flight
        cache.invalidate("bank")
        reads.release()
        await first
        return await cache.get("bank")

    after = asyncio.run(scenario())
    assert after.webhook_secrets == ("secret-2",)  # read again after the change, not the old read
    assert reads.tenants == ["bank", "bank"]
