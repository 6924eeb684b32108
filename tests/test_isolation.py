"""Isolation through a real server: 128-bit session ids, several API keys each seeing only
its own sessions, and the API's documents behind the key."""

import base64

import httpx
import pytest
import redis

from service.clients.local import running_server
from service.sessions import session_from_bytes
from service.settings import Settings

OBS = [0.5, -0.5, 0.1, 0.0]
ALPHA, BETA = "alpha-key-0b7e", "beta-key-51c2"


@pytest.fixture(scope="module")
def server(trained, redis_url):
    settings = Settings(
        model_dir=trained.run_dir, session_store="redis", redis_url=redis_url,
        api_key=ALPHA, api_keys=(BETA,), batch_sizes=(1,), max_batch=1, sample_counts=(),
    )  # fmt: skip
    with running_server(settings) as (url, _):
        yield url


def as_key(server, key):
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=server, headers=headers, timeout=60)


def test_session_ids_carry_128_random_bits(server):
    with as_key(server, ALPHA) as c:
        ids = [c.post("/sessions", json={}).json()["session_id"] for _ in range(20)]
    assert len(set(ids)) == len(ids)
    for sid in ids:
        assert len(base64.urlsafe_b64decode(sid + "==")) >= 16


def test_a_session_is_invisible_to_another_key(server, redis_url):
    with as_key(server, ALPHA) as alpha, as_key(server, BETA) as beta:
        sid = alpha.post("/sessions", json={}).json()["session_id"]
        assert alpha.post("/act", json={"session_id": sid, "observation": OBS}).status_code == 200
        stored = redis.Redis.from_url(redis_url).get(f"worldplan:session:{sid}")
        attempts = [
            beta.get(f"/sessions/{sid}"),
            beta.post("/act", json={"session_id": sid, "observation": OBS, "step": 1}),
            beta.post("/adapt", json={"session_id": sid, "steps": 1, "persist": True}),
            beta.delete(f"/sessions/{sid}"),
        ]
        for r in attempts:
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "session_not_found"
        # The same answer as for an id that never existed: nothing tells the two apart.
        never = beta.get("/sessions/" + "A" * 22).json()["error"]
        assert attempts[0].json()["error"]["message"].replace(sid, "A" * 22) == never["message"]
        assert redis.Redis.from_url(redis_url).get(f"worldplan:session:{sid}") == stored
        assert alpha.get(f"/sessions/{sid}").json()["step"] == 0
        own = beta.post("/sessions", json={}).json()["session_id"]
        assert beta.get(f"/sessions/{own}").status_code == 200
        assert alpha.get(f"/sessions/{own}").status_code == 404
        assert alpha.delete(f"/sessions/{sid}").status_code == 204


def test_a_missing_or_unknown_key_is_401_everywhere(server):
    with as_key(server, None) as anon, as_key(server, "gamma") as wrong:
        for c in (anon, wrong):
            for method, path in [("POST", "/sessions"), ("GET", "/model"), ("GET", "/metrics")]:
                assert c.request(method, path, json={}).status_code == 401
        assert anon.get("/readyz").status_code == 200  # probes need no key


def test_the_documents_sit_behind_the_key(server):
    with as_key(server, None) as anon, as_key(server, BETA) as beta:
        for path in ("/openapi.json", "/docs"):
            r = anon.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert beta.get(path).status_code == 200
        assert "/act" in beta.get("/openapi.json").json()["paths"]


def test_a_setting_opens_the_documents_and_the_delta_a_session_keeps_is_bounded(trained, redis_url):
    settings = Settings(
        model_dir=trained.run_dir, api_key=ALPHA, docs_public=True, warm_up=False,
        session_store="redis", redis_url=redis_url, max_delta_bytes=0,
        batch_sizes=(1,), max_batch=1, sample_counts=(),
    )  # fmt: skip
    with running_server(settings) as (url, _), as_key(url, None) as anon:
        assert anon.get("/openapi.json").status_code == 200
        assert "swagger" in anon.get("/docs").text.lower()
        assert anon.get("/model").status_code == 401  # only the documents
        with as_key(url, ALPHA) as c:
            limit = c.get("/model").json()["planner_limits"]["delta_bytes"]
            assert limit["le"] == 0 and limit["per_session"] > 0
            oa = {"planner": "online_adaptation"}
            sid = c.post("/sessions", json={"planner": oa}).json()["session_id"]
            assert c.post("/act", json={"session_id": sid, "observation": OBS}).status_code == 200
            record = redis.Redis.from_url(redis_url).get(f"worldplan:session:{sid}")
            assert session_from_bytes(record).delta is None  # over the bound: not kept
            r = c.post("/adapt", json={"session_id": sid, "steps": 1, "persist": True})
            assert r.status_code == 422 and r.json()["error"]["code"] == "delta_too_large"


def test_bench_memory_measures_both_stores(trained, redis_url):
    from service.benchmarks.memory import run_memory_bench

    report = run_memory_bench(trained.run_dir, 20, redis_url)
    rows = report["bytes_per_session"]
    for row in rows.values():
        assert row["record"] > 0 and row["memory_store"] > 0 and row["redis_store"] > 0
    grown = rows["with_delta"]["record"] - rows["without_delta"]["record"]
    assert grown >= report["delta_bytes"] > 0
