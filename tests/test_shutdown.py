"""A real `worldplan serve` process on loopback, its sessions in a real redis-server: its
logs hold no observation and no key, and SIGTERM during a load loses no step."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from service.clients.local import free_port, settings_env, stop, wait_ready
from service.sessions import RedisSessionStore
from service.settings import Settings

KEY = "key-6f1d0c2b9a"
WRONG_KEY = "wrong-key-e3b0c442"
# Numbers no log line would hold by chance.
OBS = [0.7071067, -0.3141592, 0.2718281, 0.1414213]
DRAIN_S = 3.0


@pytest.fixture(scope="module")
def served(trained, redis_url, tmp_path_factory):
    """(url, log path, process) of a server with two keys and a 3 s drain."""
    settings = Settings(
        model_dir=trained.run_dir, session_store="redis", redis_url=redis_url,
        api_key=KEY, api_keys=("second-key-77aa",), drain_s=DRAIN_S,
        batch_sizes=(1, 4), max_batch=4, sample_counts=(),
    )  # fmt: skip
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    with log.open("wb") as out:
        env = {**os.environ, **settings_env(settings)}
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 300, process, log)
        yield url, log, process
    finally:
        stop(process)


def assert_clean(log) -> None:
    text = log.read_text(errors="replace")
    assert "POST /act" in text  # the access log is there, and was read
    for secret in (KEY, WRONG_KEY, "second-key-77aa"):
        assert secret not in text
    for number in OBS:
        assert f"{number}"[:7] not in text
    assert "1e+39" not in text and "1e39" not in text


@pytest.mark.slow
def test_logs_hold_no_observation_and_no_key(served):
    url, log, _ = served
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as c:
        sid = c.post("/sessions", json={}).json()["session_id"]
        assert c.post("/act", json={"session_id": sid, "observation": OBS}).status_code == 200
        bad = [
            {"session_id": sid, "observation": [1e39, *OBS[1:]]},
            {"session_id": sid, "observation": OBS[:3]},
            {"session_id": sid, "observation": OBS, "step": 7},
            {"session_id": sid, "observation": OBS, "colour": OBS},
        ]
        for body in bad:
            assert 400 <= c.post("/act", json=body).status_code < 500
        task = {"kind": "reward_samples", "observations": [OBS, OBS], "rewards": [0.7071067]}
        assert c.post("/sessions", json={"task": task}).status_code == 422
        assert c.post("/act", content=b'{"observation": [0.7071067,', headers={}).is_client_error
    for headers in ({"X-API-Key": WRONG_KEY}, {}):
        r = httpx.post(f"{url}/act", json={"session_id": sid, "observation": OBS}, headers=headers)
        assert r.status_code == 401
    time.sleep(0.2)  # the access log is written after the answer
    assert_clean(log)


@pytest.mark.slow
def test_sigterm_drains_and_loses_no_step(served, redis_url):
    """Eight sessions step as fast as they can; SIGTERM arrives. /readyz turns 503 at once,
    new requests get 503 with Retry-After, and every step that was answered is stored."""
    url, log, process = served
    n_sessions = 8
    headers = {"X-API-Key": KEY}

    async def load():
        acked = {}  # session -> the last step answered 200
        refusals = []
        readiness = []
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
            ids = [(await c.post("/sessions", json={})).json()["session_id"]
                   for _ in range(n_sessions)]  # fmt: skip

            async def drive(sid):
                for step in range(100_000):
                    body = {"session_id": sid, "observation": OBS, "step": step}
                    try:
                        r = await c.post("/act", json=body)
                    except httpx.TransportError:
                        return  # the server has stopped listening
                    if r.status_code != 200:
                        refusals.append((r.status_code, r.json()["error"]["code"], r.headers))
                        return
                    acked[sid] = step

            async def terminate():
                await asyncio.sleep(1.5)
                process.send_signal(signal.SIGTERM)
                signalled = time.perf_counter()
                async with httpx.AsyncClient(base_url=url, timeout=5) as probe:
                    r = await probe.get("/readyz")
                readiness.append((r.status_code, time.perf_counter() - signalled))

            await asyncio.gather(terminate(), *(drive(sid) for sid in ids))
        return ids, acked, refusals, readiness

    ids, acked, refusals, readiness = asyncio.run(load())
    process.wait(timeout=60)
    ((ready_status, after_s),) = readiness
    assert ready_status == 503 and after_s < DRAIN_S  # before the drain ends
    assert refusals, "no request was refused during the drain"
    for status, code, response_headers in refusals:
        assert (status, code) == (503, "shutting_down")
        assert response_headers["retry-after"] == "1"

    async def stored_steps():
        store = RedisSessionStore(redis_url, idle_ttl_s=3600)
        try:
            return {sid: (await store.get(sid)).step for sid in ids}
        finally:
            await store.close()

    stored = asyncio.run(stored_steps())
    assert set(acked) == set(ids) and sum(acked.values()) > 0
    lost = {sid: (acked[sid], stored[sid]) for sid in ids if stored[sid] != acked[sid]}
    answered = sum(step + 1 for step in acked.values())
    print(f"\nSIGTERM: {answered} steps answered, {len(refusals)} refused (503), {len(lost)} lost")
    assert lost == {}, "steps answered but not stored, or stored but not answered"
    assert_clean(log)
