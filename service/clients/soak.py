"""`worldplan loadtest URL --mix`: a soak of good requests, bad requests, retries and
clients that abandon their sessions, for a bounded time.

- Good clients step sessions to the end of short episodes and delete them; a fifth of
  their steps are sent twice, and the retry must be answered with the same action.
- Bad clients send malformed, non-finite, oversize and conflicting requests to sessions
  of their own. Each such session has a twin, stepped with the same good observations
  only: if the two ever differ, a bad input changed a session.
- Abandoning clients step a session a few times and vanish without deleting it.

Afterwards the soak waits (at most `settle_s`) for the server's live sessions to fall
back to where they were, as the abandoned ones expire, and reports what was left, with
the server's resident memory before, at the end of the load and after the settling.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter

import httpx
import msgpack
import numpy as np

from service.clients.client import AsyncClient, ServiceError
from service.codec import JSON, MSGPACK

EPISODE_STEPS = (5, 20)


def gauge(metrics_text: str, name: str) -> float | None:
    match = re.search(rf"^{name} (\S+)$", metrics_text, re.M)
    return float(match.group(1)) if match else None


async def server_state(http: httpx.AsyncClient) -> dict:
    text = (await http.get("/metrics")).text
    return {
        "sessions": gauge(text, "worldplan_active_sessions"),
        "rss_bytes": gauge(text, "process_resident_memory_bytes"),
    }


def bad_requests(sid: str, shape: list[int], step: int, max_body: int) -> list[tuple]:
    """(name, body bytes, content type) of requests that must be refused with a 4xx."""
    good = np.zeros(shape, np.float32).tolist()
    beyond = np.full(shape, 1e39).tolist()
    valid = msgpack.packb({"session_id": sid, "observation": good})

    def js(body: dict) -> bytes:
        return json.dumps(body, allow_nan=True).encode()

    return [
        ("nan", js({"session_id": sid, "observation": np.full(shape, np.nan).tolist()}), JSON),
        ("beyond_float32", js({"session_id": sid, "observation": beyond}), JSON),
        ("wrong_shape", js({"session_id": sid, "observation": [good, good]}), JSON),
        ("empty", js({"session_id": sid, "observation": []}), JSON),
        ("garbage", js({"session_id": sid, "observation": {"a": [None, "x"]}}), JSON),
        (
            "bad_dtype",
            js(
                {
                    "session_id": sid,
                    "observation": {"dtype": "complex64", "shape": shape, "b64": ""},
                }
            ),
            JSON,
        ),  # fmt: skip
        ("step_gap", js({"session_id": sid, "observation": good, "step": step + 5}), JSON),
        (
            "bad_planner",
            js({"session_id": sid, "observation": good, "planner": {"kl_coef": 1e39}}),
            JSON,
        ),  # fmt: skip
        ("truncated_msgpack", valid[: len(valid) // 2], MSGPACK),
        ("huge_length", b"\xdd\xff\xff\xff\xff", MSGPACK),
        ("deep_nesting", b"\x91" * 3000 + b"\x00", MSGPACK),
        ("extension", msgpack.packb({"observation": msgpack.ExtType(9, b"x")}), MSGPACK),
        ("oversize", b"0" * (max_body + 1), JSON),
        ("not_json", b"{'session_id':", JSON),
    ]


async def run_soak(
    url: str,
    duration_s: float,
    api_key: str | None = None,
    good: int = 4,
    bad: int = 2,
    abandon: int = 2,
    settle_s: float = 60.0,
    max_body: int = 8 * 1024 * 1024,
    seed: int = 0,
) -> dict:
    rng = random.Random(seed)
    counts: Counter = Counter()
    statuses: Counter = Counter()
    failures: list[str] = []
    headers = {"X-API-Key": api_key} if api_key else {}
    async with (
        AsyncClient(url, api_key=api_key, retries=5, backoff=0.05) as client,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http,
    ):
        model = await client.model()
        shape = model["observation_space"]["shape"]
        before = await server_state(http)
        deadline = time.perf_counter() + duration_s

        def observation() -> list:
            return np.asarray([rng.uniform(-1, 1) for _ in range(int(np.prod(shape)))]).reshape(
                shape
            ).astype(np.float32).tolist()  # fmt: skip

        async def good_client() -> None:
            while time.perf_counter() < deadline:
                sid = await client.create_session(seed=rng.randrange(2**32))
                counts["sessions_created"] += 1
                for step in range(rng.randint(*EPISODE_STEPS)):
                    obs = observation()
                    try:
                        answer = await client.act(sid, obs, step=step)
                        counts["requests"] += 1
                        if rng.random() < 0.2:  # a retry, as after a lost answer
                            again = await client.act(sid, obs, step=step)
                            counts["requests"] += 1
                            counts["retries"] += 1
                            if again["action"] != answer["action"]:
                                counts["retries_answered_differently"] += 1
                    except (ServiceError, httpx.HTTPError) as err:
                        counts["good_errors"] += 1
                        failures.append(f"good step: {type(err).__name__}: {err}"[:200])
                        break
                await client.delete_session(sid)

        async def bad_client(index: int) -> None:
            seed = 1000 + index
            sid, twin = [await client.create_session(seed=seed) for _ in range(2)]
            counts["sessions_created"] += 2
            step = -1
            while time.perf_counter() < deadline:
                step += 1
                obs = observation()
                mine, theirs = [await client.act(s, obs, step=step) for s in (sid, twin)]
                counts["requests"] += 2
                # Equal up to float32 rounding: one of them may have been batched with others.
                if not np.allclose(mine["action"], theirs["action"], rtol=1e-5, atol=1e-6):
                    counts["sessions_changed_by_bad_input"] += 1
                    return
                for name, body, kind in rng.sample(bad_requests(sid, shape, step, max_body), 4):
                    r = await http.post("/act", content=body, headers={"Content-Type": kind})
                    counts["requests"] += 1
                    counts["bad_inputs"] += 1
                    statuses[r.status_code] += 1
                    if not 400 <= r.status_code < 500:
                        failures.append(f"bad input {name}: {r.status_code} {r.text[:120]}")
            info = await client.session(sid)
            if info["step"] != step:
                counts["sessions_changed_by_bad_input"] += 1
            for s in (sid, twin):
                await client.delete_session(s)

        async def abandoning_client() -> None:
            while time.perf_counter() < deadline:
                sid = await client.create_session(seed=rng.randrange(2**32))
                counts["sessions_created"] += 1
                counts["sessions_abandoned"] += 1
                for step in range(rng.randint(1, 4)):
                    await client.act(sid, observation(), step=step)
                    counts["requests"] += 1
                await asyncio.sleep(rng.uniform(0.0, 0.2))  # and it is never heard of again

        started = time.perf_counter()
        await asyncio.gather(
            *(good_client() for _ in range(good)),
            *(bad_client(i) for i in range(bad)),
            *(abandoning_client() for _ in range(abandon)),
        )
        elapsed = time.perf_counter() - started
        loaded = await server_state(http)
        settle_deadline = time.perf_counter() + settle_s
        after = loaded
        while after["sessions"] > before["sessions"] and time.perf_counter() < settle_deadline:
            await asyncio.sleep(0.5)
            after = await server_state(http)
        settled = time.perf_counter() - started - elapsed
        fives = sum(n for status, n in statuses.items() if status >= 500)

    mib = lambda b: round(b / 2**20, 1) if b is not None else None  # noqa: E731
    return {
        "url": url,
        "duration_s": round(elapsed, 2),
        "clients": {"good": good, "bad": bad, "abandoning": abandon},
        "requests": counts["requests"],
        "bad_inputs": counts["bad_inputs"],
        "retries": counts["retries"],
        "retries_answered_differently": counts["retries_answered_differently"],
        "good_errors": counts["good_errors"],
        "bad_input_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "responses_5xx": fives,
        "sessions_created": counts["sessions_created"],
        "sessions_abandoned": counts["sessions_abandoned"],
        "sessions_changed_by_bad_input": counts["sessions_changed_by_bad_input"],
        "sessions_leaked": int(after["sessions"] - before["sessions"]),
        "settle_s": round(settled, 2),
        "memory_mib": {
            "before": mib(before["rss_bytes"]),
            "end_of_load": mib(loaded["rss_bytes"]),
            "after_settling": mib(after["rss_bytes"]),
        },
        "sessions_live": {
            "before": before["sessions"],
            "end_of_load": loaded["sessions"],
            "after_settling": after["sessions"],
        },
        "failures": failures[:20],
    }
