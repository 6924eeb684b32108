"""M: the MDN-RNN. An LSTM over [z_t, a_t] whose state predicts a mixture of diagonal
Gaussians over z_{t+1}, the reward r_t and whether the episode ends.

The controller acts on [z_t, h_t] where h_t summarises steps before t; M then consumes
(z_t, a_t) to give h_{t+1}, from which the heads predict.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LSTMState = tuple[jax.Array, jax.Array]  # (c, h), as flax's LSTM cells carry it


class MDNOutput(NamedTuple):
    logits: jax.Array  # [..., K] mixture weights before softmax
    mu: jax.Array  # [..., K, Z]
    log_sigma: jax.Array  # [..., K, Z]
    reward: jax.Array  # [...]
    done_logit: jax.Array  # [...]


def initial_state(batch_shape: tuple[int, ...], hidden: int) -> LSTMState:
    zeros = jnp.zeros((*batch_shape, hidden), jnp.float32)
    return zeros, zeros


class MDNRNN(nn.Module):
    latent_dim: int = 32
    hidden: int = 256
    n_mixtures: int = 5

    def setup(self):
        self.lstm = nn.OptimizedLSTMCell(self.hidden)
        k, z = self.n_mixtures, self.latent_dim
        self.mixture = nn.Dense(k + 2 * k * z)
        self.reward_head = nn.Dense(1)
        self.done_head = nn.Dense(1)

    def heads(self, h: jax.Array) -> MDNOutput:
        k, z = self.n_mixtures, self.latent_dim
        out = self.mixture(h)
        logits = out[..., :k]
        mu = out[..., k : k + k * z].reshape((*h.shape[:-1], k, z))
        log_sigma = out[..., k + k * z :].reshape((*h.shape[:-1], k, z))
        return MDNOutput(
            logits=logits,
            mu=mu,
            log_sigma=jnp.clip(log_sigma, -7.0, 2.0),
            reward=self.reward_head(h)[..., 0],
            done_logit=self.done_head(h)[..., 0],
        )

    def step(self, state: LSTMState, z: jax.Array, action: jax.Array):
        """One step: (h_t, z_t, a_t) -> (h_{t+1}, predictions of z_{t+1}, r_t, done_t)."""
        state, h = self.lstm(state, jnp.concatenate([z, action], axis=-1))
        return state, self.heads(h)

    def __call__(self, state: LSTMState, zs: jax.Array, actions: jax.Array):
        """Unrolls over time (axis 1). Returns the final state, every state's h before its
        step ([B, T, H], the controller's input) and the predictions ([B, T, ...])."""

        def body(module: MDNRNN, carry: LSTMState, inputs):
            z, a = inputs
            h_before = carry[1]
            carry, out = module.step(carry, z, a)
            return carry, (h_before, out)

        scan = nn.scan(
            body, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
        )
        state, (hs, outputs) = scan(self, state, (zs, actions))
        return state, hs, outputs


def sample_next_latent(key: jax.Array, out: MDNOutput, temperature: float = 1.0) -> jax.Array:
    """Draws z_{t+1}: a component from softmax(logits / tau), then its Gaussian
    widened by sqrt(tau)."""
    k_mix, k_noise = jax.random.split(key)
    component = jax.random.categorical(k_mix, out.logits / temperature, axis=-1)
    pick = lambda x: jnp.take_along_axis(x, component[..., None, None], axis=-2)[..., 0, :]  # noqa: E731
    mu, sigma = pick(out.mu), jnp.exp(pick(out.log_sigma)) * jnp.sqrt(temperature)
    return mu + sigma * jax.random.normal(k_noise, mu.shape)


def unroll(
    mdn: MDNRNN, params: dict, state: LSTMState, zs: jax.Array, actions: jax.Array, chunk=None
):
    """M over a window [B, T, ...], as `MDNRNN.__call__`. With `chunk` K (truncated BPTT)
    the window runs as T / K chunks: the state is carried from chunk to chunk but detached
    between them, so no gradient crosses a chunk boundary."""
    if chunk is None or chunk >= zs.shape[1]:
        return mdn.apply({"params": params}, state, zs, actions)
    batch, steps = zs.shape[:2]

    def split(x):  # [B, T, ...] -> [T / K, B, K, ...]
        return jnp.moveaxis(x.reshape(batch, steps // chunk, chunk, *x.shape[2:]), 1, 0)

    def merge(x):  # the inverse
        return jnp.moveaxis(x, 0, 1).reshape(batch, steps, *x.shape[3:])

    def one_chunk(state, inputs):
        state, hs, out = mdn.apply({"params": params}, jax.lax.stop_gradient(state), *inputs)
        return state, (hs, out)

    state, (hs, outputs) = jax.lax.scan(one_chunk, state, (split(zs), split(actions)))
    return state, merge(hs), jax.tree.map(merge, outputs)
