"""OGBench's manipulation datasets made by its recipe (scripted plan oracles): the published
settings, files that OGBench's loader reads and that do not depend on the number of worker
processes; and OGBench's own npz files trained on as they are."""

import json

import gymnasium
import numpy as np
import ogbench
import pytest

from service.cli import main as cli_main
from tests.conftest import TINY
from tests.test_geometry import STEPS
from training.analysis.ogbench_suite import (
    CUBE_MARGIN,
    OFFICIAL_SEED,
    TASKS,
    Start,
    SubgoalSettings,
    reset_episode,
    run_lockstep,
    subgoals_for,
    tuning_tasks,
)
from training.config import parse_config
from training.data.datasets import dataset_info, open_dataset
from training.data.envs import make_env
from training.data.ogbench_manip import MANIP_RECIPES, collect_manip, healthy_scene
from training.data.ogbench_recipe import (
    collect_ogbench,
    collect_ogbench_dataset,
    minari_copy,
    npz_env_id,
)
from training.errors import UsageError
from training.learning.checkpoint import restore_bundle
from training.learning.loop import train

CUBE = "cube-single-play-v0"

# data_gen_scripts/commands.sh: generate_manipspace.py --env_name=ENV
#   --save_path=data/ENV-play-v0.npz --num_episodes=1000 --max_episode_steps=1001
#   --dataset_type=play (noise 0.1, noise_smoothing 0.5: the script's flag defaults)
PUBLISHED = {
    "cube-single-play-v0": ("cube-single-v0", 28),
    "cube-double-play-v0": ("cube-double-v0", 37),
    "scene-play-v0": ("scene-v0", 40),
    "puzzle-3x3-play-v0": ("puzzle-3x3-v0", 55),
    "puzzle-4x4-play-v0": ("puzzle-4x4-v0", 83),
}


def load(path):
    with np.load(path) as file:
        return {k: file[k] for k in file.files}


def test_recipes_are_the_published_command_lines():
    import ogbench.manipspace  # noqa: F401  (registers the environments)

    assert set(MANIP_RECIPES) == set(PUBLISHED)
    for name, (env_id, obs_dim) in PUBLISHED.items():
        recipe = MANIP_RECIPES[name]
        published = (env_id, 1000, 1001)
        assert (recipe.env_id, recipe.num_episodes, recipe.max_episode_steps) == published
        assert (recipe.noise, recipe.noise_smoothing, recipe.val_episodes) == (0.1, 0.5, 100)
        env = gymnasium.make(env_id)
        assert env.observation_space.shape == (obs_dim,) and env.action_space.shape == (5,)
        env.close()


def test_scene_s_health_check_is_the_script_s():
    qpos = np.zeros((3, 25))
    qpos[:, 14:17] = [0.0, 0.0, 0.02]
    assert healthy_scene(qpos)
    qpos[1, 15] = 0.29  # too far right
    assert not healthy_scene(qpos)
    qpos[1, 15], qpos[2, 15:17] = 0.0, [-0.31, 0.07]  # far left, in the drawer
    assert healthy_scene(qpos)
    qpos[2, 16] = 0.02  # far left on the table
    assert not healthy_scene(qpos)


@pytest.mark.slow
def test_the_files_do_not_depend_on_the_workers_and_ogbench_reads_them(tmp_path):
    one = collect_manip(CUBE, tmp_path / "one", seed=3, episodes=2, workers=1, progress=False)
    two = collect_manip(CUBE, tmp_path / "two", seed=3, episodes=2, workers=2, progress=False)
    first, second = load(one), load(two)
    assert set(first) == {"observations", "actions", "terminals", "qpos", "qvel"}
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert first["observations"].shape == (2 * 1001, 28) and first["actions"].shape[1] == 5
    assert np.array_equal(np.flatnonzero(first["terminals"]) + 1, [1001, 2002])
    assert first["observations"].dtype == np.float32 and first["terminals"].dtype == bool
    # the two episodes differ: each is seeded from its own index
    assert not np.array_equal(first["observations"][:1001], first["observations"][1001:])
    settings = json.loads(one.with_suffix(".json").read_text())
    assert (settings["episodes"], settings["val_episodes"], settings["workers"]) == (2, 0, 1)
    assert settings["env_kwargs"]["mode"] == "data_collection"
    data = ogbench.utils.load_dataset(str(one))
    assert data["observations"].shape == (2 * 1000, 28)  # OGBench drops each last row
    assert data["terminals"].sum() == 2


@pytest.mark.slow
def test_an_ogbench_file_trains_as_it_is(tmp_path, capsys, monkeypatch):
    """`worldplan train --data FILE.npz` on a file in OGBench's layout, named as OGBench
    names it, with its validation file beside it: the environment comes from the name."""
    npz = collect_ogbench(
        "pointmaze-medium-stitch-v0", tmp_path / "files", seed=1, episodes=2, progress=False
    )
    assert npz_env_id(npz) == "pointmaze-medium-v0"
    assert npz_env_id("/data/cube-single-play-v0-val.npz") == "cube-single-v0"
    cache = tmp_path / "cache"
    copy = minari_copy(npz, cache)
    assert minari_copy(npz, cache) == copy  # converted once
    info = dataset_info(open_dataset(copy))
    assert info["env_id"] == "pointmaze-medium-v0" and info["npz_path"] == str(npz)
    assert info["val_path"] == str(npz.with_name("pointmaze-medium-stitch-v0-val.npz"))
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "env"}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # where train's copy goes
    argv = ["train", "--data", str(npz), "--config", str(config), "--steps", "2", "--quiet"]
    assert cli_main([*argv, "--out", str(tmp_path / "run")]) == 0
    bundle = restore_bundle(tmp_path / "run")
    assert bundle.env_id == "pointmaze-medium-v0"
    assert bundle.metadata["dataset_info"]["npz_path"] == str(npz)
    assert (tmp_path / "xdg" / "worldplan" / "ogbench").is_dir()
    with pytest.raises(ValueError, match="not an OGBench dataset name"):
        npz_env_id(tmp_path / "mydata.npz")
    missing = ["train", "--data", str(tmp_path / "missing-play-v0.npz"), "--out", "x"]
    assert cli_main(missing) == 2
    assert "no file at" in capsys.readouterr().err


def test_cube_tuning_tasks_are_ogbench_s_moves_elsewhere():
    """Each of OGBench's cube tasks turned and moved: the same distances, every start and
    goal where the environment draws cubes and apart from each of OGBench's."""
    env = gymnasium.make("cube-double-v0").unwrapped
    low, high = np.asarray(env._object_sampling_bounds)
    official = np.concatenate([np.concatenate([t["init_xyzs"], t["goal_xyzs"]])[:, :2]
                               for t in env.task_infos])  # fmt: skip
    tasks = tuning_tasks("cube-double-v0", seed=1)
    assert tasks == tuning_tasks("cube-double-v0", seed=1) != tuning_tasks("cube-double-v0", 2)
    for task, info in zip(TASKS, env.task_infos, strict=True):
        mine = tasks[task]["task_info"]
        points = np.concatenate([mine["init_xyzs"], mine["goal_xyzs"]])
        theirs = np.concatenate([info["init_xyzs"], info["goal_xyzs"]])
        gaps = np.linalg.norm(points[:, None] - points[None], axis=-1)
        np.testing.assert_allclose(gaps, np.linalg.norm(theirs[:, None] - theirs[None], axis=-1),
                                   atol=1e-3)  # fmt: skip
        assert np.all((points[:, :2] >= low) & (points[:, :2] <= high))
        nearest = np.linalg.norm(points[:, None, :2] - official[None], axis=-1).min()
        assert nearest >= CUBE_MARGIN - 1e-3
    single = make_env("cube-single-v0")
    start = tuning_tasks("cube-single-v0", seed=1)[3]
    _, info = reset_episode(single, Start(3, start, seed=0))
    init = np.asarray(start["task_info"]["init_xyzs"][0])
    assert np.abs(info["privileged/block_0_pos"][:2] - init[:2]).max() <= 0.011  # ±1 cm noise
    with pytest.raises(UsageError, match="no tuning tasks"):
        tuning_tasks("puzzle-3x3-v0")


@pytest.mark.slow
def test_an_arm_plans_for_ogbench_s_cube_tasks_in_lockstep(tmp_path):
    """A tiny bundle of the learned geometry on a tiny cube-single dataset: OGBench's tasks
    and the tuning tasks run in lockstep through a data graph, their goals whole
    observations, success from the environment, distances in steps."""
    data = collect_ogbench_dataset(CUBE, tmp_path / "cube", seed=1, episodes=2, workers=1,
                                   progress=False)  # fmt: skip
    raw = {**STEPS, "env": "cube-single-v0"}
    bundle = restore_bundle(
        train(parse_config(raw), data, tmp_path / "run", progress=False).run_dir
    )
    assert bundle.model.goal_size == 28
    settings = SubgoalSettings(nodes=16, edge_steps=10, edges="data", lookahead=5.0)
    search = subgoals_for(bundle, settings)
    starts = [Start(1, {"task_id": 1}, seed=OFFICIAL_SEED),
              Start(2, tuning_tasks("cube-single-v0", seed=1)[2], seed=1)]  # fmt: skip
    episodes = run_lockstep(bundle, bundle.config.planning, starts, max_steps=4, subgoals=search)
    for episode in episodes:
        assert episode.steps == 4 and not episode.success  # no cube moves that far in 4 steps
        assert 0.0 < episode.final_distance < np.inf  # in steps, from the goal observation
