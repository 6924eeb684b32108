"""Probe: V's reconstruction of positions and M's one-step prediction, on 5 data episodes.
Usage: python vm_probe.py RUN DATA"""

import sys

import jax.numpy as jnp
import numpy as np

from training.data.datasets import open_dataset
from training.learning.checkpoint import restore_bundle
from training.models.mdn_rnn import MDNRNN, initial_state
from training.models.networks import denormalise
from training.planning.planners import most_likely_latent

b = restore_bundle(sys.argv[1])
m, p = b.model, b.params
ds = open_dataset(sys.argv[2])
eps = list(ds.iterate_episodes(episode_indices=list(range(5))))
rec, one, ten, still = [], [], [], []
for e in eps:
    obs = np.asarray(e.observations, np.float32)[:400]
    act = np.asarray(e.actions, np.float32)[:399]
    z = m.encode(p, jnp.asarray(obs))
    dec = denormalise(m.vae.apply({"params": p["vae"]}, z, method="decode"), p["normaliser"])
    rec.append(np.linalg.norm(np.asarray(dec)[:, :2] - obs[:, :2], axis=1))
    lstm = initial_state((), m.mdn.hidden)
    for t in range(399):
        lstm, out = m.mdn.apply(
            {"params": p["mdn"]}, lstm, z[t], jnp.asarray(act[t]), method=MDNRNN.step
        )
        zn = most_likely_latent(out)
        pred = np.asarray(
            denormalise(m.vae.apply({"params": p["vae"]}, zn, method="decode"), p["normaliser"])
        )[:2]
        if t > 20:
            one.append(np.linalg.norm(pred - obs[t + 1, :2]))
            still.append(np.linalg.norm(obs[t, :2] - obs[t + 1, :2]))
print(
    "V reconstruction error (units): median",
    np.median(np.concatenate(rec)).round(3),
    "p90",
    np.percentile(np.concatenate(rec), 90).round(3),
)
print(
    "M one-step position error: median",
    np.median(one).round(3),
    " step length median",
    np.median(still).round(3),
)
