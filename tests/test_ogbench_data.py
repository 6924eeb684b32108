"""OGBench's point-maze datasets made by OGBench's recipe: the published settings, the npz
files OGBench's loader reads, and the Minari copy worldplan trains on."""

from collections import defaultdict

import gymnasium
import numpy as np
import ogbench
import pytest

from service.cli import main as cli_main
from training.data import ogbench_recipe
from training.data.datasets import dataset_info, load_sequences, open_dataset
from training.data.envs import bfs_path
from training.data.ogbench_recipe import (
    NPZ_DIR,
    NPZ_KEYS,
    RECIPES,
    collect_ogbench,
    collect_ogbench_dataset,
    get_recipe,
    npz_episodes,
    rollouts,
)

NAVIGATE = "pointmaze-medium-navigate-v0"
STITCH = "pointmaze-medium-stitch-v0"
EPISODES = {NAVIGATE: 10, STITCH: 20}  # small collections: 1 and 2 validation episodes

# data_gen_scripts/commands.sh, the pointmaze lines:
#   --env_name=pointmaze-{medium,large}-v0 --dataset_type=navigate --num_episodes=1000
#       --max_episode_steps=1001 --noise=0.5
#   --env_name=pointmaze-giant-v0 --dataset_type=navigate --num_episodes=500
#       --max_episode_steps=2001 --noise=0.5
#   --env_name=pointmaze-{medium,large,giant}-v0 --dataset_type=stitch --num_episodes=5000
#       --max_episode_steps=201 --noise=0.5
PUBLISHED = {
    "pointmaze-medium-navigate-v0": ("pointmaze-medium-v0", "navigate", 1000, 1001, 0.5),
    "pointmaze-large-navigate-v0": ("pointmaze-large-v0", "navigate", 1000, 1001, 0.5),
    "pointmaze-giant-navigate-v0": ("pointmaze-giant-v0", "navigate", 500, 2001, 0.5),
    "pointmaze-medium-stitch-v0": ("pointmaze-medium-v0", "stitch", 5000, 201, 0.5),
    "pointmaze-large-stitch-v0": ("pointmaze-large-v0", "stitch", 5000, 201, 0.5),
    "pointmaze-giant-stitch-v0": ("pointmaze-giant-v0", "stitch", 5000, 201, 0.5),
    # --env_name=pointmaze-teleport-v0 --dataset_type=navigate --num_episodes=1000
    #     --max_episode_steps=1001 --noise=0.5; stitch: 5000 episodes of 201 steps
    "pointmaze-teleport-navigate-v0": ("pointmaze-teleport-v0", "navigate", 1000, 1001, 0.5),
    "pointmaze-teleport-stitch-v0": ("pointmaze-teleport-v0", "stitch", 5000, 201, 0.5),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """dataset name -> the directory `worldplan collect ogbench/NAME` would write."""
    root = tmp_path_factory.mktemp("ogbench")
    return {
        name: collect_ogbench_dataset(name, root / name, seed=7, episodes=n, progress=False)
        for name, n in EPISODES.items()
    }


def npz_path(made, name, val=False):
    return made[name] / NPZ_DIR / f"{name}{'-val' if val else ''}.npz"


def load_npz(path):
    with np.load(path) as file:
        return {k: file[k] for k in file.files}


def test_recipes_are_the_published_command_lines():
    assert set(RECIPES) == set(PUBLISHED)
    for name, (env_id, kind, episodes, steps, noise) in PUBLISHED.items():
        r = get_recipe(name)
        assert (r.env_id, r.dataset_type, r.num_episodes, r.max_episode_steps, r.noise) == (
            env_id,
            kind,
            episodes,
            steps,
            noise,
        ), name
        assert get_recipe(f"ogbench/{name}") == r
        assert env_id in gymnasium.registry  # OGBench's own environment id
    # num_val_episodes = FLAGS.num_episodes // 10
    assert [r.val_episodes(n) for n in (1000, 500, 5000, 19, 9)] == [100, 50, 500, 1, 0]
    with pytest.raises(ValueError, match="known: ogbench/pointmaze-medium-navigate-v0"):
        get_recipe("pointmaze-umaze-navigate-v0")


@pytest.mark.parametrize("name", [NAVIGATE, STITCH])
def test_episode_counts_and_lengths(made, name):
    steps = get_recipe(name).max_episode_steps
    for val, episodes in ((False, EPISODES[name]), (True, EPISODES[name] // 10)):
        data = load_npz(npz_path(made, name, val))
        assert len(data["terminals"]) == episodes * steps
        # Each episode runs to the time limit: its last row, and only that one, is terminal.
        assert np.array_equal(
            np.flatnonzero(data["terminals"]) + 1, steps * np.arange(1, episodes + 1)
        )
        assert [len(ep["terminals"]) for ep in npz_episodes(npz_path(made, name, val))] == [
            steps
        ] * episodes


@pytest.mark.parametrize("name", [NAVIGATE, STITCH])
def test_validation_split_is_separate_data(made, name):
    train = npz_episodes(npz_path(made, name))
    val = npz_episodes(npz_path(made, name, val=True))
    assert len(val) == EPISODES[name] // 10 >= 1
    for v in val:
        for t in train:
            assert not np.array_equal(v["observations"], t["observations"])
            assert not np.array_equal(v["actions"], t["actions"])
    info = dataset_info(open_dataset(made[name]))
    assert (info["episodes"], info["val_episodes"]) == (EPISODES[name], EPISODES[name] // 10)


def test_stitch_goals_are_four_bfs_steps_from_the_start(made):
    recipe = get_recipe(STITCH)
    env = gymnasium.make(recipe.env_id)
    maze = env.unwrapped.maze_map
    env.close()
    # The rollouts are the ones written (same seed), so their sampled cells are the data's.
    runs = rollouts(recipe, EPISODES[STITCH] + EPISODES[STITCH] // 10, seed=7)
    episodes = npz_episodes(npz_path(made, STITCH)) + npz_episodes(npz_path(made, STITCH, True))
    assert len(runs) == len(episodes)
    for run, ep in zip(runs, episodes, strict=True):
        assert np.array_equal(run.rows["observations"], ep["observations"])
        assert len(bfs_path(maze, run.init_ij, run.goal_ij)) - 1 == 4
        # In the data: the episode starts in the start cell and ends in the goal cell.
        assert xy_to_ij(ep["observations"][0]) == run.init_ij
        assert xy_to_ij(ep["observations"][-1]) == run.goal_ij


def xy_to_ij(xy):
    """OGBench's maze cell of a position (maze_unit 4, offsets 4)."""
    return int((xy[1] + 4 + 2) / 4), int((xy[0] + 4 + 2) / 4)


def test_navigate_behaviour_reaches_goals():
    recipe = get_recipe(NAVIGATE)
    env = gymnasium.make(recipe.env_id)
    maze = env.unwrapped.maze_map
    env.close()
    for run in rollouts(recipe, 3, seed=1):
        assert run.successes.sum() >= 3  # a new goal after each success, several per episode
        cells = [xy_to_ij(o) for o in run.rows["observations"]]
        goal_cells = [xy_to_ij(g) for g in run.goals]
        distance = np.array(
            [len(bfs_path(maze, c, g)) - 1 for c, g in zip(cells, goal_cells, strict=True)]
        )
        same_goal = np.array([a == b for a, b in zip(goal_cells[:-1], goal_cells[1:], strict=True)])
        change = np.diff(distance)[same_goal]
        # Towards the goal: far more cell changes closer to it than away from it.
        assert (change < 0).sum() > 5 * max(1, (change > 0).sum())
        # The actions are the direction to the goal's subgoal plus N(0, 0.5) noise, clipped.
        actions = run.rows["actions"]
        assert np.abs(actions).max() <= 1.0
        assert 0.2 < np.mean(np.abs(actions) == 1.0) < 0.9  # the noise often saturates


def script_loop(env_name, dataset_type, num_episodes, max_episode_steps, noise, seed):
    """generate_locomaze.py's main() for point mazes, transcribed (the point agent's actor is
    `ob[-2:]`), with the one addition of seeding. Returns (train_dataset, val_dataset)."""
    np.random.seed(seed)
    env = gymnasium.make(env_name, terminate_at_goal=False, max_episode_steps=max_episode_steps)
    env.action_space.seed(seed)

    def actor_fn(ob, temperature):
        return ob[-2:]

    all_cells = []
    vertex_cells = []
    maze_map = env.unwrapped.maze_map
    for i in range(maze_map.shape[0]):
        for j in range(maze_map.shape[1]):
            if maze_map[i, j] == 0:
                all_cells.append((i, j))
                if (
                    maze_map[i - 1, j] == 0
                    and maze_map[i + 1, j] == 0
                    and maze_map[i, j - 1] == 1
                    and maze_map[i, j + 1] == 1
                ):
                    continue
                if (
                    maze_map[i, j - 1] == 0
                    and maze_map[i, j + 1] == 0
                    and maze_map[i - 1, j] == 1
                    and maze_map[i + 1, j] == 1
                ):
                    continue
                vertex_cells.append((i, j))

    dataset = defaultdict(list)
    total_train_steps = 0
    num_train_episodes = num_episodes
    num_val_episodes = num_episodes // 10
    for ep_idx in range(num_train_episodes + num_val_episodes):
        if dataset_type == "navigate":
            init_ij = all_cells[np.random.randint(len(all_cells))]
            goal_ij = vertex_cells[np.random.randint(len(vertex_cells))]
        else:
            init_ij = all_cells[np.random.randint(len(all_cells))]
            adj_cells = []
            adj_steps = 4
            bfs_map = maze_map.copy()
            for i in range(bfs_map.shape[0]):
                for j in range(bfs_map.shape[1]):
                    bfs_map[i][j] = -1
            bfs_map[init_ij[0], init_ij[1]] = 0
            queue = [init_ij]
            while len(queue) > 0:
                i, j = queue.pop(0)
                for di, dj in [(-1, 0), (0, -1), (1, 0), (0, 1)]:
                    ni, nj = i + di, j + dj
                    if (
                        0 <= ni < bfs_map.shape[0]
                        and 0 <= nj < bfs_map.shape[1]
                        and maze_map[ni, nj] == 0
                        and bfs_map[ni, nj] == -1
                    ):
                        bfs_map[ni][nj] = bfs_map[i][j] + 1
                        queue.append((ni, nj))
                        if bfs_map[ni][nj] == adj_steps:
                            adj_cells.append((ni, nj))
            goal_ij = (
                adj_cells[np.random.randint(len(adj_cells))] if len(adj_cells) > 0 else init_ij
            )

        ob, _ = env.reset(
            seed=seed if ep_idx == 0 else None,
            options=dict(task_info=dict(init_ij=init_ij, goal_ij=goal_ij)),
        )
        done = False
        step = 0
        while not done:
            subgoal_xy, _ = env.unwrapped.get_oracle_subgoal(
                env.unwrapped.get_xy(), env.unwrapped.cur_goal_xy
            )
            subgoal_dir = subgoal_xy - env.unwrapped.get_xy()
            subgoal_dir = subgoal_dir / (np.linalg.norm(subgoal_dir) + 1e-6)
            agent_ob = env.unwrapped.get_ob(ob_type="states")
            agent_ob = np.concatenate([agent_ob[2:], subgoal_dir])
            action = actor_fn(agent_ob, temperature=0)
            action = action + np.random.normal(0, noise, action.shape)
            action = np.clip(action, -1, 1)

            next_ob, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            success = info["success"]
            if success and dataset_type == "navigate":
                goal_ij = vertex_cells[np.random.randint(len(vertex_cells))]
                env.unwrapped.set_goal(goal_ij)

            dataset["observations"].append(ob)
            dataset["actions"].append(action)
            dataset["terminals"].append(done)
            dataset["qpos"].append(info["prev_qpos"])
            dataset["qvel"].append(info["prev_qvel"])
            ob = next_ob
            step += 1
        if ep_idx < num_train_episodes:
            total_train_steps += step
    env.close()

    train_dataset, val_dataset = {}, {}
    for k, v in dataset.items():
        if "observations" in k and v[0].dtype == np.uint8:
            dtype = np.uint8
        elif k == "terminals":
            dtype = bool
        else:
            dtype = np.float32
        train_dataset[k] = np.array(v[:total_train_steps], dtype=dtype)
        val_dataset[k] = np.array(v[total_train_steps:], dtype=dtype)
    return train_dataset, val_dataset


@pytest.mark.parametrize("name", [NAVIGATE, STITCH])
def test_files_are_what_the_script_writes(made, name):
    r = get_recipe(name)
    expected = script_loop(
        r.env_id, r.dataset_type, EPISODES[name], r.max_episode_steps, r.noise, seed=7
    )
    for val, want in zip((False, True), expected, strict=True):
        got = load_npz(npz_path(made, name, val))
        assert list(got) == list(want) == list(NPZ_KEYS)
        for k in NPZ_KEYS:
            assert got[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_ogbench_loader_reads_the_files(made):
    train_path = npz_path(made, NAVIGATE)
    rows = EPISODES[NAVIGATE] * 1001
    data = ogbench.utils.load_dataset(str(train_path))
    assert set(data) == {"observations", "actions", "terminals", "next_observations"}
    for k in ("observations", "actions", "next_observations"):
        assert data[k].shape == (rows - EPISODES[NAVIGATE], 2) and data[k].dtype == np.float32
    assert data["terminals"].sum() == EPISODES[NAVIGATE]
    compact = ogbench.utils.load_dataset(str(train_path), compact_dataset=True, add_info=True)
    assert set(compact) == {"observations", "actions", "terminals", "valids", "qpos", "qvel"}
    assert compact["observations"].shape == (rows, 2) and compact["valids"].sum() == rows - 10
    # make_env_and_datasets finds the -val file beside the train file and makes the env.
    env, train, val = ogbench.make_env_and_datasets(NAVIGATE, dataset_path=str(train_path))
    assert env.spec.id == "pointmaze-medium-v0"
    assert len(train["observations"]) == rows - 10 and len(val["observations"]) == 1000
    env.close()


def test_minari_copy_loads_for_training(made):
    dataset = open_dataset(made[NAVIGATE])
    assert dataset.total_episodes == EPISODES[NAVIGATE]
    assert dataset.env_spec.id == "pointmaze-medium-v0"  # OGBench's id, registered by ogbench
    assert dataset.env_spec.kwargs["terminate_at_goal"] is False
    assert dataset.env_spec.max_episode_steps == 1001
    env = dataset.recover_environment(eval_env=True)  # OGBench's evaluation env: its defaults
    assert (env.spec.id, env.spec.max_episode_steps, env.unwrapped._terminate_at_goal) == (
        "pointmaze-medium-v0",
        1000,
        True,
    )
    env.close()
    info = dataset_info(dataset)
    assert (info["dataset_name"], info["env_id"], info["seed"]) == (
        NAVIGATE,
        "pointmaze-medium-v0",
        7,
    )
    assert info["ogbench_version"] == ogbench_version()
    seqs = load_sequences(made[NAVIGATE], seq_len=50)
    assert seqs.observations.shape[2:] == (2,) and seqs.actions.shape[2:] == (2,)
    assert seqs.mask.sum() == EPISODES[NAVIGATE] * 1000  # 1001 rows: 1000 transitions each
    first = npz_episodes(npz_path(made, NAVIGATE))[0]
    episode = next(iter(dataset.iterate_episodes()))
    np.testing.assert_array_equal(episode.observations, first["observations"])
    np.testing.assert_array_equal(episode.actions, first["actions"][:-1])


def ogbench_version():
    from importlib.metadata import version

    return version("ogbench")


def test_same_seed_same_data_other_seed_other_data(made, tmp_path):
    again = collect_ogbench(STITCH, tmp_path / "a", seed=7, episodes=20, progress=False)
    other = collect_ogbench(STITCH, tmp_path / "b", seed=8, episodes=20, progress=False)
    want = load_npz(npz_path(made, STITCH))
    assert np.array_equal(load_npz(again)["observations"], want["observations"])
    assert not np.array_equal(load_npz(other)["observations"], want["observations"])


def test_refuses_busy_out_dir_and_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        collect_ogbench(STITCH, busy, episodes=2, progress=False)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        collect_ogbench_dataset(STITCH, busy, episodes=2, progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ogbench_recipe, "to_minari", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_ogbench_dataset(STITCH, tmp_path / "cut", episodes=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "st"
    argv = ["collect", f"ogbench/{STITCH}", "--out", str(out), "--episodes", "10", "--seed", "3"]
    assert cli_main([*argv, "--quiet"]) == 0
    assert sorted(p.name for p in (out / NPZ_DIR).iterdir()) == [
        f"{STITCH}-val.npz",
        f"{STITCH}.json",
        f"{STITCH}.npz",
    ]
    assert open_dataset(out).total_episodes == 10
    assert "10 + 1 (validation) episodes" in capsys.readouterr().out

    assert cli_main(["collect", "ogbench/pointmaze-umaze-v0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ogbench/pointmaze-giant-stitch-v0" in err
    assert cli_main(["collect", f"ogbench/{STITCH}", "--noise", "0.1"]) == 2
    assert cli_main(["collect", "pendulum", "--out", str(tmp_path / "y")]) == 2  # no --episodes
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
