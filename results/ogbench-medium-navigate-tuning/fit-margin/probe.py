"""Probe: the least-squares goal fit redone with its moved states drawn in the data's box
grown by a margin (and a ridge), on the tuning tasks through the data graph."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from training.analysis.evaluate import with_planning
from training.analysis.ogbench_suite import SubgoalSettings, compare_on_suite, dataset_episodes
from training.learning.checkpoint import restore_bundle
from training.learning.stage_inputs import goal_box, half_moved
from training.models.networks import GOAL_DECODER
from training.models.value import ridge_solve

run, margin, ridge, out, seed = (
    sys.argv[1],
    float(sys.argv[2]),
    float(sys.argv[3]),
    sys.argv[4],
    int(sys.argv[5]),
)
b = with_planning(
    restore_bundle(run),
    {"planner": "imagination", "imagination_steps": 10, "imagination_value": False},
)
m, p = b.model, b.params
observations = jnp.asarray(np.concatenate(dataset_episodes(b)).astype(np.float32))
dims = jnp.asarray(m.config.value.goal_dims)
k_rows, k_moved = jax.random.split(jax.random.fold_in(jax.random.key(m.config.seed), 7))
n = m.goal_decoder.n_states
obs = observations[jax.random.randint(k_rows, (n,), 0, observations.shape[0])]
low, high = goal_box(observations, dims)
obs = half_moved(k_moved, obs, dims, low - margin, high + margin)
phi = m.phi(p, obs, m.encode(p, obs))
p[GOAL_DECODER] = {"positions": obs[:, dims], "solve": ridge_solve(phi, ridge)}
compare_on_suite(
    b,
    ["imagination"],
    10,
    seed,
    Path(out),
    50,
    None,
    False,
    True,
    SubgoalSettings(96, 20, "data", 15),
)
print((Path(out) / "ogbench.md").read_text())
