"""Shared fixtures: a tiny PointMaze dataset and a tiny bundle trained on it through all stages."""

from pathlib import Path

import pytest

from service.local import running_server  # noqa: F401  (the tests' server)
from training.config import parse_config
from training.data import collect
from training.train import train

TINY = {
    "env": "pointmaze-umaze",
    "seed": 3,
    "data": {"seq_len": 8},
    "vae": {"latent_dim": 4, "hidden": [16]},
    "mdn": {"hidden": 16, "n_mixtures": 2},
    "successor": {
        "feature_dims": [0, 1],
        "n_features": 15,
        "hidden": 32,
        "depth": 1,
        "batch_size": 32,
        "diffusion_steps": 100,
        "mc_warmup_steps": 10,
    },
    "readout": {"hidden": 32},
    "value": {"goal_dims": [0, 1], "hidden": 32},
    "planning": {
        "sample_steps": 4,
        "n_samples": 8,
        "adaptation_steps": 5,
        "n_adaptation_samples": 8,
    },
    "train": {
        "batch_size": 8,
        "vae_steps": 20,
        "mdn_steps": 20,
        "controller_steps": 20,
        "psi_steps": 20,
        "readout_steps": 20,
        "value_steps": 20,
        "checkpoint_every": 10,
        "log_every": 5,
    },
}
TINY_STEPS = 120


@pytest.fixture(scope="session")
def umaze_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "umaze"
    collect("pointmaze-umaze", 4, out, seed=1, skew=0.3, max_episode_steps=60, progress=False)
    return out


@pytest.fixture(scope="session")
def trained(umaze_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return train(parse_config(TINY), umaze_data, run_dir, progress=False)
