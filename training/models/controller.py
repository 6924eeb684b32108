"""C: the controller on [z_t, h_t] with a Gaussian head.

Linear by default, as in World Models; `hidden` > 0 adds one tanh layer. The mean is
squashed into the action bounds; the standard deviation is a learned per-dimension
parameter, so log-probabilities are available for policy-gradient and cloning losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Controller(nn.Module):
    action_low: Sequence[float]
    action_high: Sequence[float]
    hidden: int = 0

    @nn.compact
    def __call__(self, z: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (mean, log_std) of the action distribution."""
        x = jnp.concatenate([z, h], axis=-1)
        if self.hidden:
            x = nn.tanh(nn.Dense(self.hidden)(x))
        low, high = jnp.asarray(self.action_low), jnp.asarray(self.action_high)
        squashed = jnp.tanh(nn.Dense(low.shape[0])(x))
        mean = low + (squashed + 1.0) * 0.5 * (high - low)
        log_std = self.param("log_std", nn.initializers.constant(-0.5), (low.shape[0],))
        return mean, jnp.broadcast_to(jnp.clip(log_std, -5.0, 2.0), mean.shape)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """Log-density of a diagonal Gaussian, summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
