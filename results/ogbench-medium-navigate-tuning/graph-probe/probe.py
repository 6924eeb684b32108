"""Probe: the data graph's ceiling. A straight-line controller (the action points at the
graph's aim, at full speed beyond 1/GAIN units) follows it in the real environment, on the
tuning tasks of TUNING_SEED, 10 episodes each; no model is involved.
Usage: python probe.py DATA NODES EDGE_STEPS LOOKAHEAD TUNING_SEED GAIN [ENV]"""

import sys

import numpy as np

from training.analysis.ogbench_suite import (
    NODE_RADIUS,
    episode_starts,
    reset_episode,
    tuning_tasks,
)
from training.data.datasets import episode_observations, open_dataset
from training.data.envs import make_env
from training.planning.subgoals import data_graph, data_route, data_target, spread_indices

ENV = sys.argv[7] if len(sys.argv) > 7 else "pointmaze-medium-v0"
data, nodes, edge_steps, lookahead = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    float(sys.argv[4]),
)
seed, gain = int(sys.argv[5]), float(sys.argv[6])
episodes = [episode_observations(e.observations) for e in open_dataset(data).iterate_episodes()]
trajectory = np.concatenate(episodes)[:, :2]
episode = np.concatenate([np.full(len(e), i) for i, e in enumerate(episodes)])
chosen = spread_indices(trajectory, nodes, 0)
graph = data_graph(trajectory, episode, chosen, trajectory[chosen], np.zeros((nodes, 1)),
                   NODE_RADIUS, edge_steps)  # fmt: skip
reached = {}
for start in episode_starts(tuning_tasks(ENV, seed), 10, 0):
    env = make_env(ENV)
    obs, info = reset_episode(env, start)
    goal = np.asarray(info["goal"])
    route = data_route(graph, goal)
    success = False
    for _ in range(1000):
        target = data_target(graph, route, obs[:2], lookahead)
        d = (goal if target is None else graph.positions[target]) - obs[:2]
        action = d / max(np.linalg.norm(d), 1e-6) * min(1.0, gain * np.linalg.norm(d))
        obs, _, terminated, truncated, info = env.step(action)
        if info.get("success"):
            success = True
            break
    reached.setdefault(start.task, []).append(success)
print({task: float(np.mean(r)) for task, r in reached.items()},
      "overall", float(np.mean([x for r in reached.values() for x in r])))  # fmt: skip
