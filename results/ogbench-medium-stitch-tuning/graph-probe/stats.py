"""Connectivity of a data graph: nodes with a route to each tuning goal, edges per node."""

import sys

import numpy as np

from training.analysis.ogbench_suite import NODE_RADIUS, episode_starts, reset_episode, tuning_tasks
from training.data.datasets import episode_observations, open_dataset
from training.data.envs import make_env
from training.planning.subgoals import data_graph, data_route, spread_indices

data, nodes, edge_steps, env_id, seed = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
    int(sys.argv[5]),
)
episodes = [episode_observations(e.observations) for e in open_dataset(data).iterate_episodes()]
trajectory = np.concatenate(episodes)[:, :2]
episode = np.concatenate([np.full(len(e), i) for i, e in enumerate(episodes)])
chosen = spread_indices(trajectory, nodes, 0)
graph = data_graph(
    trajectory, episode, chosen, trajectory[chosen], np.zeros((nodes, 1)), NODE_RADIUS, edge_steps
)
edges = np.isfinite(graph.steps) & (graph.steps > 0)
print(
    "edges per node: median",
    np.median(edges.sum(1)),
    "min",
    edges.sum(1).min(),
    "nodes with no out-edge",
    int((edges.sum(1) == 0).sum()),
)
print(
    "node passes (data points within radius): median",
    np.median(np.bincount(graph.node_at[graph.node_at >= 0], minlength=nodes)),
)
for st in episode_starts(tuning_tasks(env_id, seed), 1, 0):
    env = make_env(env_id)
    obs, info = reset_episode(env, st)
    goal = np.asarray(info["goal"])
    r = data_route(graph, goal)
    print(
        "task",
        st.task,
        "start",
        obs[:2].round(1),
        "goal",
        goal.round(1),
        "nodes with a route",
        int(np.isfinite(r.remaining).sum()),
        "data at goal",
        int(r.at_goal.sum()),
    )
