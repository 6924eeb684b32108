"""M's open-loop error on the bundle's own data: warm M's LSTM on WARM true steps of a
data segment, then imagine 10 steps with the data's actions (M's most likely latent each
step, as the imagination planner does) and compare V's decoding of the last one with where
the data went. Prints the median and 90th percentile of the error, the median distance the
data moved, and the mean signed error (a drift M imagines).
Usage: python openloop.py RUN WARM"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from training.data.datasets import episode_observations, open_dataset
from training.learning.checkpoint import restore_bundle
from training.models.mdn_rnn import MDNRNN, initial_state
from training.models.networks import denormalise
from training.planning.planners import most_likely_latent

HORIZON, SEGMENTS_PER_EPISODE, EPISODES = 10, 2, 400

run, warm = sys.argv[1], int(sys.argv[2])
bundle = restore_bundle(run)
model, params = bundle.model, bundle.params
rng = np.random.default_rng(0)
observations, actions = [], []
for i, ep in enumerate(open_dataset(bundle.metadata["dataset"]).iterate_episodes()):
    obs, act = episode_observations(ep.observations), np.asarray(ep.actions)
    for _ in range(SEGMENTS_PER_EPISODE):
        t = rng.integers(0, len(act) - warm - HORIZON)
        observations.append(obs[t : t + warm + HORIZON + 1])
        actions.append(act[t : t + warm + HORIZON])
    if i + 1 == EPISODES:
        break


def step(carry, z, action):
    return model.mdn.apply({"params": params["mdn"]}, carry, z, action, method=MDNRNN.step)


def imagined_positions(obs, act):
    z = model.encode(params, obs)
    carry, _ = jax.lax.scan(lambda c, t: (step(c, z[t], act[t])[0], None),
                            initial_state((), model.mdn.hidden), jnp.arange(warm))  # fmt: skip

    def imagine(carry_z, t):
        carry, out = step(*carry_z, act[t])
        z_next = most_likely_latent(out)
        return (carry, z_next), z_next

    _, zs = jax.lax.scan(imagine, (carry, z[warm]), jnp.arange(warm, warm + HORIZON))
    decoded = model.vae.apply({"params": params["vae"]}, zs, method="decode")
    return denormalise(decoded, params["normaliser"])[:, :2]


obs = jnp.asarray(np.stack(observations), jnp.float32)
predicted = np.asarray(jax.vmap(imagined_positions)(obs, jnp.asarray(np.stack(actions))))
error = predicted[:, -1] - np.asarray(obs[:, -1, :2])
distance = np.linalg.norm(error, axis=1)
moved = np.linalg.norm(np.asarray(obs[:, -1, :2] - obs[:, warm, :2]), axis=1)
print(f"{run} warm {warm}: {len(obs)} segments, error median {np.median(distance):.2f} "
      f"p90 {np.quantile(distance, 0.9):.2f}, data moved {np.median(moved):.2f}, "
      f"drift {np.round(error.mean(axis=0), 2)}")  # fmt: skip
