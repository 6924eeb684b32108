"""The readout policy pi(a | s, psi): the action that realises a chosen outcome psi.

Deterministic, squashed into the action bounds, trained by regression on the dataset's
(s, psi-target, a) triples.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Readout(nn.Module):
    action_low: Sequence[float]
    action_high: Sequence[float]
    hidden: int = 256
    depth: int = 2

    @nn.compact
    def __call__(self, state: jax.Array, psi: jax.Array) -> jax.Array:
        x = jnp.concatenate([state, psi], axis=-1)
        for _ in range(self.depth):
            x = nn.silu(nn.Dense(self.hidden)(x))
        low, high = jnp.asarray(self.action_low), jnp.asarray(self.action_high)
        return low + (jnp.tanh(nn.Dense(low.shape[0])(x)) + 1.0) * 0.5 * (high - low)
