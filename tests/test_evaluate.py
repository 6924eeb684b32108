"""Closed-loop evaluation and the ablation, on the tiny bundle with short episodes."""

import json

import numpy as np
import pytest

from service.cli import main as cli_main
from training.analysis.evaluate import (
    EpisodeRunner,
    ablate,
    evaluation_goals,
    rare_cells_of,
    repeat_goals,
    summarise_episodes,
    wilson_interval,
)
from training.analysis.tails import data_futures
from training.data.datasets import episode_observations, open_dataset
from training.data.envs import bfs_path, make_env
from training.learning.checkpoint import restore_bundle


def test_the_wilson_interval_holds_the_rate_even_at_zero_and_one():
    for successes, n in [(0, 100), (100, 100), (20, 20), (7, 10)]:
        low, high = wilson_interval(successes, n)
        assert 0.0 <= low <= successes / n <= high <= 1.0
    assert wilson_interval(100, 100)[1] == 1.0  # not 0.9999999999999999
    assert wilson_interval(0, 0) is None


@pytest.fixture(scope="module")
def bundle(trained):
    return restore_bundle(trained.run_dir)


@pytest.mark.slow
def test_goals_are_fixed_half_rare_and_start_away_from_the_goal(bundle):
    rare = rare_cells_of(bundle)
    assert rare == [(3, 1), (3, 2)]  # the far tip of the U, from the skewed dataset
    goals = evaluation_goals(bundle, 10, seed=4)
    assert goals == evaluation_goals(bundle, 10, seed=4)
    assert goals != evaluation_goals(bundle, 10, seed=5)
    assert sum(g.rare for g in goals) == 5
    maze = make_env("pointmaze-umaze").unwrapped.maze.maze_map
    for g in goals:
        assert (g.goal_cell in rare) == g.rare
        assert g.start_cell not in rare
        assert len(bfs_path(maze, g.start_cell, g.goal_cell)) > 2
    repeated = repeat_goals(goals[:2], 3)
    assert [g.goal_cell for g in repeated] == [goals[0].goal_cell] * 3 + [goals[1].goal_cell] * 3
    assert len({g.seed for g in repeated}) == 6


@pytest.mark.slow
def test_an_episode_runs_the_whole_decision_loop(bundle):
    planning = bundle.config.planning.model_copy(update={"planner": "online_adaptation"})
    runner = EpisodeRunner(bundle, planning, max_steps=12)
    spec = evaluation_goals(bundle, 1, seed=0)[0]
    first, again = runner.run(spec), runner.run(spec)
    assert first.steps == 12 and len(first.plan_ms) == 12
    assert len(first.objective) == planning.adaptation_steps + 1 and first.objective[0] == 0.0
    assert first.kl >= 0.0 and np.isfinite(first.value_gain)
    cell = make_env("pointmaze-umaze").unwrapped.maze.cell_xy_to_rowcol(np.array(first.goal))
    assert tuple(int(c) for c in cell) == spec.goal_cell
    assert first.plan_ms != again.plan_ms  # timed anew ...
    assert (first.objective, first.goal, first.success) == (
        again.objective,
        again.goal,
        again.success,
    )
    summary = summarise_episodes([first, again])
    assert summary["episodes"] == 2 and summary["success_rare"] is not None


@pytest.mark.slow
def test_eval_command_compares_planners_on_the_same_goals(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", str(trained.run_dir), "--goals", "2", "--max-steps", "6"]
    assert cli_main([*argv, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "`online_adaptation`" in printed and "`controller`" in printed
    record = json.loads((out / "eval.json").read_text())
    labels = ["controller", "random_shooting", "random_shooting_matched", "guided_diffusion",
              "online_adaptation", "online_adaptation_original", "imagination"]  # fmt: skip
    assert [r["label"] for r in record["results"]] == labels
    by_label = {r["label"]: r for r in record["results"]}
    # Random shooting given online adaptation's time takes at least its own samples.
    matched = by_label["random_shooting_matched"]["planning"]["n_samples"]
    assert matched >= by_label["random_shooting"]["planning"]["n_samples"]
    seed_rule = by_label["online_adaptation_original"]["planning"]
    assert (seed_rule["adaptation"], seed_rule["kl_estimator"]) == ("gradient", "proxy")
    goal_cells = [g["goal_cell"] for g in record["goals"]]
    for result in record["results"]:
        assert [e["goal_cell"] for e in result["episodes"]] == goal_cells
        low, high = result["summary"]["interval"]
        assert 0.0 <= low <= result["summary"]["success_rate"] <= high <= 1.0
    assert (out / "eval.md").read_text().count("\n") == 2 + len(labels)
    assert cli_main([*argv, "--planner", "teleport", "--out", str(out)]) == 2
    assert "unknown planner" in capsys.readouterr().err


def test_eval_can_run_only_the_rare_goals(trained, bundle, tmp_path):
    argv = ["eval", str(trained.run_dir), "--goals", "4", "--max-steps", "3", "--quiet"]
    out = tmp_path / "rare"
    assert cli_main([*argv, "--planner", "random_shooting", "--rare-only", "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    rare = [g.goal_cell for g in evaluation_goals(bundle, 4) if g.rare]
    assert [tuple(g["goal_cell"]) for g in record["goals"]] == rare
    assert all(e["rare"] for e in record["results"][0]["episodes"])


@pytest.mark.slow
def test_ablation_writes_table_json_and_plots(bundle, tmp_path):
    grid = {"kl_coef": [0.1, 5.0], "adaptation_steps": [2, 4], "rule": ["gradient/proxy"]}
    rows = ablate(bundle, 2, 0, tmp_path, grid, max_steps=5, progress=False)
    assert [(r["knob"], r["value"]) for r in rows] == [
        ("kl_coef", 0.1),
        ("kl_coef", 5.0),
        ("adaptation_steps", 2),
        ("adaptation_steps", 4),
        ("rule", "gradient/proxy"),
    ]
    assert len(rows[2]["summary"]["objective"]) == 3 and len(rows[3]["summary"]["objective"]) == 5
    assert rows[4]["summary"]["ess"] == 8.0  # the gradient rule weighs no samples
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"][0]["knob"] == "kl_coef"
    assert (tmp_path / "ablation.md").read_text().count("\n") == 7
    names = ("success.png", "objective.png", "value_gain.png", "cost.png", "success_vs_cost.png")
    for name in names:
        assert (tmp_path / name).stat().st_size > 5_000


def test_ablation_measures_the_defaults_once_for_every_knob(bundle, tmp_path):
    planning = bundle.config.planning
    grid = {"kl_coef": [planning.kl_coef, 5.0], "warm_start": [planning.warm_start]}
    rows = ablate(bundle, 2, 0, tmp_path, grid, max_steps=5, progress=False)
    assert rows[0]["summary"] is rows[2]["summary"]  # both rows are the defaults' one run
    assert rows[1]["summary"] is not rows[0]["summary"]


@pytest.mark.slow
def test_episodes_carry_delta_over_between_steps_only_with_warm_start(bundle):
    spec = evaluation_goals(bundle, 1, seed=0)[0]
    base = bundle.config.planning.model_copy(
        update={"planner": "online_adaptation", "support_guard": False, "adaptation_steps": 3}
    )
    warm = EpisodeRunner(bundle, base, max_steps=4).run(spec)
    cold = EpisodeRunner(bundle, base.model_copy(update={"warm_start": False}), 4).run(spec)
    again = EpisodeRunner(bundle, base, max_steps=4).run(spec)
    assert warm.objective == again.objective  # each episode starts again from Δφ = 0
    assert warm.objective != cold.objective  # later steps start where the last one ended


def test_data_futures_are_the_discounted_sums_the_episodes_had(bundle, umaze_data):
    observations, futures = data_futures(bundle, str(umaze_data))
    episode = next(open_dataset(str(umaze_data)).iterate_episodes())
    obs = episode_observations(episode.observations)[:-1].astype(np.float32)
    phi = np.asarray(bundle.model.phi(bundle.params, obs, bundle.model.encode(bundle.params, obs)))
    discounts = bundle.config.successor.gamma ** np.arange(len(phi))
    np.testing.assert_allclose(observations[: len(obs)], obs)
    np.testing.assert_allclose(futures[0], discounts @ phi, rtol=1e-4, atol=1e-4)
    assert observations.shape[0] == futures.shape[0] > len(obs)  # every episode's states


def test_tails_command_sets_the_data_against_the_model(trained, tmp_path, capsys):
    out = tmp_path / "tails"
    argv = ["tails", str(trained.run_dir), "--goals", "6", "--seed", "0", "--samples", "64"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    records = json.loads((out / "tails.json").read_text())["tails"]
    rare = rare_cells_of(restore_bundle(trained.run_dir))
    assert records and all(tuple(r["goal_cell"]) in rare for r in records)
    for r in records:
        assert r["model_max"] >= r["model_best_of_batch"] >= r["model_mean"]
        if r["data_states"]:
            assert r["data_max"] >= r["data_p99"]
    assert (out / "tails.md").read_text().count("\n") == len(records) + 2
    assert "model best of 64" in capsys.readouterr().out
