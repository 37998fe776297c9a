"""Two API replicas (two uvicorn servers on one database): a change made through one path is used
by the other, through caches bounded by the documented second (``API_KEY_MAX_AGE_S`` /
``TENANT_CACHE_MAX_AGE_S``).

That the caches never answer past their bound is shown on a clock the test moves
(tests/shared/test_cache.py); here the replicas are shown to use those caches with that bound, and
the change to reach the other replica. The delay seen is printed, not asserted: on a loaded machine
a wall-clock bound fails for reasons that are not the code's.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy.orm import Session

from shared.security import ApiKey
from tests.conftest import Variant, variant_stack
from tests.fraud.conftest import FraudServer, FraudTenant, run_cli, serve_fraud, transaction

BOUND_S = 1.0
PROPAGATION_TIMEOUT_S = 30.0
"""Generous: how long a test waits for a change it knows will reach the other replica."""


@pytest.fixture(scope="module")
def replicas(request: pytest.FixtureRequest, stack_variant: Variant) -> Iterator[tuple[FraudServer, FraudServer]]:
    stack = variant_stack(request, stack_variant)
    run_cli(stack, "db", "upgrade")
    with contextlib.ExitStack() as servers:
        first = servers.enter_context(serve_fraud(stack, name="replica-1"))
        second = servers.enter_context(serve_fraud(stack, name="replica-2"))
        yield first, second


def on(server: FraudServer, tenant: FraudTenant) -> FraudTenant:
    """``tenant`` talking to ``server``."""
    return FraudTenant(tenant.tenant_id, tenant.api_key, tenant.webhook_secret, server.base_url)


def test_api_keys_and_tenant_policies_are_cached_for_at_most_the_documented_second() -> None:
    from services.fraud.scoring import tenant_policies
    from shared.security import principal_cache

    assert principal_cache.max_age_s == tenant_policies.max_age_s == BOUND_S


def seconds_until(condition: Callable[[], bool], limit_s: float) -> float:
    """How long until ``condition()`` holds (polled every 20 ms); fails past ``limit_s``."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < limit_s, f"still not seen after {elapsed:.2f}s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_key_revoked_with_the_cli_is_refused_by_the_other_replica_from_then_on(
        replicas: tuple[FraudServer, FraudServer]) -> None:
    first, second = replicas
    tenant = first.new_tenant()
    answers: list[tuple[float, int]] = []  # (wall-clock start of the request, status) on replica 2
    stop = threading.Event()

    def keep_using_the_key() -> None:  # the key stays hot in replica 2's cache throughout
        with on(second, tenant).client() as two:
            while not stop.is_set():
                started = time.time()
                answers.append((started, two.get("/settings").status_code))
                time.sleep(0.02)

    user = threading.Thread(target=keep_using_the_key, daemon=True)
    user.start()
    try:
        seconds_until(lambda: bool(answers) and answers[-1][1] == 200, PROPAGATION_TIMEOUT_S)
        run_cli(first.stack, "keys", "revoke", tenant.api_key.split("_")[1])
        seconds_until(lambda: answers[-1][1] == 401, PROPAGATION_TIMEOUT_S)
        refused_at = len(answers)
        seconds_until(lambda: len(answers) >= refused_at + 5, PROPAGATION_TIMEOUT_S)  # and it stays refused
    finally:
        stop.set()
        user.join()
    with Session(first.engine) as session:
        revoked_at = session.get(ApiKey, tenant.api_key.split("_")[1]).revoked_at  # type: ignore[union-attr]
    assert revoked_at is not None
    last_accepted = max(started for started, status in answers if status == 200)
    accepted_for = last_accepted - revoked_at.timestamp()
    print(f"replica 2 accepted the key until {accepted_for:.3f}s after its revocation")
    statuses = [status for _, status in answers]
    first_refusal = statuses.index(401)
    assert set(statuses[:first_refusal]) == {200} and set(statuses[first_refusal:]) == {401}, statuses
    body, headers = tenant.signed(transaction())
    with on(second, tenant).client() as two:
        assert two.post("/transactions", content=body, headers=headers).status_code == 401  # the hot route too


def test_thresholds_changed_on_one_replica_are_used_by_the_other(
        replicas: tuple[FraudServer, FraudServer]) -> None:
    first, second = replicas
    tenant = first.new_tenant()
    with on(first, tenant).client() as one:
        assert one.put("/settings", json={"review_threshold": 1.0, "decline_threshold": 1.0}).status_code == 200

    def decision_on_second() -> str:
        body, headers = tenant.signed(transaction())
        with on(second, tenant).client() as two:
            answer: httpx.Response = two.post("/transactions", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["decision"])

    seconds_until(lambda: decision_on_second() == "approve", PROPAGATION_TIMEOUT_S)  # replica 2 holds them
    with on(first, tenant).client() as one:
        assert one.put("/settings", json={"review_threshold": 0.0, "decline_threshold": 1.0}).status_code == 200
    waited = seconds_until(lambda: decision_on_second() == "review", PROPAGATION_TIMEOUT_S)
    print(f"replica 2 used the new thresholds after {waited:.3f}s")
    assert [decision_on_second() for _ in range(3)] == ["review"] * 3  # and keeps using them
