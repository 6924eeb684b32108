"""Diffusion over successor features: a VP noise schedule, the ε-prediction loss and a
deterministic DDIM sampler with an optional guidance term.

The sampler is a pure function of (params, condition, initial noise): given the noise it
is deterministic and differentiable with respect to the parameters, which is what the
online adaptation needs (reparameterised samples, gradients through every DDIM step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# eps_fn(params, x_t, t_fraction, condition) -> predicted noise, t_fraction in (0, 1]
EpsFn = Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]
# guide_fn(x0_estimate) -> value per sample; its gradient steers sampling
GuideFn = Callable[[jax.Array], jax.Array]


class Schedule(NamedTuple):
    alpha_bar: jax.Array  # [T + 1]; alpha_bar[0] = 1 (clean), alpha_bar[T] ~ 0 (noise)

    @property
    def n_steps(self) -> int:
        return self.alpha_bar.shape[0] - 1


def cosine_schedule(n_steps: int = 1000, s: float = 0.008) -> Schedule:
    """VP schedule with cosine alpha_bar (Nichol & Dhariwal), kept away from 0 for stability."""
    t = jnp.linspace(0.0, 1.0, n_steps + 1)
    f = jnp.cos((t + s) / (1 + s) * jnp.pi / 2) ** 2
    return Schedule(jnp.clip(f / f[0], 1e-5, 1.0))


def noisy(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; t integer in [1, T]."""
    ab = schedule.alpha_bar[t][..., None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def eps_loss(eps_fn: EpsFn, params, schedule: Schedule, x0, condition, key, weights=None):
    """Mean squared error of the predicted noise at a uniformly drawn step."""
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, x0.shape[:-1], 1, schedule.n_steps + 1)
    noise = jax.random.normal(k_noise, x0.shape)
    pred = eps_fn(params, noisy(schedule, x0, t, noise), t / schedule.n_steps, condition)
    err = jnp.mean(jnp.square(pred - noise), axis=-1)
    if weights is None:
        return jnp.mean(err)
    return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def ddim_timesteps(schedule: Schedule, n_sample_steps: int) -> jax.Array:
    """Evenly spaced steps T = t_K > ... > t_1, each paired with the next lower one (0 last)."""
    ts = jnp.round(jnp.linspace(schedule.n_steps, 0, n_sample_steps + 1)).astype(jnp.int32)
    return jnp.stack([ts[:-1], ts[1:]], axis=-1)


def ddim_sample(
    eps_fn: EpsFn,
    params,
    schedule: Schedule,
    condition: jax.Array,
    noise: jax.Array,
    n_sample_steps: int,
    guide_fn: GuideFn | None = None,
    guidance_scale: float | jax.Array = 0.0,
    clip: float = 5.0,
) -> jax.Array:
    """DDIM (eta = 0) from `noise` [..., D] to x_0, conditioned on `condition` [..., C].

    With `guide_fn`, each step's noise estimate becomes eps - scale * sqrt(1 - alpha_bar)
    * grad_x guide(x0_hat(x)): the classifier-guidance rule written for DDIM.
    """

    def step(x, pair):
        t, t_prev = pair
        ab, ab_prev = schedule.alpha_bar[t], schedule.alpha_bar[t_prev]
        t_frac = jnp.full(x.shape[:-1], t / schedule.n_steps)

        def x0_of(x_):
            eps_ = eps_fn(params, x_, t_frac, condition)
            return jnp.clip((x_ - jnp.sqrt(1.0 - ab) * eps_) / jnp.sqrt(ab), -clip, clip), eps_

        x0, eps = x0_of(x)
        if guide_fn is not None:
            grad = jax.grad(lambda x_: jnp.sum(guide_fn(x0_of(x_)[0])))(x)
            eps = eps - guidance_scale * jnp.sqrt(1.0 - ab) * grad
            x0 = jnp.clip((x - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab), -clip, clip)
        return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev) * eps, None

    x, _ = jax.lax.scan(step, noise, ddim_timesteps(schedule, n_sample_steps))
    return x
