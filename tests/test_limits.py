"""Limits through a real server: a full queue or a full session store answers 429, an
evicted session 410, an unreachable session store 503."""

import asyncio
import time

import httpx
import pytest

from service.clients.local import free_port, running_server
from service.settings import Settings

OBS = [0.5, -0.5, 0.1, 0.0]
LONG = {
    "planner": "online_adaptation",
    "adaptation_steps": 200,
    "n_adaptation_samples": 4096,
}  # keeps the engine busy


@pytest.mark.slow
def test_queue_and_session_limits(trained):
    settings = Settings(
        model_dir=trained.run_dir, batch_sizes=(1,), max_batch=1, max_queue=1,
        max_sessions=3, evict_idle_s=1.0, sample_counts=(4096,),
    )  # fmt: skip
    with running_server(settings) as (url, _):

        async def three_at_once():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                ids = [(await c.post("/sessions", json={})).json()["session_id"] for _ in "abc"]
                act = lambda i, **extra: c.post(  # noqa: E731
                    "/act", json={"session_id": ids[i], "observation": OBS, **extra}
                )
                busy = asyncio.create_task(act(0, planner=LONG))
                await asyncio.sleep(0.02)  # the engine is computing the long adaptation
                queued = asyncio.create_task(act(1))
                await asyncio.sleep(0.02)  # and the second decision waits in the queue
                refused = await act(2)
                # An adaptation and a task's weights wait for the same engine: refused too.
                adapt = {"session_id": ids[2], "observation": OBS, "steps": 5}
                others = [await c.post("/adapt", json=adapt), await c.post("/sessions", json={})]
                return await busy, await queued, [refused, *others], ids

        busy, queued, refusals, ids = asyncio.run(three_at_once())
        assert busy.status_code == 200 and queued.status_code == 200
        assert busy.json()["timing"]["plan_ms"] > 40  # it was still computing
        for refused in refusals:  # /act, /adapt, and a new session's task
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"

        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get(f"/sessions/{ids[2]}").json()["step"] == -1  # the refusal changed nothing
            for i, step in ((2, 0), (1, 1), (0, 1)):  # all in use, ids[2] the least recently
                body = {"session_id": ids[i], "observation": OBS, "step": step}
                assert c.post("/act", json=body).status_code == 200
            full = c.post("/sessions", json={})
            assert full.status_code == 429 and full.json()["error"]["code"] == "session_limit"
            assert 1 <= int(full.headers["retry-after"]) <= 2
            time.sleep(1.0)  # ids[2] has idled long enough to make room
            assert c.post("/sessions", json={}).status_code == 201
            evicted = c.post("/act", json={"session_id": ids[2], "observation": OBS})
            assert evicted.status_code == 410
            assert evicted.json()["error"]["code"] == "session_expired"
            assert c.get(f"/sessions/{ids[0]}").json()["step"] == 1  # kept


def test_an_unreachable_session_store_is_503_with_the_error_shape(trained):
    settings = Settings(
        model_dir=trained.run_dir, session_store="redis", warm_up=False,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        batch_sizes=(1,), max_batch=1, sample_counts=(),
    )  # fmt: skip
    with running_server(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        for method, path, body in [
            ("POST", "/sessions", {}),
            ("POST", "/act", {"session_id": "abc", "observation": OBS}),
            ("GET", "/sessions/abc", None),
        ]:
            r = c.request(method, path, json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "store_unavailable"
