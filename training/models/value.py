"""Value of an outcome psi for a task embedding z*.

Every task is turned into cumulant weights w, and V(psi, z*) = psi . w: exact for a
reward that is linear in phi (z* = w), and for goals (z* = the goal) the learned
GoalDecoder maps the goal to the weights of its reward, fitted so that phi(s) . w(g)
matches the goal reward on the dataset's states.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def linear_value(psi: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(psi * weights, axis=-1)


def goal_reward(positions: jax.Array, goal: jax.Array, sigma: float) -> jax.Array:
    """The reward a goal task stands for: a Gaussian bump of width sigma around the goal."""
    return jnp.exp(-jnp.sum(jnp.square(positions - goal), axis=-1) / (2.0 * sigma**2))


class GoalDecoder(nn.Module):
    """g -> w(g), the cumulant weights of the goal's reward."""

    n_cumulants: int
    hidden: int = 256

    @nn.compact
    def __call__(self, goal: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.hidden)(goal))
        x = nn.silu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.n_cumulants)(x)


def least_squares_weights(features: jax.Array, rewards: jax.Array, ridge: float = 1e-3):
    """w minimising |features w - rewards|^2 + ridge |w|^2: a task from (s, r) samples."""
    gram = features.T @ features + ridge * jnp.eye(features.shape[-1])
    return jnp.linalg.solve(gram, features.T @ rewards)
