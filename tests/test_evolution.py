"""C trained by CMA-ES (training/learning/evolution.py) on a deterministic toy whose world
model can be learned well in seconds: x' = x + 0.2 a, reward -x^2, 25 steps from x0 in
[-1.5, 1.5]. The best controller drives x to 0 and holds it there."""

import shutil

import gymnasium as gym
import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service.clients.local import running_server
from service.settings import Settings
from training.config import parse_config
from training.data.datasets import collect
from training.learning import evolution
from training.learning.checkpoint import restore_bundle
from training.learning.loop import read_metrics, train

ENV = "worldplan-test/Drift-v0"


class Drift(gym.Env):
    """A point on a line pushed by its action: deterministic given the reset seed."""

    observation_space = gym.spaces.Box(-4.0, 4.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-1.5, 1.5))
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = float(np.clip(self.x + 0.2 * float(action[0]), -4.0, 4.0))
        return np.array([self.x], np.float32), -(self.x**2), False, False, {}


if ENV not in gym.registry:
    gym.register(ENV, entry_point=f"{__name__}:Drift", max_episode_steps=25)


def toy_config(trainer: str, generations: int, **train) -> dict:
    return {
        "env": ENV,
        "seed": 1,
        "data": {"seq_len": 24},
        "vae": {"latent_dim": 2, "hidden": [32], "kl_tolerance": 2.0},
        "mdn": {"hidden": 16, "n_mixtures": 1},
        "evolution": {"population": 16, "sigma": 0.5, "rollouts": 8, "horizon": 25},
        "train": {
            "controller": trainer,
            "batch_size": 32,
            "learning_rate": 3e-3,
            "vae_steps": 600,
            "mdn_steps": 900,
            "controller_steps": generations,
            "psi_steps": 0,
            "readout_steps": 0,
            "checkpoint_every": 500,
            "log_every": 1,
            **train,
        },
    }


@pytest.fixture(scope="module")
def drift_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "drift"
    collect(ENV, 120, out, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def dream_run(drift_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dream"
    return train(parse_config(toy_config("cmaes_dream", 12)), drift_data, run_dir, progress=False)


def generation_returns(run_dir) -> list[float]:
    return [m["return_mean"] for m in read_metrics(run_dir) if m["stage"] == "controller"]


@pytest.mark.slow
def test_cmaes_in_the_dream_improves_the_return_it_is_given(dream_run):
    returns = generation_returns(dream_run.run_dir)
    assert len(returns) == 12
    # The population's mean dream return rises: the first generation is C's random start.
    assert np.mean(returns[-3:]) > returns[0] + 0.5 * abs(returns[0])


@pytest.mark.slow
def test_the_dream_and_the_environment_agree_on_the_toy(dream_run, drift_data):
    """The same candidates, from the same starts, scored in M's dream and in the real toy,
    rank alike and score alike."""
    bundle = restore_bundle(dream_run.run_dir)
    model, params = bundle.model, bundle.params
    es, es_params = evolution.strategy(model.config, params["controller"])
    state = es.init(jax.random.key(0), evolution.searched(params["controller"]), es_params)
    population, _ = evolution.ask(es, es_params, state, params["controller"], jax.random.key(1))

    pool = evolution.EnvironmentPool(model, 16, 8)
    z0 = model.encode(params, jnp.asarray(pool.reset(list(range(8)))[:8]))
    real = evolution.env_returns(model, params, population, pool, list(range(8)),
                                 evolution.make_policy(model)).mean(axis=1)  # fmt: skip
    pool.close()
    dream = np.asarray(evolution.dream_returns(model, params, population, z0,
                                               jax.random.key(2))).mean(axis=1)  # fmt: skip
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(ranks(dream), ranks(real))[0, 1] > 0.8
    assert np.median(np.abs(dream - real) / np.abs(real)) < 0.35


@pytest.mark.slow
def test_cmaes_in_the_environment_resumes_and_is_served(drift_data, tmp_path):
    """cmaes_env improves C in the real toy; the run resumed from a checkpoint in the middle
    of the search ends with the same C, whose actions the controller planner serves."""
    # The real toy scores C, so V and M need not be faithful: a few steps of each.
    # Checkpoints at the stages' ends and at step 303, three generations into the search.
    short = {"vae_steps": 200, "mdn_steps": 100, "checkpoint_every": 303}
    config = parse_config(toy_config("cmaes_env", 6, **short))
    whole = train(config, drift_data, tmp_path / "whole", progress=False)
    returns = generation_returns(whole.run_dir)
    assert np.mean(returns[-2:]) > returns[0]

    shutil.copytree(whole.run_dir, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / str(whole.step))  # the last checkpoint: 3 to go
    resumed = train(config, drift_data, tmp_path / "resumed", progress=False)
    assert resumed.resumed_from == whole.step - 3
    jax.tree.map(np.testing.assert_array_equal, resumed.params["controller"],
                 whole.params["controller"])  # fmt: skip

    bundle = restore_bundle(whole.run_dir)
    model, params = bundle.model, bundle.params
    obs = np.array([0.9], np.float32)
    z = model.encode(params, jnp.asarray(obs))
    expected, _ = model.controller.apply(
        {"params": params["controller"]}, z, jnp.zeros(model.mdn.hidden)
    )
    settings = Settings(model_dir=whole.run_dir, batch_sizes=(1,), max_batch=1,
                        sample_counts=(8,), warm_up=False)  # fmt: skip
    with running_server(settings) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        sid = client.post("/sessions", json={"planner": {"planner": "controller"}}).json()
        answer = client.post("/act", json={"session_id": sid["session_id"],
                                           "observation": obs.tolist()})  # fmt: skip
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["action"], np.asarray(expected), rtol=1e-5, atol=1e-6)
