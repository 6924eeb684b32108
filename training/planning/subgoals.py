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

Both graphs measure states where the goals do (`Networks.state_point`): in the learned
step space, every length below is counted in steps (`graph_lengths`); the goal dimensions
of the observation, in their own units, remain as `geometry.space: position`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

from training.models.mdn_rnn import initial_state
from training.models.networks import GOAL_DECODER, Networks, denormalise

VALUE_FLOOR = 1e-6  # of V(s, g) / V(g, g): below it a goal counts as out of reach
MIN_HOP_FRACTION = 0.25  # of max_edge_steps: a subgoal nearer than this counts as reached
# Data graphs: the data's states near a point (GraphLengths.near) stand for it, at most
# LOCAL_POINTS of them; a node the data's trajectories join to them within LOCAL_STEPS is
# a node near the point.
LOCAL_POINTS = 16
LOCAL_STEPS = 8
# A data graph's aim lies at most AIM_REACH goal widths away: farther, a goal's reward is
# flat wherever a planner's imagined steps lead.
AIM_REACH = 2.0


@dataclass(frozen=True)
class GraphLengths:
    """The lengths a data graph measures with, in its space's units."""

    node_radius: float  # a state this near a node is at it
    near: float  # the data's states this near a point stand for it
    aim_reach: float  # an aim lies at most this far


# In the step space: a node is passed within two steps of the data's travel, so that a
# passage's step count runs from node to node; the data within six steps of a point stands
# for it. The goal dimensions' lengths are OGBench's point mazes' in their units (a cell is
# 4 wide, the data travels about 0.2 a step): about the same steps, far less than a
# wall's thickness.
STEPS_LENGTHS = (2.0, 6.0)
POSITION_LENGTHS = (0.3, 1.0)


def graph_lengths(model: Networks) -> GraphLengths:
    """A model's data-graph lengths: in steps with a learned geometry, else in the goal
    dimensions' units; aims within AIM_REACH goal widths either way."""
    node_radius, near = STEPS_LENGTHS if model.step_map is not None else POSITION_LENGTHS
    return GraphLengths(node_radius, near, AIM_REACH * model.config.value.goal_sigma)


def point_function(model: Networks, goal: bool = False):
    """(params, observations [N, *obs]) -> their points where goals measure
    (Networks.state_point), or with `goal` of goals as tasks name them (goal_point):
    jitted for the learned map, NumPy indexing for the goal dimensions."""
    function = model.goal_point if goal else model.state_point
    return jax.jit(function) if model.step_map is not None else function


def state_points(model: Networks, params: dict, observations: np.ndarray, goal: bool = False,
                 point=None, chunk: int = 65536) -> np.ndarray:  # fmt: skip
    """[N, D]: every observation's point (point_function's, or `point`'s when given)."""
    point = point or point_function(model, goal)
    return np.concatenate([np.asarray(point(params, observations[i : i + chunk]))
                           for i in range(0, len(observations), chunk)])  # fmt: skip


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
    """An observation at a goal: the goal itself where it is a whole observation, else
    the goal's dimensions set and the others at the data's mean."""
    if model.step_map is not None:
        return np.asarray(goal, np.float32)
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
    """The goal decoder's task weights [G, P] of goal points [G, D] (where goals measure)."""
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
    points = state_points(model, params, observations)
    chosen = spread_indices(points, n_nodes, seed)
    nodes = observations[chosen]
    weights = goal_weights(model, params, points[chosen])
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
    weights = goal_weights(model, params, np.asarray(model.goal_point(params, goal))[None])[0]
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


# ----- edges from the data: what a trajectory of the data did, never through a wall -----


@dataclass(frozen=True)
class DataGraph:
    """Nodes spread over the data's states (their points where goals measure); an edge i
    -> j wherever a trajectory of the data passed within `radius` of node i and then of
    node j at most `max_edge_steps` later, its cost the fewest steps it took. The data
    never crossed a wall, so neither does an edge. The ψ-model then only has to reach a
    node a few steps away."""

    positions: np.ndarray  # [K, D]: the nodes' points
    observations: np.ndarray  # [K, *obs]
    weights: np.ndarray  # [K, P]: each node's task weights as a goal
    steps: np.ndarray  # [K, K]: fewest steps the data took from node i to node j (inf: never)
    trajectory: np.ndarray  # [T, D]: the data's points, episodes one after another
    episode: np.ndarray  # [T]: each position's episode
    node_at: np.ndarray  # [T]: the node each position is within `radius` of (-1: none)
    radius: float
    max_edge_steps: int
    tree: cKDTree  # over `trajectory`: the data's points near a point
    near: float  # the data's points this near a point stand for it


def nearest_within(points: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    """For each point, the index of its nearest centre if within `radius`, else -1."""
    out = np.full(len(points), -1, np.int64)
    size = max(1, 2**26 // (centres.shape[0] * centres.shape[1]))  # [chunk, K, D] bounded
    for start in range(0, len(points), size):
        chunk = points[start : start + size]
        dist = np.linalg.norm(chunk[:, None] - centres[None], axis=-1)
        nearest = np.argmin(dist, axis=1)
        out[start : start + len(chunk)] = np.where(dist.min(axis=1) <= radius, nearest, -1)
    return out


def passage_steps(
    node_at: np.ndarray, episode: np.ndarray, sources: np.ndarray, targets: np.ndarray,
    n_sources: int, n_targets: int, max_steps: int,
) -> np.ndarray:  # fmt: skip
    """[n_sources, n_targets]: the fewest steps from a position labelled `sources` = i to
    a later one of the same episode labelled `targets` = j, at most `max_steps` (inf:
    never). Labels of -1 take no part."""
    steps = np.full(n_sources * n_targets, np.inf)
    for d in range(1, max_steps + 1):  # ascending: the first d written for a pair is its least
        a, b = sources[:-d], targets[d:]
        ok = (a >= 0) & (b >= 0) & (episode[:-d] == episode[d:])
        pairs = np.unique(a[ok] * n_targets + b[ok])
        fresh = pairs[np.isinf(steps[pairs])]
        steps[fresh] = d
    return steps.reshape(n_sources, n_targets)


def build_data_graph(
    model: Networks,
    params: dict,
    episodes: list[np.ndarray],
    n_nodes: int,
    max_edge_steps: int,
    seed: int = 0,
) -> DataGraph:
    """The graph over `n_nodes` states of `episodes` (each [T, *obs], the data's), with
    the model's lengths (graph_lengths)."""
    observations = np.concatenate(episodes)
    trajectory = state_points(model, params, observations)
    episode = np.concatenate([np.full(len(e), i) for i, e in enumerate(episodes)])
    nodes = spread_indices(trajectory, n_nodes, seed)
    weights = goal_weights(model, params, trajectory[nodes])
    return data_graph(trajectory, episode, nodes, observations[nodes], weights,
                      graph_lengths(model), max_edge_steps)  # fmt: skip


def data_graph(
    trajectory: np.ndarray, episode: np.ndarray, nodes: np.ndarray, observations: np.ndarray,
    weights: np.ndarray, lengths: GraphLengths, max_edge_steps: int,
) -> DataGraph:  # fmt: skip
    """The graph whose nodes are the rows `nodes` of `trajectory` [T, D] (episode ids
    `episode` [T]), with their observations and task weights."""
    positions = trajectory[nodes]
    node_at = nearest_within(trajectory, positions, lengths.node_radius)
    k = len(nodes)
    steps = passage_steps(node_at, episode, node_at, node_at, k, k, max_edge_steps)
    np.fill_diagonal(steps, 0.0)
    return DataGraph(positions, observations, weights, steps, trajectory, episode, node_at,
                     lengths.node_radius, max_edge_steps, cKDTree(trajectory),
                     lengths.near)  # fmt: skip


@dataclass(frozen=True)
class DataRoute:
    """A goal's route over a data graph."""

    remaining: np.ndarray  # [K]: steps from each node to the goal (inf: no path)
    next_hop: np.ndarray  # [K]: the next node on each node's path (K: the goal; -1: none)
    at_goal: np.ndarray  # [T]: the data's points that count as at the goal


def data_route(graph: DataGraph, goal: np.ndarray) -> DataRoute:
    """Every node's steps to the goal point `goal` over the data's edges, and its next
    node. The goal joins the graph where the data passed near it (within_near: a goal the
    data never quite reached, such as an arm's rest pose beside a cube's goal, joins where
    the data came closest)."""
    distance = np.linalg.norm(graph.trajectory - goal, axis=1)
    within = distance <= within_near(distance.min(), graph.near)
    at_goal = np.where(within, 0, -1)
    k = len(graph.positions)
    direct = passage_steps(graph.node_at, graph.episode, graph.node_at, at_goal, k, 1,
                           graph.max_edge_steps)[:, 0]  # fmt: skip
    direct[np.linalg.norm(graph.positions - goal, axis=1) <= graph.radius] = 0.0  # at it
    remaining, next_hop = steps_to_goal(graph.steps, direct)
    return DataRoute(remaining, next_hop, within)


def within_near(nearest: float, near: float) -> float:
    """How far the data may lie from a point and stand for it: `near`; where the data
    passed no nearer than that, `near` beyond its nearest pass."""
    return near if nearest <= near else nearest + near


def near_points(graph: DataGraph, point: np.ndarray) -> np.ndarray:
    """The data's states that stand for `point`: of its LOCAL_POINTS nearest, those
    within_near of it."""
    distances, nearest = graph.tree.query(point, k=LOCAL_POINTS)
    return nearest[distances <= within_near(distances[0], graph.near)]


def steps_from_here(graph: DataGraph, route: DataRoute, position: np.ndarray,
                    horizon: int) -> tuple[np.ndarray, float]:  # fmt: skip
    """Where the data went to and came from near `position`: from its LOCAL_POINTS
    nearest points of the data (near_points), the fewest steps of the data's trajectories,
    before or after, to each node [K] and to the goal, within `horizon` (inf: not within).
    Only the data's trajectories count, so a node across a wall, however near, is not near
    here."""
    nearest = near_points(graph, position)
    offsets = np.arange(-horizon, horizon + 1)
    other = np.clip(nearest[:, None] + offsets, 0, len(graph.trajectory) - 1)  # [P, S]
    same = graph.episode[other] == graph.episode[nearest][:, None]
    steps = np.broadcast_to(np.abs(offsets), other.shape)
    labels = graph.node_at[other]
    to_nodes = np.full(len(graph.positions), np.inf)
    ok = same & (labels >= 0)
    np.minimum.at(to_nodes, labels[ok], steps[ok])
    goal = same & route.at_goal[other]
    return to_nodes, float(steps[goal].min()) if goal.any() else np.inf


def data_target(graph: DataGraph, route: DataRoute, position: np.ndarray,
                lookahead: float) -> int | None:  # fmt: skip
    """The node a decision at `position` aims at (None: the goal itself): the goal when
    the data passed from here to it within `lookahead` steps; else, from the nearest node
    with a path that the data joins to here within LOCAL_STEPS, the farthest node along its
    path at most `lookahead` steps on, and at least the first one the data does not join
    to here (nodes that near count as reached: aiming at one, a planner would find every
    action about as good)."""
    to_nodes, to_goal = steps_from_here(graph, route, position, int(lookahead))
    if to_goal <= lookahead:
        return None
    distance = np.where(np.isfinite(route.remaining),
                        np.linalg.norm(graph.positions - position, axis=1), np.inf)  # fmt: skip
    if not np.isfinite(distance).any():
        return None  # no path known: aim at the goal and hope
    joined = to_nodes <= LOCAL_STEPS
    if np.isfinite(distance[joined]).any():  # else: the nearest node with a path, and hope
        distance = np.where(joined, distance, np.inf)
    here = int(np.argmin(distance))
    k = len(graph.positions)
    target, travelled = here, 0.0
    while True:
        hop = int(route.next_hop[target])
        if hop == k:
            near = travelled + route.remaining[target] <= lookahead
            return None if near or target == here or joined[target] else target
        cost = graph.steps[target, hop]
        if travelled + cost > lookahead and target != here and not joined[target]:
            return target
        target, travelled = hop, travelled + cost


def on_the_way(graph: DataGraph, position: np.ndarray, target: int, horizon: int,
               reach: float) -> np.ndarray:  # fmt: skip
    """Where a decision at `position` aims for node `target`: the node itself when within
    `reach`; else the last point within `reach` of `position` along the one of the data's
    trajectories from near here (near_points) that
    passes the node soonest, within `horizon` steps; where none does (the data seldom
    came this way), the point `reach` along the straight line to the node. A farther
    aim's reward is about as flat at every state a planner can reach in its imagined
    steps, and its choice of action blind."""
    node = graph.positions[target]
    distance = np.linalg.norm(node - position)
    if distance <= reach:
        return node
    nearest = near_points(graph, position)
    later = np.clip(nearest[:, None] + np.arange(1, horizon + 1), 0, len(graph.trajectory) - 1)
    passes = (graph.episode[later] == graph.episode[nearest][:, None]) & (
        graph.node_at[later] == target)  # fmt: skip
    if not passes.any():
        return position + (node - position) * (reach / distance)
    first = np.where(passes.any(axis=1), passes.argmax(axis=1), horizon)
    row = int(np.argmin(first))
    path = graph.trajectory[later[row, : first[row] + 1]]
    beyond = np.linalg.norm(path - position, axis=1) > reach
    return path[max(int(beyond.argmax()) - 1, 0)] if beyond.any() else path[-1]


def data_aim(graph: DataGraph, route: DataRoute, position: np.ndarray, lookahead: float,
             reach: float) -> np.ndarray | None:  # fmt: skip
    """The point a decision at `position` aims at (None: the goal itself): on the way to
    the node `data_target` picks, at most `reach` away along the data's trajectories."""
    target = data_target(graph, route, position, lookahead)
    if target is None:
        return None
    horizon = int(lookahead) + graph.max_edge_steps + LOCAL_STEPS  # here to the node, at most
    return on_the_way(graph, position, target, horizon, reach)


# ----- a data graph kept with a bundle, for the service -----

SUBGOALS_FILE = "subgoals.npz"  # in a bundle's directory: the service then aims through it


def save_data_graph(graph: DataGraph, lookahead: float, path: Path) -> None:
    """The graph and the lookahead decisions aim with, as one npz (the tree is rebuilt)."""
    arrays = {f.name: getattr(graph, f.name) for f in fields(graph) if f.name != "tree"}
    np.savez_compressed(path, lookahead=lookahead, **arrays)


def load_data_graph(path: Path) -> tuple[DataGraph, float]:
    """What save_data_graph wrote: the graph and its lookahead."""
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    lookahead = float(arrays.pop("lookahead"))
    # A graph saved before its `near` was kept is in the point mazes' units.
    scalars = {"radius": float(arrays.pop("radius")),
               "max_edge_steps": int(arrays.pop("max_edge_steps")),
               "near": float(arrays.pop("near", POSITION_LENGTHS[1]))}  # fmt: skip
    return DataGraph(**arrays, **scalars, tree=cKDTree(arrays["trajectory"])), lookahead
