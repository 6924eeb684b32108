"""The stages of a run: where each lies on the global step counter, its loss, and its
jitted update.

The losses are pure functions of (params, inputs, key, step). Each reads the whole
parameter tree; the stage's own entry is the one differentiated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from training.config import Config
from training.learning import evolution, joint
from training.learning.losses import mdn_loss, vae_loss, weighted_bc_loss, weighted_sum
from training.learning.parallel import split_rows
from training.learning.stage_inputs import (
    EVOLUTION_TRAINERS,
    Transitions,
    goal_box,
    half_moved,
    with_aux,
)
from training.models.diffusion import v_loss
from training.models.geometry import distance, step_losses
from training.models.mdn_rnn import initial_state
from training.models.networks import GOAL_DECODER, Networks, denormalise, normalise
from training.models.successor import ema_update
from training.models.value import goal_reward


def stage_bounds(config: Config) -> dict[str, tuple[int, int]]:
    """[start, end) of each stage on the global step counter."""
    bounds, start = {}, 0
    for stage, steps in config.train.stage_steps().items():
        bounds[stage] = (start, start + steps)
        start += steps
    return bounds


def stage_at(config: Config, step: int) -> str:
    for stage, (start, end) in stage_bounds(config).items():
        if start <= step < end:
            return stage
    raise ValueError(f"step {step} is past the end of training")


# --- the losses of the stages ---------------------------------------------------------


def sample_rows(key: jax.Array, n: int, batch_size: int) -> jax.Array:
    return split_rows(jax.random.randint(key, (batch_size,), 0, n))


def vae_objective(model: Networks, params, inputs, key, step):
    (frames,) = inputs
    k_rows, k_z = jax.random.split(key)
    rows = sample_rows(k_rows, frames.shape[0], model.config.train.batch_size)
    x = normalise(frames[rows], params["normaliser"])
    recon, mu, logvar, _ = model.vae.apply({"params": params["vae"]}, x, k_z)
    return vae_loss(recon, x, mu, logvar, model.config.vae.kl_tolerance, model.config.vae.beta)


def vae_aux_objective(model: Networks, params, windows: joint.Windows, key, step):
    """staged with joint.aux_losses: V and the value head on batches of windows, V's loss
    plus the auxiliary losses with the joint stage's weights."""
    k_rows, k_z, k_aux = jax.random.split(key, 3)
    batch = joint.sample_windows(windows, k_rows, model.config.train.batch_size)
    loss, metrics, (z, mu, frames) = joint.vae_term(model, params, batch, k_z)
    aux = joint.aux_terms(model, params, batch, z, mu, frames, k_aux)
    total = loss + weighted_sum(aux, joint.aux_weights(model.config))
    return total, {**metrics, **{f"term_{k}": v for k, v in aux.items()}}


def mdn_objective(model: Networks, params, inputs, key, step):
    mu, logvar, actions, rewards, dones, mask = inputs
    k_rows, k_z = jax.random.split(key)
    rows = sample_rows(k_rows, actions.shape[0], model.config.train.batch_size)
    z = mu[rows] + jnp.exp(0.5 * logvar[rows]) * jax.random.normal(k_z, mu[rows].shape)
    state = initial_state((rows.shape[0],), model.mdn.hidden)
    _, _, out = model.mdn.apply({"params": params["mdn"]}, state, z[:, :-1], actions[rows])
    cfg = model.config.mdn
    return mdn_loss(
        out, z[:, 1:], rewards[rows], dones[rows], mask[rows], cfg.reward_weight, cfg.done_weight
    )


def imitation_objective(model: Networks, params, trans: Transitions, key, step):
    """C clones the data's actions at [z, h], each weighted by the return that followed it."""
    rows = sample_rows(key, trans.actions.shape[0], model.config.train.batch_size)
    z, h = jnp.split(trans.states[rows], [model.latent_dim], axis=-1)
    mean, log_std = model.controller.apply({"params": params["controller"]}, z, h)
    ones = jnp.ones(rows.shape)
    return weighted_bc_loss(mean, log_std, trans.actions[rows], trans.weights[rows], ones)


def policy_objective(model: Networks, params, windows: joint.Windows, key, step):
    """The joint stage's policy term alone (REINFORCE or the imagined return, as the
    controller's trainer says), on batches of windows; only C is differentiated."""
    k_rows, k_terms = jax.random.split(key)
    batch = joint.sample_windows(windows, k_rows, model.config.train.batch_size)
    trainer = model.config.train.controller_trainer
    terms, metrics = joint.joint_terms(model, params, batch, k_terms, policy_loss=trainer)
    kept = ("baseline", "imagined_return")
    return terms["policy"], {k: v for k, v in metrics.items() if k in kept}


def bellman_target(model: Networks, params, trans: Transitions, rows, key):
    """Normalised psi = phi(s) + gamma (1 - done) psi', psi' drawn from the EMA model at s'."""
    sf = model.config.successor
    noise = jax.random.normal(key, (rows.shape[0], model.psi_dim))
    psi_next = model.sample_psi(
        params["psi_ema"], trans.next_states[rows], noise, sf.target_sample_steps
    )
    psi_next = denormalise(psi_next, params["psi_norm"])
    target = trans.phi[rows] + sf.gamma * (1.0 - trans.dones[rows])[:, None] * psi_next
    return jax.lax.stop_gradient(normalise(target, params["psi_norm"]))


def psi_objective(model: Networks, params, trans: Transitions, key, step):
    """Diffusion loss on distributional Bellman targets. The first `mc_warmup_steps` fit
    the data's own discounted sums instead: bootstrapping from an untrained model would
    take hundreds of rounds of gamma-contraction to forget its start."""
    k_rows, k_target, k_loss = jax.random.split(key, 3)
    sf = model.config.successor
    rows = sample_rows(k_rows, trans.states.shape[0], sf.batch_size)
    warmup = step < stage_bounds(model.config)["psi"][0] + sf.mc_warmup_steps
    # A cond, not a where: during the warm-up the Bellman target's sampling is not run.
    x0 = jax.lax.cond(
        warmup,
        lambda: normalise(trans.mc_psi[rows], params["psi_norm"]),
        lambda: bellman_target(model, params, trans, rows, k_target),
    )
    states = trans.states[rows]
    if sf.history_dropout > 0.0:
        k_loss, k_drop = jax.random.split(k_loss)
        drop = jax.random.bernoulli(k_drop, sf.history_dropout, (rows.shape[0], 1))
        is_h = jnp.arange(states.shape[-1]) >= model.latent_dim
        states = jnp.where(drop & is_h, 0.0, states)
    loss = v_loss(model.predict_v, params["psi"], model.schedule, x0, states, k_loss)
    return loss, {"target_abs": jnp.mean(jnp.abs(x0))}


def readout_objective(model: Networks, params, trans: Transitions, key, step):
    """Action regression on (s, outcome) pairs. The Monte-Carlo outcome is the future the
    action actually led to; the Bellman one draws that future from the psi-model at s',
    which tells the action apart only through the one step between s and s'."""
    k_rows, k_target = jax.random.split(key)
    rows = sample_rows(k_rows, trans.states.shape[0], model.config.successor.batch_size)
    if model.config.readout.target == "monte_carlo":
        psi = normalise(trans.mc_psi[rows], params["psi_norm"])
    else:
        psi = bellman_target(model, params, trans, rows, k_target)
    action = model.read_out(params, trans.states[rows], psi)
    return jnp.mean(jnp.sum(jnp.square(action - trans.actions[rows]), axis=-1)), {}


def value_objective(model: Networks, params, trans: Transitions, key, step):
    """phi(s) . w(g) regressed on the goal reward r_g(s). With goal dimensions, goals are
    spread uniformly over the box the data's span, at the data's states and at the same
    states moved anywhere in that box: the reward is known everywhere, so its fit need not
    stop where the data thins out. In the learned step space, goals are the data's own
    states. A least-squares fit (set when the stage starts) is exact and learns nothing
    here: its steps only measure it."""
    cfg, n = model.config, trans.states.shape[0]
    k_rows, k_goals, k_moved = jax.random.split(key, 3)
    batch = cfg.successor.batch_size
    obs = trans.observations[sample_rows(k_rows, n, batch)]
    if model.step_map is None:
        dims = jnp.asarray(cfg.value.goal_dims)
        low, high = goal_box(trans.observations, dims)
        obs = half_moved(k_moved, obs, dims, low, high)
        goals = jax.random.uniform(k_goals, (batch, dims.shape[0]), minval=low, maxval=high)
    else:
        goals = model.state_point(params, trans.observations[sample_rows(k_goals, n, batch)])
    phi = model.phi(params, obs, model.encode(params, obs))
    goal_params = params[GOAL_DECODER]
    if cfg.value.goal_weights == "least_squares":
        goal_params = jax.lax.stop_gradient(goal_params)
    weights = model.goal_decoder.apply({"params": goal_params}, goals)  # [B, P]
    predicted = phi @ weights.T  # [states, goals]
    points = model.state_point(params, obs)
    reward = goal_reward(points[:, None], goals[None], cfg.value.goal_sigma)
    return jnp.mean(jnp.square(predicted - reward)), {"reward_mean": jnp.mean(reward)}


def geometry_objective(model: Networks, params, inputs, key, step):
    """The step map's fit on the data's windows (training/models/geometry.py): two
    observations of one window, and one of another window as the far one."""
    observations, mask = inputs  # [N, L+1, *obs], [N, L]
    n, length = observations.shape[:2]
    k_rows, k_times, k_other = jax.random.split(key, 3)
    batch = model.config.successor.batch_size
    rows = sample_rows(k_rows, n, batch)
    times = jax.random.randint(k_times, (batch, 2), 0, length)
    real = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1) > 0  # [N, L+1]
    valid = (real[rows, times[:, 0]] & real[rows, times[:, 1]]).astype(jnp.float32)
    first = model.steps_point(params, observations[rows, times[:, 0]])
    second = model.steps_point(params, observations[rows, times[:, 1]])
    other = model.steps_point(params, observations[sample_rows(k_other, n, batch), 0])
    near = distance(first, second)
    gaps = jnp.abs(times[:, 0] - times[:, 1]).astype(jnp.float32)
    fit, hinge = step_losses(near, gaps, valid, distance(first, other), length - 1,
                             model.config.geometry.expectile)  # fmt: skip
    error = jnp.sum(jnp.abs(near - gaps) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    return fit + hinge, {"fit": fit, "hinge": hinge, "steps_error": error}


CONTROLLER_OBJECTIVES = {
    "imitation": imitation_objective,
    "reinforce": policy_objective,
    "imagination": policy_objective,
}
OBJECTIVES = {
    "vae": vae_objective,
    "mdn": mdn_objective,
    "geometry": geometry_objective,
    "psi": psi_objective,
    "readout": readout_objective,
    "value": value_objective,
}


# --- the updates ------------------------------------------------------------------------


def stage_params(stage: str, config: Config, params: dict) -> dict:
    """The parameter groups a (non-joint) stage trains: its own, and the value head
    beside V's when the auxiliary losses train with it."""
    groups = (stage, "value_head") if with_aux(stage, config) else (stage,)
    return {k: params[k] for k in groups}


def stage_update(stage: str, model: Networks, tx) -> Callable:
    """The jitted update of one stage: (params, opt_state, inputs, key, step) -> (params,
    opt_state, metrics)."""
    if stage == "joint":
        return joint.make_update(model, stage_bounds(model.config)["joint"][0])
    trainer = model.config.train.controller_trainer
    if stage == "controller" and trainer in EVOLUTION_TRAINERS:
        return evolution.make_update(model)
    if stage == "controller":
        objective = CONTROLLER_OBJECTIVES[trainer]
    elif with_aux(stage, model.config):
        objective = vae_aux_objective
    else:
        objective = OBJECTIVES[stage]

    def update(params, opt_state, inputs, key, step):
        def loss_fn(own):
            return objective(model, {**params, **own}, inputs, key, step)

        own = stage_params(stage, model.config, params)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(own)
        updates, opt_state = tx.update(grads, opt_state, own)
        new = {**params, **optax.apply_updates(own, updates)}
        if stage == "psi":
            decay = model.config.successor.ema_decay
            new["psi_ema"] = ema_update(params["psi_ema"], new["psi"], decay)
        return new, opt_state, {"loss": loss, **metrics}

    return jax.jit(update)
