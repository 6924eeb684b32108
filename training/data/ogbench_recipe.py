"""OGBench's point-maze datasets, made locally by OGBench's own recipe.

OGBench publishes its datasets together with the script that made them
(`data_gen_scripts/generate_locomaze.py`) and the exact command line of every dataset
(`data_gen_scripts/commands.sh`). `collect_ogbench` runs that recipe for the point-maze
datasets: the same environments, the same oracle policy (the direction to the BFS subgoal),
the same Gaussian action noise, the same start and goal sampling and, for navigate, the same
new goal on every success. It writes the train and validation files in OGBench's npz layout,
which `ogbench.utils.load_dataset` reads. `to_minari` stores the same episodes as a Minari
dataset for `worldplan train`, and `collect_ogbench_dataset` makes both in one directory:

    OUT/worldplan.json, OUT/data/   the Minari dataset (train split) and its sidecar
    OUT/ogbench/NAME.npz            OGBench's train file
    OUT/ogbench/NAME-val.npz        OGBench's validation file
    OUT/ogbench/NAME.json           every setting of the collection

The recipe's only randomness is NumPy's global generator (and the environment's own, for the
initial velocity); the script leaves both unseeded. Here both are seeded from `seed`, so the
same arguments always produce the same files, and the global generator's state is put back
afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import ogbench.locomaze  # noqa: F401  (registers OGBench's maze environments in gymnasium)
import ogbench.manipspace  # noqa: F401  (and its manipulation environments)
from minari.data_collector import EpisodeBuffer
from tqdm import tqdm

from training.data.datasets import (
    SIDECAR,
    _data_dir,
    _minari_root,
    ensure_free,
    files_digest,
    staged,
)
from training.data.ogbench_files import write_split
from training.errors import UsageError

SOURCE = "OGBench data_gen_scripts/generate_locomaze.py, flags from data_gen_scripts/commands.sh"
PREFIX = "ogbench/"  # how `worldplan collect` names these datasets
NPZ_DIR = "ogbench"  # the folder of collect_ogbench_dataset's output that holds the npz files
NPZ_KEYS = ("observations", "actions", "terminals", "qpos", "qvel")  # the script's keys, in order
STITCH_STEPS = 4  # stitch: the goal cell lies this many BFS steps from the start cell


@dataclass(frozen=True)
class Recipe:
    """One dataset's command line in OGBench's commands.sh."""

    dataset_name: str  # e.g. pointmaze-medium-navigate-v0: the npz files' names
    env_id: str  # --env_name, e.g. pointmaze-medium-v0: OGBench's gymnasium id
    dataset_type: str  # --dataset_type: navigate or stitch
    num_episodes: int  # --num_episodes: train episodes; validation adds num_episodes // 10
    max_episode_steps: int  # --max_episode_steps: every episode has exactly this many rows
    noise: float  # --noise: standard deviation of the Gaussian added to the actions

    @staticmethod
    def val_episodes(train_episodes: int) -> int:
        """The script's validation count: `num_val_episodes = FLAGS.num_episodes // 10`."""
        return train_episodes // 10


def _recipe(maze: str, dataset_type: str) -> Recipe:
    if dataset_type == "navigate":
        episodes, steps = (500, 2001) if maze == "giant" else (1000, 1001)
    else:
        episodes, steps = 5000, 201
    return Recipe(
        dataset_name=f"pointmaze-{maze}-{dataset_type}-v0",
        env_id=f"pointmaze-{maze}-v0",
        dataset_type=dataset_type,
        num_episodes=episodes,
        max_episode_steps=steps,
        noise=0.5,
    )


RECIPES: dict[str, Recipe] = {
    r.dataset_name: r
    for r in (
        _recipe(maze, kind)
        for kind in ("navigate", "stitch")
        for maze in ("medium", "large", "giant", "teleport")
    )
}


def get_recipe(dataset_name: str) -> Recipe:
    """The recipe of a dataset, named with or without the `ogbench/` prefix."""
    name = dataset_name.removeprefix(PREFIX)
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(PREFIX + n for n in RECIPES)
        raise UsageError(f"unknown OGBench dataset {dataset_name!r}; known: {known}") from None


# ----- the recipe -----


def maze_cells(maze_map: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The script's `all_cells` (every free cell) and `vertex_cells` (free cells that are not
    the middle of a straight hallway), both in row-major order."""
    all_cells, vertex_cells = [], []
    for i in range(maze_map.shape[0]):
        for j in range(maze_map.shape[1]):
            if maze_map[i, j] != 0:
                continue
            all_cells.append((i, j))
            vertical = (
                maze_map[i - 1, j] == 0
                and maze_map[i + 1, j] == 0
                and maze_map[i, j - 1] == 1
                and maze_map[i, j + 1] == 1
            )
            horizontal = (
                maze_map[i, j - 1] == 0
                and maze_map[i, j + 1] == 0
                and maze_map[i - 1, j] == 1
                and maze_map[i + 1, j] == 1
            )
            if not (vertical or horizontal):
                vertex_cells.append((i, j))
    return all_cells, vertex_cells


def cells_at_distance(
    maze_map: np.ndarray, start: tuple[int, int], steps: int
) -> list[tuple[int, int]]:
    """The free cells exactly `steps` BFS steps from start, in the order the script's BFS
    finds them (neighbours up, left, down, right)."""
    distance = np.full(maze_map.shape, -1)
    distance[start] = 0
    queue = [start]
    found = []
    while queue:
        i, j = queue.pop(0)
        for di, dj in ((-1, 0), (0, -1), (1, 0), (0, 1)):
            ni, nj = i + di, j + dj
            if (
                0 <= ni < maze_map.shape[0]
                and 0 <= nj < maze_map.shape[1]
                and maze_map[ni, nj] == 0
                and distance[ni, nj] == -1
            ):
                distance[ni, nj] = distance[i, j] + 1
                queue.append((ni, nj))
                if distance[ni, nj] == steps:
                    found.append((ni, nj))
    return found


def make_env(recipe: Recipe) -> gym.Env:
    """The environment exactly as the script makes it."""
    return gym.make(
        recipe.env_id, terminate_at_goal=False, max_episode_steps=recipe.max_episode_steps
    )


@dataclass
class Rollout:
    """One episode of the recipe: the rows it writes, and what it does not write."""

    rows: dict[str, np.ndarray]  # NPZ_KEYS, one row per step, as the script appends them
    init_ij: tuple[int, int]  # the sampled start cell
    goal_ij: tuple[int, int]  # the first sampled goal cell
    goals: np.ndarray  # [T, 2] the goal position (with its noise) in force at each step
    successes: np.ndarray  # [T] bool: the step reached the goal (navigate then draws a new one)


def rollouts(recipe: Recipe, count: int, *, seed: int = 0, progress: bool = False) -> list[Rollout]:
    """`count` episodes of the script's collection loop, seeded by seed.

    NumPy's global generator is seeded for the run (the script and the environment draw from
    it) and put back afterwards.
    """
    env = make_env(recipe)
    saved_state = np.random.get_state()
    np.random.seed(seed)
    try:
        env.action_space.seed(seed)  # the random steps inside reset (their effect is overwritten)
        bar = tqdm(range(count), desc=recipe.dataset_name, unit="ep", disable=not progress)
        return [_rollout(recipe, env, seed if index == 0 else None) for index in bar]
    finally:
        np.random.set_state(saved_state)
        env.close()


def _rollout(recipe: Recipe, env: gym.Env, seed: int | None) -> Rollout:
    """One pass of the script's episode loop (generate_locomaze.py, `for ep_idx in trange`)."""
    u = env.unwrapped
    maze_map = u.maze_map
    all_cells, vertex_cells = maze_cells(maze_map)
    # Sample an initial state from all cells; navigate: a goal from the vertex cells;
    # stitch: a goal among the cells STITCH_STEPS BFS steps away (the start if there is none).
    init_ij = all_cells[np.random.randint(len(all_cells))]
    if recipe.dataset_type == "navigate":
        goal_ij = vertex_cells[np.random.randint(len(vertex_cells))]
    elif recipe.dataset_type == "stitch":
        adj_cells = cells_at_distance(maze_map, init_ij, STITCH_STEPS)
        goal_ij = adj_cells[np.random.randint(len(adj_cells))] if adj_cells else init_ij
    else:
        raise UsageError(f"unsupported dataset type {recipe.dataset_type!r}")
    first_goal_ij = goal_ij

    ob, _ = env.reset(seed=seed, options=dict(task_info=dict(init_ij=init_ij, goal_ij=goal_ij)))
    rows = recipe.max_episode_steps
    out = {
        "observations": np.zeros((rows, *ob.shape), np.float32),
        "actions": np.zeros((rows, *env.action_space.shape), np.float32),
        "terminals": np.zeros(rows, bool),
        "qpos": np.zeros((rows, u.model.nq), np.float32),
        "qvel": np.zeros((rows, u.model.nv), np.float32),
    }
    goals = np.zeros((rows, 2))
    successes = np.zeros(rows, bool)
    done = False
    step = 0
    while not done:
        # The point agent's oracle actor returns the unit direction to the BFS subgoal.
        xy = u.get_xy()
        goals[step] = u.cur_goal_xy
        subgoal_xy, _ = u.get_oracle_subgoal(xy, u.cur_goal_xy)
        subgoal_dir = subgoal_xy - xy
        action = subgoal_dir / (np.linalg.norm(subgoal_dir) + 1e-6)
        # Add Gaussian noise to the action.
        action = action + np.random.normal(0, recipe.noise, action.shape)
        action = np.clip(action, -1, 1)

        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        successes[step] = info["success"]

        # Sample a new goal state when the current goal is reached (navigate only).
        if info["success"] and recipe.dataset_type == "navigate":
            goal_ij = vertex_cells[np.random.randint(len(vertex_cells))]
            u.set_goal(goal_ij)

        out["observations"][step] = ob
        out["actions"][step] = action
        out["terminals"][step] = done
        out["qpos"][step] = info["prev_qpos"]
        out["qvel"][step] = info["prev_qvel"]
        ob = next_ob
        step += 1
    return Rollout(
        rows={k: v[:step] for k, v in out.items()},
        init_ij=init_ij,
        goal_ij=first_goal_ij,
        goals=goals[:step],
        successes=successes[:step],
    )


def collect_ogbench(
    dataset_name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    episodes: int | None = None,
    progress: bool = True,
) -> Path:
    """Run OGBench's recipe for dataset_name into out_dir; returns the train file's path.

    out_dir (absent or empty) ends up holding NAME.npz (the first `episodes` episodes),
    NAME-val.npz (the next episodes // 10) and NAME.json (the settings). `episodes` defaults to
    the published count. The files appear only once all of them are written.
    """
    recipe = get_recipe(dataset_name)
    train_episodes = recipe.num_episodes if episodes is None else episodes
    if train_episodes < 1:
        raise UsageError(f"episodes must be at least 1, got {train_episodes}")
    val_episodes = recipe.val_episodes(train_episodes)
    ensure_free(Path(out_dir).expanduser())  # before the collection, not after it
    episodes_run = rollouts(recipe, train_episodes + val_episodes, seed=seed, progress=progress)
    settings = {
        "dataset_name": recipe.dataset_name,
        "env_id": recipe.env_id,
        "env_kwargs": {
            "terminate_at_goal": False,
            "max_episode_steps": recipe.max_episode_steps,
        },
        "dataset_type": recipe.dataset_type,
        "seed": seed,
        "episodes": train_episodes,
        "val_episodes": val_episodes,
        "published_episodes": recipe.num_episodes,
        "max_episode_steps": recipe.max_episode_steps,
        "noise": recipe.noise,
        "recipe": SOURCE,
        "seeding": "numpy.random.seed(seed) for the recipe's draws (restored afterwards); "
        "env.reset(seed=seed) and env.action_space.seed(seed) once, for the first episode",
        "ogbench_version": version("ogbench"),
    }
    rows = [r.rows for r in episodes_run]
    return write_split(out_dir, recipe.dataset_name, rows, train_episodes, settings)


# ----- the Minari copy -----


def npz_episodes(npz_path: str | Path) -> list[dict[str, np.ndarray]]:
    """The episodes of an OGBench npz file: each episode's rows end at a terminal row."""
    with np.load(npz_path) as file:
        data = {k: file[k] for k in file.files}
    ends = np.flatnonzero(data["terminals"]) + 1
    if len(data["terminals"]) and (not len(ends) or ends[-1] != len(data["terminals"])):
        raise UsageError(f"{npz_path}: the last episode has no terminal row")
    starts = np.concatenate([[0], ends[:-1]])
    return [{k: v[s:e] for k, v in data.items()} for s, e in zip(starts, ends, strict=True)]


def to_minari(
    npz_path: str | Path,
    out_dir: str | Path,
    env_id: str,
    *,
    env_kwargs: dict[str, Any] | None = None,
    dataset_id: str | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """The episodes of an OGBench npz file as a Minari dataset in out_dir (data/ + sidecar).

    An episode of T rows becomes T observations and T - 1 transitions: the file holds no state
    after its last action (`ogbench.utils.load_dataset` drops that row too). Rewards are zero
    (OGBench's datasets have none: the goals are not stored) and nothing terminates; the last
    transition is marked truncated. The dataset records env_id made with env_kwargs (the
    environment the data came from) and, for evaluation, env_id with its defaults.
    out_dir may hold other files but no Minari dataset yet.
    """
    npz_path = Path(npz_path)
    out_dir = Path(out_dir).expanduser().resolve()
    if _data_dir(out_dir) is not None or (out_dir / "data").exists():
        raise FileExistsError(f"{out_dir} already holds a Minari dataset")
    name = npz_path.name.removesuffix(".npz")
    dataset_id = dataset_id or f"{PREFIX}{name}"
    episodes = npz_episodes(npz_path)
    if not episodes:
        raise UsageError(f"{npz_path} holds no episodes")
    buffers = [
        EpisodeBuffer(
            id=index,
            observations=ep["observations"],
            actions=ep["actions"][:-1],
            rewards=np.zeros(len(ep["actions"]) - 1, np.float32),
            terminations=np.zeros(len(ep["actions"]) - 1, bool),
            truncations=np.arange(len(ep["actions"]) - 1) == len(ep["actions"]) - 2,
        )
        for index, ep in enumerate(episodes)
    ]
    if any(len(b.rewards) < 1 for b in buffers):
        raise UsageError(f"{npz_path} has an episode of a single row (no transition)")
    obs_dim = episodes[0]["observations"].shape[1:]
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".minari.", dir=out_dir))
    try:
        env = gym.make(env_id, **(env_kwargs or {}))
        try:
            with _minari_root(staging), warnings.catch_warnings():
                # Minari nags about optional metadata (author email, permalink, ...).
                warnings.simplefilter("ignore", UserWarning)
                minari.create_dataset_from_buffers(
                    dataset_id,
                    buffers,
                    env=env,
                    eval_env=env_id,
                    observation_space=gym.spaces.Box(-np.inf, np.inf, obs_dim, np.float32),
                    algorithm_name=f"OGBench's recipe: {(info or {}).get('recipe', SOURCE)}",
                    author="worldplan",
                    description=f"{len(buffers)} episodes of OGBench's {name}, made by "
                    f"OGBench's recipe, converted from {npz_path.name}",
                    data_format="hdf5",
                    requirements=[f"ogbench=={version('ogbench')}"],
                    jpeg_encoding=False,
                )
        finally:
            env.close()
        built = staging / dataset_id
        sidecar = {
            **(info or {}),
            "source": "ogbench",
            "env_id": env_id,
            "minari_dataset_id": dataset_id,
            "npz": npz_path.name,
            "layout": "an episode of T npz rows is T observations and T - 1 transitions",
        }
        (built / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        (built / "data").rename(out_dir / "data")
        (built / SIDECAR).rename(out_dir / SIDECAR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def collect_ogbench_dataset(
    dataset_name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    episodes: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    map_seed: int | None = None,
) -> Path:
    """`worldplan collect ogbench/NAME`: the npz files in out_dir/ogbench/ (a point maze's
    by the locomaze recipe, a manipulation dataset's by the manipspace recipe on `workers`
    processes) and their train split as a Minari dataset in out_dir, all appearing at once
    when done. With `map_seed`, every observation is seen through a random linear map
    drawn from it (observation_map.py), which the settings record."""
    from training.data.ogbench_manip import MANIP_RECIPES, collect_manip

    name = dataset_name.removeprefix(PREFIX)
    if name in MANIP_RECIPES:
        make_npz = functools.partial(collect_manip, workers=workers)
    elif name in RECIPES:
        make_npz = collect_ogbench
    else:
        known = ", ".join(PREFIX + n for n in (*RECIPES, *MANIP_RECIPES))
        raise UsageError(f"unknown OGBench dataset {dataset_name!r}; known: {known}")
    out_dir = Path(out_dir).expanduser().resolve()
    ensure_free(out_dir)
    with staged(out_dir) as staging:
        npz = make_npz(name, staging / NPZ_DIR, seed=seed, episodes=episodes, progress=progress)
        settings = json.loads(npz.with_suffix(".json").read_text())
        if map_seed is not None:
            settings["observation_map"] = map_files(npz, settings["files"], map_seed)
            npz.with_suffix(".json").write_text(json.dumps(settings, indent=2) + "\n")
        settings["files"] = {k: f"{NPZ_DIR}/{v}" for k, v in settings["files"].items()}
        to_minari(
            npz,
            staging,
            settings["env_id"],
            env_kwargs=settings["env_kwargs"],
            info={**settings, "minari_split": "train"},
        )
    return out_dir


def map_files(npz: Path, files: dict[str, str], seed: int) -> dict:
    """Every npz file of a collection (`files`, beside `npz`) through one map drawn from
    `seed`, each file's noise its own; the map, as recorded."""
    from training.data.observation_map import data_map, map_npz

    observation_map = data_map(npz, seed)
    for index, name in enumerate(files.values()):
        map_npz(npz.parent / name, observation_map, seed=index)
    return observation_map.to_json()


# ----- OGBench's own files -----

DATASET_TYPES = ("navigate", "stitch", "explore", "play", "noisy")  # OGBench's name parts


def npz_env_id(npz_path: str | Path) -> str:
    """The environment of an OGBench dataset file, from its name: `pointmaze-medium-stitch-v0`
    was recorded in `pointmaze-medium-v0`, `cube-single-play-v0` in `cube-single-v0`."""
    name = Path(npz_path).name.removesuffix(".npz").removesuffix("-val")
    for kind in DATASET_TYPES:
        if f"-{kind}-" in name:
            return name.replace(f"-{kind}-", "-", 1)
    raise UsageError(
        f"{npz_path}: not an OGBench dataset name (ENV-TYPE-vN.npz, TYPE one of "
        f"{', '.join(DATASET_TYPES)})"
    )


def minari_copy(npz_path: str | Path, cache: str | Path | None = None) -> Path:
    """An OGBench npz file (as `ogbench.utils.load_dataset` reads it, e.g. one downloaded to
    ~/.ogbench/data/) as the Minari dataset `worldplan train` reads: converted once into
    `cache` (default ~/.cache/worldplan/ogbench), under the file's name and digest, and
    found there again after. The environment comes from the name; the sidecar records the
    file and the validation file beside it."""
    npz_path = Path(npz_path).expanduser().resolve()
    if not npz_path.is_file():
        raise FileNotFoundError(f"no file at {npz_path}")
    env_id = npz_env_id(npz_path)
    digest = files_digest(npz_path)[:12]  # read in chunks: these files run to 100s of MB
    root = Path(cache or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    out = (root / "worldplan" / "ogbench" if cache is None else root) / f"{npz_path.stem}-{digest}"
    if (out / "data").is_dir():
        return out
    val = npz_path.with_name(f"{npz_path.stem}-val.npz")
    info = {
        "dataset_name": npz_path.stem,
        "env_id": env_id,
        "npz_path": str(npz_path),
        "npz_digest_12": digest,  # datasets.files_digest
        "val_path": str(val) if val.is_file() else None,
        "minari_split": "train",
    }
    with staged(out) as staging:
        to_minari(npz_path, staging, env_id, info=info)
    return out
