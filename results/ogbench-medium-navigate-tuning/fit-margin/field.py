"""Least-squares goal fit with fit states drawn in the data's box grown by a margin: the
field round a corner goal, and the error round random goals."""

import sys

import jax.numpy as jnp
import numpy as np

from training.analysis.ogbench_suite import dataset_episodes
from training.learning.checkpoint import restore_bundle
from training.models.value import goal_reward, ridge_solve

b = restore_bundle(sys.argv[1])
m, p = b.model, b.params
sigma = m.config.value.goal_sigma
obs_all = np.concatenate(dataset_episodes(b)).astype(np.float32)
lo, hi = obs_all[:, :2].min(0), obs_all[:, :2].max(0)
print("box", lo, hi, "features", m.config.successor.n_features)
rng = np.random.default_rng(0)


def phi(o):
    o = jnp.asarray(o, jnp.float32)
    return m.phi(p, o, m.encode(p, o))


test = obs_all[rng.integers(0, len(obs_all), 4000)]
goals = obs_all[rng.integers(0, len(obs_all), 50), :2]
ptest = phi(test)
for n, margin, ridge in [
    (2048, 0, 1e-3),
    (2048, 2, 1e-3),
    (2048, 4, 1e-3),
    (8192, 0, 1e-3),
    (8192, 2, 1e-3),
    (2048, 0, 1e-1),
    (2048, 2, 1e-1),
]:
    obs = obs_all[rng.integers(0, len(obs_all), n)].copy()
    obs[: n // 2, :2] = rng.uniform(lo - margin, hi + margin, (n // 2, 2))
    S = ridge_solve(phi(obs), ridge)
    pos = jnp.asarray(obs[:, :2])
    errs = []
    for g in goals:
        w = S @ goal_reward(pos, jnp.asarray(g), sigma)
        near = np.linalg.norm(test[:, :2] - g, axis=1) < 2 * sigma
        errs.append(
            float(
                jnp.sqrt(
                    jnp.mean(
                        (
                            ptest[near] @ w
                            - goal_reward(jnp.asarray(test[near, :2]), jnp.asarray(g), sigma)
                        )
                        ** 2
                    )
                )
            )
        )
    g = jnp.asarray([20.2, 20.1])
    w = S @ goal_reward(pos, g, sigma)
    grid = np.array(
        [[x, y] for y in [21.4, 20.5, 20.0, 19.0] for x in [19.0, 20.0, 20.5, 21.4]], np.float32
    )
    f = np.asarray(phi(grid) @ w).reshape(4, 4)
    print(
        f"n {n} margin {margin} ridge {ridge}: near-goal rmse {np.median(errs):.3f};",
        "corner field rows y=21.4..19, x=19..21.4:",
        f.round(2).tolist(),
        "true (21.4,21.4)",
        round(float(goal_reward(jnp.asarray([21.4, 21.4]), g, sigma)), 2),
        flush=True,
    )
