"""ScriptPipeline on a real Redis: calls of one loop turn share a pipeline, NOSCRIPT is healed, errors stay per call."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.kv import ScriptPipeline
from tests.conftest import Stack

ECHO_OR_FAIL = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return ARGV[1]
"""


def run_calls(redis_url: str, values: list[str], *, flush_scripts_first: bool = False) -> tuple[list[object], int]:
    """Run the script once per value, concurrently; returns the outcomes and how many pipelines were sent."""

    async def scenario() -> tuple[list[object], int]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            if flush_scripts_first:
                await client.script_flush()
            scripts = ScriptPipeline(client)
            sha = scripts.register(ECHO_OR_FAIL)
            sent = 0
            execute = scripts._execute

            async def counting(batch):  # type: ignore[no-untyped-def]
                nonlocal sent
                sent += 1
                return await execute(batch)

            scripts._execute = counting  # type: ignore[method-assign]
            outcomes = await asyncio.gather(*(scripts.run(sha, [], [value]) for value in values),
                                            return_exceptions=True)
            return list(outcomes), sent
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def test_calls_of_one_loop_turn_share_one_pipeline(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    outcomes, sent = run_calls(postgres_stack.redis_url, [f"v{i}" for i in range(20)])
    assert outcomes == [f"v{i}".encode() for i in range(20)]
    assert sent <= 2  # one pipeline, plus one retry if the script was not loaded yet


def test_a_flushed_script_is_loaded_again(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    outcomes, sent = run_calls(postgres_stack.redis_url, ["a", "b"], flush_scripts_first=True)
    assert outcomes == [b"a", b"b"] and sent == 2


def test_an_error_fails_only_its_own_call(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    outcomes, _ = run_calls(postgres_stack.redis_url, ["ok", "fail", "fine"])
    assert outcomes[0] == b"ok" and outcomes[2] == b"fine"
    assert isinstance(outcomes[1], ResponseError) and "asked to fail" in str(outcomes[1])


def test_nothing_to_send_sends_nothing(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    assert run_calls(postgres_stack.redis_url, []) == ([], 0)
