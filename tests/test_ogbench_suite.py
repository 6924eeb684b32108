"""OGBench's evaluation: its tasks' reset and success signal, the tuning tasks, and the
lockstep evaluator against one episode at a time, on a tiny bundle trained on a tiny
OGBench dataset made by its recipe."""

import json

import gymnasium as gym
import numpy as np
import pytest

from service.cli import main as cli_main
from tests.conftest import TINY
from training.analysis.ogbench_suite import (
    OFFICIAL_SEED,
    PUBLISHED,
    TASKS,
    Start,
    check_tuning_seeds,
    episode_starts,
    official_tasks,
    reach_starts,
    run_lockstep,
    tuning_tasks,
)
from training.config import dataset_config, parse_config
from training.data.envs import Shift, ShiftedDrive, bfs_path, make_env
from training.data.ogbench_recipe import collect_ogbench_dataset
from training.errors import UsageError
from training.learning.checkpoint import restore_bundle
from training.learning.loop import train

ENV = "pointmaze-medium-v0"
DATASET = "pointmaze-medium-navigate-v0"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = collect_ogbench_dataset(
        DATASET, tmp_path_factory.mktemp("og") / "medium", episodes=2, progress=False
    )
    assert dataset_config(data).env == ENV  # the dataset's own environment
    value = {"goal_dims": [0, 1], "goal_sigma": 2.0, "goal_weights": "least_squares"}  # as packaged
    raw = {**TINY, "env": ENV, "value": value}
    return train(
        parse_config(raw), data, tmp_path_factory.mktemp("runs") / "og", progress=False
    ).run_dir


@pytest.fixture(scope="module")
def bundle(run_dir):
    return restore_bundle(run_dir)


def planning(bundle, planner):
    return bundle.config.planning.model_copy(update={"planner": planner})


def test_official_tasks_reset_where_ogbench_says():
    env = gym.make(ENV)
    infos = env.unwrapped.task_infos
    starts = episode_starts(official_tasks(), 2, seed=3)
    assert [(s.task, s.seed) for s in starts] == [(t, 3 + k) for t in TASKS for k in range(2)]
    for start in starts[::2]:
        obs, info = env.reset(seed=start.seed, options=start.options)
        task = infos[start.task - 1]
        # OGBench adds noise to both (and a few random steps): within half a 4-unit cell
        assert np.linalg.norm(info["goal"] - np.asarray(task["goal_xy"])) < 2.0
        assert np.linalg.norm(obs - np.asarray(task["init_xy"])) < 2.0
    assert env.spec.max_episode_steps == 1000  # OGBench's episode limit
    env.close()


@pytest.mark.parametrize("env_id", ["pointmaze-medium-v0", "pointmaze-large-v0",
                                    "pointmaze-giant-v0"])  # fmt: skip
def test_tuning_tasks_touch_no_cell_of_ogbench_s_tasks(env_id):
    maze = gym.make(env_id).unwrapped
    official = [(tuple(t["init_ij"]), tuple(t["goal_ij"])) for t in maze.task_infos]
    cells = {cell for pair in official for cell in pair}
    tasks = tuning_tasks(env_id, seed=1)
    assert tasks == tuning_tasks(env_id, seed=1) != tuning_tasks(env_id, seed=2)
    pairs = {(t["task_info"]["init_ij"], t["task_info"]["goal_ij"]) for t in tasks.values()}
    assert len(pairs) == len(TASKS)
    lengths = []
    for task, (init, goal) in zip(TASKS, official, strict=True):
        info = tasks[task]["task_info"]
        assert info["init_ij"] not in cells and info["goal_ij"] not in cells
        mine = len(bfs_path(maze.maze_map.tolist(), info["init_ij"], info["goal_ij"]))
        lengths.append((mine, len(bfs_path(maze.maze_map.tolist(), init, goal))))
    # As long as OGBench's where the maze has such a pair apart from its cells, else shorter.
    assert all(mine <= theirs for mine, theirs in lengths)
    assert any(mine == theirs for mine, theirs in lengths)


def test_tuning_never_takes_the_reported_episodes_seeds(run_dir, capsys):
    starts = episode_starts(tuning_tasks(ENV, 1), 3, seed=OFFICIAL_SEED - 2)
    with pytest.raises(UsageError, match="reset seed 1000"):
        check_tuning_seeds(starts)
    check_tuning_seeds(episode_starts(tuning_tasks(ENV, 1), 3, seed=1))
    argv = ["eval", str(run_dir), "--suite", "ogbench-tuning", "--seed", "999", "--quiet"]
    assert cli_main([*argv, "--episodes", "2", "--max-steps", "2"]) == 2
    assert "the reported evaluations'" in capsys.readouterr().err


@pytest.mark.slow
def test_an_episode_that_reaches_its_goal_succeeds_and_ends(bundle):
    """OGBench's success signal: starting on the goal ends the episode at once, a success;
    a far goal within three steps is not reached."""
    at_goal = Start(1, {"task_info": {"init_ij": (6, 6), "goal_ij": (6, 6)}}, seed=0)
    far = Start(1, {"task_id": 1}, seed=0)
    done, missed = run_lockstep(bundle, planning(bundle, "random_shooting"), [at_goal, far], 3)
    assert (done.success, done.steps) == (True, 1)
    assert (missed.success, missed.steps) == (False, 3) and missed.final_distance > 10.0


@pytest.mark.parametrize("planner", ["random_shooting", "online_adaptation"])
@pytest.mark.slow
def test_lockstep_equals_one_episode_at_a_time(bundle, planner):
    starts = episode_starts(official_tasks(), 1, seed=5)[:3]
    config = planning(bundle, planner)
    together = run_lockstep(bundle, config, starts, max_steps=12)
    alone = [run_lockstep(bundle, config, [s], max_steps=12)[0] for s in starts]
    for a, b in zip(together, alone, strict=True):
        assert (a.task, a.seed, a.success, a.steps) == (b.task, b.seed, b.success, b.steps)
        assert a.final_distance == pytest.approx(b.final_distance, abs=1e-3)
        assert a.value_gain == pytest.approx(b.value_gain, rel=1e-3, abs=1e-4)
    # Different episodes went different ways: the rows were not mixed up.
    assert len({round(e.final_distance, 3) for e in together}) == 3


@pytest.mark.slow
def test_eval_suite_writes_the_table_with_the_published_baselines(run_dir, tmp_path, capsys):
    out = tmp_path / "suite"
    argv = ["eval", str(run_dir), "--suite", "ogbench", "--planner", "random_shooting"]
    argv += ["--episodes", "1", "--max-steps", "4", "--batch", "5", "--out", str(out), "--quiet"]
    assert cli_main(argv) == 0
    record = json.loads((out / "ogbench.json").read_text())
    assert (record["env"], record["dataset"], record["tasks"]) == (ENV, DATASET, "ogbench")
    # By default OGBench's tasks run on reset seeds that tuning never takes, and say so.
    settings = record["provenance"]["settings"]
    assert settings["reset_seeds"] == [OFFICIAL_SEED] * len(TASKS)  # one episode a task
    assert settings["max_steps"] == 4 and settings["planners"] == ["random_shooting"]
    (result,) = record["results"]
    assert [e["task"] for e in result["episodes"]] == list(TASKS)
    assert result["summary"]["episodes"] == 5 and set(result["summary"]["tasks"]) == {
        str(t) for t in TASKS
    }
    table = (out / "ogbench.md").read_text()
    assert all(f"{method} (published)" in table for method in PUBLISHED[DATASET])
    assert (out / "ogbench.png").stat().st_size > 0
    assert "random_shooting" in capsys.readouterr().out
    # The same through a subgoal graph over 6 states of the data, on the tuning tasks.
    argv[3] = "ogbench-tuning"
    assert cli_main([*argv, "--subgoals", "6", "--edge-steps", "40"]) == 0
    record = json.loads((out / "ogbench.json").read_text())
    assert (record["tasks"], record["subgoals"]["nodes"]) == ("tuning", 6)
    assert record["results"][0]["label"] == "random_shooting + subgoals (value)"
    assert "published" not in (out / "ogbench.md").read_text()
    # And through a graph whose edges the data's trajectories give.
    assert (
        cli_main([*argv, "--subgoals", "6", "--edge-steps", "40", "--subgoal-edges", "data"]) == 0
    )
    record = json.loads((out / "ogbench.json").read_text())
    assert record["subgoals"]["edges"] == "data"
    assert record["results"][0]["label"] == "random_shooting + subgoals (data)"


def test_the_suite_refuses_a_bundle_of_another_environment(trained, capsys):
    argv = ["eval", str(trained.run_dir), "--suite", "ogbench", "--episodes", "1"]
    assert cli_main(argv) == 2
    assert "has no OGBench tasks" in capsys.readouterr().err


@pytest.mark.slow
def test_drive_runs_an_ogbench_task_through_the_service(run_dir):
    """`worldplan drive --task-id K`: OGBench's task K, its goal the session's task, planned
    with the deployment's planner defaults (WORLDPLAN_PLANNING) over the bundle's."""
    import httpx

    from service.clients.drive import run_drive
    from service.clients.local import running_server
    from service.settings import Settings

    imagined = {"planner": "imagination", "imagination_steps": 3, "imagination_value": False}
    settings = Settings(model_dir=run_dir, batch_sizes=(1,), max_batch=1, sample_counts=(8,),
                        warm_up=False, planning=imagined)  # fmt: skip
    with running_server(settings) as (url, _):
        defaults = httpx.get(f"{url}/model").json()["planner_defaults"]
        (result,) = run_drive(url, None, 1, max_steps=3, task_id=3)
        sid = httpx.post(f"{url}/sessions", json={}).json()["session_id"]
        act = httpx.post(f"{url}/act", json={"session_id": sid, "observation": [1.0, 1.0]})
    assert {key: defaults[key] for key in imagined} == imagined
    assert (result.steps, result.success) == (3, False) and len(result.latency_ms) == 3
    assert act.json()["planner"] == "imagination"


def test_reach_starts_are_cells_the_asked_bfs_steps_apart():
    env = gym.make(ENV).unwrapped
    maze = env.maze_map.tolist()
    for distance in (1, 2):
        starts = reach_starts(ENV, distance, 12, seed=3)
        assert len(starts) == 12 and len({s.seed for s in starts}) == 12
        for start in starts:
            info = start.options["task_info"]
            assert len(bfs_path(maze, info["init_ij"], info["goal_ij"])) - 1 == distance
    assert reach_starts(ENV, 2, 12, seed=3) == starts  # the same draw again


@pytest.mark.slow
def test_eval_reach_reports_success_at_each_distance(run_dir, tmp_path):
    out = tmp_path / "reach"
    argv = ["eval", str(run_dir), "--suite", "ogbench-reach", "--episodes", "2",
            "--planner", "random_shooting", "--out", str(out), "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0
    record = json.loads((out / "reach.json").read_text())
    rows = record["success"]["random_shooting"]
    assert set(rows) == {"1", "2"} and all(r["episodes"] == 2 for r in rows.values())
    assert "2 cell(s) away" in (out / "reach.md").read_text()
    n_samples = record["planning"]["random_shooting"]["planning"]["n_samples"]
    assert f"| random_shooting | {n_samples} |" in (out / "reach.md").read_text()


@pytest.mark.slow
def test_the_service_aims_goal_tasks_through_the_subgoal_graph_saved_with_the_bundle(
    run_dir, tmp_path
):
    import shutil

    from service.clients.local import running_server
    from service.engine import Engine
    from service.settings import Settings
    from training.planning.subgoals import AIM_REACH, SUBGOALS_FILE, goal_weights

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(run_dir, bundle_dir)
    argv = ["subgoals", str(bundle_dir), "--nodes", "24", "--edge-steps", "40", "--lookahead", "8"]
    assert cli_main(argv) == 0
    engine = Engine.restore(bundle_dir)
    graph, lookahead = engine.subgoals
    assert (len(graph.positions), graph.max_edge_steps, lookahead) == (24, 40, 8.0)
    # A goal at one node, the agent at the node farthest from it along the data's paths.
    goal = graph.positions[0]
    remaining = engine.route(goal).remaining
    far = int(np.argmax(np.where(np.isfinite(remaining), remaining, -1)))
    assert remaining[far] > lookahead
    task, weights = engine.task_weights({"kind": "goal", "goal": goal.tolist()})
    aimed = engine.aim(task, weights, graph.observations[far])
    # The aim is a point of the data within reach of the agent, not the goal.
    reach = AIM_REACH * engine.model.config.value.goal_sigma
    near = np.linalg.norm(graph.trajectory - graph.positions[far], axis=1) <= reach
    candidates = goal_weights(engine.model, engine.params, graph.trajectory[near])
    assert np.isclose(candidates, aimed, atol=1e-5).all(axis=1).any()
    assert not np.allclose(aimed, weights, atol=1e-5)
    # At the goal, the goal's own weights; a task that is not a goal is never redirected.
    assert np.array_equal(engine.aim(task, weights, graph.observations[0]), weights)
    other = {"kind": "reward_weights", "weights": weights.tolist()}
    assert np.array_equal(engine.aim(other, weights, graph.observations[far]), weights)
    # The bundle exported for serving keeps the graph, and /model says so.
    assert cli_main(["export", str(bundle_dir), str(tmp_path / "served")]) == 0
    assert (tmp_path / "served" / SUBGOALS_FILE).exists()
    settings = Settings(model_dir=tmp_path / "served", batch_sizes=(1,), max_batch=1,
                        sample_counts=(8,), warm_up=False)  # fmt: skip
    with running_server(settings) as (url, _):
        import httpx

        info = httpx.get(f"{url}/model").json()
    assert info["subgoals"] == {"nodes": 24, "max_edge_steps": 40, "lookahead": 8.0}


@pytest.mark.parametrize(
    ("items", "first", "second"),
    [
        ([], [0.2, 0.0], [0.2, 0.0]),
        (["rotate=90"], [0.0, 0.2], [0.0, 0.2]),  # the robot turns what it is told by 90°
        (["gain=0.5"], [0.1, 0.0], [0.1, 0.0]),
        (["delay=1"], [0.0, 0.0], [0.2, 0.0]),  # a step late: it stands still first
        (["bias=-1,0.5"], [0.0, 0.1], [0.0, 0.1]),
    ],
)
def test_a_shifted_drive_moves_the_point_as_the_shift_says(items, first, second):
    env = ShiftedDrive(make_env(ENV), Shift.parse(items))
    env.reset(seed=0)
    moves = []
    for _ in range(2):
        before = env.unwrapped.get_xy().copy()
        env.step(np.array([1.0, 0.0], np.float32))  # what the planner asked for
        moves.append(env.unwrapped.get_xy() - before)
    np.testing.assert_allclose(moves, [first, second], atol=1e-3)
    env.close()


def test_bad_shifts_are_refused_by_name():
    assert Shift.parse(["rotate=45", "gain=0.4", "delay=2"]) == Shift(45.0, 0.4, (), 2)
    for items, message in (
        (["tilt=3"], "the keys are"),
        (["gain=x"], "takes numbers"),
        (["delay=1.5"], "whole number"),
        (["rotate=1,2"], "one number"),
    ):
        with pytest.raises(UsageError, match=message):
            Shift.parse(items)


def test_eval_runs_ogbench_s_tasks_with_a_shifted_drive(run_dir, tmp_path, capsys):
    out = tmp_path / "shifted"
    argv = ["eval", str(run_dir), "--suite", "ogbench", "--planner", "random_shooting",
            "--episodes", "1", "--max-steps", "2", "--batch", "5", "--quiet",
            "--shift", "rotate=90", "--shift", "delay=1", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    record = json.loads((out / "ogbench.json").read_text())
    shift = {"rotate_deg": 90.0, "gain": 1.0, "bias": [], "delay": 1}
    assert record["shift"] == record["provenance"]["settings"]["shift"] == shift
    assert cli_main(["eval", str(run_dir), "--shift", "rotate=90", "--quiet"]) == 2
    assert "--shift runs with --suite ogbench" in capsys.readouterr().err
