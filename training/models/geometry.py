"""A geometry learned from the data: a map e of the whole (normalised) observation into a
space where the distance between two states counts the steps between them.

It is trained on the data's own windows. For two observations of one window, t1 and t2
apart, ‖e(s_t1) − e(s_t2)‖ fits a low expectile of |t1 − t2|: where the data went between
two such states both slowly and quickly, the quicker count wins. Two observations of
different windows are pushed at least a window's length apart (a hinge), so that far
states do not fold onto near ones; distances beyond a window mean only "far". Nothing in it
is in the observation's units: a rotated, rescaled observation padded with noise maps to
the same distances.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class StepMap(nn.Module):
    """e(x): the normalised observation's point in step space."""

    dim: int
    hidden: int = 256
    depth: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            x = nn.silu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.dim)(x)


def distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Euclidean distance over the last axis, with a gradient at zero."""
    return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1) + 1e-8)


def expectile_loss(residual: jax.Array, tau: float) -> jax.Array:
    """|τ − 1(residual < 0)| · residual²: below a half, over-estimates cost more."""
    return jnp.where(residual < 0, 1.0 - tau, tau) * jnp.square(residual)


def step_losses(near: jax.Array, gaps: jax.Array, valid: jax.Array, far: jax.Array,
                horizon: int, tau: float) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """The two terms, in windows: the near pairs' expectile fit of their distances `near`
    to their `gaps` (where `valid`), and the far pairs' hinge below `horizon`."""
    fit = expectile_loss((gaps - near) / horizon, tau)
    fit = jnp.sum(fit * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    hinge = jnp.mean(jnp.square(jax.nn.relu(1.0 - far / horizon)))
    return fit, hinge
