"""Drives a gymnasium environment through the service: one session per episode, one /act
per step (or per action chunk), and a report of success and latency as the robot sees them.

`worldplan drive URL --env pointmaze-umaze --start-cell 1 1 --goal-cell 1 3 --episodes 3`;
without --env, the environment the served model was trained in (/model's env_id): a
packaged name or any registered gymnasium id. `--task-id K` runs OGBench's task K of an
OGBench maze. `--transport stream` drives it as a robot stack built on openpi-client
does: openpi's own WebsocketClientPolicy on the policy stream, one connection an episode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from service.clients.client import Client, stream_url
from training.data.envs import (
    check_observation_shape,
    is_goal_maze,
    make_env,
    reported_success,
    select_observation,
)


@dataclass
class DriveResult:
    success: bool | None  # None: the environment reports no success
    steps: int
    episode_return: float
    latency_ms: list[float]


def drive_episode(
    client: Client,
    env_name: str | None,
    seed: int,
    reset_options: dict | None = None,
    planner: dict | None = None,
    max_steps: int | None = None,
    model: dict | None = None,
    transport: str = "http",
) -> DriveResult:
    """One episode of `env_name` (None: /model's env_id). `model` is the server's /model
    answer (asked for when not given); an environment whose observations are not the
    shape the served model takes is refused before the session starts."""
    model = model or client.model()
    env_name = env_name or model["env_id"]
    maze = is_goal_maze(env_name)
    kwargs = {"continuing_task": False} if maze else {}
    env = make_env(env_name, max_episode_steps=max_steps, **kwargs)
    try:
        obs_key = check_observation_shape(env, env_name, model["observation_space"]["shape"])
    except ValueError:
        env.close()
        raise
    obs, info = env.reset(seed=seed, options=reset_options)
    # A maze episode's goal (random, or options["goal_cell"]) is the session's task, and
    # so is the goal an OGBench maze names at reset; any other environment's session takes
    # the model's default task.
    goal = obs["desired_goal"] if maze else info.get("goal")
    task = None if goal is None else {"kind": "goal", "goal": [float(x) for x in goal]}
    if transport == "stream":
        policy = stream_policy(client, task, planner, seed)
        session = policy.get_server_metadata()["session_id"]
        decide = lambda obs, step: policy.infer({"observation": obs})["actions"]  # noqa: E731
    else:
        session = client.create_session(task=task, planner=planner, seed=seed)
        decide = lambda obs, step: client.act(session, obs, step=step)["actions"]  # noqa: E731
    latencies, total, success, step, done = [], 0.0, None, 0, False
    try:
        while not done:
            started = time.perf_counter()
            chunk = np.asarray(decide(np.asarray(select_observation(obs, obs_key)), step))
            latencies.append(1000 * (time.perf_counter() - started))
            for action in chunk:  # an action chunk runs whole, unless the episode ends
                obs, reward, terminated, truncated, info = env.step(action)
                total += float(reward)
                reported = reported_success(info)
                if reported is not None:
                    success = bool(success) or reported
                step += 1
                done = terminated or truncated
                if done:
                    break
    finally:
        if transport == "stream":
            policy._ws.close()  # openpi-client keeps its connection; the episode is over
        client.delete_session(session)
        env.close()
    return DriveResult(success, step, total, latencies)


def stream_policy(client: Client, task: dict | None, planner: dict | None, seed: int):
    """openpi-client's WebsocketClientPolicy on the service's policy stream, for a new
    session of this task, planner and seed."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    url = stream_url(client.options.base_url, seed, task, planner)
    return WebsocketClientPolicy(url, api_key=client.options.api_key)


def summarise(results: list[DriveResult]) -> dict:
    latency = np.concatenate([r.latency_ms for r in results])
    reported = [r.success for r in results if r.success is not None]
    return {
        "episodes": len(results),
        "success_rate": float(np.mean(reported)) if reported else None,
        "mean_steps": float(np.mean([r.steps for r in results])),
        "mean_return": float(np.mean([r.episode_return for r in results])),
        "act_ms_p50": float(np.percentile(latency, 50)),
        "act_ms_p99": float(np.percentile(latency, 99)),
    }


def run_drive(
    url: str,
    env_name: str | None,
    episodes: int,
    seed: int = 0,
    start_cell: tuple[int, int] | None = None,
    goal_cell: tuple[int, int] | None = None,
    planner: str | None = None,
    max_steps: int | None = None,
    api_key: str | None = None,
    task_id: int | None = None,
    transport: str = "http",
) -> list[DriveResult]:
    """`episodes` episodes through the service at `url`, from seeds seed, seed + 1, ...,
    of `env_name` (None: the environment the served model was trained in); `task_id`:
    OGBench's task of that number."""
    cells = {"reset_cell": start_cell, "goal_cell": goal_cell}
    options = {k: np.array(v) for k, v in cells.items() if v} or None
    overrides = {"planner": planner} if planner else None
    with Client(url, api_key=api_key) as client:
        model = client.model()
        env_name = env_name or model["env_id"]
        if options and not is_goal_maze(env_name):
            raise ValueError(f"--start-cell and --goal-cell: only for a PointMaze, not {env_name}")
        if task_id is not None:
            options = {**(options or {}), "task_id": task_id}
        return [
            drive_episode(
                client, env_name, seed + i, options, overrides, max_steps, model, transport
            )  # fmt: skip
            for i in range(episodes)
        ]


def episode_line(index: int, result: DriveResult) -> str:
    p50 = np.median(result.latency_ms)
    if result.success is None:
        outcome = f"return {result.episode_return:.2f}"
    else:
        outcome = "reached" if result.success else "missed"
    return f"episode {index}: {outcome} in {result.steps} steps, act p50 {p50:.1f} ms"
