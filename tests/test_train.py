"""Collect -> train -> save -> restore, resume after a killed run, and config errors."""

import json
import os
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

from training.checkpoint import params_digest, restore_bundle
from training.cli import main as cli_main
from training.config import ConfigError, load_config, parse_config, with_steps
from training.data import collect
from training.models.mdn_rnn import MDNRNN, initial_state
from training.train import METRICS_FILE, read_metrics, train

TINY = {
    "env": "pointmaze-umaze",
    "seed": 3,
    "data": {"seq_len": 8},
    "vae": {"latent_dim": 4, "hidden": [16]},
    "mdn": {"hidden": 16, "n_mixtures": 2},
    "train": {
        "batch_size": 8,
        "vae_steps": 20,
        "mdn_steps": 20,
        "controller_steps": 20,
        "checkpoint_every": 10,
        "log_every": 5,
    },
}


@pytest.fixture(scope="module")
def umaze_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "umaze"
    collect("pointmaze-umaze", 4, out, seed=1, max_episode_steps=60, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(umaze_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return train(parse_config(TINY), umaze_data, run_dir, progress=False)


def probe_outputs(run_dir: str) -> str:
    """V, M and C applied to fixed inputs, as the hex of their float32 bytes."""
    bundle = restore_bundle(run_dir)
    model, params = bundle.model, bundle.params
    obs = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    mu, logvar = model.vae.apply({"params": params["vae"]}, obs, method="encode")
    state = initial_state((2,), model.mdn.hidden)
    state, out = model.mdn.apply(
        {"params": params["mdn"]}, state, mu, jnp.full((2, 2), 0.3), method=MDNRNN.step
    )
    mean, log_std = model.controller.apply({"params": params["controller"]}, mu, state[1])
    leaves = [mu, logvar, state[0], state[1], out.mu, out.logits, out.reward, mean, log_std]
    return "".join(np.asarray(x, np.float32).tobytes().hex() for x in leaves)


def test_round_trip_is_bit_identical_in_another_process(trained):
    restored = restore_bundle(trained.run_dir)
    assert restored.step == 60 and restored.env_id == "pointmaze-umaze"
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
    assert set(meta["summary"]) == {"vae", "mdn", "controller"}

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
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert [m["stage"] for m in metrics if m["step"] in (20, 40, 60)] == [
        "vae",
        "mdn",
        "controller",
    ]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert (trained.run_dir / "loss_curves.png").stat().st_size > 10_000


def test_rerun_of_finished_run_changes_nothing(trained, umaze_data):
    again = train(parse_config(TINY), umaze_data, trained.run_dir, progress=False)
    assert again.resumed_from == 60
    assert params_digest(again.params) == params_digest(trained.params)


def test_resume_after_kill_matches_uninterrupted_run(umaze_data, tmp_path):
    config = dict(TINY, train={**TINY["train"], "checkpoint_every": 2, "log_every": 2})
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.cli", "train", "--config", str(config_path)]
    cmd += ["--data", str(umaze_data), "--out", str(run_dir), "--steps", "30", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.isdigit() for p in run_dir.glob("*")):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = train(with_steps(parse_config(config), 30), umaze_data, run_dir, progress=False)
    assert resumed.resumed_from is not None and 0 < resumed.resumed_from < 90
    # Checkpointing does not change the result: the reference run saves only at stage ends.
    rarely_saved = dict(config, train={**config["train"], "checkpoint_every": 1000})
    whole = train(with_steps(parse_config(rarely_saved), 30), umaze_data, tmp_path / "whole", False)
    assert params_digest(resumed.params) == params_digest(whole.params)
    logged = [m["step"] for m in read_metrics(run_dir)]
    assert logged == list(range(2, 91, 2))


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
    ],
)
def test_bad_config_values_give_clear_errors(change, message):
    raw = {**TINY, **change}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


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


def test_packaged_configs_are_valid():
    for name in ("pointmaze-umaze", "pointmaze-medium", "pendulum", "carracing"):
        assert load_config(name).env == name


def test_cli_inspect_prints_the_bundle(trained, capsys):
    assert cli_main(["inspect", str(trained.run_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 60
    assert report["params_sha256"] == params_digest(trained.params)
    assert (trained.run_dir / METRICS_FILE).exists()
