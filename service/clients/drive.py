"""Drives a gymnasium environment through the service: one session per episode, one /act
per step, and a report of success and latency as the robot sees them.

`worldplan drive URL --env pointmaze-umaze --start-cell 1 1 --goal-cell 1 3 --episodes 3`
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from service.clients.client import Client
from training.data.envs import get_env_spec, make_env, select_observation


@dataclass
class DriveResult:
    success: bool
    steps: int
    episode_return: float
    latency_ms: list[float]


def drive_episode(
    client: Client,
    env_name: str,
    seed: int,
    reset_options: dict | None = None,
    planner: dict | None = None,
    max_steps: int | None = None,
) -> DriveResult:
    spec = get_env_spec(env_name)
    maze = env_name.startswith("pointmaze")
    kwargs = {"continuing_task": False} if maze else {}
    env = make_env(env_name, max_episode_steps=max_steps, **kwargs)
    obs, _ = env.reset(seed=seed, options=reset_options)
    # A maze episode's goal (random, or options["goal_cell"]) is the session's task.
    task = {"kind": "goal", "goal": [float(x) for x in obs["desired_goal"]]} if maze else None
    session = client.create_session(task=task, planner=planner, seed=seed)
    latencies, total, success, step = [], 0.0, False, 0
    try:
        while True:
            started = time.perf_counter()
            answer = client.act(session, select_observation(obs, spec.obs_key), step=step)
            latencies.append(1000 * (time.perf_counter() - started))
            obs, reward, terminated, truncated, info = env.step(np.asarray(answer["action"]))
            total += float(reward)
            success = success or bool(info.get("success", False))
            step += 1
            if terminated or truncated:
                break
    finally:
        client.delete_session(session)
        env.close()
    return DriveResult(success, step, total, latencies)


def summarise(results: list[DriveResult]) -> dict:
    latency = np.concatenate([r.latency_ms for r in results])
    return {
        "episodes": len(results),
        "success_rate": float(np.mean([r.success for r in results])),
        "mean_steps": float(np.mean([r.steps for r in results])),
        "mean_return": float(np.mean([r.episode_return for r in results])),
        "act_ms_p50": float(np.percentile(latency, 50)),
        "act_ms_p99": float(np.percentile(latency, 99)),
    }


def run_drive(
    url: str,
    env_name: str,
    episodes: int,
    seed: int = 0,
    start_cell: tuple[int, int] | None = None,
    goal_cell: tuple[int, int] | None = None,
    planner: str | None = None,
    max_steps: int | None = None,
    api_key: str | None = None,
) -> list[DriveResult]:
    """`episodes` episodes through the service at `url`, from seeds seed, seed + 1, ..."""
    cells = {"reset_cell": start_cell, "goal_cell": goal_cell}
    options = {k: np.array(v) for k, v in cells.items() if v} or None
    overrides = {"planner": planner} if planner else None
    with Client(url, api_key=api_key) as client:
        return [
            drive_episode(client, env_name, seed + i, options, overrides, max_steps)
            for i in range(episodes)
        ]


def episode_line(index: int, result: DriveResult) -> str:
    outcome = "reached" if result.success else "missed"
    p50 = np.median(result.latency_ms)
    return f"episode {index}: {outcome} in {result.steps} steps, act p50 {p50:.1f} ms"
