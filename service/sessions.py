"""Session state and where it lives: in this process (LRU + idle TTL) or in Redis.

Both stores keep sessions as msgpack records (``session_to_bytes``), so a session read from
either is an independent copy: a request that fails half way changes nothing until it calls
``put``, and whatever the memory store accepts, the Redis store accepts too.

Recency and idleness are counted from the last ``create`` or ``put``; ``get`` refreshes
neither, so reading a session does not keep it alive. An id that was evicted (idle TTL or
the size limit) answers ``SessionExpired`` (410) rather than ``SessionNotFound`` (404).
A full memory store evicts its least recently used session only once that one has been
idle ``min_idle_to_evict_s``: a robot in the middle of an episode keeps its session, and
the newcomer is told to come back (``SessionLimit``, 429).
"""

from __future__ import annotations

import functools
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np
import redis
import redis.asyncio as aioredis

from service.codec import MSGPACK, CodecError, decode_body, encode_body

# 2 added `owner`: version 1 records are read with no owner. 3 added `delta_program`: older
# records are read without their Δφ, which no program can be told to have fitted (a warm
# start only; the next step adapts from Δφ = 0). 4 added `revision`: older records are
# read at revision 0.
RECORD_VERSION = 4


@dataclass(eq=False)
class Session:
    session_id: str
    seed: int
    step: int  # the last applied step, -1 before the first
    lstm_c: np.ndarray
    lstm_h: np.ndarray
    task: dict | None
    task_weights: np.ndarray | None
    planner: dict
    last_response: dict | None  # returned again when the same step is retried
    delta: dict | None  # Δφ warm start: a pytree (nested dicts) of float32 arrays
    created_at: float
    last_used: float
    last_observation: np.ndarray | None = None  # where /adapt adapts when given none
    owner: str | None = None  # a digest of the API key that created it (never the key)
    delta_program: str | None = None  # the planning program that fitted `delta`
    # Writes so far: a write succeeds only over the revision it read (compare-and-set), so
    # that a replica's late write never overwrites what another one wrote meanwhile.
    revision: int = 0


_FIELDS = tuple(f.name for f in fields(Session))


class SessionNotFound(KeyError):
    """No session has this id."""


class SessionExpired(KeyError):
    """The session existed but was evicted: idle too long, or pushed out by the size limit."""


class SessionLimit(Exception):
    """No session can be created now: the store is full of sessions used too recently to
    evict. ``retry_after_s``: when the least recently used one becomes evictable."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StaleWrite(Exception):
    """The session was written by someone else since it was read: this write is refused."""


class StoreUnavailable(RuntimeError):
    """The store cannot be reached; nothing was read or written (503, retried by clients)."""


class SessionStore(Protocol):
    evictions: int  # sessions evicted so far, for metrics

    async def create(self, session: Session) -> None: ...

    async def get(self, session_id: str) -> Session: ...

    async def put(self, session: Session) -> None:
        """Writes the session over the revision it was read at, and counts the write in
        `session.revision`; StaleWrite if another write came in between."""
        ...

    async def delete(self, session_id: str) -> None: ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


def _array_tree(tree: Any) -> Any:
    """Every leaf of a dict pytree as an ndarray, so that numpy scalars and JAX arrays keep
    their dtype through the record (a bare scalar would come back as a Python number)."""
    if isinstance(tree, dict):
        return {k: _array_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def session_to_bytes(s: Session) -> bytes:
    """The session as a msgpack record; arrays travel as raw bytes with dtype and shape."""
    record: dict[str, Any] = {name: getattr(s, name) for name in _FIELDS}
    for name in ("lstm_c", "lstm_h"):
        record[name] = np.asarray(record[name])
    if s.task_weights is not None:
        record["task_weights"] = np.asarray(s.task_weights)
    if s.delta is not None:
        record["delta"] = _array_tree(s.delta)
    return encode_body({"v": RECORD_VERSION, **record}, MSGPACK)


def session_from_bytes(b: bytes) -> Session:
    """The session a record holds, arrays bit for bit; a foreign or damaged record is a
    ValueError (``CodecError``), never something executed."""
    record = decode_body(b, MSGPACK)
    if isinstance(record, dict) and record.get("v") == 1:
        record = {**record, "v": 2, "owner": None}
    if isinstance(record, dict) and record.get("v") == 2:
        record = {**record, "v": 3, "delta": None, "delta_program": None}
    if isinstance(record, dict) and record.get("v") == 3:
        record = {**record, "v": RECORD_VERSION, "revision": 0}
    if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
        raise CodecError("not a session record (or one of another version)")
    if set(record) != {"v", *_FIELDS}:
        raise CodecError(f"session record has fields {sorted(record)}, expected {_FIELDS}")
    if not all(isinstance(record[k], np.ndarray) for k in ("lstm_c", "lstm_h")):
        raise CodecError("session record lacks its LSTM state arrays")
    return Session(**{name: record[name] for name in _FIELDS})


def _check_ttl(idle_ttl_s: float) -> None:
    if not idle_ttl_s > 0:
        raise ValueError(f"idle_ttl_s must be positive, got {idle_ttl_s}")


class MemorySessionStore:
    """Sessions in this process: when full, the least recently used is evicted (if idle
    ``min_idle_to_evict_s``), idle ones expire lazily on access and by ``sweep()``. One event
    loop; no operation awaits in between, so each is atomic."""

    def __init__(
        self,
        max_sessions: int,
        idle_ttl_s: float,
        clock: Callable[[], float] = time.time,
        remember_evicted: int = 10_000,
        min_idle_to_evict_s: float = 0.0,
    ) -> None:
        if max_sessions < 0:
            raise ValueError(f"max_sessions must be >= 0, got {max_sessions}")
        _check_ttl(idle_ttl_s)
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.min_idle_to_evict_s = min_idle_to_evict_s
        self.clock = clock
        self.remember_evicted = remember_evicted
        self.evictions = 0
        # id -> (record, time of the last create/put, revision); oldest first: LRU order.
        self._entries: OrderedDict[str, tuple[bytes, float, int]] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()

    def _evict(self, session_id: str) -> None:
        del self._entries[session_id]
        self.evictions += 1
        self._evicted[session_id] = None
        self._evicted.move_to_end(session_id)
        while len(self._evicted) > self.remember_evicted:
            self._evicted.popitem(last=False)

    def _idle(self, touched: float, now: float) -> bool:
        return now - touched >= self.idle_ttl_s

    def _missing(self, session_id: str) -> KeyError:
        if session_id in self._evicted:
            return SessionExpired(session_id)
        return SessionNotFound(session_id)

    def sweep(self) -> int:
        """Evicts every idle session; returns how many. Cheap: the idle ones are the oldest."""
        now = self.clock()
        n = 0
        while self._entries:
            session_id, (_, touched, _) = next(iter(self._entries.items()))
            if not self._idle(touched, now):
                break
            self._evict(session_id)
            n += 1
        return n

    async def create(self, session: Session) -> None:
        if self.max_sessions == 0:
            raise SessionLimit("this store holds no sessions (max_sessions = 0)")
        if session.session_id in self._entries:
            raise ValueError(f"session {session.session_id!r} already exists")
        record = session_to_bytes(session)
        self.sweep()
        now = self.clock()
        while len(self._entries) >= self.max_sessions:
            oldest, (_, touched, _) = next(iter(self._entries.items()))
            wait = self.min_idle_to_evict_s - (now - touched)
            if wait > 0:
                raise SessionLimit(f"all {self.max_sessions} sessions are in use", wait)
            self._evict(oldest)
        self._entries[session.session_id] = (record, now, session.revision)
        self._evicted.pop(session.session_id, None)

    async def get(self, session_id: str) -> Session:
        entry = self._entries.get(session_id)
        if entry is None:
            raise self._missing(session_id)
        if self._idle(entry[1], self.clock()):
            self._evict(session_id)
            raise SessionExpired(session_id)
        return session_from_bytes(entry[0])

    async def put(self, session: Session) -> None:
        session_id = session.session_id
        entry = self._entries.get(session_id)
        if entry is None:
            raise self._missing(session_id)
        now = self.clock()
        if self._idle(entry[1], now):
            # Expired before this write: do not bring it back.
            self._evict(session_id)
            raise SessionExpired(session_id)
        if entry[2] != session.revision:
            raise StaleWrite(session_id)
        record = session_to_bytes(replace(session, revision=session.revision + 1))
        session.revision += 1
        self._entries[session_id] = (record, now, session.revision)
        self._entries.move_to_end(session_id)

    async def delete(self, session_id: str) -> None:
        if self._entries.pop(session_id, None) is None:
            raise self._missing(session_id)

    async def count(self) -> int:
        self.sweep()
        return len(self._entries)

    async def close(self) -> None:
        self._entries.clear()


def _reachable(method):
    """Redis's connection failures as StoreUnavailable, so callers need not know Redis."""

    @functools.wraps(method)
    async def call(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise StoreUnavailable(f"the session store is unreachable: {err}") from None

    return call


# A write of a session, atomic in Redis: only over an existing record (a session that
# expired or was deleted meanwhile is not brought back) and only over the revision it was
# read at, which the `seen:` key mirrors as "r:<revision>" (a key of an older version
# holds "1" and is written over). KEYS: session, seen; ARGV: record, its expiry and the
# seen key's (ms), the revision read.
PUT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seen = redis.call('GET', KEYS[2])
if seen and string.sub(seen, 1, 2) == 'r:' and seen ~= 'r:' .. ARGV[4] then return 1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], 'r:' .. (tonumber(ARGV[4]) + 1), 'PX', ARGV[3])
return 2
"""
PUT_MISSING, PUT_STALE, PUT_WRITTEN = 0, 1, 2


def revision_mark(revision: int) -> bytes:
    return f"r:{revision}".encode()


class RedisSessionStore:
    """Sessions in Redis, so that any replica can continue one. Each session is one key whose
    expiry is the idle TTL (refreshed by ``put``); a second, long-lived ``seen:`` key written at
    ``create`` lets ``get`` tell an expired session (410) from one that never existed (404),
    since Redis expires keys silently. ``evictions`` stays 0: Redis does not say when."""

    def __init__(
        self,
        url: str,
        idle_ttl_s: float,
        prefix: str = "worldplan:",
        seen_ttl_s: float = 24 * 3600,
    ) -> None:
        _check_ttl(idle_ttl_s)
        if seen_ttl_s < idle_ttl_s:
            raise ValueError("seen_ttl_s must be at least idle_ttl_s")
        self.idle_ttl_s = idle_ttl_s
        self.seen_ttl_s = seen_ttl_s
        self.prefix = prefix
        self.evictions = 0
        self._redis = aioredis.Redis.from_url(url)
        self._put_script = self._redis.register_script(PUT_SCRIPT)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _seen(self, session_id: str) -> str:
        return f"{self.prefix}seen:{session_id}"

    def _px(self, seconds: float) -> int:
        return max(1, round(seconds * 1000))

    async def _missing(self, session_id: str) -> KeyError:
        if await self._redis.exists(self._seen(session_id)):
            return SessionExpired(session_id)
        return SessionNotFound(session_id)

    @_reachable
    async def create(self, session: Session) -> None:
        sid = session.session_id
        record = session_to_bytes(session)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(sid), record, px=self._px(self.idle_ttl_s), nx=True)
            pipe.set(self._seen(sid), revision_mark(session.revision),
                     px=self._px(self.seen_ttl_s))  # fmt: skip
            created, _ = await pipe.execute()
        if not created:
            raise ValueError(f"session {sid!r} already exists")

    @_reachable
    async def get(self, session_id: str) -> Session:
        record = await self._redis.get(self._key(session_id))
        if record is None:
            raise await self._missing(session_id)
        return session_from_bytes(record)

    @_reachable
    async def put(self, session: Session) -> None:
        sid = session.session_id
        written = session_to_bytes(replace(session, revision=session.revision + 1))
        outcome = await self._put_script(
            keys=[self._key(sid), self._seen(sid)],
            args=[written, self._px(self.idle_ttl_s), self._px(self.seen_ttl_s),
                  session.revision],
        )  # fmt: skip
        if outcome == PUT_MISSING:
            raise await self._missing(sid)
        if outcome == PUT_STALE:
            raise StaleWrite(sid)
        session.revision += 1

    @_reachable
    async def delete(self, session_id: str) -> None:
        if not await self._redis.delete(self._key(session_id)):
            raise await self._missing(session_id)
        await self._redis.delete(self._seen(session_id))

    @_reachable
    async def count(self) -> int:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "session:*"
        n = 0
        async for _ in self._redis.scan_iter(match=pattern, count=1000):
            n += 1
        return n

    async def close(self) -> None:
        await self._redis.aclose()
