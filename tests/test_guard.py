"""The non-finite guard through a real server: no NaN, Inf or number beyond float32 reaches
a session, and the refusal leaves the stored record byte for byte as it was."""

import json
import re

import httpx
import msgpack
import numpy as np
import pytest
import redis

from service.clients.local import running_server
from service.settings import Settings

OBS = [0.5, -0.5, 0.1, 0.0]
OA = {"planner": "online_adaptation"}


@pytest.fixture(scope="module")
def server(trained, redis_url):
    settings = Settings(
        model_dir=trained.run_dir, session_store="redis", redis_url=redis_url,
        batch_sizes=(1,), max_batch=1, sample_counts=(),
    )  # fmt: skip
    with running_server(settings) as (url, _):
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture
def record(redis_url):
    """The stored bytes of a session, read straight from Redis."""
    r = redis.Redis.from_url(redis_url)
    yield lambda sid: r.get(f"worldplan:session:{sid}")
    r.close()


def acted_session(client, seed=3) -> str:
    """A session with a step, an LSTM state and a Δφ warm start behind it."""
    sid = client.post("/sessions", json={"seed": seed, "planner": OA}).json()["session_id"]
    assert client.post("/act", json={"session_id": sid, "observation": OBS}).status_code == 200
    return sid


def raw_json(client, path, body):
    """A body as Python's json writes it when NaN is allowed: NaN, Infinity, 1e39 …"""
    text = json.dumps(body, allow_nan=True)
    return client.post(path, content=text, headers={"Content-Type": "application/json"})


def non_finite_count(client, route, stage) -> float:
    text = client.get("/metrics").text
    pattern = rf'^worldplan_non_finite_total{{route="{route}",stage="{stage}"}} (\S+)$'
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def test_an_observation_beyond_float32_is_refused_and_the_session_stays_usable(client, record):
    """The poisoned session: 1e39 is a finite JSON number but Inf as float32. It was
    accepted, the answer failed to encode (500), and the stored session broke."""
    sid, twin = acted_session(client), acted_session(client)
    before = record(sid)
    counted = non_finite_count(client, "/act", "input")
    r = client.post("/act", json={"session_id": sid, "observation": [1e39, 0.0, 0.0, 0.0]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_observation"
    assert "float32" in r.json()["error"]["message"]
    assert record(sid) == before  # nothing was written
    assert non_finite_count(client, "/act", "input") == counted + 1
    info = client.get(f"/sessions/{sid}")
    assert info.status_code == 200 and info.json()["step"] == 0
    # The next step is the step the session would have taken without the bad input.
    nxt = client.post("/act", json={"session_id": sid, "observation": OBS, "step": 1})
    ref = client.post("/act", json={"session_id": twin, "observation": OBS, "step": 1})
    assert nxt.status_code == 200 and nxt.json()["action"] == ref.json()["action"]


@pytest.mark.parametrize(
    "observation",
    [
        [float("nan"), 0.0, 0.0, 0.0],
        [0.0, float("inf"), 0.0, 0.0],
        [-1e39, 0.0, 0.0, 0.0],
        {"dtype": "float64", "shape": [4], "b64": "AAAAAAAA8H8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="},
    ],
    ids=["nan", "inf", "beyond-float32", "b64-inf"],
)
def test_non_finite_observations_change_nothing_in_json_and_msgpack(client, record, observation):
    sid = acted_session(client)
    before = record(sid)
    body = {"session_id": sid, "observation": observation}
    r = raw_json(client, "/act", body)
    assert r.status_code == 400, r.text
    packed = msgpack.packb(body, use_bin_type=True)
    m = client.post("/act", content=packed, headers={"Content-Type": "application/msgpack"})
    assert m.status_code == 400, m.text
    assert record(sid) == before


def test_a_msgpack_ndarray_holding_nan_is_refused(client, record):
    sid = acted_session(client)
    before = record(sid)
    obs = np.asarray([0.0, np.nan, 0.0, 0.0], np.float32)
    body = {
        "session_id": sid,
        "observation": {"__ndarray__": True, "data": obs.tobytes(), "dtype": "<f4", "shape": [4]},
    }
    r = client.post(
        "/act", content=msgpack.packb(body), headers={"Content-Type": "application/msgpack"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_observation"
    assert record(sid) == before


def test_a_finite_input_that_drives_the_model_out_of_range_is_422_and_changes_nothing(
    client, record
):
    """Weights of 3e38 are finite float32, but every value ψ·w overflows: the result is
    refused before the session is written, and counted."""
    huge = [3e38] * 16
    sid = client.post("/sessions", json={"planner": OA}).json()["session_id"]
    assert client.post("/act", json={"session_id": sid, "observation": OBS}).status_code == 200
    before = record(sid)
    counted = non_finite_count(client, "/adapt", "result")
    task = {"kind": "embedding", "embedding": huge}
    r = client.post("/adapt", json={"session_id": sid, "task": task, "steps": 2, "persist": True})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "non_finite_result"
    assert record(sid) == before
    assert non_finite_count(client, "/adapt", "result") == counted + 1

    poisoned = client.post("/sessions", json={"task": task, "planner": OA}).json()["session_id"]
    before = record(poisoned)
    r = client.post("/act", json={"session_id": poisoned, "observation": OBS})
    assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_result"
    assert record(poisoned) == before
    assert client.get(f"/sessions/{poisoned}").json()["step"] == -1


@pytest.mark.parametrize(
    "task",
    [
        {"kind": "goal", "goal": [float("nan"), 0.0]},
        {"kind": "goal", "goal": [1e39, 0.0]},
        {"kind": "embedding", "embedding": [float("inf")] * 16},
        {"kind": "reward_samples", "observations": [[1e39, 0, 0, 0], OBS], "rewards": [0, 1]},
        {"kind": "reward_samples", "observations": [OBS, OBS], "rewards": [1e39, 1]},
    ],
)
def test_tasks_with_non_finite_numbers_are_refused(client, record, task):
    r = raw_json(client, "/sessions", {"task": task})
    assert 400 <= r.status_code < 500 and r.status_code != 404, r.text
    sid = acted_session(client)
    before = record(sid)
    r = raw_json(client, "/adapt", {"session_id": sid, "task": task, "steps": 1})
    assert 400 <= r.status_code < 500, r.text
    assert record(sid) == before


def test_json_numbers_json_cannot_spell_are_a_bad_body(client):
    for text in (b'{"seed": NaN}', b'{"seed": Infinity}', b'{"planner": {"kl_coef": 1e400}}'):
        r = client.post("/sessions", content=text, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_body", text


@pytest.mark.parametrize(
    "planner",
    [
        {"kl_coef": 1e-300},  # float32 0: the planner divides by it
        {"kl_coef": 1e39},
        {"guidance_scale": 1e6},
        {"delta_phi_lr": 1e-30},
        {"kl_coef": float("nan")},
    ],
)
def test_planner_overrides_outside_the_published_limits_are_422(client, planner):
    limits = client.get("/model").json()["planner_limits"]
    assert limits["kl_coef"] == {"ge": 1e-3, "le": 1e3}
    r = client.post(
        "/sessions",
        content=msgpack.packb({"planner": planner}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
