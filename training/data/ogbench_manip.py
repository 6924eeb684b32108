"""OGBench's manipulation datasets, made locally by OGBench's own recipe.

OGBench makes them with scripted oracles, not an expert checkpoint:
`data_gen_scripts/generate_manipspace.py --dataset_type=play`, with the flags of
`data_gen_scripts/commands.sh`. `collect_manip` runs that recipe: the same environments in
their data-collection mode, the same plan oracles (cube, button, drawer, window) with the
same noise (0.1, smoothed 0.5), the same stacking probability per episode, a new target
whenever the oracle is done, and scene's health check (an episode whose cube leaves the
table is drawn again). It writes OGBench's npz layout (observations, actions, terminals,
qpos, qvel, and button_states where the scene has buttons), train and validation files,
which `ogbench.utils.load_dataset` reads.

Unlike the script, which draws from unseeded generators in one process, every episode here
seeds NumPy's global generator (the oracles draw from it) and the environment's reset from
its own index (and, for a redrawn scene episode, its attempt), so episodes can be spread over
worker processes and the files do not depend on how many there were.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from training.data.datasets import ensure_free
from training.data.ogbench_files import write_split
from training.errors import UsageError

SOURCE = "OGBench data_gen_scripts/generate_manipspace.py, flags from data_gen_scripts/commands.sh"


@dataclass(frozen=True)
class ManipRecipe:
    """One manipulation dataset's command line in OGBench's commands.sh (play datasets)."""

    dataset_name: str  # e.g. cube-single-play-v0: the npz files' names
    env_id: str  # --env_name, e.g. cube-single-v0
    num_episodes: int = 1000  # --num_episodes: train episodes; validation adds a tenth
    max_episode_steps: int = 1001  # --max_episode_steps: rows per episode
    noise: float = 0.1  # --noise: the plan oracles' noise level
    noise_smoothing: float = 0.5  # --noise_smoothing

    @property
    def val_episodes(self) -> int:
        return self.num_episodes // 10

    @property
    def scene(self) -> bool:
        return self.env_id.startswith("scene")


MANIP_RECIPES: dict[str, ManipRecipe] = {
    f"{env}-play-v0": ManipRecipe(f"{env}-play-v0", f"{env}-v0")
    for env in ("cube-single", "cube-double", "scene", "puzzle-3x3", "puzzle-4x4")
}


def make_collection_env(recipe: ManipRecipe) -> gym.Env:
    """The script's environment: data-collection mode, no termination at the goal."""
    import ogbench.manipspace  # noqa: F401  (registers the environments)

    return gym.make(
        recipe.env_id,
        terminate_at_goal=False,
        mode="data_collection",
        max_episode_steps=recipe.max_episode_steps,
    )


def make_oracles(recipe: ManipRecipe, env: gym.Env) -> dict:
    """The script's plan oracles for the environment's kinds of task."""
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    noise = {"noise": recipe.noise, "noise_smoothing": recipe.noise_smoothing}
    if recipe.env_id.startswith("cube"):
        return {"cube": CubePlanOracle(env=env, **noise)}
    if recipe.scene:
        return {
            "cube": CubePlanOracle(env=env, **noise),
            "button": ButtonPlanOracle(env=env, **noise),
            "drawer": DrawerPlanOracle(env=env, **noise),
            "window": WindowPlanOracle(env=env, **noise),
        }
    return {"button": ButtonPlanOracle(env=env, gripper_always_closed=True, **noise)}


def stacking_probability(env_id: str) -> float:
    """The script's p_stack: the chance that a new cube target is on another cube."""
    if "single" in env_id:
        return 0.0
    if "double" in env_id:
        return float(np.random.uniform(0.0, 0.25))
    return 0.5


def episode_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of episode `index` (its `attempt`-th draw), from the collection's seed."""
    return int(np.random.SeedSequence([seed, index, attempt]).generate_state(1)[0])


def healthy_scene(qpos: np.ndarray) -> bool:
    """The script's check that scene's cube stays visible: never too far right, and never
    too far left unless it is in the drawer."""
    cube = qpos[:, 14:17]
    if (cube[:, 1] >= 0.29).any():
        return False
    return not ((cube[:, 1] <= -0.3) & ((cube[:, 2] < 0.06) | (cube[:, 2] > 0.08))).any()


def run_episode(recipe: ManipRecipe, env: gym.Env, oracles: dict, seed: int) -> dict:
    """One pass of the script's episode loop, seeded by `seed`: its rows by npz key."""
    np.random.seed(seed)
    ob, info = env.reset(seed=seed)
    p_stack = stacking_probability(recipe.env_id)
    agent = oracles[info["privileged/target_task"]]
    agent.reset(ob, info)
    buttons = hasattr(env.unwrapped, "_cur_button_states")
    rows: dict[str, list] = {k: [] for k in npz_keys(buttons)}
    done = False
    while not done:
        action = np.clip(np.asarray(agent.select_action(ob, info)), -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if agent.done:  # a new target when the oracle is done with this one
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            agent = oracles[agent_info["privileged/target_task"]]
            agent.reset(agent_ob, agent_info)
        rows["observations"].append(ob)
        rows["actions"].append(action)
        rows["terminals"].append(done)
        rows["qpos"].append(info["prev_qpos"])
        rows["qvel"].append(info["prev_qvel"])
        if buttons:
            rows["button_states"].append(info["prev_button_states"])
        ob = next_ob
    return {k: np.asarray(v, NPZ_DTYPES.get(k, np.float32)) for k, v in rows.items()}


NPZ_DTYPES = {"terminals": bool, "button_states": np.int64}  # the rest: float32


def npz_keys(buttons: bool) -> tuple[str, ...]:
    base = ("observations", "actions", "terminals", "qpos", "qvel")
    return (*base, "button_states") if buttons else base


# Each worker process keeps one environment and its oracles, made on its first episode.
_worker: dict = {}


def collect_episode(task: tuple[ManipRecipe, int, int]) -> tuple[dict, int]:
    """Episode `index` of a collection seeded `seed`, and how many draws it took (scene
    draws an episode again until it passes the health check)."""
    recipe, seed, index = task
    if _worker.get("recipe") != recipe:
        if "env" in _worker:
            _worker["env"].close()
        env = make_collection_env(recipe)
        _worker.update(recipe=recipe, env=env, oracles=make_oracles(recipe, env))
    attempt = 0
    while True:
        rows = run_episode(
            recipe, _worker["env"], _worker["oracles"], episode_seed(seed, index, attempt)
        )
        if not recipe.scene or healthy_scene(rows["qpos"]):
            return rows, attempt + 1
        attempt += 1


def collect_manip(
    dataset_name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    episodes: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """OGBench's recipe for a manipulation dataset into out_dir (absent or empty): NAME.npz
    (the first `episodes`, by default the published 1000), NAME-val.npz (the next tenth)
    and NAME.json (every setting). `workers` processes share the episodes (default: every
    core); the files appear only once all of them are written. Returns the train file."""
    recipe = get_manip_recipe(dataset_name)
    train_episodes = recipe.num_episodes if episodes is None else episodes
    if train_episodes < 1:
        raise UsageError(f"episodes must be at least 1, got {train_episodes}")
    val_episodes = train_episodes // 10
    total = train_episodes + val_episodes
    workers = max(1, min(workers or os.cpu_count() or 1, total))
    ensure_free(Path(out_dir).expanduser())  # before the collection, not after it
    tasks = [(recipe, seed, index) for index in range(total)]
    bar = tqdm(total=total, desc=recipe.dataset_name, unit="ep", disable=not progress)
    episodes_run, draws = [], 0
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for rows, tries in pool.imap(collect_episode, tasks):  # in index order
            episodes_run.append(rows)
            draws += tries
            bar.update()
    bar.close()
    settings = {
        "dataset_name": recipe.dataset_name,
        "env_id": recipe.env_id,
        "env_kwargs": {
            "terminate_at_goal": False,
            "mode": "data_collection",
            "max_episode_steps": recipe.max_episode_steps,
        },
        "dataset_type": "play",
        **{k: v for k, v in asdict(recipe).items() if k not in ("dataset_name", "env_id")},
        "seed": seed,
        "episodes": train_episodes,
        "val_episodes": val_episodes,
        "published_episodes": recipe.num_episodes,
        "redrawn_episodes": draws - total,
        "recipe": SOURCE,
        "seeding": "each episode seeds numpy.random and env.reset with "
        "SeedSequence([seed, index, attempt]), so the files do not depend on the workers",
        "workers": workers,
        "ogbench_version": version("ogbench"),
    }
    return write_split(out_dir, recipe.dataset_name, episodes_run, train_episodes, settings)


def get_manip_recipe(dataset_name: str) -> ManipRecipe:
    name = dataset_name.removeprefix("ogbench/")
    try:
        return MANIP_RECIPES[name]
    except KeyError:
        known = ", ".join(f"ogbench/{n}" for n in MANIP_RECIPES)
        raise UsageError(
            f"unknown OGBench manipulation dataset {dataset_name!r}; known: {known}"
        ) from None
