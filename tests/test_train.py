"""Collect -> train -> save -> restore, resume after a killed run, and config errors."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from service import cli as service_cli
from service.cli import main as cli_main
from tests.conftest import TINY, TINY_STEPS, decide_once
from training import cli as training_cli
from training.config import ConfigError, load_config, parse_config, with_overrides, with_steps
from training.learning.checkpoint import params_digest, restore_bundle
from training.learning.loop import METRICS_FILE, read_metrics, train
from training.learning.stages import stage_bounds
from training.models.mdn_rnn import initial_state
from training.planning.planners import PLANNERS, Knobs, PlanShape, compile_decide
from training.planning.tasks import task_weights


def probe_outputs(run_dir: str) -> str:
    """Every planner's whole decision on fixed inputs, as the hex of its float32 bytes."""
    bundle = restore_bundle(run_dir)
    model, params = bundle.model, bundle.params
    weights = jnp.asarray(task_weights(model, params, {"kind": "goal", "goal": [0.5, -0.5]}))
    lstm = initial_state((), model.mdn.hidden)
    obs = jnp.array([-1.0, 0.5, 0.1, -0.2])
    leaves = []
    for planner in PLANNERS:
        config = bundle.config.planning.model_copy(update={"planner": planner})
        decide = compile_decide(model, PlanShape.of(config))
        out = decide(params, lstm, obs, weights, jax.random.key(7), Knobs.of(config), None)
        leaves += [out.plan.action, out.plan.value, out.plan.objective, out.lstm[0], out.lstm[1]]
    return "".join(np.asarray(x, np.float32).tobytes().hex() for x in leaves)


@pytest.mark.slow
def test_round_trip_is_bit_identical_in_another_process(trained):
    restored = restore_bundle(trained.run_dir)
    assert restored.step == TINY_STEPS and restored.env_id == "pointmaze-umaze"
    assert params_digest(restored.params) == params_digest(trained.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        restored.params,
        trained.params,
    )
    meta = restored.metadata
    assert meta["spaces"]["observation_shape"] == [4]
    assert meta["spaces"]["action_low"] == [-1.0, -1.0]
    assert meta["config"] == parse_config(TINY).model_dump(mode="json")
    assert {"jax", "flax", "orbax-checkpoint"} <= set(meta["versions"])
    assert set(meta["summary"]) == {"vae", "mdn", "controller", "psi", "readout", "value"}

    code = (
        "import sys; from tests.test_train import probe_outputs; print(probe_outputs(sys.argv[1]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(trained.run_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert other.stdout.strip() == probe_outputs(str(trained.run_dir))


def test_training_writes_metrics_and_curves(trained):
    metrics = read_metrics(trained.run_dir)
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)) and steps[-1] == TINY_STEPS
    stage_ends = [m["stage"] for m in metrics if m["step"] % 20 == 0]
    assert stage_ends == ["vae", "mdn", "controller", "psi", "readout", "value"]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert (trained.run_dir / "loss_curves.png").stat().st_size > 10_000


def test_rerun_of_finished_run_changes_nothing(trained, umaze_data, tmp_path):
    run_dir = tmp_path / "copy"  # the shared bundle stays as it was made
    shutil.copytree(trained.run_dir, run_dir)
    again = train(parse_config(TINY), umaze_data, run_dir, progress=False)
    assert again.resumed_from == TINY_STEPS
    assert params_digest(again.params) == params_digest(trained.params)


# Each mode, with its most stateful options: the phases' optimiser states, the value head,
# the meta-learned weights and their optimiser. The meta-learning run stops after its
# joint stage (its compilation is the slowest); the alternating run goes through them all.
RESUMED_MODES = {
    "staged": ({}, 12),
    "end_to_end": (
        {
            "train": {
                "mode": "end_to_end",
                "tbptt": 4,
                **{f"{stage}_steps": 0 for stage in ("psi", "readout", "value")},
            },
            "joint": {"meta_learning": True, "meta_inner_steps": 1, "schedule": False},
        },
        6,
    ),
    "alternating": (
        {
            "train": {"mode": "alternating", "tbptt": 4},
            "joint": {
                "epoch_steps": 1,
                "world_epochs": 1,
                "controller_epochs": 2,
                "policy_loss": "imagination",
                "aux_losses": True,
            },
        },
        6,
    ),
}


@pytest.mark.parametrize("mode", list(RESUMED_MODES))
@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(mode, umaze_data, tmp_path):
    change, steps = RESUMED_MODES[mode]
    train_section = {**TINY["train"], "checkpoint_every": 2, "log_every": 2}
    config = {**TINY, **change, "train": {**train_section, **change.get("train", {})}}
    total = with_steps(parse_config(config), steps).train.total_steps
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "service.cli", "train", "--config", str(config_path)]
    cmd += ["--data", str(umaze_data), "--out", str(run_dir), "--steps", str(steps), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.isdigit() for p in run_dir.glob("*")):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = train(with_steps(parse_config(config), steps), umaze_data, run_dir, progress=False)
    assert resumed.resumed_from is not None and 0 < resumed.resumed_from < total
    # Checkpointing does not change the result: the reference run saves only at stage ends.
    rarely_saved = dict(config, train={**config["train"], "checkpoint_every": 1000})
    whole = train(
        with_steps(parse_config(rarely_saved), steps), umaze_data, tmp_path / "whole", False
    )
    assert params_digest(resumed.params) == params_digest(whole.params)
    logged = [m["step"] for m in read_metrics(run_dir)]
    assert logged == list(range(2, total + 1, 2))
    if mode != "staged":  # the bundle of a joint mode serves as a staged one does
        assert np.all(np.isfinite(decide_once(run_dir)))


def test_resume_into_a_later_stage_builds_its_transitions_then(trained, umaze_data, tmp_path):
    """A run builds the transitions once, at C's stage, and keeps them for psi, the readout
    and the goal decoder; resumed at the value stage's start, it builds them there, and
    ends with the same parameters."""
    run_dir = tmp_path / "copy"
    shutil.copytree(trained.run_dir, run_dir)
    value_start = stage_bounds(parse_config(TINY))["value"][0]
    assert (run_dir / str(value_start)).is_dir()
    for later in [p for p in run_dir.iterdir() if p.name.isdigit()]:
        if int(later.name) > value_start:
            shutil.rmtree(later)
    resumed = train(parse_config(TINY), umaze_data, run_dir, progress=False)
    assert resumed.resumed_from == value_start
    assert params_digest(resumed.params) == params_digest(trained.params)


def test_resume_with_another_config_is_refused(trained, umaze_data):
    other = dict(TINY, seed=4)
    with pytest.raises(ConfigError, match="different config"):
        train(parse_config(other), umaze_data, trained.run_dir, progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"env": "atari-pong"}, "unknown env 'atari-pong'"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"vae": {"latent_dim": -3}}, "vae.latent_dim"),
        ({"controller": {"kind": "transformer"}}, "controller.kind"),
        ({"mdn": {"temperature": 0}}, "mdn.temperature"),
        ({"trian": {}}, "trian"),
        ({"planning": {"planner": "teleport"}}, "planning.planner: Input should be 'controller'"),
        ({"train": {"controller": "cmaes"}}, "train.controller: Input should be 'imitation'"),
        ({"evolution": {"population": 1}}, "evolution.population"),
    ],
)
def test_bad_config_values_give_clear_errors(change, message):
    raw = {**TINY, **change}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_the_controller_trainer_and_the_command_lines_overrides():
    """staged mode always ends with C's stage (imitation unless told); a joint mode only
    when a trainer is named. --seed, --mode and --tbptt are checked as the YAML is."""
    staged = parse_config(TINY).train
    assert staged.controller_trainer == "imitation" and "controller" in staged.stage_steps()
    joint = {**TINY, "train": {**TINY["train"], "mode": "end_to_end"}}
    assert "controller" not in parse_config(joint).train.stage_steps()
    joint["train"]["controller"] = "cmaes_dream"
    e2e = parse_config(joint).train
    assert list(e2e.stage_steps())[:2] == ["joint", "controller"]
    assert e2e.controller_trainer == "cmaes_dream"
    config = with_overrides(parse_config(TINY), seed=11, mode="end_to_end", tbptt=4)
    assert (config.seed, config.train.mode, config.train.tbptt) == (11, "end_to_end", 4)
    with pytest.raises(ConfigError, match="train.tbptt 3 must divide"):
        with_overrides(parse_config(TINY), mode="end_to_end", tbptt=3)


def test_the_config_takes_every_planner_of_the_registry():
    for name in PLANNERS:
        assert parse_config({**TINY, "planning": {"planner": name}}).planning.planner == name


def test_cli_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "train": {"learning_rate": -1}}))
    assert cli_main(["train", "--config", str(bad), "--data", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "greater than 0" in err
    assert not Path("y").exists()
    assert cli_main(["train", "--config", "no-such-config", "--out", "y"]) == 2
    assert "packaged configs" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_only_the_projects_own_failures_print_one_line(tmp_path, capsys, monkeypatch):
    # The project's refusal: one line, exit status 2.
    argv = ["collect", "pointmaze-umaze", "--out", str(tmp_path / "d")]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "worldplan: error: collect needs --episodes N (only ogbench/ datasets have a default)"
    )

    # A ValueError of anything else is a bug: it is not swallowed into one line.
    def broken(*args, **kwargs):
        raise ValueError("a library's own complaint")

    monkeypatch.setattr("training.data.datasets.collect", broken)
    with pytest.raises(ValueError, match="a library's own complaint"):
        cli_main([*argv, "--episodes", "1"])


def test_one_parser_holds_the_commands_each_package_adds():
    def added(add_commands) -> set[str]:
        sub = argparse.ArgumentParser().add_subparsers()
        add_commands(sub)
        return set(sub.choices)

    training, service = added(training_cli.add_commands), added(service_cli.add_commands)
    assert {"collect", "train", "eval", "inspect"} <= training and not training & service
    assert {"serve", "bench", "loadtest", "drive"} <= service
    parser = service_cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == training | service


def test_packaged_configs_are_valid():
    for name in ("pointmaze-umaze", "pointmaze-medium", "pendulum", "carracing"):
        assert load_config(name).env == name


def test_packaged_maze_configs_fit_psi_to_the_datas_own_futures():
    # Bootstrapped targets lost the rarely taken futures that rare goals need (docs/results.md).
    for name in ("pointmaze-umaze", "pointmaze-medium"):
        config = load_config(name)
        assert config.successor.mc_warmup_steps >= config.train.psi_steps


def test_cli_inspect_prints_the_bundle(trained, capsys):
    assert cli_main(["inspect", str(trained.run_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == TINY_STEPS
    assert report["params_sha256"] == params_digest(trained.params)
    assert (trained.run_dir / METRICS_FILE).exists()


@pytest.mark.slow
def test_a_least_squares_goal_fit_is_the_ridge_optimum_and_peaks_at_its_goal(umaze_data, tmp_path):
    """`value.goal_weights: least_squares`: the bundle keeps states of the data and the ridge
    map from rewards there to weights, which the value stage's steps leave as fitted: no
    other weights fit the goal reward at those states better; its reward peaks at the goal."""
    from training.analysis.ogbench_suite import dataset_episodes
    from training.models.networks import GOAL_DECODER
    from training.models.value import goal_reward

    value = {**TINY["value"], "goal_weights": "least_squares"}
    run = train(parse_config({**TINY, "value": value}), umaze_data, tmp_path / "fit",
                progress=False).run_dir  # fmt: skip
    bundle = restore_bundle(run)
    model, params = bundle.model, bundle.params
    positions = params[GOAL_DECODER]["positions"]
    assert positions.shape == (2048, 2) and float(jnp.std(positions)) > 0.1
    # half of them anywhere up to a goal's width past the data, so the fit holds at the walls
    data = np.concatenate(dataset_episodes(bundle))[:, :2]
    low, high, sigma = data.min(0), data.max(0), bundle.config.value.goal_sigma
    assert np.all(positions >= low - sigma - 1e-5) and np.all(positions <= high + sigma + 1e-5)
    assert np.any(positions < low) and np.any(positions > high)
    # umaze observations are the position and velocity; phi reads the position alone
    obs = jnp.concatenate([positions, jnp.zeros((len(positions), 2))], axis=1)
    phi = model.phi(params, obs, model.encode(params, obs))
    goal = positions[0]
    w = jnp.asarray(task_weights(model, params, {"kind": "goal", "goal": goal.tolist()}))
    reward = goal_reward(positions, goal, bundle.config.value.goal_sigma)

    def ridge_objective(weights):
        return float(jnp.sum(jnp.square(phi @ weights - reward)) + 1e-3 * jnp.sum(weights**2))

    for k in range(5):
        nudge = 1e-2 * jax.random.normal(jax.random.key(k), w.shape)
        assert ridge_objective(w) < ridge_objective(w + nudge)
    far = goal + 2 * bundle.config.value.goal_sigma
    at = lambda p: float(model.phi(params, p[None], model.encode(params, p[None]))[0] @ w)  # noqa: E731
    assert at(jnp.concatenate([goal, jnp.zeros(2)])) > at(jnp.concatenate([far, jnp.zeros(2)]))
