"""RedisMultiplexer and ScriptPipeline on a real Redis: one write per loop turn, replies in order,
NOSCRIPT healed, errors per call, a lost or silent connection fails its callers and reconnects."""

from __future__ import annotations

import asyncio
import contextlib

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.kv import RedisMultiplexer, ScriptPipeline
from tests.conftest import REDIS_TEST_DB, Stack
from tests.support import free_port, wait_until_async

ECHO_OR_FAIL = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return ARGV[1]
"""


def run_scripts(redis_url: str, values: list[str], *, flush_scripts_first: bool = False) -> tuple[list[object], int]:
    """Run the script once per value, concurrently; returns the outcomes and how many writes were sent."""

    async def scenario() -> tuple[list[object], int]:
        multiplexer = RedisMultiplexer(redis_url)
        try:
            await multiplexer.execute("PING")
            if flush_scripts_first:
                await multiplexer.execute("SCRIPT", "FLUSH")
            scripts = ScriptPipeline(multiplexer)
            sha = scripts.register(ECHO_OR_FAIL)
            before = multiplexer.writes
            outcomes = await asyncio.gather(*(scripts.run(sha, [], [value]) for value in values),
                                            return_exceptions=True)
            return list(outcomes), multiplexer.writes - before
        finally:
            await multiplexer.close()

    return asyncio.run(scenario())


def test_calls_of_one_loop_turn_share_one_write(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    outcomes, writes = run_scripts(postgres_stack.redis_url, [f"v{i}" for i in range(20)])
    assert outcomes == [f"v{i}".encode() for i in range(20)]
    assert writes <= 3  # one write, plus SCRIPT LOAD and the retries if the script was not loaded yet


def test_a_flushed_script_is_loaded_again(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    outcomes, writes = run_scripts(postgres_stack.redis_url, ["a", "b"], flush_scripts_first=True)
    assert outcomes == [b"a", b"b"] and writes == 3  # EVALSHA x2, SCRIPT LOAD x2, EVALSHA x2


def test_an_error_fails_only_its_own_call(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    outcomes, _ = run_scripts(postgres_stack.redis_url, ["ok", "fail", "fine"])
    assert outcomes[0] == b"ok" and outcomes[2] == b"fine"
    assert isinstance(outcomes[1], ResponseError) and "asked to fail" in str(outcomes[1])


def test_nothing_to_send_sends_nothing(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    assert run_scripts(postgres_stack.redis_url, []) == ([], 0)


def test_replies_reach_their_own_callers_and_the_database_is_selected(postgres_stack: Stack) -> None:
    assert postgres_stack.redis_url
    url = f"{postgres_stack.redis_url.rsplit('/', 1)[0]}/{REDIS_TEST_DB}"  # not the stack's own database

    async def scenario() -> list[object]:
        multiplexer = RedisMultiplexer(url)
        try:
            await multiplexer.execute("SET", "tessera:test:mux", b"\x00binary")
            return await asyncio.gather(*(multiplexer.execute("INCRBY", "tessera:test:counter", i)
                                          for i in range(1, 51)),
                                        multiplexer.execute("GET", "tessera:test:mux"),
                                        multiplexer.execute("GET", "tessera:test:absent"))
        finally:
            await multiplexer.close()

    sync = redis.Redis.from_url(url)
    sync.delete("tessera:test:counter")
    replies = asyncio.run(scenario())
    assert replies[:50] == [sum(range(1, i + 1)) for i in range(1, 51)]  # each caller got its own reply
    assert replies[50:] == [b"\x00binary", None]
    assert sync.get("tessera:test:mux") == b"\x00binary"  # written to that database, as the URL says
    sync.delete("tessera:test:mux", "tessera:test:counter")


def test_a_killed_connection_fails_its_callers_and_the_next_command_reconnects(postgres_stack: Stack) -> None:
    url = postgres_stack.redis_url
    assert url

    async def scenario() -> tuple[BaseException | None, object]:
        multiplexer = RedisMultiplexer(url)
        try:
            client_id = await multiplexer.execute("CLIENT", "ID")
            blocked = asyncio.ensure_future(multiplexer.execute("BLPOP", "tessera:test:never", 5))
            admin = redis.Redis.from_url(url)
            await wait_until_async(lambda: any(client["id"] == str(client_id) and client["cmd"] == "blpop"
                                               for client in admin.client_list()), 10, "the BLPOP to block")
            admin.client_kill_filter(_id=client_id)
            failure = None
            try:
                await blocked
            except RedisConnectionError as exc:
                failure = exc
            return failure, await multiplexer.execute("PING")
        finally:
            await multiplexer.close()

    failure, pong = asyncio.run(scenario())
    assert isinstance(failure, RedisConnectionError)
    assert pong == b"PONG"


def test_a_silent_server_times_out_instead_of_hanging() -> None:
    async def scenario() -> BaseException | None:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while await reader.read(1024):
                    pass  # accepts every command, answers none

        port = free_port()
        server = await asyncio.start_server(swallow, "127.0.0.1", port)
        multiplexer = RedisMultiplexer(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        failure = None
        try:  # a hang ends in wait_for's own TimeoutError (not redis's), failing the test
            await asyncio.wait_for(multiplexer.execute("PING"), 30)
        except RedisTimeoutError as exc:
            failure = exc
        await multiplexer.close()
        server.close()
        return failure

    failure = asyncio.run(scenario())
    assert isinstance(failure, RedisTimeoutError) and "within" in str(failure)


def test_no_server_is_a_connection_error() -> None:
    async def scenario() -> None:
        await RedisMultiplexer(f"redis://127.0.0.1:{free_port()}/0").execute("PING")

    try:
        asyncio.run(scenario())
    except RedisConnectionError as exc:
        assert "cannot connect" in str(exc)
    else:
        raise AssertionError("expected a connection error")
