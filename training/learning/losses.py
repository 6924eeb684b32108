"""Every training loss as a pure function of model outputs and data.

Each returns (scalar loss, dict of scalar metrics); masks weight padded steps out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from training.models.controller import gaussian_log_prob
from training.models.mdn_rnn import MDNOutput


def gaussian_kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the latent axis."""
    return 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def vae_loss(
    recon: jax.Array,
    target: jax.Array,
    mu: jax.Array,
    logvar: jax.Array,
    kl_tolerance: float = 0.5,
    beta: float = 1.0,
    mask: jax.Array | None = None,
):
    """Squared reconstruction error + KL, with World Models' free bits: the KL is not
    pushed below `kl_tolerance` nats per latent dimension. `mask` (the frames' batch
    shape) leaves padding frames out."""
    obs_axes = tuple(range(mu.ndim - 1, target.ndim))
    recon_err = jnp.sum(jnp.square(recon - target), axis=obs_axes)
    kl = gaussian_kl(mu, logvar)
    kl_floor = kl_tolerance * mu.shape[-1]
    mean = jnp.mean if mask is None else (lambda x: masked_mean(x, mask))
    loss = mean(recon_err + beta * jnp.maximum(kl, kl_floor))
    return loss, {"recon": mean(recon_err), "kl": mean(kl)}


def mixture_nll(out: MDNOutput, target: jax.Array) -> jax.Array:
    """-log sum_k pi_k N(target | mu_k, sigma_k), per step, divided by the latent size."""
    log_pi = jax.nn.log_softmax(out.logits, axis=-1)
    diff = (target[..., None, :] - out.mu) * jnp.exp(-out.log_sigma)
    log_n = jnp.sum(-0.5 * diff**2 - out.log_sigma - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
    return -jax.nn.logsumexp(log_pi + log_n, axis=-1) / target.shape[-1]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mdn_loss(
    out: MDNOutput,
    z_next: jax.Array,
    rewards: jax.Array,
    dones: jax.Array,
    mask: jax.Array,
    reward_weight: float = 1.0,
    done_weight: float = 1.0,
):
    nll = masked_mean(mixture_nll(out, z_next), mask)
    reward_mse = masked_mean(jnp.square(out.reward - rewards), mask)
    done_bce = masked_mean(
        jnp.logaddexp(0.0, out.done_logit) - dones * out.done_logit, mask
    )  # binary cross-entropy on logits
    loss = nll + reward_weight * reward_mse + done_weight * done_bce
    return loss, {"nll": nll, "reward_mse": reward_mse, "done_bce": done_bce}


def discounted_returns(rewards: jax.Array, dones: jax.Array, gamma: float) -> jax.Array:
    """G_t = r_t + gamma (1 - done_t) G_{t+1} along the last axis (no bootstrap past the end)."""

    def back(carry, x):
        r, d = x
        g = r + gamma * (1.0 - d) * carry
        return g, g

    xs = (jnp.moveaxis(rewards, -1, 0), jnp.moveaxis(dones, -1, 0))
    _, g = jax.lax.scan(back, jnp.zeros(rewards.shape[:-1]), xs, reverse=True)
    return jnp.moveaxis(g, 0, -1)


def return_weights(returns: jax.Array, mask: jax.Array, temperature: float) -> jax.Array:
    """exp(standardised return / temperature), capped: better steps count more when cloned."""
    mean = masked_mean(returns, mask)
    std = jnp.sqrt(masked_mean(jnp.square(returns - mean), mask)) + 1e-6
    return jnp.exp(jnp.minimum((returns - mean) / std / temperature, 5.0))


def weighted_bc_loss(mean, log_std, actions, weights, mask):
    """Return-weighted behaviour cloning: -sum w log pi(a | z, h) / sum w."""
    log_prob = gaussian_log_prob(actions, mean, log_std)
    w = jax.lax.stop_gradient(weights) * mask
    loss = -jnp.sum(w * log_prob) / jnp.maximum(jnp.sum(w), 1e-6)
    mse = masked_mean(jnp.mean(jnp.square(mean - actions), axis=-1), mask)
    return loss, {"action_mse": mse, "log_prob": masked_mean(log_prob, mask)}


# --- the joint objective of the end_to_end and alternating modes -------------------------


def loss_weights(
    step: jax.Array | int,
    vae_weight: float,
    mdn_weight: float,
    policy_weight: float,
    policy_warmup_steps: int,
    recon_decay_steps: int,
    recon_floor: float = 0.1,
) -> dict[str, jax.Array]:
    """The adaptive schedule: lambda_pi = lambda_pi0 min(1, step / warmup) grows
    while lambda_V = lambda_V0 max(floor, 1 - step / decay) shrinks; lambda_M stays.
    Its lambda_recon weighs V's whole loss (reconstruction and KL), as here."""
    step = jnp.asarray(step, jnp.float32)
    return {
        "vae": vae_weight * jnp.maximum(recon_floor, 1.0 - step / recon_decay_steps),
        "mdn": jnp.asarray(mdn_weight, jnp.float32),
        "policy": policy_weight * jnp.minimum(1.0, step / policy_warmup_steps),
    }


def weighted_sum(terms: dict[str, jax.Array], weights: dict[str, jax.Array]) -> jax.Array:
    """sum_k weights[k] terms[k] over the terms that have a weight."""
    return sum(weights[k] * terms[k] for k in weights)


def reinforce_loss(log_prob: jax.Array, returns: jax.Array, mask: jax.Array):
    """REINFORCE on logged actions: -E[log pi(a_t | s_t) (G_t - b)], with the batch's mean
    return as the baseline b (it lowers the variance and leaves the gradient's mean)."""
    baseline = masked_mean(returns, mask)
    advantage = jax.lax.stop_gradient(returns - baseline)
    loss = -masked_mean(log_prob * advantage, mask)
    return loss, {"baseline": baseline, "log_prob": masked_mean(log_prob, mask)}


def imagined_return(rewards: jax.Array, done_logits: jax.Array, gamma: float) -> jax.Array:
    """sum_k gamma^k r_k prod_{j<k} (1 - p(done_j)) over the horizon (last axis): the return
    M predicts for an imagined rollout, every step weighted by the chance it is still on."""
    alive = jnp.cumprod(1.0 - jax.nn.sigmoid(done_logits), axis=-1)
    alive_before = jnp.concatenate([jnp.ones_like(alive[..., :1]), alive[..., :-1]], axis=-1)
    discount = gamma ** jnp.arange(rewards.shape[-1])
    return jnp.sum(discount * alive_before * rewards, axis=-1)


def info_nce_logits(
    anchor: jax.Array, positive: jax.Array, negatives: jax.Array, temperature: float
) -> jax.Array:
    """Cosine similarities / temperature of each anchor [..., Z] to its positive [..., Z]
    (index 0) and to its negatives [..., K, Z] (1..K): [..., 1 + K]."""

    def unit(x):
        # eps inside the root: the norm's gradient at 0 (a zero-padding frame's latent
        # under a bias-free encoder) would be NaN, and NaN * mask 0 is still NaN.
        return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)

    a = unit(anchor)
    pos = jnp.sum(a * unit(positive), axis=-1, keepdims=True)
    neg = jnp.einsum("...z,...kz->...k", a, unit(negatives))
    return jnp.concatenate([pos, neg], axis=-1) / temperature


def info_nce_loss(logits: jax.Array, negative_valid: jax.Array, mask: jax.Array) -> jax.Array:
    """-log exp(pos) / (exp(pos) + sum exp(neg)), negatives that are not valid (the same
    trajectory, padding) left out; the mean over the anchors the mask keeps."""
    valid = jnp.concatenate([jnp.ones_like(negative_valid[..., :1]), negative_valid], axis=-1)
    logits = jnp.where(valid > 0, logits, -jnp.inf)
    return masked_mean(-jax.nn.log_softmax(logits, axis=-1)[..., 0], mask)
