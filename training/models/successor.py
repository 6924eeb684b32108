"""Successor features: the cumulants phi(s) and the conditional diffusion psi-model.

phi is a fixed random Fourier feature map of the (normalised) observation plus a constant
bias feature; its projection is drawn once at training time and stored in the bundle.
psi is the discounted sum of future cumulants; p(psi | s) is a diffusion model over
per-dimension normalised psi, conditioned on the planning state s = [z, h].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def random_fourier_projection(
    key: jax.Array, in_dim: int, n_features: int, lengthscale: float
) -> dict[str, jax.Array]:
    k_w, k_b = jax.random.split(key)
    return {
        "W": jax.random.normal(k_w, (in_dim, n_features)) / lengthscale,
        "b": jax.random.uniform(k_b, (n_features,), maxval=2 * jnp.pi),
    }


def cumulants(projection: dict, x: jax.Array) -> jax.Array:
    """phi(x) = [sqrt(2/D) cos(x W + b), 1]: D random features and the bias feature."""
    n = projection["W"].shape[1]
    features = jnp.sqrt(2.0 / n) * jnp.cos(x @ projection["W"] + projection["b"])
    return jnp.concatenate([features, jnp.ones((*x.shape[:-1], 1), features.dtype)], axis=-1)


def time_embedding(t_fraction: jax.Array, dim: int = 32) -> jax.Array:
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), dim // 2))
    angles = t_fraction[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class PsiNoiseModel(nn.Module):
    """v(psi_t, t, s): an MLP whose hidden layers are modulated by (s, t) (FiLM).

    Its layers are named so that online adaptation can adapt a subset of them: the FiLM
    layers `film_i`, through which the state conditions the prediction, and the output `out`.
    """

    psi_dim: int
    hidden: int = 256
    depth: int = 3

    @nn.compact
    def __call__(
        self, psi_t: jax.Array, t_fraction: jax.Array, state: jax.Array, features_only=False
    ) -> jax.Array:
        """The predicted v, or with `features_only` what the output layer reads."""
        cond = jnp.concatenate([state, time_embedding(t_fraction)], axis=-1)
        cond = nn.silu(nn.Dense(self.hidden, name="cond")(cond))
        x = nn.Dense(self.hidden, name="embed")(psi_t)
        for i in range(self.depth):
            film = nn.Dense(2 * self.hidden, name=f"film_{i}")(cond)
            scale, shift = jnp.split(film, 2, axis=-1)
            h = nn.silu(nn.LayerNorm(name=f"norm_{i}")(x) * (1 + scale) + shift)
            x = x + nn.Dense(self.hidden, name=f"mlp_{i}")(h)
        features = nn.silu(x)
        if features_only:
            return features
        return nn.Dense(self.psi_dim, kernel_init=nn.initializers.zeros, name="out")(features)


def ema_update(ema: dict, params: dict, decay: float) -> dict:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
