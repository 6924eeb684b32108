"""Subgoals for goals beyond the discount's horizon: a graph over states of the data whose
edge costs the ψ-model itself gives, searched for the next subgoal at every decision.

Along the best of N sampled futures from s, the value of a goal g is V(s, g) =
max_n ψ_n(s)·w(g). A future that reaches g after k steps and stays is worth about
γ^k V(g, g), so k(s, g) = log(V(s, g) / V(g, g)) / log γ is the ψ-model's own count of
the steps from s to g. It is trustworthy only within the discount's horizon, where V(s, g)
stands clear of zero: edges join only states at most `max_edge_steps` apart. The nodes
are states of the data spread over it (farthest-point sampling on the goal dimensions).
For a goal, a shortest-path search gives every node's steps to the goal; a decision then
aims at the goal itself when it is near, else at the node that minimises the steps to it
plus its steps to the goal. The planner is unchanged: only the task weights it is given
are the subgoal's.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse.csgraph import dijkstra

from training.models.mdn_rnn import initial_state
from training.models.networks import GOAL_DECODER, Networks, denormalise

VALUE_FLOOR = 1e-6  # of V(s, g) / V(g, g): below it a goal counts as out of reach
MIN_HOP_FRACTION = 0.25  # of max_edge_steps: a subgoal nearer than this counts as reached


@dataclass(frozen=True)
class SubgoalGraph:
    observations: np.ndarray  # [K, *obs]: the nodes, states of the data
    weights: np.ndarray  # [K, P]: each node's task weights as a goal
    self_values: np.ndarray  # [K]: V(node, node)
    steps: np.ndarray  # [K, K]: steps from node i to node j (inf beyond max_edge_steps)
    gamma: float
    max_edge_steps: float


def spread_indices(points: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k rows of `points` spread over them: farthest-point sampling from a random first."""
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(points)))]
    nearest = np.linalg.norm(points - points[chosen[0]], axis=1)
    for _ in range(1, min(k, len(points))):
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.asarray(chosen)


def goal_observation(model: Networks, params: dict, goal: np.ndarray) -> np.ndarray:
    """An observation at a goal: the goal's dimensions set, the others at the data's mean."""
    obs = np.array(params["normaliser"]["mean"], np.float32)
    obs[list(model.config.value.goal_dims)] = goal
    return obs


def compile_reach(model: Networks, n_samples: int, sample_steps: int):
    """jit of (params, observations [B, *obs], LSTM h [B, H], weights [G, P], key) ->
    V [B, G]: the value of each goal along the best of n_samples futures of each state."""

    def reach(params, obs, lstm_h, weights, key):
        states = jnp.concatenate([model.encode(params, obs), lstm_h], axis=-1)
        noise = jax.random.normal(key, (states.shape[0], n_samples, model.psi_dim))
        cond = jnp.broadcast_to(states[:, None], (*noise.shape[:2], states.shape[-1]))
        psi = model.sample_psi(params["psi_ema"], cond, noise, sample_steps)
        values = denormalise(psi, params["psi_norm"]) @ weights.T  # [B, N, G]
        return jnp.max(values, axis=1)

    return jax.jit(reach)


def goal_weights(model: Networks, params: dict, goals: np.ndarray) -> np.ndarray:
    """The goal decoder's task weights [G, P] of goals [G, D]."""
    apply = model.goal_decoder.apply
    return np.asarray(apply({"params": params[GOAL_DECODER]}, jnp.asarray(goals, jnp.float32)))


def steps_from_values(values: np.ndarray, self_values: np.ndarray, gamma: float) -> np.ndarray:
    """k = log(V(s, g) / V(g, g)) / log γ, at least 0; inf where V(s, g) is out of reach."""
    ratio = values / np.maximum(self_values, 1e-12)
    steps = np.log(np.clip(ratio, VALUE_FLOOR, 1.0)) / np.log(gamma)
    return np.where(ratio > VALUE_FLOOR, steps, np.inf)


def build_graph(
    model: Networks,
    params: dict,
    observations: np.ndarray,
    n_nodes: int,
    max_edge_steps: float,
    n_samples: int = 64,
    sample_steps: int = 5,
    seed: int = 0,
) -> SubgoalGraph:
    """The graph over `n_nodes` states of `observations` (the data's), each seen with a
    fresh LSTM state."""
    dims = list(model.config.value.goal_dims)
    nodes = observations[spread_indices(observations[:, dims], n_nodes, seed)]
    weights = goal_weights(model, params, nodes[:, dims])
    reach = compile_reach(model, n_samples, sample_steps)
    h0 = np.broadcast_to(initial_state((), model.mdn.hidden)[1], (len(nodes), model.mdn.hidden))
    values = np.asarray(reach(params, nodes, h0, weights, jax.random.key(seed)))  # [K, K]
    self_values = np.diag(values).copy()
    gamma = model.config.successor.gamma
    steps = steps_from_values(values, self_values, gamma)
    np.fill_diagonal(steps, 0.0)
    steps[steps > max_edge_steps] = np.inf
    return SubgoalGraph(nodes, weights, self_values, steps, gamma, max_edge_steps)


@dataclass(frozen=True)
class Route:
    """What a goal needs at every decision: its weights, and each node's steps to it."""

    goal_weights: np.ndarray  # [P]
    goal_self_value: float
    remaining: np.ndarray  # [K]: steps from each node to the goal (inf: no path)
    next_hop: np.ndarray  # [K]: the next node on each node's path (K: the goal; -1: none)


def route_to(graph: SubgoalGraph, reach, params, model: Networks, goal: np.ndarray, key) -> Route:
    """Every node's steps to `goal` through the graph (Dijkstra from the goal backwards)."""
    weights = goal_weights(model, params, goal[None])[0]
    obs = goal_observation(model, params, goal)[None]
    h0 = np.zeros((1, model.mdn.hidden), np.float32)
    self_value = float(np.asarray(reach(params, obs, h0, weights[None], key))[0, 0])
    to_goal = np.asarray(reach(params, graph.observations,
                               np.zeros((len(graph.observations), model.mdn.hidden), np.float32),
                               weights[None], key))[:, 0]  # fmt: skip
    direct = steps_from_values(to_goal, np.float32(self_value), graph.gamma)
    direct[direct > graph.max_edge_steps] = np.inf
    remaining, next_hop = steps_to_goal(graph.steps, direct)
    return Route(weights, self_value, remaining, next_hop)


def steps_to_goal(steps: np.ndarray, direct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shortest paths to the goal over the edges `steps` [K, K] (inf: none) and each node's
    edge to the goal `direct` [K]: every node's steps to the goal (inf: no path) and the
    next node on its path (K: the goal itself; -1: no path)."""
    k = len(direct)
    # Node k is the goal; on the reversed edges one search from it reaches every node.
    full = np.full((k + 1, k + 1), np.inf)
    full[:k, :k] = steps
    full[:k, k] = direct
    reverse = full.T
    # csgraph reads 0 as "no edge": a zero-step edge becomes a tiny positive one.
    dense = np.where(np.isinf(reverse), 0.0, np.maximum(reverse, 1e-6))
    np.fill_diagonal(dense, 0.0)
    remaining, predecessors = dijkstra(dense, directed=True, indices=k, return_predecessors=True)
    return remaining[:k], np.where(predecessors[:k] < 0, -1, predecessors[:k])


def next_target(
    graph: SubgoalGraph, route: Route, to_nodes: np.ndarray, to_goal: float
) -> int | None:
    """The node a decision aims at (None: the goal itself), given V from the current state
    to every node (`to_nodes` [K]) and to the goal."""
    direct = steps_from_values(np.asarray([to_goal]), np.asarray([route.goal_self_value]),
                               graph.gamma)[0]  # fmt: skip
    if direct <= graph.max_edge_steps:
        return None
    steps = steps_from_values(to_nodes, graph.self_values, graph.gamma)
    near = np.where(steps <= graph.max_edge_steps, steps, np.inf)
    total = near + route.remaining
    if not np.isfinite(total).any():
        return None  # no path known: aim at the goal and hope
    target = int(np.argmin(total))
    # A node already reached is passed on to the next one of its path.
    k = len(graph.observations)
    while steps[target] < MIN_HOP_FRACTION * graph.max_edge_steps and route.next_hop[target] >= 0:
        if route.next_hop[target] == k:
            return None
        target = int(route.next_hop[target])
    return target
