"""Redis clients for shared fast state (velocity windows, idempotency answers, write-behind streams).

Fast state is optional: with ``TESSERA_REDIS_URL`` unset (the embedded default) every vertical
keeps its state in the database instead (:func:`redis_configured`); window state is chosen once,
by :mod:`shared.window_state`, and its callers never test this switch.
Clients are cached per process (the async one per event loop: a client's connections belong to
the loop that opened them).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import get_settings
from shared.errors import NotReady

logger = logging.getLogger("tessera.kv")

MAX_CONNECTIONS = 64
POOL_TIMEOUT_S = 2.0
_async_clients: dict[int, aioredis.Redis] = {}
_multiplexers: dict[int, RedisMultiplexer] = {}


def redis_configured() -> bool:
    """Whether a Redis URL is set for fast shared state."""
    return bool(get_settings().redis_url)


def _url() -> str:
    url = get_settings().redis_url
    if not url:
        raise RuntimeError("TESSERA_REDIS_URL is not set; check redis_configured() first")
    return url


def async_redis() -> aioredis.Redis:
    """The async client of the running event loop (bytes in, bytes out)."""
    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        # A blocking pool: past MAX_CONNECTIONS in-flight commands a caller waits for a free
        # connection instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(_url(), max_connections=MAX_CONNECTIONS,
                                                        timeout=POOL_TIMEOUT_S, health_check_interval=30,
                                                        socket_keepalive=True)
        client = aioredis.Redis(connection_pool=pool)
        _async_clients[loop_id] = client
    return client


@lru_cache(maxsize=1)
def sync_redis() -> redis.Redis:
    """A blocking client for code that runs in worker threads or Celery tasks."""
    return redis.Redis.from_url(_url(), health_check_interval=30, socket_keepalive=True)


async def warm_async_redis(connections: int = 4) -> None:
    """Connect the running loop's multiplexer and open a few pool connections now, at start-up.

    redis-py builds each connection with a package-metadata lookup and a TCP connect (several ms
    of CPU); made lazily, they land on the first requests' latency. Hot paths use the multiplexer
    (one connection); the pool serves the occasional blocking or administrative command.
    """
    client = async_redis()
    try:
        await redis_multiplexer().execute("PING")
        await asyncio.gather(*(client.ping() for _ in range(connections)))
    except RedisError as exc:  # start anyway: readiness reports it, requests get 503 until it is back
        logger.warning("Redis unreachable at start-up: %r", exc)


async def close_async_redis() -> None:
    """Close the running loop's async client and multiplexer (app shutdown)."""
    client = _async_clients.pop(id(asyncio.get_running_loop()), None)
    if client is not None:
        await client.aclose()
    multiplexer = _multiplexers.pop(id(asyncio.get_running_loop()), None)
    if multiplexer is not None:
        await multiplexer.close()


def reset_redis_clients() -> None:
    """Forget cached clients (tests that change the settings between stacks)."""
    _async_clients.clear()
    _multiplexers.clear()
    sync_redis.cache_clear()


@contextmanager
def redis_unavailable_as_503(what: str) -> Iterator[None]:
    """Turn a Redis failure inside the block into a 503 problem (callers retry) instead of a 500."""
    try:
        yield
    except RedisError as exc:
        raise redis_unavailable(what, exc) from exc


def redis_unavailable(what: str, exc: RedisError) -> NotReady:
    """The 503 problem (logged) for ``exc`` while using ``what``: raise it ``from exc``.

    For hot paths, where a ``try``/``except`` costs nothing and :func:`redis_unavailable_as_503`'s
    generator would be built on every call.
    """
    logger.warning("%s unavailable: %r", what, exc)
    return NotReady(f"{what} (Redis) is unavailable; retry shortly", headers={"Retry-After": "1"})


class RedisMultiplexer:
    """Every command of one event loop over one connection, pipelined as it is issued.

    RESP answers come back in the order commands were sent, so callers need no connection of
    their own: commands issued in one turn of the loop leave in one write, hiredis parses the
    replies, and each is handed to its caller in order (the design of StackExchange.Redis and
    Lettuce). redis-py's asyncio client checks a connection out of its pool for every command or
    pipeline: measured here, a lone GET costs 119 us of client CPU that way against 21 us this
    way (88 against 8 us with 16 in flight).

    A command unanswered for ``timeout_s`` closes the connection: every caller still waiting gets
    :class:`redis.exceptions.TimeoutError` (a lost connection gives ``ConnectionError``; both are
    ``RedisError``), and the next command reconnects. Blocking commands
    (``BLPOP``, ``XREAD BLOCK``) and pub/sub must not go through it: they would hold up every
    caller queued behind them; use :func:`async_redis` for those.

    Parameters
    ----------
    url : str
        ``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix://path?db=N``.
    timeout_s : float
        Longest wait for the oldest outstanding reply before the connection is declared dead.
    """

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        self._params = parse_url(url)
        self._tls = self._params.get("connection_class") is SSLConnection
        self.timeout_s = timeout_s
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Future[_RespProtocol] | None = None
        self.writes = 0
        """Writes sent so far (tests and benchmarks read it: one per loop turn with commands)."""

    async def execute(self, *args: Any) -> Any:
        """Send one command; returns its reply (bytes, int, list, None) or raises its error."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connected()
        return await protocol.send(hiredis.pack_command(args))  # type: ignore[arg-type]  # stub types a 1-tuple

    async def _connected(self) -> _RespProtocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        params = self._params
        try:
            if "path" in params:
                _, protocol = await asyncio.wait_for(loop.create_unix_connection(
                    lambda: _RespProtocol(self), params["path"]), self.timeout_s)
            else:
                _, protocol = await asyncio.wait_for(loop.create_connection(
                    lambda: _RespProtocol(self), params.get("host", "localhost"), params.get("port", 6379),
                    ssl=ssl.create_default_context() if self._tls else None), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
        try:
            if params.get("password"):
                credentials = [params["username"]] if params.get("username") else []
                await protocol.send(hiredis.pack_command(("AUTH", *credentials, params["password"])))  # type: ignore[arg-type]
            if params.get("db"):
                await protocol.send(hiredis.pack_command(("SELECT", params["db"])))  # type: ignore[arg-type]
        except BaseException:
            protocol.close()
            raise
        self._protocol = protocol
        return protocol

    async def close(self) -> None:
        """Close the connection; callers still waiting get ConnectionError."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None


class _RespProtocol(asyncio.Protocol):
    """One Redis connection: buffered writes (one per loop turn), replies matched to callers in order."""

    def __init__(self, owner: RedisMultiplexer) -> None:
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        self._waiting.append(future)
        return future

    def _flush(self) -> None:
        if self.closed or self._transport is None:
            return
        self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()
        self._owner.writes += 1
        if self._watchdog is None:
            self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        oldest = self._waiting[0] if self._waiting else None
        self._watchdog = None if oldest is None else self._loop.call_later(
            self._owner.timeout_s, self._check_progress, oldest)

    def _check_progress(self, oldest: asyncio.Future[Any]) -> None:
        """No reply to the oldest command for timeout_s: the connection is presumed dead."""
        self._watchdog = None
        if self._waiting and self._waiting[0] is oldest:
            logger.warning("Redis did not answer within %.1f s; reconnecting", self._owner.timeout_s)
            self._fail_all(RedisTimeoutError(f"no reply from Redis within {self._owner.timeout_s} s"))
            self.close()
        else:
            self._arm_watchdog()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self._waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(_typed_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(RedisConnectionError(f"Redis connection lost: {exc!r}" if exc else "Redis connection closed"))
        self.close()

    def close(self) -> None:
        """Stop using this connection (the multiplexer opens a new one for the next command)."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _fail_all(self, error: Exception) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


def _typed_error(reply: ResponseError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else reply


def redis_multiplexer() -> RedisMultiplexer:
    """The running event loop's :class:`RedisMultiplexer` (hot paths: scripts, GET/SET)."""
    loop_id = id(asyncio.get_running_loop())
    multiplexer = _multiplexers.get(loop_id)
    if multiplexer is None:
        multiplexer = _multiplexers[loop_id] = RedisMultiplexer(_url())
    return multiplexer


class ScriptPipeline:
    """Runs Lua scripts by EVALSHA over a :class:`RedisMultiplexer` (so the calls of one loop turn
    travel in one write); scripts missing from the server (a restarted Redis) are loaded and the
    affected calls retried. Each script still runs atomically on its own.
    """

    def __init__(self, redis: RedisMultiplexer) -> None:
        self._redis = redis
        self._sources: dict[str, str] = {}

    def register(self, source: str) -> str:
        """Remember a script; returns the SHA1 that :meth:`run` takes."""
        sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._sources[sha] = source
        return sha

    async def run(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA ``sha`` with ``keys`` and ``args``."""
        try:
            return await self._redis.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.execute("SCRIPT", "LOAD", self._sources[sha])
            return await self._redis.execute("EVALSHA", sha, len(keys), *keys, *args)
