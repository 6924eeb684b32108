"""Session stores: every behaviour against the memory store and a real redis-server."""

import asyncio
import contextlib
import pickle
import time
import uuid
from collections.abc import AsyncIterator

import msgpack
import numpy as np
import pytest
import redis

from service.clients.local import free_port
from service.codec import CodecError
from service.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    Session,
    SessionExpired,
    SessionLimit,
    SessionNotFound,
    SessionStore,
    StaleWrite,
    StoreUnavailable,
    session_from_bytes,
    session_to_bytes,
)

HIDDEN = 16


def make_session(session_id: str | None = None, seed: int = 0, delta: bool = True) -> Session:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    c[0, 0] = np.nan  # stored bit for bit, NaN included
    tree = None
    if delta:
        tree = {
            "psi": {
                "dense_0": {
                    "kernel": rng.standard_normal((100, 500)).astype(np.float32),
                    "bias": np.zeros(500, np.float32),
                },
            },
            "scale": np.full((), 0.5, np.float32),
        }
    now = time.time()
    return Session(
        session_id=session_id or uuid.uuid4().hex,
        seed=seed,
        step=-1,
        lstm_c=c,
        lstm_h=rng.standard_normal((1, HIDDEN)).astype(np.float32),
        task={"kind": "goal", "goal": [1.0, 2.5]},
        task_weights=rng.standard_normal(15).astype(np.float32),
        planner={"planner": "guided", "guidance_scale": 2.0, "adaptation_steps": 5},
        last_response={"session_id": "x", "step": 0, "action": [0.1, -0.2], "timing": {}},
        delta=tree,
        created_at=now,
        last_used=now,
    )


def assert_same(a, b) -> None:
    """Equal structure and, for arrays, equal dtype, shape and bytes."""
    if isinstance(a, Session):
        assert isinstance(b, Session)
        for name in a.__dataclass_fields__:
            assert_same(getattr(a, name), getattr(b, name))
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


# --- fixtures ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Harness:
    """Makes a store of one kind inside the running event loop, and lets time pass for it."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.clock = FakeClock()

    @contextlib.asynccontextmanager
    async def store(self, idle_ttl_s: float = 60.0) -> AsyncIterator[SessionStore]:
        if self.kind == "memory":
            s: SessionStore = MemorySessionStore(1000, idle_ttl_s, clock=self.clock)
        else:
            # A fresh prefix per store keeps tests apart on the shared server.
            s = RedisSessionStore(self.url, idle_ttl_s, prefix=f"test:{uuid.uuid4().hex}:")
        try:
            yield s
        finally:
            await s.close()

    async def advance(self, seconds: float) -> None:
        if self.kind == "memory":
            self.clock.t += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def harness(request) -> Harness:
    if request.param == "memory":
        return Harness("memory")
    return Harness("redis", request.getfixturevalue("redis_url"))


# --- both stores ---------------------------------------------------------------------------


def test_create_get_put_delete_round_trip(harness):
    async def main():
        async with harness.store() as store:
            s = make_session(seed=1)
            await store.create(s)
            assert_same(await store.get(s.session_id), s)

            s.step = 0
            s.lstm_h = s.lstm_h + 1
            s.last_response = {"step": 0, "action": [1.0, 2.0]}
            s.delta = None
            s.task, s.task_weights = None, None
            s.last_used += 5
            await store.put(s)
            assert_same(await store.get(s.session_id), s)

            await store.delete(s.session_id)
            with pytest.raises(SessionNotFound):
                await store.get(s.session_id)
            with pytest.raises(SessionNotFound):
                await store.delete(s.session_id)

    asyncio.run(main())


def test_get_returns_an_independent_copy(harness):
    async def main():
        async with harness.store() as store:
            s = make_session()
            snapshot = session_from_bytes(session_to_bytes(s))
            await store.create(s)
            got = await store.get(s.session_id)
            got.lstm_c[...] = 7.0
            got.delta["psi"]["dense_0"]["bias"][:] = 1.0
            got.planner["guidance_scale"] = 0.0
            s.lstm_h[...] = 3.0  # nor does the caller's object stay linked to the store
            assert_same(await store.get(s.session_id), snapshot)

    asyncio.run(main())


def test_unknown_id_is_not_found(harness):
    async def main():
        async with harness.store() as store:
            with pytest.raises(SessionNotFound):
                await store.get("nope")
            with pytest.raises(SessionNotFound):
                await store.put(make_session("nope"))
            with pytest.raises(SessionNotFound):
                await store.get("nope")  # put did not create it
            with pytest.raises(SessionNotFound):
                await store.delete("nope")

    asyncio.run(main())


def test_create_twice_is_refused(harness):
    async def main():
        async with harness.store() as store:
            s = make_session()
            await store.create(s)
            with pytest.raises(ValueError, match="already exists"):
                await store.create(make_session(s.session_id, seed=9))
            assert (await store.get(s.session_id)).seed == s.seed

    asyncio.run(main())


def test_put_after_delete_does_not_bring_it_back(harness):
    async def main():
        async with harness.store() as store:
            s = make_session()
            await store.create(s)
            await store.delete(s.session_id)
            with pytest.raises(SessionNotFound):
                await store.put(s)
            with pytest.raises(SessionNotFound):
                await store.get(s.session_id)

    asyncio.run(main())


def test_idle_session_expires(harness):
    async def main():
        async with harness.store(idle_ttl_s=1.0) as store:
            s = make_session()
            await store.create(s)
            await harness.advance(1.3)
            with pytest.raises(SessionExpired):
                await store.get(s.session_id)
            with pytest.raises(SessionExpired):
                await store.get(s.session_id)  # still 410, not 404, when asked again
            with pytest.raises(SessionExpired):
                await store.put(s)  # and a late write does not revive it
            with pytest.raises(SessionNotFound):
                await store.get("never-existed")
            assert await store.count() == 0

    asyncio.run(main())


def test_put_keeps_a_session_alive_and_get_does_not(harness):
    async def main():
        async with harness.store(idle_ttl_s=1.0) as store:
            s = make_session()
            await store.create(s)
            await harness.advance(0.5)
            await store.put(s)
            await harness.advance(0.5)  # 1.0 s after create, 0.5 s after put
            await store.get(s.session_id)
            await harness.advance(0.6)  # 1.1 s after put; the get above did not count
            with pytest.raises(SessionExpired):
                await store.get(s.session_id)

    asyncio.run(main())


def test_count(harness):
    async def main():
        async with harness.store() as store, harness.store() as other:
            assert await store.count() == 0
            sessions = [make_session(delta=False) for _ in range(3)]
            for s in sessions:
                await store.create(s)
            await other.create(make_session(delta=False))
            assert await store.count() == 3
            await store.delete(sessions[0].session_id)
            assert await store.count() == 2
            assert await other.count() == 1

    asyncio.run(main())


def test_concurrent_puts_do_not_interfere(harness):
    n = 50

    async def main():
        async with harness.store() as store:
            sessions = [make_session(seed=i, delta=i % 5 == 0) for i in range(n)]
            await asyncio.gather(*(store.create(s) for s in sessions))

            async def advance(s: Session, rounds: int) -> None:
                for step in range(rounds):
                    s = await store.get(s.session_id)
                    s.step = step
                    s.lstm_h = np.full((1, HIDDEN), s.seed * 100 + step, np.float32)
                    s.last_response = {"step": step, "seed": s.seed}
                    await store.put(s)
                    await asyncio.sleep(0)

            await asyncio.gather(*(advance(s, 1 + s.seed % 4) for s in sessions))
            got = await asyncio.gather(*(store.get(s.session_id) for s in sessions))
            for s, g in zip(sessions, got, strict=True):
                last = s.seed % 4
                assert g.seed == s.seed and g.step == last
                assert g.last_response == {"step": last, "seed": s.seed}
                np.testing.assert_array_equal(g.lstm_h, np.full((1, HIDDEN), s.seed * 100 + last))
                assert_same(g.lstm_c, s.lstm_c)
                assert_same(g.delta, s.delta)
            assert await store.count() == n

    asyncio.run(main())


# --- memory store --------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used():
    async def main():
        store = MemorySessionStore(max_sessions=3, idle_ttl_s=60)
        a, b, c, d = (make_session(delta=False) for _ in range(4))
        for s in (a, b, c):
            await store.create(s)
        await store.get(a.session_id)  # reading does not count as use
        await store.put(a)  # writing does: b is now the least recently used
        await store.create(d)
        assert store.evictions == 1
        with pytest.raises(SessionExpired):
            await store.get(b.session_id)
        for s in (a, c, d):
            await store.get(s.session_id)
        assert await store.count() == 3
        with pytest.raises(SessionExpired):
            await store.delete(b.session_id)

    asyncio.run(main())


def test_evicted_ids_are_remembered_up_to_a_bound():
    async def main():
        store = MemorySessionStore(max_sessions=1, idle_ttl_s=60, remember_evicted=2)
        sessions = [make_session(delta=False) for _ in range(4)]
        for s in sessions:
            await store.create(s)
        assert store.evictions == 3
        with pytest.raises(SessionNotFound):
            await store.get(sessions[0].session_id)  # forgotten
        for s in sessions[1:3]:
            with pytest.raises(SessionExpired):
                await store.get(s.session_id)
        await store.get(sessions[3].session_id)

    asyncio.run(main())


def test_sweep_evicts_idle_sessions():
    async def main():
        clock = FakeClock()
        store = MemorySessionStore(max_sessions=10, idle_ttl_s=10, clock=clock)
        old = [make_session(delta=False) for _ in range(3)]
        for s in old:
            await store.create(s)
        clock.t += 6
        fresh = make_session(delta=False)
        await store.create(fresh)
        await store.put(old[0])
        clock.t += 5
        assert store.sweep() == 2
        assert store.evictions == 2
        assert store.sweep() == 0
        assert await store.count() == 2
        with pytest.raises(SessionExpired):
            await store.get(old[1].session_id)
        await store.get(old[0].session_id)

    asyncio.run(main())


def test_a_full_store_refuses_newcomers_until_its_oldest_session_idles():
    async def main():
        clock = FakeClock()
        store = MemorySessionStore(max_sessions=2, idle_ttl_s=600, clock=clock,
                                   min_idle_to_evict_s=30)  # fmt: skip
        a, b, c = (make_session(delta=False) for _ in range(3))
        await store.create(a)
        clock.t += 10
        await store.create(b)
        clock.t += 5
        with pytest.raises(SessionLimit) as refused:
            await store.create(c)
        assert refused.value.retry_after_s == pytest.approx(15)  # a idles 30 s at t = 30
        assert store.evictions == 0 and await store.count() == 2
        with pytest.raises(SessionNotFound):
            await store.get(c.session_id)  # the refused one was not kept
        clock.t += 15
        await store.create(c)
        assert store.evictions == 1
        with pytest.raises(SessionExpired):
            await store.get(a.session_id)
        await store.get(b.session_id)

    asyncio.run(main())


def test_no_room_at_all_is_session_limit():
    async def main():
        store = MemorySessionStore(max_sessions=0, idle_ttl_s=60)
        with pytest.raises(SessionLimit):
            await store.create(make_session())

    asyncio.run(main())


def test_an_unreachable_redis_is_store_unavailable():
    async def main():
        store = RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0", idle_ttl_s=60)
        session = make_session()
        calls = [store.create(session), store.get(session.session_id), store.put(session),
                 store.delete(session.session_id), store.count()]  # fmt: skip
        for call in calls:
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await call
        await store.close()

    asyncio.run(main())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MemorySessionStore(max_sessions=-1, idle_ttl_s=60)
    with pytest.raises(ValueError):
        MemorySessionStore(max_sessions=1, idle_ttl_s=0)
    with pytest.raises(ValueError):
        RedisSessionStore("redis://127.0.0.1:1/0", idle_ttl_s=60, seen_ttl_s=1)


# --- Redis store ---------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_keys_and_expiries(redis_url):
    async def main():
        prefix = f"test:{uuid.uuid4().hex}:"
        store = RedisSessionStore(redis_url, idle_ttl_s=30, prefix=prefix, seen_ttl_s=3600)
        s = make_session()
        await store.create(s)
        client = redis.Redis.from_url(redis_url)
        try:
            assert sorted(client.keys(prefix + "*")) == sorted(
                [
                    f"{prefix}session:{s.session_id}".encode(),
                    f"{prefix}seen:{s.session_id}".encode(),
                ]
            )
            assert 0 < client.pttl(f"{prefix}session:{s.session_id}") <= 30_000
            assert 30_000 < client.pttl(f"{prefix}seen:{s.session_id}") <= 3_600_000
            record = client.get(f"{prefix}session:{s.session_id}")
            assert_same(session_from_bytes(record), s)
            await store.delete(s.session_id)
            assert client.keys(prefix + "*") == []
        finally:
            client.close()
            await store.close()

    asyncio.run(main())


# --- records -------------------------------------------------------------------------------


def test_record_round_trip_is_exact():
    for s in (make_session(seed=3), make_session(seed=4, delta=False)):
        assert_same(session_from_bytes(session_to_bytes(s)), s)
    s = make_session()
    s.lstm_c = np.zeros((2, 3, HIDDEN), np.float32)
    s.delta = {"a": {"b": {"c": np.arange(5, dtype=np.float32)}}, "d": np.ones(0, np.float32)}
    s.task = {"kind": "reward_weights", "weights": np.arange(3, dtype=np.float32)}
    assert_same(session_from_bytes(session_to_bytes(s)), s)


def test_record_keeps_the_dtype_of_scalar_and_array_like_leaves():
    class ArrayLike:  # stands for a JAX array
        def __array__(self, dtype=None, copy=None):
            return np.arange(4, dtype=np.float32)

    s = make_session(delta=False)
    s.delta = {"scale": np.float32(0.25), "w": ArrayLike(), "b": 1.5}
    s.lstm_h = ArrayLike()
    back = session_from_bytes(session_to_bytes(s))
    assert_same(back.delta["scale"], np.full((), 0.25, np.float32))
    assert_same(back.delta["w"], np.arange(4, dtype=np.float32))
    assert_same(back.delta["b"], np.full((), 1.5, np.float64))
    assert_same(back.lstm_h, np.arange(4, dtype=np.float32))


def test_foreign_records_are_refused_not_executed():
    with pytest.raises(CodecError):
        session_from_bytes(pickle.dumps(make_session()))
    with pytest.raises(CodecError, match="not a session record"):
        session_from_bytes(msgpack.packb({"session_id": "x"}))
    with pytest.raises(CodecError, match="not a session record"):
        session_from_bytes(msgpack.packb([1, 2]))
    bad = msgpack.unpackb(session_to_bytes(make_session(delta=False)), raw=False)
    del bad["seed"]
    with pytest.raises(CodecError, match="session record has fields"):
        session_from_bytes(msgpack.packb(bad, use_bin_type=True))


def test_a_write_over_a_revision_read_before_another_write_is_refused(harness):
    """Compare-and-set: two readers of one revision; the first write wins, the late one is
    refused, and what the first wrote stays."""

    async def main():
        async with harness.store() as store:
            s = make_session(seed=3)
            await store.create(s)
            first, late = await store.get(s.session_id), await store.get(s.session_id)
            first.step, first.last_response = 0, {"step": 0, "by": "first"}
            await store.put(first)
            assert first.revision == 1
            late.step, late.last_response = 0, {"step": 0, "by": "late"}
            with pytest.raises(StaleWrite):
                await store.put(late)
            assert late.revision == 0
            stored = await store.get(s.session_id)
            assert (stored.revision, stored.last_response["by"]) == (1, "first")
            # Read again, it writes: the refusal was about what it read, not who it is.
            stored.step = 1
            await store.put(stored)
            assert (await store.get(s.session_id)).revision == 2

    asyncio.run(main())


def test_a_record_of_the_version_before_revisions_reads_at_revision_0():
    from service.codec import MSGPACK, decode_body, encode_body

    record = decode_body(session_to_bytes(make_session(seed=4)), MSGPACK)
    del record["revision"]
    older = session_from_bytes(encode_body({**record, "v": 3}, MSGPACK))
    assert older.revision == 0 and older.seed == 4
