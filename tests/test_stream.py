"""The policy stream (/stream) through a real server on loopback, driven by openpi's own
client package (openpi-client) in pointmaze, and by a bare WebSocket for its refusals."""

import json
import re

import httpx
import numpy as np
import pytest
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from service.clients.local import running_server
from service.settings import Settings
from training.data.envs import make_env

KEY = "stream-key"
GOAL = [1.0, 1.0]
TASK = json.dumps({"kind": "goal", "goal": GOAL})


@pytest.fixture(scope="module")
def server(trained):
    # One batch size and no extra sample counts: fewer programs to compile before ready.
    settings = Settings(
        model_dir=trained.run_dir, api_key=KEY, batch_sizes=(1,), max_batch=1,
        sample_counts=(), action_horizons=(1, 3),
    )  # fmt: skip
    with running_server(settings) as (url, _):
        yield url


def stream_url(server: str, **query: str) -> str:
    return server.replace("http://", "ws://") + "/stream?" + str(httpx.QueryParams(query))


def test_openpi_client_drives_pointmaze_as_act_does(server, trained):
    """openpi-client's policy drives a session step by step; a twin session over HTTP,
    with the same seed and observations, gets the same actions."""
    policy = WebsocketClientPolicy(stream_url(server, seed="11", task=TASK), api_key=KEY)
    metadata = policy.get_server_metadata()
    assert metadata["step"] == -1 and metadata["observation_space"]["shape"] == [4]
    session_id = metadata["session_id"]
    env = make_env("pointmaze-umaze", max_episode_steps=30)
    obs = env.reset(seed=4)[0]["observation"]
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=server, headers=headers, timeout=60) as http:
        twin = http.post("/sessions", json={"seed": 11, "task": json.loads(TASK)}).json()
        for step in range(6):
            result = policy.infer({"observation": np.asarray(obs, np.float32)})
            actions = result["actions"]
            assert isinstance(actions, np.ndarray) and actions.shape == (1, 2)
            assert result["step"] == step and result["session_id"] == session_id
            assert set(result["server_timing"]) == {"infer_ms", "plan_ms"}
            body = {"session_id": twin["session_id"], "observation": obs.tolist(), "step": step}
            expected = http.post("/act", json=body).json()["action"]
            np.testing.assert_allclose(actions[0], expected, rtol=1e-5, atol=1e-6)
            obs = env.step(actions[0])[0]["observation"]
        assert http.get(f"/sessions/{session_id}").json()["step"] == 5
    policy._ws.close()  # the robot's side goes away

    # Reconnected to the same session, a resent step gets the same answer; the next goes on.
    again = WebsocketClientPolicy(stream_url(server, session_id=session_id), api_key=KEY)
    assert again.get_server_metadata()["step"] == 5
    retried = again.infer({"observation": np.asarray(obs, np.float32), "step": 5})
    np.testing.assert_array_equal(retried["actions"][0], actions[0])
    assert again.infer({"observation": np.asarray(obs, np.float32)})["step"] == 6
    again._ws.close()


def refusal(url: str, *frames, **connect) -> tuple[dict, int, str]:
    """The error frame and the close (code, reason) a bare WebSocket gets."""
    with websockets.sync.client.connect(url, **connect) as ws:
        first = ws.recv()
        for frame in frames:
            ws.send(frame)
            first = ws.recv()
        try:
            ws.recv()
        except websockets.ConnectionClosed as closed:
            return json.loads(first), closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("the stream did not close")


def test_the_stream_refuses_as_openpi_servers_do(server):
    # No key: the error as a text frame, then the close with our code in the reason.
    error, code, reason = refusal(stream_url(server))
    assert (error["status"], error["error"]["code"]) == (401, "unauthorized")
    assert (code, reason) == (1008, "401 unauthorized")
    # X-API-Key works as well as openpi's `Authorization: Api-Key`.
    headers = {"X-API-Key": KEY}
    error, code, reason = refusal(stream_url(server, session_id="nope"), additional_headers=headers)
    assert (error["error"]["code"], reason) == ("session_not_found", "404 session_not_found")
    # A text frame, and an observation of the wrong shape, are refused and change nothing.
    url = stream_url(server, seed="1")
    error, code, _ = refusal(url, "hello", additional_headers=headers)
    assert (error["error"]["code"], code) == ("bad_body", 1008)
    with websockets.sync.client.connect(url, additional_headers=headers) as ws:
        session_id = msgpack_numpy.unpackb(ws.recv())["session_id"]
        ws.send(msgpack_numpy.packb({"observation": np.zeros(3, np.float32)}))
        error = json.loads(ws.recv())
    assert error["error"]["code"] == "bad_observation"
    with httpx.Client(base_url=server, headers=headers) as http:
        assert http.get(f"/sessions/{session_id}").json()["step"] == -1


def test_a_plain_get_of_the_stream_is_told_to_upgrade(server):
    """curl on /stream: 426 in the API's error shape and `Upgrade: websocket`, not a 404,
    with or without a key."""
    for headers in ({}, {"X-API-Key": KEY}):
        answer = httpx.get(f"{server}/stream?seed=1", headers=headers)
        assert answer.status_code == 426 and answer.headers["upgrade"] == "websocket"
        assert answer.json()["error"]["code"] == "upgrade_required"
        assert "WebSocket" in answer.json()["error"]["message"]


def test_action_chunks_over_the_stream_and_http(server):
    """A session asking for action_horizon 3 gets 3 actions a step, the first one `action`;
    a horizon that is not published is refused."""
    chunked = json.dumps({"action_horizon": 3})
    policy = WebsocketClientPolicy(stream_url(server, seed="2", planner=chunked), api_key=KEY)
    obs = np.asarray([0.5, -0.5, 0.1, 0.0], np.float32)
    assert policy.infer({"observation": obs})["actions"].shape == (3, 2)
    policy._ws.close()
    with httpx.Client(base_url=server, headers={"X-API-Key": KEY}, timeout=60) as http:
        limits = http.get("/model").json()["planner_limits"]
        assert limits["action_horizon"] == [1, 3]
        sid = http.post("/sessions", json={"seed": 2}).json()["session_id"]
        body = {"session_id": sid, "observation": obs.tolist()}
        answer = http.post("/act", json={**body, "planner": {"action_horizon": 3}}).json()
        assert len(answer["actions"]) == 3 and answer["actions"][0] == answer["action"]
        plain = http.post("/act", json={**body, "step": 1}).json()
        assert len(plain["actions"]) == 1
        refused = http.post("/act", json={**body, "planner": {"action_horizon": 5}})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "unsupported_planner_shape"


def active_sessions(server: str) -> float:
    with httpx.Client(base_url=server, headers={"X-API-Key": KEY}) as http:
        text = http.get("/metrics").text
    return float(re.search(r"^worldplan_active_sessions (\S+)$", text, re.M)[1])


def test_drive_over_the_stream_with_openpi_client(server, capsys):
    """`worldplan drive --transport stream`: openpi-client's policy runs the episodes, and
    each episode's session is deleted at its end."""
    from service.cli import main as cli_main

    before = active_sessions(server)
    argv = ["drive", server, "--env", "pointmaze-umaze", "--transport", "stream", "--episodes",
            "2", "--max-steps", "12", "--api-key", KEY]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "episode 0:" in out and "episode 1:" in out and '"episodes": 2' in out
    assert '"mean_steps": 12.0' in out
    assert active_sessions(server) == before
