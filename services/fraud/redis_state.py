"""Window state and idempotency in Redis: one Lua script before the model, one after.

The hot path with Redis configured (every API replica shares it):

1. :data:`RESERVE_LUA` atomically checks the transaction id (a stored answer is returned as is, a
   concurrent duplicate waits), reads the customer windows, the card history and the terminal
   windows, and adds the transaction to them. Windows and semantics are those of
   :mod:`services.fraud.state` (the database store), so both stores give the same features.
2. The model scores it (batched with whatever else is in flight).
3. :data:`COMMIT_LUA` stores the answer under the transaction id and appends the full decision
   record to the ``fraud:decisions`` stream - unless a duplicate committed first, whose answer
   wins. The answer goes back to the processor only after this.

:class:`RedisWindowStore` is the :class:`~shared.window_state.WindowStateStore` over these steps
(one per process; the scripts run over the running loop's :class:`~shared.kv.RedisMultiplexer`).

The database row is written off the request path by :mod:`services.fraud.recorder`, which drains
the stream in batches. Nothing answered is lost if an API process dies: the record is already in
the stream (Redis with AOF, ``appendfsync everysec``, as in compose.yaml), and a process that dies
after step 1 leaves only a short pending lease; a resend then takes over and, because set members
are transaction ids, is not counted twice.

Key layout (``{tenant}`` is a hash tag, so one tenant's keys share a slot): ``answer:<tx>`` (the
request's digest and the answer, :func:`split_answer`, kept ``ANSWER_TTL_S``), ``cust:<customer>``
(sorted set by event time of ``<tx>|<amount>|<terminal>``), ``term:<terminal>`` and
``termfraud:<terminal>`` (sorted sets of transaction ids, all and labelled fraud). The scripts
touch a global stream too, so they need a single Redis primary (Sentinel for failover), not Redis
Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.exceptions import RedisError

from services.fraud.features import HISTORY_LENGTH, SECONDS_PER_DAY, WindowAggregates
from services.fraud.schemas import DecisionOut, TransactionIn
from services.fraud.state import LABEL_DELAY_S, FlaggedHook, check_same_request, stored_in_database
from shared.errors import Conflict
from shared.kv import RedisMultiplexer, ScriptPipeline, redis_multiplexer, redis_unavailable, sync_redis
from shared.window_state import RedisWindowStoreBase

DECISION_STREAM = "fraud:decisions"
ANSWER_TTL_S = 3600
"""How long a resend is answered from Redis; older resends are recognised by their window entry
and answered from the database."""
RETENTION_S = 40 * SECONDS_PER_DAY
"""Window entries older than this (event time) are trimmed: the longest window is 7 + 30 days."""
CUSTOMER_IDLE_EXPIRY_S = 400 * SECONDS_PER_DAY
"""A card unseen this long (wall clock) is forgotten; its card history then starts afresh, where the
database store would still find its last transactions."""
PENDING_LEASE_MS = 2000
"""A reservation not committed within this is presumed dead (its process crashed)."""

RESERVE_LUA = """
local answer = redis.call('GET', KEYS[1])
if answer then
  if answer == 'P' then return {'busy'} end
  return {'done', answer}
end
local t = tonumber(ARGV[1])
local member, tx_id = ARGV[2], ARGV[3]
if ARGV[6] ~= '1' and (redis.call('ZSCORE', KEYS[2], member) or redis.call('ZSCORE', KEYS[3], tx_id)) then
  return {'seen'}  -- the same id in the card's or the terminal's window: a resend, whatever else changed
end
redis.call('SET', KEYS[1], 'P', 'PX', ARGV[4])
local function fmt(x) return string.format('%.17g', x) end
local history_length = tonumber(ARGV[7])

local widths = {3600, 86400, 604800, 2592000}
local bounds, counts, sums = {}, {0, 0, 0, 0}, {0, 0, 0, 0}
for w = 1, 4 do bounds[w] = t - widths[w] end
local sumsq = 0
local history = {}
local entries = redis.call('ZREVRANGEBYSCORE', KEYS[2], ARGV[1], '-inf', 'WITHSCORES')
for i = 1, #entries, 2 do
  local entry = entries[i]
  if entry ~= member then
    local time = tonumber(entries[i + 1])
    if time <= bounds[4] and #history >= 3 * history_length then break end
    local first = string.find(entry, '|', 1, true)
    local second = string.find(entry, '|', first + 1, true)
    local amount_text = string.sub(entry, first + 1, second - 1)
    local amount = tonumber(amount_text)
    for w = 1, 4 do
      if time > bounds[w] then counts[w] = counts[w] + 1; sums[w] = sums[w] + amount end
    end
    if time > bounds[4] then sumsq = sumsq + amount * amount end
    if #history < 3 * history_length then
      history[#history + 1] = entries[i + 1]
      history[#history + 1] = amount_text
      history[#history + 1] = string.sub(entry, second + 1)
    end
  end
end

local delayed_end = t - tonumber(ARGV[8])
local upper = fmt(delayed_end)
local result = {'new'}
for w = 1, 4 do result[#result + 1] = counts[w] end
for w = 1, 4 do result[#result + 1] = fmt(sums[w]) end
result[#result + 1] = fmt(sumsq)
for w = 2, 4 do
  result[#result + 1] = redis.call('ZCOUNT', KEYS[3], '(' .. fmt(delayed_end - widths[w]), upper)
end
for w = 2, 4 do
  result[#result + 1] = redis.call('ZCOUNT', KEYS[4], '(' .. fmt(delayed_end - widths[w]), upper)
end
local own = redis.call('ZSCORE', KEYS[3], tx_id) and 1 or 0
result[#result + 1] = redis.call('ZCOUNT', KEYS[3], '(' .. fmt(bounds[1]), ARGV[1]) - own
result[#result + 1] = redis.call('ZCOUNT', KEYS[3], '(' .. fmt(bounds[2]), ARGV[1]) - own
local first_fraud = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. fmt(delayed_end - widths[4]), upper,
                               'WITHSCORES', 'LIMIT', 0, 1)
result[#result + 1] = first_fraud[2] or ''
for i = 1, #history do result[#result + 1] = history[i] end

redis.call('ZADD', KEYS[2], ARGV[1], member)
redis.call('ZADD', KEYS[3], ARGV[1], tx_id)
local cutoff = '(' .. fmt(t - tonumber(ARGV[5]))
local old = redis.call('ZCOUNT', KEYS[2], '-inf', cutoff)
if old > 0 then
  local removable = math.min(old, redis.call('ZCARD', KEYS[2]) - history_length)
  if removable > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, removable - 1) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', cutoff)
redis.call('EXPIRE', KEYS[2], ARGV[9])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return result
"""

COMMIT_LUA = """
local answer = redis.call('GET', KEYS[1])
if answer and answer ~= 'P' then return answer end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'r', ARGV[2])
return false
"""

RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == 'P' then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _key(tenant_id: str, kind: str, name: str) -> str:
    return f"fraud:{{{tenant_id}}}:{kind}:{name}"


def answer_key(tenant_id: str, transaction_id: str) -> str:
    """Where a transaction's answer (or its pending lease, ``P``) is kept."""
    return _key(tenant_id, "answer", transaction_id)


def customer_key(tenant_id: str, customer_id: str) -> str:
    """The sorted set of a card's transactions (``window_member`` entries, by event time)."""
    return _key(tenant_id, "cust", customer_id)


def terminal_key(tenant_id: str, terminal_id: str) -> str:
    """The sorted set of a terminal's transaction ids (by event time)."""
    return _key(tenant_id, "term", terminal_id)


def terminal_fraud_key(tenant_id: str, terminal_id: str) -> str:
    """The sorted set of a terminal's transactions labelled fraud (by event time)."""
    return _key(tenant_id, "termfraud", terminal_id)


def window_member(transaction_id: str, amount: float, terminal_id: str) -> str:
    """A customer-window entry; ids cannot contain ``|`` (schemas.Identifier)."""
    return f"{transaction_id}|{amount!r}|{terminal_id}"


DIGEST_LENGTH = 64


def split_answer(value: bytes) -> tuple[str | None, bytes]:
    """(request digest, answer JSON) of an answer key's value.

    The value is the sha256 hex digest of the scored request followed by the answer's JSON, so a
    resend can be checked against it; answers stored before digests existed are the JSON alone.
    """
    if value.startswith(b"{"):
        return None, value
    return value[:DIGEST_LENGTH].decode(), value[DIGEST_LENGTH:]


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :data:`RESERVE_LUA` said: ``new`` (with aggregates), ``done`` (with the stored answer),
    ``busy`` (a duplicate is being scored) or ``seen`` (already in the windows, answer expired)."""

    status: str
    aggregates: WindowAggregates | None = None
    answer: bytes | None = None


def _aggregates(reply: list[Any], amount: float, tx_time_s: float) -> WindowAggregates:
    """Window aggregates from the script's reply, the current transaction included (as the SQL store)."""
    counts = [int(v) for v in reply[1:5]]
    sums = [float(v) for v in reply[5:9]]
    sumsq = float(reply[9])
    terminal = [int(v) for v in reply[10:18]]
    first_fraud = reply[18]
    flat = reply[19:]
    history = tuple((float(flat[i]), float(flat[i + 1]), flat[i + 2].decode())
                    for i in range(len(flat) - 3, -1, -3))  # the script lists newest first
    previous = history[-1][0] if history else None
    return WindowAggregates(
        customer_count_1h=counts[0] + 1, customer_count_1d=counts[1] + 1,
        customer_count_7d=counts[2] + 1, customer_count_30d=counts[3] + 1,
        customer_amount_sum_1h=sums[0] + amount, customer_amount_sum_1d=sums[1] + amount,
        customer_amount_sum_7d=sums[2] + amount, customer_amount_sum_30d=sums[3] + amount,
        customer_amount_sumsq_30d=sumsq + amount * amount,
        seconds_since_prev_customer_tx=None if previous is None else tx_time_s - previous,
        terminal_count_delayed_1d=terminal[0], terminal_count_delayed_7d=terminal[1],
        terminal_count_delayed_30d=terminal[2], terminal_fraud_delayed_1d=terminal[3],
        terminal_fraud_delayed_7d=terminal[4], terminal_fraud_delayed_30d=terminal[5],
        terminal_count_1h=terminal[6] + 1, terminal_count_1d=terminal[7] + 1,
        seconds_since_first_terminal_fraud_delayed=tx_time_s - float(first_fraud) if first_fraud else None,
        card_history=history,
    )


class RedisWindowState:
    """The Redis side of scoring: reserve (read + add to windows), commit (answer + record), labels."""

    def __init__(self, redis: RedisMultiplexer) -> None:
        self._redis = redis
        self._scripts = ScriptPipeline(redis)
        self._reserve = self._scripts.register(RESERVE_LUA)
        self._commit = self._scripts.register(COMMIT_LUA)
        self._release = self._scripts.register(RELEASE_LUA)

    async def reserve(self, tenant_id: str, transaction_id: str, customer_id: str, terminal_id: str,
                      tx_time_s: float, amount: float, *, takeover: bool = False) -> Reservation:
        """Check the id and, for a new transaction, read its windows and add it to them (atomically)."""
        keys = [answer_key(tenant_id, transaction_id), customer_key(tenant_id, customer_id),
                terminal_key(tenant_id, terminal_id), terminal_fraud_key(tenant_id, terminal_id)]
        args = [repr(tx_time_s), window_member(transaction_id, amount, terminal_id), transaction_id,
                PENDING_LEASE_MS, RETENTION_S, "1" if takeover else "0", HISTORY_LENGTH, LABEL_DELAY_S,
                CUSTOMER_IDLE_EXPIRY_S]
        reply = await self._scripts.run(self._reserve, keys, args)
        status = reply[0].decode()
        if status == "new":
            return Reservation(status, aggregates=_aggregates(reply, amount, tx_time_s))
        return Reservation(status, answer=reply[1] if status == "done" else None)

    async def commit(self, tenant_id: str, transaction_id: str, answer: bytes, record: dict[str, Any],
                     digest: str | None = None) -> bytes | None:
        """Store the answer (after the request's ``digest``, see :func:`split_answer`) and queue the
        record for the database; a duplicate's earlier answer wins.

        Returns None when this answer was stored, else the value that was already there.
        """
        value = answer if digest is None else digest.encode() + answer
        return await self._scripts.run(self._commit, [answer_key(tenant_id, transaction_id), DECISION_STREAM],
                                       [value, orjson.dumps(record), ANSWER_TTL_S])

    async def release(self, tenant_id: str, transaction_id: str) -> None:
        """Drop a pending lease whose scoring failed (overload, deadline): a retry need not wait it out.

        The transaction stays in the windows; the retry finds it there and takes it over.
        """
        await self._scripts.run(self._release, [answer_key(tenant_id, transaction_id)], [])

    async def answer(self, tenant_id: str, transaction_id: str) -> bytes | None:
        """The stored answer (None while pending or unknown)."""
        value = await self._redis.execute("GET", answer_key(tenant_id, transaction_id))
        return None if value in (None, b"P") else value


def stored_answer_sync(client: redis.Redis, tenant_id: str, transaction_id: str) -> bytes | None:
    """The answer Redis holds for a transaction (None while pending or unknown), from a worker thread."""
    value = client.get(answer_key(tenant_id, transaction_id))
    return None if value in (None, b"P") else value  # type: ignore[return-value]


def record_label_sync(client: redis.Redis, tenant_id: str, terminal_id: str, transaction_id: str,
                      tx_time_s: float, is_fraud: bool) -> None:
    """Make a label count in the terminal risk windows (or stop counting, for a reversed label)."""
    key = terminal_fraud_key(tenant_id, terminal_id)
    if is_fraud:
        client.zadd(key, {transaction_id: tx_time_s})
        client.expire(key, RETENTION_S)
    else:
        client.zrem(key, transaction_id)


async def wait_while_busy(state: RedisWindowState, tenant_id: str, transaction_id: str,
                          poll_s: float = 0.002) -> bytes | None:
    """Wait for a concurrent duplicate's answer; None if its lease lapses first (it died)."""
    deadline = time.monotonic() + PENDING_LEASE_MS / 1000 + 0.5
    while time.monotonic() < deadline:
        answer = await state.answer(tenant_id, transaction_id)
        if answer is not None:
            return answer
        await asyncio.sleep(poll_s)
    return None


def replayed_answer(value: bytes) -> DecisionOut:
    """A stored answer (an answer key's value, :func:`split_answer`) as a resend gets it."""
    _digest, answer = split_answer(value)
    return DecisionOut.model_validate_json(answer).model_copy(update={"replayed": True})


def checked_replay(transaction_id: str, value: bytes, digest: str) -> DecisionOut:
    """The stored answer for a resend whose request has ``digest`` (409 if the stored one differs)."""
    check_same_request(transaction_id, split_answer(value)[0], digest)
    return replayed_answer(value)


MAX_RESERVE_ATTEMPTS = 4
WINDOW_STATE = "fraud window state"
DECISION_STORE = "fraud decision store"


class RedisWindowStore(RedisWindowStoreBase):
    """Fraud's window state and answers in Redis (``TESSERA_REDIS_URL`` set), rows written behind.

    A Redis failure is a 503 (:func:`~shared.kv.redis_unavailable`): nothing was answered.
    """

    def __init__(self) -> None:
        self._states: weakref.WeakKeyDictionary[RedisMultiplexer, RedisWindowState] = weakref.WeakKeyDictionary()
        """Keyed by the multiplexer itself, not its id(): a closed one's id may be reused by the next one."""

    def scripts(self) -> RedisWindowState:
        """The scripts over the running event loop's multiplexer."""
        multiplexer = redis_multiplexer()
        state = self._states.get(multiplexer)
        if state is None:
            state = self._states[multiplexer] = RedisWindowState(multiplexer)
        return state

    async def admit(self, tenant_id: str, event: TransactionIn, digest: str) -> WindowAggregates | DecisionOut:
        """Window state for a new transaction, or the answer a resend (or a concurrent duplicate) gets
        (409 when its body differs from the one answered)."""
        try:
            return await self._reserve(self.scripts(), tenant_id, event, digest)
        except RedisError as exc:
            raise redis_unavailable(WINDOW_STATE, exc) from exc

    async def _reserve(self, state: RedisWindowState, tenant_id: str, tx: TransactionIn,
                       digest: str) -> WindowAggregates | DecisionOut:
        takeover = False
        for _ in range(MAX_RESERVE_ATTEMPTS):
            reservation = await state.reserve(tenant_id, tx.id, tx.customer_id, tx.terminal_id,
                                              tx.timestamp.timestamp(), tx.amount, takeover=takeover)
            if reservation.aggregates is not None:
                return reservation.aggregates
            if reservation.answer is not None:
                return checked_replay(tx.id, reservation.answer, digest)
            if reservation.status == "busy":
                answer = await wait_while_busy(state, tenant_id, tx.id)
                if answer is not None:
                    return checked_replay(tx.id, answer, digest)
                continue  # the duplicate's lease lapsed: its process died; reserve again
            stored = await asyncio.to_thread(stored_in_database, tenant_id, tx.id, digest)
            if stored is not None:
                return stored
            takeover = True  # in the windows but never answered: a crashed attempt, score it now
        raise Conflict("a duplicate of this transaction is still being scored; retry shortly",
                       headers={"Retry-After": "1"})

    async def commit(self, tenant_id: str, event: TransactionIn, answer: DecisionOut, record: dict[str, Any], *,
                     on_flagged: FlaggedHook | None = None) -> DecisionOut:
        """Store the answer and queue ``record`` for the recorder (which opens a flagged decision's
        case and callback: ``on_flagged`` is not called here); a duplicate's earlier answer wins."""
        digest = record["request_digest"]
        try:
            winner = await self.scripts().commit(tenant_id, event.id, answer.model_dump_json().encode(), record,
                                                 digest)
        except RedisError as exc:
            raise redis_unavailable(WINDOW_STATE, exc) from exc
        return answer if winner is None else checked_replay(event.id, winner, digest)

    async def release(self, tenant_id: str, event: TransactionIn) -> None:
        """Drop the pending lease (shielded from the caller's cancellation); if Redis cannot be
        reached the lease lapses by itself."""
        with contextlib.suppress(RedisError):
            await asyncio.shield(self.scripts().release(tenant_id, event.id))

    def unrecorded_answer(self, tenant_id: str, event_id: str) -> DecisionOut | None:
        """The answer Redis holds for a transaction (None while pending or unknown)."""
        try:
            value = stored_answer_sync(sync_redis(), tenant_id, event_id)
        except RedisError as exc:
            raise redis_unavailable(DECISION_STORE, exc) from exc
        return None if value is None else replayed_answer(value)

    def record_label(self, tenant_id: str, terminal_id: str, transaction_id: str, tx_time_s: float,
                     is_fraud: bool) -> None:
        """Make a label count in the terminal risk windows (or stop counting, for a reversed label)."""
        try:
            record_label_sync(sync_redis(), tenant_id, terminal_id, transaction_id, tx_time_s, is_fraud)
        except RedisError as exc:
            raise redis_unavailable(WINDOW_STATE, exc) from exc
