"""Limits through a real server: a full queue answers 429, an evicted session 410."""

import asyncio

import httpx

from service.local import running_server
from service.settings import Settings

OBS = [0.5, -0.5, 0.1, 0.0]


def test_queue_limit_and_lru_eviction(trained):
    settings = Settings(
        model_dir=trained.run_dir, batch_sizes=(1, 2), max_batch=2, max_wait_ms=400,
        max_queue=1, max_sessions=2, adapt_steps=(), sample_counts=(),
    )  # fmt: skip
    with running_server(settings) as (url, _):

        async def two_at_once():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                ids = [(await c.post("/sessions", json={})).json()["session_id"] for _ in (0, 1)]
                first = asyncio.create_task(
                    c.post("/act", json={"session_id": ids[0], "observation": OBS})
                )
                await asyncio.sleep(0.1)  # the first waits in the queue for a partner
                second = await c.post("/act", json={"session_id": ids[1], "observation": OBS})
                return (await first), second

        first, second = asyncio.run(two_at_once())
        assert first.status_code == 200
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "queue_full"

        with httpx.Client(base_url=url, timeout=30) as c:
            ids = [c.post("/sessions", json={}).json()["session_id"] for _ in range(3)]
            evicted = c.post("/act", json={"session_id": ids[0], "observation": OBS})
            assert evicted.status_code == 410
            assert evicted.json()["error"]["code"] == "session_expired"
            assert (
                c.post("/act", json={"session_id": ids[2], "observation": OBS}).status_code == 200
            )
