"""Environments, behaviour policies and Minari datasets, on real environments and files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium_robotics.envs.maze.maps import MEDIUM_MAZE, U_MAZE

from training.data.datasets import (
    Sequences,
    collect,
    dataset_env_name,
    dataset_info,
    episode_observations,
    episode_seeds,
    episode_windows,
    load_sequences,
    open_dataset,
)
from training.data.envs import (
    ENVIRONMENTS,
    MazeWaypointPolicy,
    bfs_path,
    free_cells,
    get_env_spec,
    make_behaviour_policy,
    make_env,
    rare_cells,
)

MAPS = {"umaze": U_MAZE, "medium": MEDIUM_MAZE}


# ----- registry -----


def test_registry_lookup():
    spec = get_env_spec("pointmaze-umaze")
    assert (spec.gym_id, spec.kind, spec.obs_key) == ("PointMaze_UMaze-v3", "vector", "observation")
    assert get_env_spec("carracing").kind == "pixels"
    assert get_env_spec("pendulum").obs_key is None
    assert set(ENVIRONMENTS) == {"pointmaze-umaze", "pointmaze-medium", "pendulum", "carracing"}


def test_unknown_environment_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown environment 'nope'.*pointmaze-umaze"):
        get_env_spec("nope")
    with pytest.raises(ValueError, match="known environments"):
        make_env("nope")


# ----- maze geometry -----


@pytest.mark.parametrize("maze", MAPS.values(), ids=MAPS.keys())
def test_bfs_paths_are_valid_shortest_walks(maze):
    cells = free_cells(maze)
    assert all(maze[r][c] != 1 for r, c in cells)
    for start in cells:
        for goal in cells:
            path = bfs_path(maze, start, goal)
            assert path[0] == start and path[-1] == goal
            assert all(maze[r][c] != 1 for r, c in path)
            steps = np.abs(np.diff(np.array(path), axis=0)).sum(axis=1)
            assert np.all(steps == 1)
            assert len(set(path)) == len(path)
            assert len(path) - 1 >= abs(start[0] - goal[0]) + abs(start[1] - goal[1])


def test_bfs_path_rejects_walls():
    with pytest.raises(ValueError, match="not a free cell"):
        bfs_path(U_MAZE, (1, 1), (2, 1))


@pytest.mark.parametrize("maze", MAPS.values(), ids=MAPS.keys())
@pytest.mark.parametrize("skew", [0.05, 0.3, 0.5])
def test_rare_cells_are_the_free_cells_farthest_from_the_first(maze, skew):
    cells = free_cells(maze)
    rare = rare_cells(maze, skew)
    assert len(rare) == max(1, round(skew * len(cells)))
    assert len(set(rare)) == len(rare) and set(rare) <= set(cells)
    common = [cell for cell in cells if cell not in rare]
    distance = {cell: len(bfs_path(maze, cells[0], cell)) for cell in cells}
    assert min(distance[c] for c in rare) >= max(distance[c] for c in common)
    assert rare == rare_cells(maze, skew)  # deterministic


def test_rare_cells_edges():
    assert rare_cells(U_MAZE, 0.0) == []
    assert rare_cells(U_MAZE, 0.01) == [(3, 1)]  # the far tip of the U
    assert rare_cells(U_MAZE, 0.3) == [(3, 1), (3, 2)]
    with pytest.raises(ValueError, match="skew"):
        rare_cells(U_MAZE, 1.0)


# ----- behaviour policies -----


def _visited_cells(env, policy, steps):
    maze = env.unwrapped.maze
    obs, info = env.reset(seed=0, options=policy.reset_options())
    policy.reset(obs, info)
    visited, goals = set(), set()
    for _ in range(steps):
        obs, *_ = env.step(policy.act(obs))
        visited.add(tuple(int(v) for v in maze.cell_xy_to_rowcol(obs["observation"][:2])))
        goals.add(policy.goal)
    return visited, goals


def test_pointmaze_policy_wanders_through_the_maze():
    env = make_env("pointmaze-medium")
    policy = make_behaviour_policy("pointmaze-medium", env, np.random.default_rng(0))
    visited, goals = _visited_cells(env, policy, 300)
    assert len(visited) >= 8
    assert len(goals) >= 3  # it reached goals and moved on


def test_pointmaze_skew_keeps_resets_off_and_goals_mostly_off_rare_cells():
    env = make_env("pointmaze-medium")
    policy = make_behaviour_policy("pointmaze-medium", env, np.random.default_rng(1), skew=0.3)
    assert isinstance(policy, MazeWaypointPolicy)
    rare = set(rare_cells(env.unwrapped.maze.maze_map, 0.3))
    assert set(policy.rare) == rare
    rare_goals = 0
    for _ in range(2000):
        options = policy.reset_options()
        assert tuple(options["reset_cell"]) not in rare
        rare_goals += tuple(options["goal_cell"]) in rare
    assert 0 < rare_goals < 0.1 * 2000  # rarely, not never (rare_goal_prob = 0.05)
    _, goals = _visited_cells(env, policy, 600)
    assert len(goals) >= 3


def _rare_goal_fraction(rare_goal_prob: float, draws: int = 4000) -> float:
    env = make_env("pointmaze-medium")
    policy = make_behaviour_policy(
        "pointmaze-medium", env, np.random.default_rng(2), skew=0.3, rare_goal_prob=rare_goal_prob
    )
    rare = set(policy.rare)
    return np.mean([tuple(policy.reset_options()["goal_cell"]) in rare for _ in range(draws)])


def test_rare_goal_prob_sets_how_often_behaviour_goals_are_rare():
    assert _rare_goal_fraction(0.0) == 0.0
    assert 0.0 < _rare_goal_fraction(0.01) < 0.02
    assert 0.2 < _rare_goal_fraction(0.25) < 0.3
    with pytest.raises(ValueError, match="rare_goal_prob"):
        _rare_goal_fraction(1.5)


def _wall_fraction(env, policy, steps):
    """Fraction of steps the point spends in its cell's outer band on a side with a wall."""
    maze = env.unwrapped.maze
    obs, info = env.reset(seed=0, options=policy.reset_options())
    policy.reset(obs, info)
    near_wall = 0
    for _ in range(steps):
        obs, *_ = env.step(policy.act(obs))
        pos = obs["observation"][:2]
        row, col = (int(v) for v in maze.cell_xy_to_rowcol(pos))
        dx, dy = (pos - maze.cell_rowcol_to_xy(np.array([row, col]))) / maze.maze_size_scaling
        # Rows grow downwards while y grows upwards.
        sides = [(0, int(np.sign(dx))) if abs(dx) > 0.3 else None,
                 (-int(np.sign(dy)), 0) if abs(dy) > 0.3 else None]  # fmt: skip
        near_wall += any(s and maze.maze_map[row + s[0]][col + s[1]] == 1 for s in sides)
    return near_wall / steps


def test_waypoint_jitter_moves_waypoints_off_centre_and_the_data_to_cell_edges():
    env = make_env("pointmaze-medium")
    jittered = make_behaviour_policy(
        "pointmaze-medium", env, np.random.default_rng(0), waypoint_jitter=0.4
    )
    centred = make_behaviour_policy("pointmaze-medium", env, np.random.default_rng(0))
    jittered.reset(*env.reset(seed=0, options=jittered.reset_options()))
    offsets = np.array([jittered._waypoint(c) - jittered._centre(c) for c in jittered._path[1:]])
    assert np.all(np.abs(offsets) <= 0.4) and np.all(np.abs(offsets).max(axis=1) > 0.0)
    assert _wall_fraction(env, jittered, 1500) > _wall_fraction(env, centred, 1500) + 0.05


@pytest.mark.parametrize(
    "option", [{"skew": 0.2}, {"noise": 0.5}, {"waypoint_jitter": 0.3}, {"rare_goal_prob": 0.01}]
)
def test_maze_options_are_pointmaze_only(option):
    env = make_env("pendulum")
    with pytest.raises(ValueError, match=f"{next(iter(option))}: only for the pointmaze"):
        make_behaviour_policy("pendulum", env, np.random.default_rng(0), **option)


def test_pendulums_swing_ups_reach_the_top_and_are_recorded(tmp_path):
    """A swing-up episode (noiseless) ends upright and scores far above random torques; a
    collected dataset records the fraction and its noise; noise without swing-ups, or a
    fraction outside [0, 1], is refused."""
    env = make_env("pendulum")
    returns = {}
    for fraction in (0.0, 1.0):
        noise = 0.0 if fraction else None
        policy = make_behaviour_policy(
            "pendulum", env, np.random.default_rng(0), noise=noise, swing_up=fraction
        )
        obs, info = env.reset(seed=4)
        policy.reset(obs, info)
        total = 0.0
        for _ in range(200):
            obs, reward, *_ = env.step(policy.act(obs))
            total += reward
        returns[fraction] = (total, obs[0])
    assert returns[1.0][1] > 0.99 and returns[1.0][0] > -400  # upright at the end
    assert returns[0.0][0] < returns[1.0][0] - 300
    with pytest.raises(ValueError, match="noise: only for the pointmaze"):
        make_behaviour_policy("pendulum", env, np.random.default_rng(0), noise=0.3)
    with pytest.raises(ValueError, match="swing_up is a fraction"):
        make_behaviour_policy("pendulum", env, np.random.default_rng(0), swing_up=1.5)
    with pytest.raises(ValueError, match="swing_up: only for pendulum"):
        make_behaviour_policy("carracing", make_env("carracing"), np.random.default_rng(0),
                              swing_up=0.5)  # fmt: skip
    out = collect("pendulum", 2, tmp_path / "p", swing_up=0.5, max_episode_steps=5, progress=False)
    info = dataset_info(open_dataset(out))
    assert (info["swing_up"], info["noise"]) == (0.5, 0.5)


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_actions_stay_in_the_action_space(name):
    env = make_env(name, max_episode_steps=20)
    policy = make_behaviour_policy(name, env, np.random.default_rng(0))
    obs, info = env.reset(seed=3, options=policy.reset_options())
    policy.reset(obs, info)
    for _ in range(8 if name == "carracing" else 20):
        action = policy.act(obs)
        assert action.dtype == np.float32 and env.action_space.contains(action)
        obs, *_ = env.step(action)
        assert env.observation_space.contains(obs)
    if name == "carracing":
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert env.observation_space.shape == (64, 64, 3)
    env.close()


# ----- sequences (pure) -----


def test_episode_windows_pad_the_last_window():
    steps, seq_len = 7, 3
    obs = np.arange(steps + 1, dtype=np.float32)[:, None] + 1.0
    actions = np.arange(steps, dtype=np.float32)[:, None] + 1.0
    terms = np.zeros(steps, bool)
    terms[-1] = True
    win = episode_windows(obs, actions, actions[:, 0], terms, seq_len)
    assert win.observations.shape == (3, 4, 1) and win.actions.shape == (3, 3, 1)
    np.testing.assert_array_equal(
        win.observations[:, :, 0], [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 0, 0]]
    )
    np.testing.assert_array_equal(win.mask, [[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(win.dones, [[0, 0, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(win.rewards, [[1, 2, 3], [4, 5, 6], [7, 0, 0]])


def test_episode_observations_picks_the_key():
    obs = {"observation": np.ones((3, 4)), "desired_goal": np.zeros((3, 2))}
    assert episode_observations(obs).dtype == np.float32
    assert episode_observations(obs, "desired_goal").shape == (3, 2)
    with pytest.raises(ValueError, match="obs_key"):
        episode_observations(obs, None)
    with pytest.raises(ValueError, match="not a dict"):
        episode_observations(np.ones((3, 4)), "observation")


# ----- Minari datasets -----


def _check_sequences_match(dataset, seqs: Sequences, seq_len: int, obs_key):
    row = 0
    for episode in dataset.iterate_episodes():
        obs = episode_observations(episode.observations, obs_key)
        steps = len(episode)
        count = -(-steps // seq_len)
        for k in range(count):
            real = min(seq_len, steps - k * seq_len)
            lo = k * seq_len
            np.testing.assert_array_equal(
                seqs.observations[row, : real + 1], obs[lo : lo + real + 1]
            )
            np.testing.assert_array_equal(seqs.actions[row, :real], episode.actions[lo : lo + real])
            np.testing.assert_array_equal(
                seqs.rewards[row, :real], episode.rewards[lo : lo + real].astype(np.float32)
            )
            np.testing.assert_array_equal(
                seqs.dones[row, :real], episode.terminations[lo : lo + real].astype(np.float32)
            )
            assert seqs.mask[row].sum() == real and np.all(seqs.mask[row, :real] == 1)
            assert not seqs.observations[row, real + 1 :].any()
            assert not seqs.actions[row, real:].any() and not seqs.dones[row, real:].any()
            row += 1
    assert row == len(seqs)


def test_collect_open_load_round_trip(tmp_path):
    out = collect("pointmaze-umaze", 3, tmp_path / "umaze", max_episode_steps=40, progress=False)
    assert out == (tmp_path / "umaze").resolve()
    dataset = open_dataset(out)
    assert dataset.total_episodes == 3 and dataset.total_steps == 120
    assert dataset_env_name(dataset) == "pointmaze-umaze"
    assert dataset_info(dataset)["max_episode_steps"] == 40

    seqs = load_sequences(out, 16)
    assert seqs.observations.shape == (9, 17, 4) and seqs.observations.dtype == np.float32
    assert seqs.actions.shape == (9, 16, 2) and seqs.actions.dtype == np.float32
    assert seqs.rewards.shape == seqs.dones.shape == seqs.mask.shape == (9, 16)
    assert seqs.mask.sum() == 120 and not seqs.dones.any()  # continuing task: truncations only
    _check_sequences_match(dataset, seqs, 16, "observation")
    first = next(dataset.iterate_episodes())
    expected = first.observations["observation"][:17].astype(np.float32)
    np.testing.assert_array_equal(seqs.observations[0], expected)


def test_terminations_become_dones(tmp_path):
    out = collect(
        "pointmaze-umaze",
        3,
        tmp_path / "episodic",
        max_episode_steps=150,
        progress=False,
        env_kwargs={"continuing_task": False},
    )
    dataset = open_dataset(out)
    episodes = list(dataset.iterate_episodes())
    assert all(ep.terminations[-1] for ep in episodes)  # the behaviour goal is the env goal
    seqs = load_sequences(dataset, 16)
    assert seqs.dones.sum() == len(episodes)
    _check_sequences_match(dataset, seqs, 16, "observation")


def test_same_seed_same_dataset(tmp_path):
    def episodes(seed, name):
        out = collect(
            "pointmaze-umaze", 2, tmp_path / name, seed=seed, max_episode_steps=30, progress=False
        )
        return list(open_dataset(out).iterate_episodes())

    a, b, c = episodes(7, "a"), episodes(7, "b"), episodes(8, "c")
    for x, y in zip(a, b, strict=True):
        for key in ("observation", "desired_goal"):
            np.testing.assert_array_equal(x.observations[key], y.observations[key])
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.rewards, y.rewards)
    assert not np.array_equal(a[0].actions, c[0].actions)
    assert episode_seeds(7, 3) == episode_seeds(7, 3) != episode_seeds(8, 3)


def test_skewed_dataset_records_rare_cells_and_behaviour_options(tmp_path):
    out = collect(
        "pointmaze-medium", 1, tmp_path / "skew", skew=0.3, noise=0.3, waypoint_jitter=0.2,
        max_episode_steps=20, progress=False,
    )  # fmt: skip
    info = json.loads((out / "worldplan.json").read_text())
    assert info["skew"] == 0.3 and info["env"] == "pointmaze-medium"
    assert info["noise"] == 0.3 and info["waypoint_jitter"] == 0.2
    assert [tuple(c) for c in info["rare_cells"]] == rare_cells(MEDIUM_MAZE, 0.3)
    meta = next(iter(open_dataset(out).storage.get_episode_metadata([0])))
    assert tuple(meta["options"]["reset_cell"]) not in set(rare_cells(MEDIUM_MAZE, 0.3))


def test_collect_refuses_existing_dataset(tmp_path):
    out = collect("pendulum", 1, tmp_path / "pend", max_episode_steps=5, progress=False)
    with pytest.raises(FileExistsError, match="already holds a Minari dataset"):
        collect("pendulum", 1, out, max_episode_steps=5, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        collect("pendulum", 1, tmp_path / "busy", max_episode_steps=5, progress=False)
    (tmp_path / "empty").mkdir()
    assert open_dataset(
        collect("pendulum", 1, tmp_path / "empty", max_episode_steps=5, progress=False)
    )


def test_open_dataset_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError, match="no Minari dataset"):
        open_dataset(tmp_path / "absent")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no Minari dataset"):
        open_dataset(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="local Minari store"):
        open_dataset("worldplan/absent-v0")


def test_open_dataset_by_id_from_local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    collect(
        "pendulum",
        2,
        tmp_path / "store/worldplan/pendulum-v0",
        max_episode_steps=10,
        progress=False,
    )
    dataset = open_dataset("worldplan/pendulum-v0")
    assert dataset.total_episodes == 2 and dataset_env_name(dataset) == "pendulum"
    seqs = load_sequences("worldplan/pendulum-v0", 4, obs_key=None)
    assert seqs.observations.shape == (6, 5, 3) and seqs.mask.sum() == 20


def test_carracing_frames_round_trip_exactly(tmp_path):
    out = collect("carracing", 1, tmp_path / "car", max_episode_steps=10, progress=False)
    dataset = open_dataset(out)
    episode = next(dataset.iterate_episodes())
    assert episode.observations.shape == (11, 64, 64, 3) and episode.observations.dtype == np.uint8
    # Replaying the stored actions from the stored seed reproduces the stored frames bit for bit.
    env = make_env("carracing", max_episode_steps=10)
    seed = next(iter(dataset.storage.get_episode_metadata([0])))["seed"]
    frames = [env.reset(seed=seed)[0]] + [env.step(a)[0] for a in episode.actions]
    env.close()
    np.testing.assert_array_equal(np.stack(frames), episode.observations)
    seqs = load_sequences(out, 4)
    assert seqs.observations.shape == (3, 5, 64, 64, 3) and seqs.observations.dtype == np.uint8
    _check_sequences_match(dataset, seqs, 4, "auto")
