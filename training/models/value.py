"""Value of an outcome psi for a task embedding z*.

Every task is turned into cumulant weights w, and V(psi, z*) = psi . w: exact for a
reward that is linear in phi (z* = w), and for goals (z* = the goal) the weights of the
goal's reward, fitted so that phi(s) . w(g) matches the goal reward on the dataset's
states: by a learned GoalDecoder (`value.goal_weights: decoder`), or exactly, by least
squares on states of the data kept with the bundle (GoalFit, `least_squares`).
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


class GoalFit(nn.Module):
    """g -> w(g) by ridge regression of the goal reward on n_states fixed states: w(g) =
    solve @ r_g(positions), where solve = (Φᵀ Φ + ridge I)⁻¹ Φᵀ over those states' φ
    (set by the value stage, `fit_goal_weights`; zeros until then)."""

    n_cumulants: int
    n_states: int
    sigma: float

    @nn.compact
    def __call__(self, goal: jax.Array) -> jax.Array:
        positions = self.param("positions", nn.initializers.zeros, (self.n_states, goal.shape[-1]))
        solve = self.param("solve", nn.initializers.zeros, (self.n_cumulants, self.n_states))
        return goal_reward(positions, goal[..., None, :], self.sigma) @ solve.T


def ridge_solve(features: jax.Array, ridge: float = 1e-3) -> jax.Array:
    """(Fᵀ F + ridge I)⁻¹ Fᵀ: the map from rewards at the states to their weights."""
    gram = features.T @ features + ridge * jnp.eye(features.shape[-1])
    return jnp.linalg.solve(gram, features.T)


def least_squares_weights(features: jax.Array, rewards: jax.Array, ridge: float = 1e-3):
    """w minimising |features w - rewards|^2 + ridge |w|^2: a task from (s, r) samples."""
    return ridge_solve(features, ridge) @ rewards
