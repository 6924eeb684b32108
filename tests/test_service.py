"""The service through a real uvicorn server on loopback, driven with httpx, with its
sessions in a real redis-server (as deployed behind the load balancer)."""

import asyncio
import json
import math
import re
import threading
import time
from dataclasses import replace

import httpx
import msgpack
import numpy as np
import pytest
import redis

from service.app import create_app
from service.clients.local import running_server
from service.clients.race import run_race
from service.engine import Engine, StepInput
from service.sessions import RedisSessionStore
from service.settings import Settings
from training.learning.checkpoint import restore_bundle
from training.planning.planners import PlanShape, knob_values
from training.planning.tasks import default_task, task_weights

KEY = "test-key"
READINESS: list[int] = []


@pytest.fixture(scope="module")
def served(trained, redis_url):
    """The server's url and its application (whose engine a test may look at)."""
    settings = Settings(
        model_dir=trained.run_dir,
        session_store="redis",
        redis_url=redis_url,
        api_key=KEY,
        batch_sizes=(1, 4),
        max_batch=4,
        max_wait_ms=5,
        sample_counts=(8,),
        default_adapt_steps=4,
    )
    app = create_app(settings)
    with running_server(settings, app=app) as (url, readiness):
        READINESS[:] = readiness
        yield url, app


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": KEY}, timeout=30) as c:
        yield c


def new_session(client, **body) -> str:
    r = client.post("/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


OBS = [0.5, -0.5, 0.1, 0.0]


def test_readiness_is_503_until_the_warm_up_ends(server):
    assert READINESS[0] == 503 and READINESS[-1] == 200
    assert set(READINESS) == {503, 200}


def test_probes_and_model(client, server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server}/readyz").status_code == 200  # no key needed for probes
    info = client.get("/model").json()
    assert info["observation_space"]["shape"] == [4]
    assert info["action_space"] == {"shape": [2], "low": [-1.0, -1.0], "high": [1.0, 1.0]}
    assert info["default_task"]["kind"] == "goal"
    assert info["planner_limits"]["adaptation_steps"] == {"ge": 0, "le": 200}


def test_api_key_is_required(server):
    r = httpx.post(f"{server}/sessions", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(f"{server}/model", headers={"X-API-Key": "wrong"})
    assert r.status_code == 401


def test_steps_are_idempotent_and_gaps_conflict(client):
    sid = new_session(client, seed=7)
    first = client.post("/act", json={"session_id": sid, "observation": OBS, "step": 0})
    assert first.status_code == 200, first.text
    assert first.json()["step"] == 0 and len(first.json()["action"]) == 2
    retry = client.post("/act", json={"session_id": sid, "observation": OBS, "step": 0})
    assert retry.json() == first.json()
    assert client.get(f"/sessions/{sid}").json()["step"] == 0
    gap = client.post("/act", json={"session_id": sid, "observation": OBS, "step": 2})
    assert gap.status_code == 409
    assert gap.json()["error"]["detail"]["expected_step"] == 1
    nxt = client.post("/act", json={"session_id": sid, "observation": OBS})
    assert nxt.json()["step"] == 1
    assert all(-1.0 <= a <= 1.0 for a in nxt.json()["action"])


@pytest.mark.parametrize(
    ("observation", "code"),
    [
        ([1.0, 2.0], "bad_observation"),
        ([1.0, math.nan, 0.0, 0.0], "bad_body"),  # JSON has no NaN: the body is malformed
        ([1e39, 0.0, 0.0, 0.0], "bad_observation"),  # finite, but Inf as float32
        ("north", "bad_observation"),
        ([[1, 2, 3, 4]], "bad_observation"),
    ],
)
def test_bad_observations_change_nothing(client, observation, code):
    sid = new_session(client)
    client.post("/act", json={"session_id": sid, "observation": OBS})
    body = {"session_id": sid, "observation": observation}
    r = client.post("/act", content=__import__("json").dumps(body, allow_nan=True),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert client.get(f"/sessions/{sid}").json()["step"] == 0


def test_unknown_and_deleted_sessions(client):
    assert client.post("/act", json={"session_id": "nope", "observation": OBS}).status_code == 404
    sid = new_session(client)
    assert client.delete(f"/sessions/{sid}").status_code == 204
    r = client.get(f"/sessions/{sid}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_schema_errors_are_422_with_the_error_shape(client):
    r = client.post("/sessions", json={"planner": {"planner": "teleport"}})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request"
    assert "planner.planner" in r.json()["error"]["message"]
    r = client.post("/sessions", json={"planner": {"n_adaptation_samples": 7}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_planner_shape"
    r = client.post("/sessions", json={"planner": {"adaptation_steps": 201}})
    assert r.status_code == 422 and "max_adaptation_steps" in r.json()["error"]["message"]
    r = client.post("/sessions", json={"planner": {"delta_phi_lr": 5.0}})
    assert r.status_code == 422 and "delta_phi_lr" in r.json()["error"]["message"]
    r = client.post("/sessions", json={"task": {"kind": "goal", "goal": [1.0]}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_task"


def test_msgpack_and_json_give_the_same_action(client):
    a = new_session(client, seed=11)
    b = new_session(client, seed=11)
    by_json = client.post("/act", json={"session_id": a, "observation": OBS}).json()
    packed = msgpack.packb(
        {
            "session_id": b,
            "observation": {
                "__ndarray__": True,
                "data": np.asarray(OBS, np.float32).tobytes(),
                "dtype": "<f4",
                "shape": [4],
            },
        }
    )
    r = client.post(
        "/act",
        content=packed,
        headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
    )
    assert r.headers["content-type"].startswith("application/msgpack")
    by_msgpack = msgpack.unpackb(r.content)
    assert by_msgpack["action"] == by_json["action"]


def sequential_replay(bundle, seed: int, observations) -> tuple[list, StepInput]:
    """One session's steps, one at a time in this process: its actions and last state."""
    engine = Engine(bundle, batch_sizes=(1,))
    model, params, planning = bundle.model, bundle.params, bundle.config.planning
    decision = engine.probe(
        np.asarray(task_weights(model, params, default_task(model, params)), np.float32),
        knob_values(planning),
    )
    actions = []
    for step, obs in enumerate(observations):
        decision = replace(decision, observation=np.float32(obs), seed=seed, step=step)
        (outcome,) = engine.run(PlanShape.of(planning), [decision])
        actions.append(outcome.action)
        decision = replace(
            decision, lstm_c=outcome.lstm_c, lstm_h=outcome.lstm_h, delta=outcome.delta
        )  # the warm start carries Δφ over
    return actions, decision


def batch_sizes_seen(server) -> tuple[float, float]:
    """(decisions, batches) the server's batch-size histogram has counted so far."""
    text = httpx.get(f"{server}/metrics", headers={"X-API-Key": KEY}).text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return value("worldplan_batch_size_sum"), value("worldplan_batch_size_count")


@pytest.mark.slow
def test_concurrent_sessions_are_isolated(server, trained, redis_url):
    """16 sessions stepped concurrently (and so batched together, 4 at a time) for 12 steps:
    each one's LSTM state, as the store holds it, equals a sequential replay of its own
    steps."""
    n_sessions, n_steps = 16, 12
    observations = np.random.default_rng(0).normal(size=(n_sessions, n_steps, 4)).round(3)

    async def drive_all() -> tuple[list[str], list[list]]:
        headers = {"X-API-Key": KEY}
        async with httpx.AsyncClient(base_url=server, headers=headers, timeout=120) as c:
            ids = []
            for i in range(n_sessions):
                ids.append(
                    (await c.post("/sessions", json={"seed": 1000 + i})).json()["session_id"]
                )

            async def drive(i):
                actions = []
                for t in range(n_steps):
                    body = {"session_id": ids[i], "observation": observations[i, t].tolist(),
                            "step": t}  # fmt: skip
                    r = await c.post("/act", json=body)
                    assert r.status_code == 200, r.text
                    actions.append(r.json()["action"])
                return actions

            return ids, list(await asyncio.gather(*(drive(i) for i in range(n_sessions))))

    async def stored(ids) -> list:
        store = RedisSessionStore(redis_url, idle_ttl_s=3600)
        try:
            return [await store.get(sid) for sid in ids]
        finally:
            await store.close()

    before = batch_sizes_seen(server)
    ids, actions = asyncio.run(drive_all())
    after = batch_sizes_seen(server)
    decisions, batches = after[0] - before[0], after[1] - before[1]
    assert decisions == n_sessions * n_steps and batches < decisions  # some ran together
    sessions = asyncio.run(stored(ids))
    bundle = restore_bundle(trained.run_dir)
    for i, session in enumerate(sessions):
        replayed, last = sequential_replay(bundle, 1000 + i, observations[i])
        assert session.step == n_steps - 1
        np.testing.assert_allclose(actions[i], replayed, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(session.lstm_c, last.lstm_c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(session.lstm_h, last.lstm_h, rtol=1e-4, atol=1e-5)


def test_adapt_sets_the_task_and_persists_delta_only_when_asked(client):
    fresh = new_session(client)
    r = client.post("/adapt", json={"session_id": fresh, "steps": 5})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_observation"

    a, b, c = (new_session(client, seed=21) for _ in range(3))
    for sid in (a, b, c):
        client.post("/act", json={"session_id": sid, "observation": OBS})
    r = client.post("/adapt", json={"session_id": a, "steps": 5})  # persist defaults to false
    assert r.status_code == 200, r.text
    diag = r.json()["diagnostics"]
    assert len(diag["objective"]) == 6 and diag["steps"] == 5 and not diag["persisted"]
    assert diag["objective"][diag["kept_step"]] == max(diag["objective"])
    assert diag["kl"] >= 0.0 and diag["ess"] >= 1.0
    goal = {"kind": "goal", "goal": [0.9, -0.9]}
    r = client.post(
        "/adapt",
        json={"session_id": b, "steps": 5, "task": goal, "observation": OBS, "persist": True},
    )
    assert r.status_code == 200 and len(r.json()["task_embedding"]) == 16
    assert client.get(f"/sessions/{b}").json()["task"] == goal

    oa = {"planner": "online_adaptation"}
    acts = {
        sid: client.post("/act", json={"session_id": sid, "observation": OBS, "planner": oa}).json()
        for sid in (a, c)
    }
    assert acts[a]["action"] == acts[c]["action"]  # without persist, nothing of Δφ stays


def test_adapt_without_a_step_count_takes_the_configured_default(client):
    sid = new_session(client)
    r = client.post("/adapt", json={"session_id": sid, "observation": OBS})
    assert r.status_code == 200, r.text
    diag = r.json()["diagnostics"]
    assert diag["steps"] == 4 and len(diag["objective"]) == 5  # WORLDPLAN_DEFAULT_ADAPT_STEPS


def test_adapt_takes_any_step_count_up_to_the_published_maximum(client):
    sid = new_session(client)
    client.post("/act", json={"session_id": sid, "observation": OBS})
    limit = client.get("/model").json()["planner_limits"]["adaptation_steps"]["le"]
    for steps in (37, limit):  # neither was compiled on its own
        r = client.post("/adapt", json={"session_id": sid, "steps": steps})
        assert r.status_code == 200, r.text
        assert len(r.json()["diagnostics"]["objective"]) == steps + 1
    r = client.post("/adapt", json={"session_id": sid, "steps": limit + 1})
    assert r.status_code == 422 and "max_adaptation_steps" in r.json()["error"]["message"]


def test_act_reports_adaptation_and_carries_delta_over_until_a_reset(client, server):
    oa = {"planner": "online_adaptation"}
    carried, cold, reset, fresh = (new_session(client, seed=5, planner=oa) for _ in range(4))
    act = lambda sid, **extra: client.post(  # noqa: E731
        "/act", json={"session_id": sid, "observation": OBS, **extra}
    ).json()
    first = act(carried)
    diag = first["diagnostics"]
    assert {"ess", "fallback", "chose_prior", "kl", "kept_step", "objective"} <= diag.keys()
    assert 1.0 <= diag["ess"] <= 8.0  # 8 prior samples in the test's published shape
    assert first["action"] == act(cold, planner={**oa, "warm_start": False})["action"]
    act(reset)
    act(fresh, planner={"planner": "random_shooting"})  # leaves no Δφ behind
    second = {
        carried: act(carried),
        cold: act(cold, planner={**oa, "warm_start": False}),
        reset: act(reset, reset=True),
        fresh: act(fresh, reset=True),
    }
    # The same LSTM state; only the warm-started session starts from the first step's Δφ.
    assert second[carried]["diagnostics"]["objective"] != second[cold]["diagnostics"]["objective"]
    # A reset starts from zero LSTM state and Δφ = 0, as the session that never adapted.
    assert second[reset]["action"] == second[fresh]["action"]
    assert "worldplan_adaptation_fallbacks_total" in client.get("/metrics").text


def test_warm_start_false_decides_as_a_cold_twin(client):
    """A session that holds a Δφ and asks for no warm start decides exactly as its twin
    that holds none; asking for the warm start does start from it."""
    oa = {"planner": "online_adaptation"}
    warm, twin, control = (new_session(client, seed=11, planner=oa) for _ in range(3))
    act = lambda sid, **extra: client.post(  # noqa: E731
        "/act", json={"session_id": sid, "observation": OBS, **extra}
    ).json()
    act(warm)  # keeps its Δφ
    act(control)  # keeps the same Δφ
    act(twin, planner={**oa, "warm_start": False})  # the same step, keeps none
    cold = {**oa, "warm_start": False}
    asked_cold, twin_cold = act(warm, planner=cold), act(twin, planner=cold)
    assert asked_cold["action"] == twin_cold["action"]
    assert asked_cold["diagnostics"] == twin_cold["diagnostics"]
    warm_started = act(control)
    assert warm_started["diagnostics"]["objective"] != twin_cold["diagnostics"]["objective"]


def test_a_delta_fitted_by_one_program_never_reaches_another():
    """The step rule hands a carried Δφ only to a warm step of the program that fitted it."""
    from training.planning.step_rule import Carried, after_act, starting_delta

    fitted_by = PlanShape("online_adaptation", 4, 8, 8)
    carried = Carried.fitted({"out": np.ones(3)}, fitted_by)
    assert starting_delta(carried, fitted_by, warm_start=True, reset=False) is not None
    others = [
        PlanShape("online_adaptation", 4, 8, 16),  # another sample count
        PlanShape("online_adaptation", 4, 8, 8, adapt_params="film"),  # another tree
        *(PlanShape(name, 4, 8, 8) for name in ("controller", "random_shooting")),
    ]
    for shape in others:
        assert starting_delta(carried, shape, warm_start=True, reset=False) is None
    # A step of another planner leaves the Δφ for a later step of its own program.
    kept = after_act(carried, others[-1], warm_start=True, reset=False, delta=None)
    assert starting_delta(kept, fitted_by, warm_start=True, reset=False) is carried.delta


def test_a_new_task_drops_the_warm_start(client):
    oa = {"planner": "online_adaptation"}
    warm, cold = (new_session(client, seed=9, planner=oa) for _ in range(2))
    act = lambda sid, **extra: client.post(  # noqa: E731
        "/act", json={"session_id": sid, "observation": OBS, **extra}
    ).json()
    act(warm)  # keeps its Δφ
    act(cold, planner={**oa, "warm_start": False})  # keeps none
    goal = {"kind": "goal", "goal": [-0.9, 0.9]}
    for sid in (warm, cold):
        r = client.post("/adapt", json={"session_id": sid, "task": goal, "steps": 3})
        assert r.status_code == 200, r.text
    assert act(warm)["action"] == act(cold)["action"]  # both start the new task from Δφ = 0


def test_metrics_count_requests_batches_and_adaptation(client):
    sid = new_session(client)
    oa = {"planner": "online_adaptation"}
    client.post("/act", json={"session_id": sid, "observation": OBS, "planner": oa})
    text = client.get("/metrics").text
    assert 'worldplan_request_seconds_count{method="POST",route="/act",status="200"}' in text
    assert "worldplan_batch_size_count" in text and "worldplan_queue_wait_seconds_sum" in text
    assert 'worldplan_decisions_total{planner="online_adaptation"}' in text
    assert "worldplan_adaptation_kl_count" in text
    active = [line for line in text.splitlines() if line.startswith("worldplan_active_sessions")]
    assert float(active[0].split()[-1]) >= 1
    assert httpx.get(str(client.base_url) + "/metrics").status_code == 401


def test_clients_sync_async_and_msgpack_agree(server):
    from service.clients.client import AsyncClient, Client, ServiceError

    with Client(server, api_key=KEY) as c, Client(server, api_key=KEY, use_msgpack=True) as m:
        a, b = c.create_session(seed=0), m.create_session(seed=0)
        first = c.act(a, OBS, step=0)
        assert c.act(a, OBS, step=0) == first  # a retried step is answered, not applied again
        assert c.session(a)["step"] == 0
        assert m.act(b, np.asarray(OBS, np.float32), step=0)["action"] == first["action"]
        with pytest.raises(ServiceError) as err:
            c.act(a, OBS, step=5)
        assert err.value.status == 409 and err.value.detail["expected_step"] == 1

    async def drive():
        async with AsyncClient(server, api_key=KEY) as ac:
            ids = [await ac.create_session(seed=0) for _ in range(3)]
            answers = await asyncio.gather(*(ac.act(sid, OBS, step=0) for sid in ids))
            return [r["action"] for r in answers]

    # batched together: equal up to float32 rounding of the larger compiled batch
    np.testing.assert_allclose(asyncio.run(drive()), [first["action"]] * 3, rtol=1e-5, atol=1e-6)


def test_the_committed_openapi_document_is_the_apps(client):
    from pathlib import Path

    from service.app import create_app
    from service.openapi import document

    committed = Path(__file__).parent.parent / "openapi" / "openapi.json"
    assert committed.read_text() == document(create_app()), (
        "run: worldplan openapi > openapi/openapi.json"
    )
    served = client.get("/openapi.json").json()
    assert served["paths"]["/act"]["post"]["requestBody"]["content"]["application/msgpack"]
    assert "409" in served["paths"]["/act"]["post"]["responses"]
    assert "101" in served["paths"]["/stream"]["get"]["responses"]  # the policy stream


def test_loadtest_reports_throughput_latency_and_errors(server, served, tmp_path):
    from service.clients.loadtest import run_loadtest, write_report

    report = asyncio.run(run_loadtest(server, sessions=4, duration_s=1.5, api_key=KEY))
    assert report["errors"] == {} and report["requests"] >= 4
    assert report["throughput_rps"] > 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    json_path, png_path = write_report(report, tmp_path)
    assert png_path.stat().st_size > 5_000
    # The result names the model the server answered with, and the load it was under.
    origin = json.loads(json_path.read_text())["provenance"]
    assert origin["model_version"] == served[1].state.runtime.model_version
    assert origin["settings"]["sessions"] == 4
    from service.clients.client import ServiceError

    with pytest.raises(ServiceError, match="401 unauthorized"):
        asyncio.run(run_loadtest(server, sessions=1, duration_s=0.5, api_key="wrong"))


def test_oversized_bodies_are_refused(client):
    sid = new_session(client)
    huge = b"[" + b"0," * (4 * 1024 * 1024 + 1) + b"0]"  # over the 8 MiB default
    r = client.post("/act", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert client.get(f"/sessions/{sid}").json()["step"] == -1


def test_a_missed_deadline_is_504_and_the_step_can_be_retried(client):
    sid = new_session(client)
    body = {"session_id": sid, "observation": OBS, "step": 0}
    r = client.post("/act", json={**body, "deadline_ms": 0.001})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert client.get(f"/sessions/{sid}").json()["step"] == -1
    assert client.post("/act", json=body).json()["step"] == 0


def test_a_damaged_session_record_is_a_500_with_the_error_shape(client, redis_url):
    sid = new_session(client)
    redis.Redis.from_url(redis_url).set(f"worldplan:session:{sid}", b"not a session record")
    r = client.get(f"/sessions/{sid}")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "CodecError" in r.json()["error"]["message"]


class InFlight:
    """Counts the engine's calls in flight. Each call holds the engine 50 ms longer, so
    that two calls allowed to run at once would overlap."""

    def __init__(self):
        self.now = self.most = 0
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def wrap(self, name: str, method):
        def counted(*args):
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
                self.calls[name] = self.calls.get(name, 0) + 1
            try:
                time.sleep(0.05)
                return method(*args)
            finally:
                with self._lock:
                    self.now -= 1

        return counted


def test_adapt_and_a_batch_of_act_never_run_two_engine_calls_at_once(served, monkeypatch):
    url, app = served
    engine = app.state.runtime.engine
    in_flight = InFlight()
    for name in ("run", "adapt", "task_weights"):
        monkeypatch.setattr(engine, name, in_flight.wrap(name, getattr(engine, name)))

    async def concurrently():
        headers = {"X-API-Key": KEY}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
            created = await asyncio.gather(*(c.post("/sessions", json={}) for _ in range(8)))
            sids = [r.json()["session_id"] for r in created]
            adapts = [
                c.post("/adapt", json={"session_id": sid, "observation": OBS, "steps": 3})
                for sid in sids[:4]
            ]
            acts = [c.post("/act", json={"session_id": sid, "observation": OBS}) for sid in sids]
            return await asyncio.gather(*adapts, *acts)

    answers = asyncio.run(concurrently())
    assert [r.status_code for r in answers] == [200] * 12, [r.text for r in answers]
    assert in_flight.calls["adapt"] == 4 and in_flight.calls["run"] >= 1
    assert in_flight.calls["task_weights"] == 8  # each new session's default task
    assert in_flight.most == 1


def test_a_model_that_fails_to_load_fails_liveness(tmp_path):
    """/healthz answers 503 once the load failed, so that Kubernetes restarts the pod;
    /readyz says why too."""
    import uvicorn

    from service.clients.local import free_port

    settings = Settings(model_dir=tmp_path / "no-bundle-here", session_store="memory")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/healthz")
                if health.status_code != 200 or time.monotonic() > deadline:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert health.status_code == 503
        error = health.json()["error"]
        assert error["code"] == "model_load_failed" and "no-bundle-here" in error["message"]
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "failed to load" in ready.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow
@pytest.mark.redis
def test_two_replicas_racing_one_session_never_change_an_acknowledged_step(trained, redis_url):
    """A slow replica's late write of a step that another replica stored meanwhile is
    refused: it answers what was stored (as a retry would be answered) and counts it."""
    settings = Settings(
        model_dir=trained.run_dir, session_store="redis", redis_url=redis_url,
        batch_sizes=(1,), max_batch=1, sample_counts=(4096,),
    )  # fmt: skip
    slow_planner = {"planner": "online_adaptation", "adaptation_steps": 200,
                    "n_adaptation_samples": 4096}  # fmt: skip
    with running_server(settings) as (a, _), running_server(settings) as (b, _):
        sid = httpx.post(f"{a}/sessions", json={"seed": 5}).json()["session_id"]
        first = {"session_id": sid, "observation": [0.5, -0.5, 0.1, 0.0], "step": 0}

        async def race():
            async with httpx.AsyncClient(timeout=60) as c:
                slow = asyncio.create_task(
                    c.post(f"{a}/act", json={**first, "planner": slow_planner})
                )
                await asyncio.sleep(0.05)  # replica a is computing
                quick = await c.post(f"{b}/act", json=first)
                return quick, await slow

        quick, slow = asyncio.run(race())
        assert quick.status_code == 200 and slow.status_code == 200
        # b acknowledged step 0 first; a's late answer is b's, not its own.
        assert slow.json() == quick.json()
        stale = re.search(r'worldplan_stale_writes_total\{route="/act"\} (\S+)',
                          httpx.get(f"{a}/metrics").text)  # fmt: skip
        assert stale and float(stale[1]) == 1.0
        # The session goes on from b's step 0, on either replica.
        nxt = httpx.post(f"{a}/act", json={**first, "step": 1})
        assert nxt.status_code == 200 and nxt.json()["step"] == 1
        assert httpx.get(f"{b}/sessions/{sid}").json()["step"] == 1
        # Every step of several sessions sent to both replicas at once: one answer each.
        report = asyncio.run(run_race(a, b, sessions=3, steps=8))
        assert report["steps"] == 24 and report["errors"] == 0
        assert report["answers_that_differ"] == 0
        assert report["sessions_not_at_their_last_step"] == 0
