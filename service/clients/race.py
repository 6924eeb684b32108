"""Two replicas racing the same sessions: every step is sent to both at once, as a balancer
that remaps a session mid-step (or a client retrying on the other replica) would.

`worldplan race URL_A URL_B --sessions 8 --steps 200` counts the steps whose two answers
differ (one replica's step rolled back or doubled by the other's) and checks that each
session ends at its last step. Both replicas must share one session store (Redis).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from service.clients.client import AsyncClient, ServiceError
from service.clients.loadtest import probe_observation


async def race_session(a: AsyncClient, b: AsyncClient, model: dict, steps: int, seed: int):
    """One session stepped `steps` times on both replicas at once: (steps whose answers
    differ, errors, the session's last step as stored)."""
    session = await a.create_session(seed=seed)
    rng = np.random.default_rng(seed)
    differ, errors = 0, 0
    for step in range(steps):
        obs = probe_observation(model, rng)
        answers = await asyncio.gather(
            a.act(session, obs, step=step), b.act(session, obs, step=step), return_exceptions=True
        )
        if any(isinstance(x, ServiceError) for x in answers):
            errors += 1
        elif answers[0] != answers[1]:
            differ += 1
    last = (await a.session(session))["step"]
    await a.delete_session(session)
    return differ, errors, last


async def run_race(url_a: str, url_b: str, sessions: int, steps: int, api_key=None) -> dict:
    started = time.perf_counter()
    async with AsyncClient(url_a, api_key=api_key) as a, AsyncClient(url_b, api_key=api_key) as b:
        model = await a.model()
        results = await asyncio.gather(*(race_session(a, b, model, steps, seed)
                                         for seed in range(sessions)))  # fmt: skip
    return {
        "replicas": [url_a, url_b],
        "sessions": sessions,
        "steps_per_session": steps,
        "steps": sessions * steps,
        "answers_that_differ": sum(r[0] for r in results),
        "errors": sum(r[1] for r in results),
        "sessions_not_at_their_last_step": sum(r[2] != steps - 1 for r in results),
        "wall_s": round(time.perf_counter() - started, 1),
    }
