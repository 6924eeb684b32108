"""Any gymnasium environment, any Minari dataset: a dataset of MountainCarContinuous-v0
recorded with Minari's own DataCollector (no worldplan sidecar, as a new user would bring
it) trains with the generic config, serves, evaluates, compares and drives; an
environment of another observation shape is refused before its first step."""

import json
import warnings

import gymnasium as gym
import httpx
import minari
import numpy as np
import pytest

from service.cli import main as cli_main
from service.clients.local import running_server
from service.settings import Settings
from training.analysis.evaluate import mean_interval
from training.data.envs import check_observation_shape, make_env
from training.learning import checkpoint

ENV = "MountainCarContinuous-v0"


@pytest.fixture(scope="module")
def mountaincar_data(tmp_path_factory):
    """8 episodes of 100 steps of uniform random actions, in a Minari store of its own."""
    root = tmp_path_factory.mktemp("minari")
    env = gym.make(ENV, max_episode_steps=100)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        warnings.simplefilter("ignore", UserWarning)  # Minari's optional metadata
        collector = minari.DataCollector(env)
        collector.action_space.seed(0)
        for seed in range(8):
            collector.reset(seed=seed)
            done = False
            while not done:
                _, _, terminated, truncated, _ = collector.step(collector.action_space.sample())
                done = terminated or truncated
        collector.create_dataset(
            "mountaincar/random-v0",
            algorithm_name="uniform random actions",
            author="a newcomer",
            description="MountainCarContinuous-v0 with uniform random actions",
        )
        collector.close()
    return root / "mountaincar" / "random-v0"


@pytest.fixture(scope="module")
def mountaincar_run(mountaincar_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "mountaincar"
    argv = ["train", "--data", str(mountaincar_data), "--out", str(run), "--steps", "2"]
    assert cli_main([*argv, "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def served(mountaincar_run):
    settings = Settings(
        model_dir=mountaincar_run, batch_sizes=(1,), max_batch=1, sample_counts=(8,),
        warm_up=False,
    )  # fmt: skip
    with running_server(settings) as (url, _):
        yield url


@pytest.fixture
def no_stepping(monkeypatch):
    """Every environment step fails the test: a refusal must come before the first one."""

    def step(self, action):
        raise AssertionError("an environment was stepped")

    monkeypatch.setattr(gym.wrappers.TimeLimit, "step", step)


def one_error_line(err: str, *words: str) -> None:
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("worldplan: error: ")
    for word in words:
        assert word in line


@pytest.mark.slow
def test_a_dataset_made_elsewhere_trains_serves_and_evaluates(
    mountaincar_run, served, tmp_path, capsys
):
    bundle = checkpoint.restore_bundle(mountaincar_run)
    assert (bundle.metadata["env"], bundle.metadata["gym_id"]) == (ENV, ENV)
    assert bundle.config.env == ENV and bundle.metadata["dataset_info"] is None
    task = bundle.metadata["default_task"]
    assert task["kind"] == "reward_weights" and len(task["weights"]) == bundle.model.psi_dim

    info = httpx.get(f"{served}/model").json()
    assert info["env_id"] == ENV and info["observation_space"]["shape"] == [2]
    assert info["default_task"] == task

    # drive without --env: the environment the server names
    argv = ["drive", served, "--episodes", "1", "--max-steps", "3"]
    assert cli_main([*argv, "--planner", "random_shooting"]) == 0
    printed = capsys.readouterr().out
    assert "episode 0: return" in printed and "in 3 steps" in printed
    summary = json.loads(printed[printed.index("{") :])
    assert summary["episodes"] == 1 and summary["success_rate"] is None

    out = tmp_path / "eval"
    argv = ["eval", str(mountaincar_run), "--planner", "random_shooting", "--episodes", "2"]
    assert cli_main([*argv, "--max-steps", "20", "--out", str(out), "--quiet"]) == 0
    assert f"{ENV} planner" in capsys.readouterr().out
    record = json.loads((out / "eval.json").read_text())
    assert (record["env"], record["gym_id"], record["reset_seeds"]) == (ENV, ENV, [0, 1])
    assert record["task"] == task
    [result] = record["results"]
    assert result["label"] == "random_shooting"
    assert [(e["seed"], e["steps"]) for e in result["episodes"]] == [(0, 20), (1, 20)]
    summary = result["summary"]
    returns = [e["episode_return"] for e in result["episodes"]]
    assert summary["mean_return"] == pytest.approx(np.mean(returns))
    low, high = summary["return_interval"]
    assert low <= summary["mean_return"] <= high
    assert summary["success_rate"] is None and summary["interval"] is None  # none reported
    assert "Student t" in (out / "eval.md").read_text()


@pytest.mark.slow
def test_another_environments_observations_are_refused_before_stepping(
    mountaincar_run, served, tmp_path, capsys, no_stepping
):
    # A bundle that names Pendulum (3 observations) for a model of MountainCar's 2, as one
    # trained under pendulum's config before datasets were checked against it.
    bundle = checkpoint.restore_bundle(mountaincar_run)
    mislabelled = tmp_path / "mislabelled"
    with checkpoint.open_manager(mislabelled) as manager:
        metadata = {**bundle.metadata, "env": "pendulum", "gym_id": "Pendulum-v1"}
        checkpoint.save(manager, bundle.step, bundle.params, None, metadata)
        manager.wait_until_finished()
    quick = ["--episodes", "1", "--max-steps", "2", "--quiet"]
    for command in (["eval", "--planner", "controller"], ["compare"]):
        argv = [command[0], str(mislabelled), *command[1:], *quick]
        assert cli_main([*argv, "--out", str(tmp_path / command[0])]) == 2
        one_error_line(capsys.readouterr().err, "Pendulum-v1", "[3]", "[2]")
    assert cli_main(["drive", served, "--env", "Pendulum-v1", "--max-steps", "2"]) == 2
    one_error_line(capsys.readouterr().err, "Pendulum-v1", "[3]", "[2]")


def test_a_config_of_another_environment_is_refused(mountaincar_data, tmp_path, capsys):
    argv = ["train", "--config", "pointmaze-umaze", "--data", str(mountaincar_data)]
    assert cli_main([*argv, "--out", str(tmp_path / "run"), "--steps", "1", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, ENV, "pointmaze-umaze")
    assert checkpoint.latest_step(tmp_path / "run") is None


def test_the_observation_check_and_the_return_interval():
    with pytest.raises(ValueError, match=r"'Pendulum-v1' observes shape \[3\].* shape \[2\]"):
        check_observation_shape(make_env("Pendulum-v1"), "Pendulum-v1", (2,))
    assert check_observation_shape(make_env(ENV), ENV, (2,)) is None
    maze = make_env("pointmaze-umaze")  # dict observations: the array under "observation"
    assert check_observation_shape(maze, "pointmaze-umaze", (4,)) == "observation"
    # t(0.975, 2) = 4.3027: 2 ± 4.3027 / sqrt(3)
    low, high = mean_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)
    assert mean_interval([1.0]) is None
