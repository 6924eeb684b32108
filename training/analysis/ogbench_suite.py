"""OGBench's evaluation of a bundle trained on one of its datasets: the maze's five tasks,
with OGBench's own reset (`options={"task_id": k}`), success signal (`info["success"]`)
and episode limit (the environment's), N episodes per task, success with 95% Wilson
intervals and OGBench's published baselines beside.

Settings are chosen on the tuning tasks instead (`tuning_tasks`): for each of OGBench's
tasks, another start and goal cell as many BFS steps apart, so that tuning never sees the
five tasks reported.

Episodes run in lockstep: at each time step one batched decision serves every episode
still running (`compile_decide(batched=True)`), so that hundreds of episodes fit on two
cores. Each episode keeps its own LSTM state, task weights, PRNG key and Δφ under the one
step rule. A batch of one is the one-at-a-time evaluator.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from training.analysis.evaluate import fmt, markdown_table, sample_counts, wilson_interval
from training.analysis.provenance import provenance, write_result
from training.config import PlanningConfig
from training.data.envs import NO_SHIFT, Shift, ShiftedDrive, bfs_path, make_env
from training.data.observation_map import MappedObservations, ObservationMap
from training.data.ogbench_recipe import cells_at_distance
from training.errors import UsageError
from training.learning.checkpoint import Bundle
from training.models.mdn_rnn import initial_state
from training.planning.planners import Knobs, PlanShape, compile_decide, session_key, zero_delta
from training.planning.step_rule import NOTHING, after_act, starting_delta
from training.planning.subgoals import (
    DataGraph,
    SubgoalGraph,
    build_data_graph,
    build_graph,
    compile_reach,
    data_aim,
    data_route,
    goal_weights,
    graph_lengths,
    next_target,
    point_function,
    route_to,
    state_points,
)
from training.planning.tasks import task_weights

TASKS = (1, 2, 3, 4, 5)  # OGBench's evaluation tasks of every maze
# Episodes on OGBench's tasks take their reset seeds from here on by default; tuning's stay
# below it, so that no episode a setting was chosen on is ever reported.
OFFICIAL_SEED = 1000
# Success %, OGBench's paper (ICLR 2025), benchmark table: 8 seeds, the five tasks.
PUBLISHED = {
    "pointmaze-medium-navigate-v0": {"GCIQL": 53, "HIQL": 79, "QRL": 82},
    "pointmaze-large-navigate-v0": {"GCIQL": 34, "HIQL": 58, "QRL": 86},
    "pointmaze-giant-navigate-v0": {"GCIQL": 0, "HIQL": 46, "QRL": 68},
    "pointmaze-medium-stitch-v0": {"GCIQL": 21, "HIQL": 74, "QRL": 80},
    "pointmaze-large-stitch-v0": {"GCIQL": 31, "HIQL": 13, "QRL": 84},
    "pointmaze-giant-stitch-v0": {"GCIQL": 0, "HIQL": 0, "QRL": 50},
}


@dataclass(frozen=True)
class SuiteEpisode:
    task: int
    seed: int
    success: bool
    steps: int
    final_distance: float  # from the last state to the goal, where goals measure
    plan_ms: float  # median wall time of the batched decisions it took part in
    value_gain: float  # mean over steps of V after - V before adaptation


@dataclass(frozen=True)
class Start:
    """An episode: its task's number (1-5), the reset options that set it, the reset seed."""

    task: int
    options: dict
    seed: int


def official_tasks() -> dict[int, dict]:
    """OGBench's five tasks, as its environments' reset options."""
    return {task: {"task_id": task} for task in TASKS}


def official_cells(env) -> set[tuple[int, int]]:
    """Every start and goal cell of OGBench's five tasks in a maze environment."""
    return {tuple(info[key]) for info in env.task_infos for key in ("init_ij", "goal_ij")}


def tuning_tasks(env_id: str, seed: int = 0) -> dict[int, dict]:
    """Five tasks like OGBench's but none of them, drawn with `seed`, to choose settings
    on: in a maze, start and goal cells; with cubes, the cubes' starts and goals."""
    env = make_env(env_id).unwrapped
    try:
        if hasattr(env, "maze_map"):
            return maze_tuning_tasks(env, seed)
        if env.task_infos and "goal_xyzs" in env.task_infos[0]:
            return cube_tuning_tasks(env, seed)
    finally:
        env.close()
    raise UsageError(f"{env_id!r} has no tuning tasks yet: only the mazes' and the cubes'")


# Tuning cubes start and end at least this far (metres) from every start and goal of
# OGBench's tasks: more than a cube's width (4 cm), OGBench's success distance.
CUBE_MARGIN = 0.06


def cube_tuning_tasks(env, seed: int) -> dict[int, dict]:
    """For each of OGBench's cube tasks, the same task turned by a random angle and moved
    (every cube's start and goal together, so that a stack stays a stack), drawn with
    `seed` until every start and goal lies where the environment draws cubes and at least
    CUBE_MARGIN from each start and goal of OGBench's tasks."""
    low, high = np.asarray(env._object_sampling_bounds)
    official = np.concatenate([np.concatenate([info["init_xyzs"], info["goal_xyzs"]])[:, :2]
                               for info in env.task_infos])  # fmt: skip
    rng = np.random.default_rng(seed)
    tasks = {}
    for task, info in zip(TASKS, env.task_infos, strict=True):
        points = np.concatenate([info["init_xyzs"], info["goal_xyzs"]])
        centre = points[:, :2].mean(axis=0)
        while True:
            angle = rng.uniform(0, 2 * np.pi)
            turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            xy = (points[:, :2] - centre) @ turn.T + rng.uniform(low, high)
            inside = np.all((xy >= low) & (xy <= high))
            apart = np.linalg.norm(xy[:, None] - official[None], axis=-1).min() >= CUBE_MARGIN
            if inside and apart:
                break
        moved = np.concatenate([xy, points[:, 2:]], axis=1).round(4)
        n = len(info["init_xyzs"])
        tasks[task] = {"task_info": {"task_name": f"tuning{task}",
                                     "init_xyzs": moved[:n].tolist(),
                                     "goal_xyzs": moved[n:].tolist()}}  # fmt: skip
    return tasks


def maze_tuning_tasks(env, seed: int) -> dict[int, dict]:
    """For each of OGBench's tasks, a start and a goal cell drawn with `seed`, neither of
    them a start or goal cell of any of OGBench's tasks, as many BFS steps apart as the
    task's where the maze has such a pair (else the longest distance under it that has
    one): five pairs unlike each other."""
    maze_map = np.asarray(env.maze_map)
    official = official_cells(env)
    free = [(int(i), int(j)) for i, j in np.argwhere(maze_map == 0)]
    free = [cell for cell in free if cell not in official]
    rng = np.random.default_rng(seed)
    taken: set[tuple] = set()
    tasks = {}
    for task, info in zip(TASKS, env.task_infos, strict=True):
        steps = len(bfs_path(maze_map.tolist(), info["init_ij"], info["goal_ij"])) - 1
        for distance in range(steps, 0, -1):
            pairs = [(a, b) for a in free for b in cells_at_distance(maze_map, a, distance)
                     if b not in official and (a, b) not in taken]  # fmt: skip
            if pairs:
                break
        start, goal = pairs[rng.integers(len(pairs))]
        taken |= {(start, goal), (goal, start)}
        tasks[task] = {"task_info": {"init_ij": start, "goal_ij": goal}}
    return tasks


def episode_starts(tasks: dict[int, dict], episodes_per_task: int, seed: int = 0) -> list[Start]:
    """Every episode: the tasks in turn, reset seeds from `seed` on."""
    return [
        Start(task, options, seed + k)
        for task, options in tasks.items()
        for k in range(episodes_per_task)
    ]


def check_tuning_seeds(starts: list[Start]) -> None:
    """Tuning episodes keep below OFFICIAL_SEED, the reported episodes' seeds."""
    if starts and max(start.seed for start in starts) >= OFFICIAL_SEED:
        raise UsageError(
            f"tuning episodes would reach reset seed {max(s.seed for s in starts)}; the seeds "
            f"from {OFFICIAL_SEED} on are the reported evaluations': choose a smaller --seed"
        )


def dataset_name(bundle: Bundle) -> str | None:
    """The OGBench dataset a bundle was trained on, from its dataset's sidecar."""
    return (bundle.metadata.get("dataset_info") or {}).get("dataset_name")


def check_suite_env(bundle: Bundle) -> None:
    """OGBench's tasks exist only in its own environments."""
    env = make_env(bundle.env_id).unwrapped
    if not hasattr(env, "task_infos"):
        raise UsageError(
            f"{bundle.env_id!r} has no OGBench tasks: --suite ogbench needs a bundle trained "
            "on an OGBench dataset (worldplan collect ogbench/...)"
        )


def suite_env(bundle: Bundle, max_steps: int | None = None) -> gym.Env:
    """The bundle's environment as its data saw it: through the data's observation map,
    where the dataset records one (`collect --map-observations`)."""
    env = make_env(bundle.env_id, max_episode_steps=max_steps)
    recorded = (bundle.metadata.get("dataset_info") or {}).get("observation_map")
    return MappedObservations(env, ObservationMap(**recorded)) if recorded else env


def reset_episode(env: gym.Env, start: Start) -> tuple[np.ndarray, dict]:
    """OGBench's reset, made repeatable: it draws the start and goal noise from NumPy's
    global generator and its settling steps from the action space, so both are seeded
    from the episode's seed (and the global generator's state is put back)."""
    state = np.random.get_state()
    np.random.seed(start.seed)
    env.action_space.seed(start.seed)
    options = start.options
    if "task_info" in options:  # kept as JSON lists; the cube environments index arrays
        info = {k: np.asarray(v) if k.endswith("_xyzs") else v
                for k, v in options["task_info"].items()}  # fmt: skip
        options = {**options, "task_info": info}
    try:
        return env.reset(seed=start.seed, options=options)
    finally:
        np.random.set_state(state)


class ValueSubgoals:
    """Subgoal search over a graph whose edges the ψ-model's own values give
    (training/planning/subgoals.py), searched every `every` decisions."""

    def __init__(self, graph: SubgoalGraph, reach, every: int):
        self.graph, self.reach, self.every = graph, reach, every
        self.routes: list = []

    def start(self, bundle: Bundle, goals: list[np.ndarray]) -> None:
        key = jax.random.key(0)
        self.routes = [route_to(self.graph, self.reach, bundle.params, bundle.model, g, key)
                       for g in goals]  # fmt: skip

    def aims(self, params, observations, lstm_h, own_weights, step) -> list | None:
        """Each episode's point to aim at (a node; None: its goal); None for all: keep the
        aims."""
        if step % self.every:
            return None
        aims = np.concatenate([self.graph.weights, own_weights])  # [K + n, P]
        values = np.asarray(self.reach(params, observations, lstm_h, aims, jax.random.key(step)))
        k = len(self.graph.weights)
        targets = [next_target(self.graph, route, values[i, :k], values[i, k + i])
                   for i, route in enumerate(self.routes)]  # fmt: skip
        return [None if t is None else self.graph.weights[t] for t in targets]


class DataSubgoals:
    """Subgoal search over a graph whose edges the data's own trajectories give
    (subgoals.DataGraph): at every decision, the node `lookahead` steps on along the
    shortest path from the node nearest to the agent, or a point of the data's way to it
    within reach (graph_lengths)."""

    def __init__(self, graph: DataGraph, lookahead: float, reach: float):
        self.graph, self.lookahead, self.reach = graph, lookahead, reach
        self.routes: list = []
        self.model, self.point = None, None

    def start(self, bundle: Bundle, goals: list[np.ndarray]) -> None:
        self.model, self.point = bundle.model, point_function(bundle.model)
        points = state_points(bundle.model, bundle.params, np.stack(goals), goal=True)
        self.routes = [data_route(self.graph, point) for point in points]

    def aims(self, params, observations, lstm_h, own_weights, step) -> list:
        points = state_points(self.model, params, observations, point=self.point)
        aims = [data_aim(self.graph, route, point, self.lookahead, self.reach)
                for point, route in zip(points, self.routes, strict=True)]  # fmt: skip
        rows = [i for i, aim in enumerate(aims) if aim is not None]
        if not rows:
            return aims
        weights = goal_weights(self.model, params, np.stack([aims[i] for i in rows]))  # one call
        return [None if aim is None else weights[rows.index(i)] for i, aim in enumerate(aims)]


def aim_weights(aims: list, own_weights: np.ndarray) -> np.ndarray:
    """Each episode's task weights [n, P]: its goal's own where its aim is None, else its
    aim's."""
    weights = own_weights.copy()
    for i, aim in enumerate(aims):
        if aim is not None:
            weights[i] = aim
    return weights


def dataset_episodes(bundle: Bundle, data: str | None = None) -> list[np.ndarray]:
    """The observations of every episode of the bundle's own dataset (or of `data`)."""
    from training.data.datasets import episode_observations, open_dataset

    dataset = open_dataset(data or bundle.metadata["dataset"])
    return [episode_observations(ep.observations) for ep in dataset.iterate_episodes()]


@dataclass(frozen=True)
class SubgoalSettings:
    nodes: int  # states of the data the graph spans
    edge_steps: float  # the most steps an edge may stand for
    edges: str = "value"  # who gives the edges: the ψ-model's values, or the data's trajectories
    lookahead: float = 25.0  # "data": steps along the path to aim ahead

    def __post_init__(self):
        if self.edges not in ("value", "data"):
            raise UsageError(f"subgoal edges must be 'value' or 'data', got {self.edges!r}")
        if self.nodes < 2 or self.edge_steps <= 0 or self.lookahead <= 0:
            raise UsageError(f"subgoals need 2+ nodes and positive steps, got {self}")


def subgoals_for(
    bundle: Bundle,
    settings: SubgoalSettings,
    every: int = 5,
    n_samples: int = 64,
    data: str | None = None,
) -> ValueSubgoals | DataSubgoals:
    """The subgoal search over states of the bundle's own dataset (or of `data`)."""
    episodes = dataset_episodes(bundle, data)
    if settings.edges == "data":
        graph = build_data_graph(bundle.model, bundle.params, episodes, settings.nodes,
                                 int(settings.edge_steps))  # fmt: skip
        return DataSubgoals(graph, settings.lookahead, graph_lengths(bundle.model).aim_reach)
    sample_steps = bundle.config.planning.sample_steps
    graph = build_graph(bundle.model, bundle.params, np.concatenate(episodes), settings.nodes,
                        settings.edge_steps, n_samples, sample_steps)  # fmt: skip
    return ValueSubgoals(graph, compile_reach(bundle.model, n_samples, sample_steps), every)


def run_lockstep(
    bundle: Bundle,
    planning: PlanningConfig,
    starts: list[Start],
    max_steps: int | None = None,
    progress: bool = False,
    subgoals: ValueSubgoals | DataSubgoals | None = None,
    shift: Shift = NO_SHIFT,
) -> list[SuiteEpisode]:
    """The episodes of `starts` in lockstep, one batched decision per time step; with
    `subgoals`, each episode aims at the subgoal its search picks, searched every
    `subgoals.every` steps; with a `shift`, every episode's robot drives shifted."""
    model, params = bundle.model, bundle.params
    shape, knobs = PlanShape.of(planning), Knobs.of(planning)
    n = len(starts)
    decide = compile_decide(model, shape, batched=True)
    envs = [suite_env(bundle, max_steps) for _ in starts]
    if shift:
        envs = [ShiftedDrive(env, shift) for env in envs]
    observations, goals, weights = [], [], []
    for env, start in zip(envs, starts, strict=True):
        obs, info = reset_episode(env, start)
        goal = np.asarray(info["goal"], np.float32)
        observations.append(np.asarray(obs, np.float32))
        goals.append(goal)
        weights.append(task_weights(model, params, {"kind": "goal", "goal": goal}))
    own_weights = np.stack(weights)
    weights = jnp.asarray(own_weights)
    if subgoals is not None:
        subgoals.start(bundle, goals)
    seeds = jnp.asarray([start.seed for start in starts], jnp.uint32)
    batch_knobs = Knobs(*(jnp.full(n, k, jnp.float32) for k in knobs))
    adapts = shape.planner == "online_adaptation"
    zero = zero_delta(params, shape) if adapts else None
    carried = [NOTHING] * n  # each episode starts without Δφ
    lstm = tuple(jnp.broadcast_to(x, (n, *x.shape)) for x in initial_state((), model.mdn.hidden))
    running = np.ones(n, bool)
    success, steps = np.zeros(n, bool), np.zeros(n, int)
    plan_ms = [[] for _ in starts]
    gains = [[] for _ in starts]
    step = 0
    bar = tqdm(total=n, desc=shape.planner, unit="ep", disable=not progress)
    while running.any():
        delta = None
        if adapts:
            rows = [starting_delta(c, shape, planning.warm_start, reset=False) for c in carried]
            rows = [zero if d is None else d for d in rows]
            delta = jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
        aims = None
        if subgoals is not None:
            aims = subgoals.aims(params, np.stack(observations), lstm[1], own_weights, step)
        if aims is not None:
            weights = jnp.asarray(aim_weights(aims, own_weights))
        keys = jax.vmap(session_key)(seeds, jnp.full(n, step, jnp.uint32))
        started = time.perf_counter()
        out = decide(params, lstm, jnp.asarray(np.stack(observations)), weights, keys,
                     batch_knobs, delta)  # fmt: skip
        chunks = np.asarray(out.actions)  # [n, H, A]; waits for the result
        ms = 1000 * (time.perf_counter() - started)
        lstm = out.lstm
        gain = np.asarray(out.plan.value_after - out.plan.value_before)
        for i in np.flatnonzero(running):
            if adapts:
                row_delta = jax.tree.map(lambda x, i=i: x[i], out.plan.delta)
                carried[i] = after_act(carried[i], shape, planning.warm_start, False, row_delta)
            plan_ms[i].append(ms)
            gains[i].append(float(gain[i]))
            for action in chunks[i]:  # an action chunk runs whole, unless the episode ends
                obs, _, terminated, truncated, info = envs[i].step(action)
                observations[i] = np.asarray(obs, np.float32)
                steps[i] += 1
                success[i] = success[i] or bool(info.get("success", False))
                if terminated or truncated:
                    running[i] = False
                    bar.update(1)
                    break
        step += 1
    bar.close()
    left = state_points(model, params, np.stack(observations))
    goal_points = state_points(model, params, np.stack(goals), goal=True)
    return [
        SuiteEpisode(
            task=start.task,
            seed=start.seed,
            success=bool(success[i]),
            steps=int(steps[i]),
            final_distance=float(np.linalg.norm(left[i] - goal_points[i])),
            plan_ms=float(np.median(plan_ms[i])),
            value_gain=float(np.mean(gains[i])),
        )
        for i, start in enumerate(starts)
    ]


def run_batches(
    bundle: Bundle,
    planning: PlanningConfig,
    starts: list[Start],
    batch: int,
    max_steps: int | None,
    progress: bool,
    subgoals: ValueSubgoals | DataSubgoals | None = None,
    shift: Shift = NO_SHIFT,
) -> list[SuiteEpisode]:
    """The episodes of `starts`, `batch` at a time in lockstep."""
    episodes = []
    for first in range(0, len(starts), batch):
        episodes += run_lockstep(bundle, planning, starts[first : first + batch], max_steps,
                                 progress, subgoals, shift)  # fmt: skip
    return episodes


def run_suite(
    bundle: Bundle,
    planning: PlanningConfig,
    starts: list[Start],
    batch: int = 50,
    max_steps: int | None = None,
    progress: bool = True,
    label: str | None = None,
    subgoals: ValueSubgoals | DataSubgoals | None = None,
    shift: Shift = NO_SHIFT,
) -> dict:
    """The episodes of `starts`, `batch` at a time in lockstep; the per-task and overall
    success with their intervals."""
    started = time.perf_counter()
    episodes = run_batches(bundle, planning, starts, batch, max_steps, progress, subgoals,
                           shift)  # fmt: skip
    return {
        "label": label or planning.planner,
        "planner": planning.planner,
        "planning": planning.model_dump(mode="json"),
        "summary": summarise_suite(episodes),
        "wall_s": round(time.perf_counter() - started, 1),
        "episodes": [asdict(e) for e in episodes],
    }


def success_of(episodes: list[SuiteEpisode]) -> dict:
    wins = sum(e.success for e in episodes)
    return {
        "episodes": len(episodes),
        "success": wins / len(episodes) if episodes else None,
        "interval": wilson_interval(wins, len(episodes)),
    }


def summarise_suite(episodes: list[SuiteEpisode]) -> dict:
    return {
        **success_of(episodes),
        "tasks": {task: success_of([e for e in episodes if e.task == task]) for task in TASKS},
        "plan_ms_median": float(np.median([e.plan_ms for e in episodes])),
        "value_gain": float(np.mean([e.value_gain for e in episodes])),
    }


def percent(entry: dict) -> str:
    """`82 [76, 87]`: a success rate in % and its 95% Wilson interval."""
    if entry["success"] is None:
        return "–"
    low, high = entry["interval"]
    return f"{100 * entry['success']:.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def suite_table(name: str, results: list[dict]) -> str:
    """One row per planner: overall and per-task success %, the published baselines of the
    dataset in the same columns, and the cost per batched decision."""
    header = [f"{name}: planner", "samples", "success % [95% CI]"]
    header += [f"task {t}" for t in TASKS] + ["ms / batched step"]
    rows = [
        [
            r["label"],
            sample_counts(r),
            percent(r["summary"]),
            *(percent(r["summary"]["tasks"][t]) for t in TASKS),
            fmt(r["summary"]["plan_ms_median"], ".1f"),
        ]
        for r in results
    ]
    for method, value in PUBLISHED.get(name, {}).items():
        rows.append([f"{method} (published)", "–", str(value), *("–" for _ in TASKS), "–"])
    return markdown_table(header, rows)


def write_suite(out_dir: Path, name: str, record: dict, origin: dict) -> None:
    write_result(out_dir / "ogbench.json", record, origin)
    (out_dir / "ogbench.md").write_text(suite_table(name, record["results"]))


def compare_on_suite(
    bundle: Bundle,
    planners: list[str],
    episodes_per_task: int,
    seed: int,
    out_dir: Path,
    batch: int = 50,
    max_steps: int | None = None,
    progress: bool = True,
    tuning: bool = False,
    subgoals: SubgoalSettings | None = None,
    shift: Shift = NO_SHIFT,
) -> list[dict]:
    """Every planner (or variant) on the same episodes of OGBench's five tasks (or of the
    tuning tasks, drawn with `seed`); writes ogbench.json, ogbench.md and ogbench.png into
    out_dir after each planner. With `subgoals`, every planner aims through that subgoal
    graph over states of the data; with a `shift`, the robot's drive is shifted (the planner
    is not told)."""
    from training.analysis.evaluate import check_variants, variant_planning
    from training.analysis.plots import plot_suite

    check_variants(planners)
    check_suite_env(bundle)
    name = dataset_name(bundle) or bundle.env_id
    tasks = tuning_tasks(bundle.env_id, seed) if tuning else official_tasks()
    starts = episode_starts(tasks, episodes_per_task, seed)
    if tuning:
        check_tuning_seeds(starts)
    record = {"env": bundle.env_id, "dataset": name, "tasks": "tuning" if tuning else "ogbench",
              "task_options": tasks, "seed": seed, "batch": batch,
              "episodes_per_task": episodes_per_task,
              "subgoals": asdict(subgoals) if subgoals else None,
              "action_horizon": bundle.config.planning.action_horizon,
              "shift": asdict(shift)}  # fmt: skip
    origin = provenance(bundle, seed=seed, reset_seeds=[start.seed for start in starts],
                        planners=planners, tasks=record["tasks"], batch=batch,
                        episodes_per_task=episodes_per_task, max_steps=max_steps,
                        subgoals=record["subgoals"], shift=record["shift"])  # fmt: skip
    search = subgoals_for(bundle, subgoals) if subgoals else None
    if tuning:
        name += " (tuning tasks)"
    results = []
    for planner in planners:
        planning = variant_planning(bundle, planner)
        label = f"{planner} + subgoals ({subgoals.edges})" if subgoals else planner
        results.append(run_suite(bundle, planning, starts, batch, max_steps, progress, label,
                                 search, shift))  # fmt: skip
        # Written after every planner: a long evaluation that stops keeps what it measured.
        write_suite(out_dir, name, {**record, "results": results}, origin)
    plot_suite(results, {} if tuning else PUBLISHED.get(name, {}), name, out_dir / "ogbench.png")
    return results


# ----- local reach: how often the planner gets to a cell a step or two away -----

REACH_DISTANCES = (1, 2)  # BFS steps between start and goal cell
REACH_STEPS_PER_CELL = 40  # twice the data's 20 steps a cell, and 20 to settle


def reach_starts(env_id: str, distance: int, episodes: int, seed: int) -> list[Start]:
    """`episodes` start and goal cells `distance` BFS steps apart, drawn with `seed`."""
    env = make_env(env_id).unwrapped
    maze_map = np.asarray(env.maze_map)
    env.close()
    free = [(int(i), int(j)) for i, j in np.argwhere(maze_map == 0)]
    pairs = [(a, b) for a in free for b in cells_at_distance(maze_map, a, distance)]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pairs), min(episodes, len(pairs)), replace=False)
    return [Start(distance, {"task_info": {"init_ij": pairs[k][0], "goal_ij": pairs[k][1]}},
                  seed + n) for n, k in enumerate(chosen)]  # fmt: skip


def reach_on_suite(
    bundle: Bundle, planners: list[str], episodes: int, seed: int, out_dir: Path,
    batch: int = 50, progress: bool = True,
) -> dict:  # fmt: skip
    """The local controller alone: success from a cell to one `REACH_DISTANCES` BFS steps
    away, within REACH_STEPS_PER_CELL steps a cell, for every planner. Writes reach.json
    and reach.md into out_dir."""
    from training.analysis.evaluate import check_variants, variant_planning

    check_variants(planners)
    check_suite_env(bundle)
    starts_at = {d: reach_starts(bundle.env_id, d, episodes, seed) for d in REACH_DISTANCES}
    for starts in starts_at.values():
        check_tuning_seeds(starts)
    rows, settings = {}, {}
    for planner in planners:
        planning = variant_planning(bundle, planner)
        settings[planner] = {"planner": planning.planner, "planning": planning.model_dump()}
        rows[planner] = {}
        for distance, starts in starts_at.items():
            limit = REACH_STEPS_PER_CELL * distance + 20
            found = run_batches(bundle, planning, starts, batch, limit, progress)
            rows[planner][distance] = success_of(found)
    record = {"env": bundle.env_id, "seed": seed, "episodes": episodes,
              "steps_per_cell": REACH_STEPS_PER_CELL, "success": rows,
              "planning": settings}  # fmt: skip
    seeds = {d: [start.seed for start in starts] for d, starts in starts_at.items()}
    origin = provenance(bundle, seed=seed, episodes=episodes, planners=planners, batch=batch,
                        reset_seeds=seeds)  # fmt: skip
    write_result(out_dir / "reach.json", record, origin)
    header = [f"{bundle.env_id}: planner", "samples"]
    header += [f"{d} cell(s) away" for d in REACH_DISTANCES]
    table = [[p, sample_counts(settings[p]), *(percent(r[d]) for d in REACH_DISTANCES)]
             for p, r in rows.items()]  # fmt: skip
    (out_dir / "reach.md").write_text(markdown_table(header, table))
    return record
