"""Diffusion over successor features: a VP noise schedule, the v-prediction loss and a
deterministic DDIM sampler with an optional guidance term.

The network predicts v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0 (Salimans & Ho), from which both the
noise ε and the clean estimate x0 follow without division. With ε-prediction the clean
estimate is (x_t - sqrt(1 - ᾱ) ε̂) / sqrt(ᾱ): at the first, noisiest DDIM step that
multiplies the network's error by 1 / sqrt(ᾱ_T) (about 300 here), the samples come out
too wide, and distributional Bellman targets built from them diverge.

The sampler is a pure function of (params, condition, initial noise): given the noise it
is deterministic and differentiable with respect to the parameters, which is what the
online adaptation needs (reparameterised samples, gradients through every DDIM step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# v_fn(params, x_t, t_fraction, condition) -> predicted v, t_fraction in (0, 1]
VFn = Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]
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


def v_loss(v_fn: VFn, params, schedule: Schedule, x0, condition, key, weights=None):
    """Mean squared error of the predicted v at a uniformly drawn step."""
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, x0.shape[:-1], 1, schedule.n_steps + 1)
    noise = jax.random.normal(k_noise, x0.shape)
    ab = schedule.alpha_bar[t][..., None]
    target = jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0
    pred = v_fn(params, noisy(schedule, x0, t, noise), t / schedule.n_steps, condition)
    err = jnp.mean(jnp.square(pred - target), axis=-1)
    if weights is None:
        return jnp.mean(err)
    return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def ddim_timesteps(schedule: Schedule, n_sample_steps: int) -> jax.Array:
    """Evenly spaced steps T = t_K > ... > t_1, each paired with the next lower one (0 last)."""
    ts = jnp.round(jnp.linspace(schedule.n_steps, 0, n_sample_steps + 1)).astype(jnp.int32)
    return jnp.stack([ts[:-1], ts[1:]], axis=-1)


def ddim_sigma(ab: jax.Array, ab_prev: jax.Array, eta: float) -> jax.Array:
    """The noise a DDIM step adds: 0 for eta = 0 (deterministic), DDPM's for eta = 1."""
    return eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))


def clean_estimate(schedule: Schedule, x, v, t, clip: float) -> jax.Array:
    """x0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v, clipped."""
    ab = schedule.alpha_bar[t]
    return jnp.clip(jnp.sqrt(ab) * x - jnp.sqrt(1.0 - ab) * v, -clip, clip)


def step_mean(schedule: Schedule, x, x0, t, t_prev, sigma) -> jax.Array:
    """The mean of x_{t_prev} given x_t and the clean estimate x0, for a step that adds
    noise of standard deviation sigma (0: deterministic DDIM)."""
    ab, ab_prev = schedule.alpha_bar[t], schedule.alpha_bar[t_prev]
    eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
    direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0))
    return jnp.sqrt(ab_prev) * x0 + direction * eps


def ddim_sample(
    v_fn: VFn,
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

    With `guide_fn`, each step moves its clean estimate up the guide's gradient,
    x0 += scale (1 - ᾱ_t) grad guide(x0), and takes the noise consistent with it: a large
    move while the sample is mostly noise, none at the end.
    """

    def step(x, pair):
        t, t_prev = pair
        v = v_fn(params, x, jnp.full(x.shape[:-1], t / schedule.n_steps), condition)
        x0 = clean_estimate(schedule, x, v, t, clip)
        if guide_fn is not None:
            grad = jax.grad(lambda y: jnp.sum(guide_fn(y)))(x0)
            x0 = jnp.clip(x0 + guidance_scale * (1.0 - schedule.alpha_bar[t]) * grad, -clip, clip)
        return step_mean(schedule, x, x0, t, t_prev, 0.0), None

    x, _ = jax.lax.scan(step, noise, ddim_timesteps(schedule, n_sample_steps))
    return x


def sample_with_path_kl(
    v_fn: VFn,
    params,
    base_params,
    schedule: Schedule,
    condition: jax.Array,
    noise: jax.Array,
    step_noise: jax.Array,
    eta: float = 1.0,
    clip: float = 5.0,
) -> tuple[jax.Array, jax.Array]:
    """Stochastic DDIM samples of the model `params`, and the KL between the paths of the
    two samplers, KL(sampler(params) || sampler(base_params)), along these samples' paths.

    Both samplers take Gaussian steps of the same variance sigma_t^2 on the same
    schedule, so the path KL is the sum over steps of |mean - base mean|^2 / (2 sigma_t^2),
    each mean taken at the sampled x_t (the deterministic last step, sigma = 0, adds
    nothing). `step_noise` [K, ..., D] holds the noise of each of the K steps: fixed, it
    makes samples and KL differentiable functions of the parameters.
    Returns (samples [..., D], path KL [...]).
    """
    n_steps = step_noise.shape[0]

    def step(carry, inputs):
        x, kl = carry
        (t, t_prev), z = inputs
        t_fraction = jnp.full(x.shape[:-1], t / schedule.n_steps)
        sigma = ddim_sigma(schedule.alpha_bar[t], schedule.alpha_bar[t_prev], eta)

        def mean_of(psi_params):
            x0 = clean_estimate(schedule, x, v_fn(psi_params, x, t_fraction, condition), t, clip)
            return step_mean(schedule, x, x0, t, t_prev, sigma)

        mean, base_mean = mean_of(params), mean_of(base_params)
        gap = jnp.sum(jnp.square(mean - base_mean), axis=-1)
        kl = kl + jnp.where(sigma > 0, gap / (2.0 * jnp.maximum(sigma, 1e-8) ** 2), 0.0)
        return (mean + sigma * z, kl), None

    start = (noise, jnp.zeros(noise.shape[:-1]))
    pairs = ddim_timesteps(schedule, n_steps)
    (x, kl), _ = jax.lax.scan(step, start, (pairs, step_noise))
    return x, kl
