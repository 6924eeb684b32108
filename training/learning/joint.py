"""V, M and C trained together on one joint loss: the `joint` stage of the end_to_end and
alternating modes (docs/design.md §1, the end-to-end optimisation).

    lambda_V (recon + KL) + lambda_M (MDN NLL + reward + done) + lambda_pi policy loss
        [+ 0.1 value of z + 0.1 InfoNCE, with joint.aux_losses]

on batches of the dataset's windows. Gradients flow through V's reparameterised z and
through time in M's LSTM, over a whole window or (train.tbptt K) chunks of K steps whose
state is carried but detached. As every stage of train.py, each step is one jitted update
whose randomness is fold_in(seed, step), so a resumed run is bit-identical.

- end_to_end: one optimiser over V, M and C; the weights follow the adaptive schedule, or
  with joint.meta_learning are learned: each step runs `meta_inner_steps` updates with
  the current weights, then moves the weights down the gradient of the loss on held-out
  episodes, differentiated through those updates.
- alternating: cycles of world-model epochs with C frozen, controller epochs with V and M
  frozen, and a joint fine-tune; a frozen group gets zero updates from an optax mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from training.config import Config, ConfigError
from training.learning.losses import (
    discounted_returns,
    imagined_return,
    info_nce_logits,
    info_nce_loss,
    loss_weights,
    masked_mean,
    mdn_loss,
    reinforce_loss,
    vae_loss,
    weighted_sum,
)
from training.learning.optim import make_optimizer, with_frozen
from training.learning.parallel import split_rows
from training.models.controller import gaussian_log_prob
from training.models.mdn_rnn import MDNRNN, initial_state, sample_next_latent, unroll
from training.models.networks import Networks, normalise

# The parameter groups the joint stage trains, and the group each belongs to.
GROUPS = {"vae": "world", "mdn": "world", "value_head": "world", "controller": "controller"}
# Alternating: the groups each phase trains and the loss terms it optimises.
PHASES = ("world", "controller", "joint")
PHASE_GROUPS = {
    "world": ("world",),
    "controller": ("controller",),
    "joint": ("world", "controller"),
}
PHASE_TERMS = {
    "world": ("vae", "mdn", "value_head", "infonce"),
    "controller": ("policy",),
    "joint": ("vae", "mdn", "policy", "value_head", "infonce"),
}
LEARNED_WEIGHTS = ("vae", "mdn", "policy")  # what meta-learning learns; aux weights stay
# What its outer step lowers on held-out windows: the world model's fit and a bounded
# measure of the policy (policy_measure). Not the policy term itself: the REINFORCE
# surrogate is unbounded below, and the outer step drove lambda_M to 0 to chase it; with
# the world model's fit alone it switched the policy term off (docs/results.md).
VALIDATION_TERMS = ("vae", "mdn", "policy")


class Windows(NamedTuple):
    """Training windows on the device, with what the joint loss needs beside the data."""

    observations: jax.Array  # [N, L+1, *obs]
    actions: jax.Array  # [N, L, A]
    rewards: jax.Array  # [N, L]
    dones: jax.Array  # [N, L]
    mask: jax.Array  # [N, L]
    returns: jax.Array  # [N, L] discounted returns within the window
    episode: jax.Array  # [N]


class JointInputs(NamedTuple):
    train: Windows
    validation: Windows  # held-out episodes (meta-learning); the training windows otherwise


def make_windows(data, episode: np.ndarray, rows: np.ndarray, gamma: float) -> Windows:
    """The windows `rows` of train.py's DeviceData."""
    returns = discounted_returns(data.rewards[rows], data.dones[rows], gamma)
    return Windows(
        data.observations[rows],
        data.actions[rows],
        data.rewards[rows],
        data.dones[rows],
        data.mask[rows],
        returns,
        jnp.asarray(episode[rows]),
    )


def held_out_episodes(episode: np.ndarray, fraction: float) -> np.ndarray:
    """Which windows belong to the last `fraction` of the episodes (at least one)."""
    episodes = np.unique(episode)
    if len(episodes) < 2:
        raise ConfigError("joint.meta_learning holds out episodes: the dataset needs at least 2")
    n_held = min(len(episodes) - 1, max(1, round(fraction * len(episodes))))
    return np.isin(episode, episodes[-n_held:])


def prepare(config: Config, data, episode: np.ndarray) -> JointInputs:
    gamma, rows = config.controller.gamma, np.arange(len(episode))
    if not config.joint.meta_learning:
        windows = make_windows(data, episode, rows, gamma)
        return JointInputs(windows, windows)
    held = held_out_episodes(episode, config.joint.validation_fraction)
    return JointInputs(
        make_windows(data, episode, rows[~held], gamma),
        make_windows(data, episode, rows[held], gamma),
    )


def sample_windows(windows: Windows, key: jax.Array, batch_size: int) -> Windows:
    rows = split_rows(jax.random.randint(key, (batch_size,), 0, windows.actions.shape[0]))
    return jax.tree.map(lambda x: x[rows], windows)


def trained_params(params: dict) -> dict:
    return {k: params[k] for k in GROUPS if k in params}


# --- the loss terms ------------------------------------------------------------------------


def reinforce_term(model: Networks, params, batch: Windows, z, hs, final_state, key):
    """REINFORCE on the dataset's actions at [z_t, h_t]; its gradient reaches V and M too,
    through z and h: the representation is shaped by what the policy needs."""
    mean, log_std = model.controller.apply({"params": params["controller"]}, z[:, :-1], hs)
    log_prob = gaussian_log_prob(batch.actions, mean, log_std)
    loss, metrics = reinforce_loss(log_prob, batch.returns, batch.mask)
    return loss, {"baseline": metrics["baseline"]}


def imagined(model: Networks, params, batch: Windows, z, final_state, key, world_fixed: bool):
    """C acts in M for H steps from the state M reached at each window's end: actions and
    next latents are reparameterised samples. (minus the mean imagined return, metrics),
    differentiable through the whole rollout; with `world_fixed` only C is."""
    cfg = model.config
    fixed = jax.lax.stop_gradient if world_fixed else (lambda x: x)
    mdn_params = fixed(params["mdn"])
    low, high = jnp.asarray(model.spaces.action_low), jnp.asarray(model.spaces.action_high)

    def step(carry, key):
        state, z = carry
        k_action, k_latent = jax.random.split(key)
        mean, log_std = model.controller.apply({"params": params["controller"]}, z, state[1])
        action = mean + jnp.exp(log_std) * jax.random.normal(k_action, mean.shape)
        action = jnp.clip(action, low, high)
        state, out = model.mdn.apply({"params": mdn_params}, state, z, action, method=MDNRNN.step)
        z_next = sample_next_latent(k_latent, out, cfg.mdn.temperature)
        return (state, z_next), (out.reward, out.done_logit)

    start = fixed((final_state, z[:, -1]))
    keys = jax.random.split(key, cfg.joint.imagination_horizon)
    _, (rewards, done_logits) = jax.lax.scan(step, start, keys)
    returns = imagined_return(rewards.T, done_logits.T, cfg.controller.gamma)
    # Rollouts start only where the window ends on a real, non-final step.
    live = batch.mask[:, -1] * (1.0 - batch.dones[:, -1])
    imagined = masked_mean(returns, live)
    return -imagined, {"imagined_return": imagined}


def imagination_term(model: Networks, params, batch: Windows, z, hs, final_state, key):
    """Minus the return C imagines in M. Only C learns from it: V and M are held fixed
    here, so that M's reward head is not taught to flatter C."""
    return imagined(model, params, batch, z, final_state, key, world_fixed=True)


def policy_measure(model: Networks, params, batch: Windows, z, hs, final_state, key):
    """Meta-learning's measure of the policy on held-out windows: minus the imagined return
    through V, M and C alike, per imagined step, so on the scale of one reward. Bounded
    as the rewards are, where the REINFORCE surrogate is not."""
    loss, metrics = imagined(model, params, batch, z, final_state, key, world_fixed=False)
    return loss / model.config.joint.imagination_horizon, metrics


POLICY_TERMS = {
    "reinforce": reinforce_term,
    "imagination": imagination_term,
    "measure": policy_measure,  # meta-learning's validation only
}


def infonce_term(model: Networks, batch: Windows, mu, frames, key):
    """InfoNCE on V's mean latents: the anchor z_t, its positive z_{t+1} of the same window,
    and `infonce_negatives` frames drawn from the batch's windows of other episodes."""
    cfg = model.config.joint
    n, length = mu.shape[:2]
    k_rows, k_times = jax.random.split(key)
    shape = (n, length - 1, cfg.infonce_negatives)
    rows = jax.random.randint(k_rows, shape, 0, n)
    times = jax.random.randint(k_times, shape, 0, length)
    other = batch.episode[rows] != batch.episode[:, None, None]
    valid = (other & (frames[rows, times] > 0)).astype(jnp.float32)
    logits = info_nce_logits(mu[:, :-1], mu[:, 1:], mu[rows, times], cfg.infonce_temperature)
    return info_nce_loss(logits, valid, batch.mask)


def standardised(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x in units of its batch's standard deviation about its mean: the value head's
    target, so that its weight means the same whatever the scale of the rewards (raw
    returns of -100s made it outweigh every other term)."""
    mean = masked_mean(x, mask)
    std = jnp.sqrt(masked_mean(jnp.square(x - mean), mask)) + 1e-6
    return jax.lax.stop_gradient((x - mean) / std)


def vae_term(model: Networks, params: dict, batch: Windows, key):
    """V's loss on every real frame of a batch of windows: (loss, metrics, (z, mu, frames)),
    with z the reparameterised latents and frames the frames' mask."""
    cfg = model.config.vae
    x = normalise(batch.observations, params["normaliser"])
    recon, mu, logvar, z = model.vae.apply({"params": params["vae"]}, x, key)
    frames = jnp.concatenate([jnp.ones_like(batch.mask[:, :1]), batch.mask], axis=1)
    loss, metrics = vae_loss(recon, x, mu, logvar, cfg.kl_tolerance, cfg.beta, frames)
    return loss, metrics, (z, mu, frames)


def aux_terms(model: Networks, params: dict, batch: Windows, z, mu, frames, key) -> dict:
    """The auxiliary representation losses on V's latents of a batch of windows: the value
    head's error on the standardised discounted returns, and InfoNCE."""
    value = model.value_head.apply({"params": params["value_head"]}, z[:, :-1])
    target = standardised(batch.returns, batch.mask)
    return {
        "value_head": masked_mean(jnp.square(value - target), batch.mask),
        "infonce": infonce_term(model, batch, mu, frames, key),
    }


def joint_terms(
    model: Networks, params: dict, batch: Windows, key: jax.Array, policy_loss: str | None = None
):
    """Every term of the joint loss on a batch of windows, unweighted: (terms, metrics). The
    policy term is `policy_loss`'s (joint.policy_loss when None)."""
    cfg = model.config
    k_z, k_policy, k_negatives = jax.random.split(key, 3)
    vae, vae_metrics, (z, mu, frames) = vae_term(model, params, batch, k_z)
    state = initial_state((batch.actions.shape[0],), model.mdn.hidden)
    final, hs, out = unroll(
        model.mdn, params["mdn"], state, z[:, :-1], batch.actions, cfg.train.tbptt
    )
    # The target z_{t+1} is held fixed: with gradients into it as well, V could make its
    # latents easy to predict rather than informative.
    mdn, mdn_metrics = mdn_loss(
        out,
        jax.lax.stop_gradient(z[:, 1:]),
        batch.rewards,
        batch.dones,
        batch.mask,
        cfg.mdn.reward_weight,
        cfg.mdn.done_weight,
    )
    policy_term = POLICY_TERMS[policy_loss or cfg.joint.policy_loss]
    policy, policy_metrics = policy_term(model, params, batch, z, hs, final, k_policy)
    terms = {"vae": vae, "mdn": mdn, "policy": policy}
    if model.value_head is not None:
        terms.update(aux_terms(model, params, batch, z, mu, frames, k_negatives))
    metrics = {**vae_metrics, **mdn_metrics, **policy_metrics}
    return terms, {**metrics, **{f"term_{k}": v for k, v in terms.items()}}


# --- the weights ---------------------------------------------------------------------------


def scheduled_weights(config: Config, step) -> dict[str, jax.Array]:
    """lambda_V, lambda_M, lambda_pi at a step of the joint stage, and the fixed auxiliary
    weights."""
    j = config.joint
    if j.schedule:
        weights = loss_weights(
            step,
            j.vae_weight,
            j.mdn_weight,
            j.policy_weight,
            j.policy_warmup_steps,
            j.recon_decay_steps,
            j.recon_floor,
        )
    else:
        weights = initial_lambdas(config)
    return {**weights, **aux_weights(config)}


def aux_weights(config: Config) -> dict[str, jax.Array]:
    j = config.joint
    if not j.aux_losses:
        return {}
    return {
        "value_head": jnp.asarray(j.value_head_weight, jnp.float32),
        "infonce": jnp.asarray(j.infonce_weight, jnp.float32),
    }


def phase_ends(config: Config) -> np.ndarray:
    """Alternating: where each phase of a cycle ends, in steps from the cycle's start; a
    cycle is world_epochs, controller_epochs and joint_epochs epochs of epoch_steps steps."""
    j = config.joint
    lengths = [j.world_epochs, j.controller_epochs, j.joint_epochs]
    return np.cumsum(lengths) * j.epoch_steps


def phase_start(config: Config, phase: str) -> int:
    """The first step of a phase within the joint stage's first cycle."""
    return int(np.concatenate([[0], phase_ends(config)])[PHASES.index(phase)])


def phase_at(config: Config, step: int) -> str:
    """Alternating: the phase of a step of the joint stage."""
    ends = phase_ends(config)
    position = step % int(ends[-1])
    return PHASES[int(np.searchsorted(ends, position, side="right"))]


def in_phase(weights: dict, phase: str) -> dict:
    """The weights with the terms a phase does not optimise set to 0."""
    return {k: w if k in PHASE_TERMS[phase] else jnp.zeros_like(w) for k, w in weights.items()}


# --- updates ---------------------------------------------------------------------------


def loss_and_grads(model: Networks, params, trained, batch, weights, key):
    def loss_fn(trained):
        terms, metrics = joint_terms(model, {**params, **trained}, batch, key)
        return weighted_sum(terms, weights), metrics

    return jax.value_and_grad(loss_fn, has_aux=True)(trained)


def weight_metrics(weights: dict) -> dict:
    return {f"lam_{k}": w for k, w in weights.items()}


def make_step_update(model: Networks, tx, weights_of: Callable) -> Callable:
    """One update of V, M and C on the weighted joint loss: (params, opt_state, inputs,
    key, step) -> (params, opt_state, metrics), jitted."""

    def update(params, opt_state, inputs: JointInputs, key, step):
        k_rows, k_loss = jax.random.split(key)
        batch = sample_windows(inputs.train, k_rows, model.config.train.batch_size)
        weights = weights_of(step)
        trained = trained_params(params)
        (loss, metrics), grads = loss_and_grads(model, params, trained, batch, weights, k_loss)
        updates, opt_state = tx.update(grads, opt_state, trained)
        params = {**params, **optax.apply_updates(trained, updates)}
        return params, opt_state, {"loss": loss, **metrics, **weight_metrics(weights)}

    return jax.jit(update)


def meta_gradient_step(
    inner_step: Callable,
    validation_loss: Callable,
    lambdas: dict,
    carry,
    keys: jax.Array,
    meta_tx: optax.GradientTransformation,
    meta_state,
):
    """One outer update of learnable loss weights. `inner_step(carry, lambdas, key) ->
    (carry, metrics)` runs once per key (a lax.scan) from `carry` with the current weights;
    the gradient of `validation_loss(final carry)` with respect to the weights, through
    every inner step, updates them with `meta_tx`, and they are clamped at >= 0.
    Returns (final carry, new lambdas, meta_state, validation loss, inner metrics)."""

    def outer(lambdas):
        final, metrics = jax.lax.scan(lambda c, k: inner_step(c, lambdas, k), carry, keys)
        return validation_loss(final), (final, metrics)

    (val, (final, metrics)), grads = jax.value_and_grad(outer, has_aux=True)(lambdas)
    updates, meta_state = meta_tx.update(grads, meta_state, lambdas)
    lambdas = jax.tree.map(lambda x: jnp.maximum(x, 0.0), optax.apply_updates(lambdas, updates))
    return final, lambdas, meta_state, val, metrics


def make_meta_update(model: Networks, tx, meta_tx) -> Callable:
    """end_to_end with meta-learned weights: each step is `meta_inner_steps` updates of V,
    M and C with the current lambdas, then one meta-gradient step on the lambdas, whose
    objective is V's and M's unweighted losses and the policy's measure on a batch of
    held-out windows."""
    cfg = model.config

    def update(params, opt_state, inputs: JointInputs, key, step):
        k_inner, k_val_rows, k_val = jax.random.split(key, 3)
        fixed = aux_weights(cfg)

        def inner_step(carry, lambdas, key):
            trained, model_state = carry
            k_rows, k_loss = jax.random.split(key)
            batch = sample_windows(inputs.train, k_rows, cfg.train.batch_size)
            weights = {**lambdas, **fixed}
            (loss, metrics), grads = loss_and_grads(model, params, trained, batch, weights, k_loss)
            updates, model_state = tx.update(grads, model_state, trained)
            return (optax.apply_updates(trained, updates), model_state), {"loss": loss, **metrics}

        val_batch = sample_windows(inputs.validation, k_val_rows, cfg.train.batch_size)

        def validation_loss(carry):
            trained = {**params, **carry[0]}
            terms, _ = joint_terms(model, trained, val_batch, k_val, policy_loss="measure")
            return sum(terms[k] for k in VALIDATION_TERMS)

        keys = jax.random.split(k_inner, cfg.joint.meta_inner_steps)
        carry = (trained_params(params), opt_state["model"])
        (trained, model_state), lambdas, meta_state, val, inner = meta_gradient_step(
            inner_step, validation_loss, opt_state["lambdas"], carry, keys, meta_tx,
            opt_state["meta"],
        )  # fmt: skip
        opt_state = {"model": model_state, "lambdas": lambdas, "meta": meta_state}
        last = jax.tree.map(lambda x: x[-1], inner)  # the last inner step's metrics
        metrics = {**last, "validation": val, **weight_metrics({**lambdas, **fixed})}
        return {**params, **trained}, opt_state, metrics

    return jax.jit(update)


# --- what train.py calls ---------------------------------------------------------------


def initial_lambdas(config: Config) -> dict[str, jax.Array]:
    """lambda_V, lambda_M, lambda_pi as configured: fixed weights, or meta-learning's start."""
    return {
        k: jnp.asarray(getattr(config.joint, f"{k}_weight"), jnp.float32) for k in LEARNED_WEIGHTS
    }


def optimizers(config: Config) -> dict[str, optax.GradientTransformation]:
    """The joint stage's optimisers: one over V, M and C, or one per alternating phase
    (the same Adam, each phase's frozen groups masked out)."""
    if config.joint.meta_learning:
        return {"model": make_optimizer(config.train, eps_root=1e-8)}
    base = make_optimizer(config.train)
    if config.train.mode == "alternating":
        return {phase: with_frozen(base, GROUPS, PHASE_GROUPS[phase]) for phase in PHASES}
    return {"joint": base}


def init_opt_state(config: Config, params: dict):
    trained = trained_params(params)
    txs = optimizers(config)
    if config.joint.meta_learning:
        lambdas = initial_lambdas(config)
        meta = optax.adam(config.joint.meta_lr)
        return {"model": txs["model"].init(trained), "lambdas": lambdas, "meta": meta.init(lambdas)}
    if config.train.mode == "alternating":
        return {phase: tx.init(trained) for phase, tx in txs.items()}
    return txs["joint"].init(trained)


def make_update(model: Networks, start: int) -> Callable:
    """The joint stage's update for train.py's loop: (params, opt_state, inputs, key, step)
    -> (params, opt_state, metrics), where `start` is the stage's first global step."""
    config = model.config
    txs = optimizers(config)
    if config.joint.meta_learning:
        return make_meta_update(model, txs["model"], optax.adam(config.joint.meta_lr))
    if config.train.mode == "end_to_end":
        return make_step_update(
            model, txs["joint"], lambda step: scheduled_weights(config, step - start)
        )

    # alternating: one jitted update per phase, each on its own optimiser state
    phase_updates = {
        phase: make_step_update(
            model,
            txs[phase],
            lambda step, p=phase: in_phase(scheduled_weights(config, step - start), p),
        )
        for phase in PHASES
    }

    def update(params, opt_states, inputs, key, step):
        phase = phase_at(config, step - start)
        params, state, metrics = phase_updates[phase](params, opt_states[phase], inputs, key, step)
        return params, {**opt_states, phase: state}, metrics

    return update
