"""V: the VAE that compresses an observation into a latent z.

Vector observations use an MLP; 64x64x3 pixels use the World Models convolutional VAE
(4 stride-2 convolutions 32/64/128/256, mirrored transposed convolutions). Both take
observations already normalised (vectors standardised, pixels scaled to [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def reparameterise(key: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
    return mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)


class VectorVAE(nn.Module):
    obs_dim: int
    latent_dim: int = 32
    hidden: Sequence[int] = (256, 256)

    def setup(self):
        self.enc = [nn.Dense(h) for h in self.hidden]
        self.enc_out = nn.Dense(2 * self.latent_dim)
        self.dec = [nn.Dense(h) for h in reversed(self.hidden)]
        self.dec_out = nn.Dense(self.obs_dim)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for layer in self.enc:
            x = nn.relu(layer(x))
        mu, logvar = jnp.split(self.enc_out(x), 2, axis=-1)
        return mu, jnp.clip(logvar, -10.0, 5.0)

    def decode(self, z: jax.Array) -> jax.Array:
        for layer in self.dec:
            z = nn.relu(layer(z))
        return self.dec_out(z)

    def __call__(self, x: jax.Array, key: jax.Array):
        mu, logvar = self.encode(x)
        z = reparameterise(key, mu, logvar)
        return self.decode(z), mu, logvar, z


class ConvVAE(nn.Module):
    """Input [..., 64, 64, 3] in [0, 1]; reconstruction through a sigmoid."""

    latent_dim: int = 32
    channels: Sequence[int] = (32, 64, 128, 256)

    def setup(self):
        self.enc = [nn.Conv(c, (4, 4), strides=(2, 2), padding="VALID") for c in self.channels]
        self.enc_out = nn.Dense(2 * self.latent_dim)
        self.dec_in = nn.Dense(4 * self.channels[-1])
        # 1 -> 5 -> 13 -> 30 -> 64 pixels, as in World Models.
        kernels = (5, 5, 6, 6)
        features = (*reversed(self.channels[:-1]), 3)
        self.dec = [
            nn.ConvTranspose(f, (k, k), strides=(2, 2), padding="VALID")
            for f, k in zip(features, kernels, strict=True)
        ]

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch_shape = x.shape[:-3]
        x = x.reshape((-1, *x.shape[-3:]))
        for conv in self.enc:
            x = nn.relu(conv(x))
        x = x.reshape((x.shape[0], -1))
        mu, logvar = jnp.split(self.enc_out(x), 2, axis=-1)
        mu = mu.reshape((*batch_shape, self.latent_dim))
        logvar = logvar.reshape((*batch_shape, self.latent_dim))
        return mu, jnp.clip(logvar, -10.0, 5.0)

    def decode(self, z: jax.Array) -> jax.Array:
        batch_shape = z.shape[:-1]
        x = self.dec_in(z.reshape((-1, z.shape[-1])))
        x = x.reshape((x.shape[0], 1, 1, -1))
        for i, deconv in enumerate(self.dec):
            x = deconv(x)
            x = nn.sigmoid(x) if i == len(self.dec) - 1 else nn.relu(x)
        return x.reshape((*batch_shape, *x.shape[1:]))

    def __call__(self, x: jax.Array, key: jax.Array):
        mu, logvar = self.encode(x)
        z = reparameterise(key, mu, logvar)
        return self.decode(z), mu, logvar, z


class LatentValueHead(nn.Module):
    """The task-oriented head of the original formulation's VAE: a linear value of z, fitted to the
    discounted return, so that z has to keep what the task's value depends on."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        return nn.Dense(1)(z)[..., 0]
