"""What each stage reads: the dataset on the device, and what the stages before it give
the later ones (V's latents for M, the planning-state transitions for C, psi, the readout
and the goal decoder)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from training.config import Config
from training.data.datasets import Sequences
from training.errors import UsageError
from training.learning import evolution, joint
from training.learning.losses import discounted_returns, return_weights
from training.models.networks import GOAL_DECODER, Networks, Spaces, normalise
from training.models.value import ridge_solve

# The stages that read the transitions (C's too when it imitates). None of them trains V,
# M or the cumulants the transitions are made of, so the first of them to run builds them
# for all.
TRANSITION_STAGES = ("psi", "readout", "value")
WINDOW_TRAINERS = ("reinforce", "imagination")  # C's trainers that read the data's windows
EVOLUTION_TRAINERS = ("cmaes_dream", "cmaes_env")  # C's trainers that search its weights


def reads_transitions(stage: str, config: Config) -> bool:
    if stage == "controller":
        return config.train.controller_trainer == "imitation"
    return stage in TRANSITION_STAGES


class DeviceData(NamedTuple):
    """The dataset on the device, as every stage reads it (a pytree, so jit takes it)."""

    observations: jax.Array  # [N, L+1, *obs] as stored
    frames: jax.Array  # [M, *obs] every real observation, for V
    actions: jax.Array  # [N, L, A]
    rewards: jax.Array  # [N, L]
    dones: jax.Array  # [N, L]
    mask: jax.Array  # [N, L]


def real_frames(seqs: Sequences) -> np.ndarray:
    """The observations that are not padding: the first of each window, then one per real step."""
    valid = np.concatenate([np.ones_like(seqs.mask[:, :1]), seqs.mask], axis=1) > 0
    return seqs.observations[valid]


def device_data(seqs: Sequences) -> DeviceData:
    return DeviceData(
        observations=jnp.asarray(seqs.observations),
        frames=jnp.asarray(real_frames(seqs)),
        actions=jnp.asarray(seqs.actions),
        rewards=jnp.asarray(seqs.rewards),
        dones=jnp.asarray(seqs.dones),
        mask=jnp.asarray(seqs.mask),
    )


def spaces_of(dataset, seqs: Sequences) -> Spaces:
    obs_shape = tuple(seqs.observations.shape[2:])
    if len(obs_shape) == 3:
        if obs_shape != (64, 64, 3):
            raise UsageError(f"pixel observations must be 64x64x3, the dataset has {obs_shape}")
        kind = "pixels"
    elif len(obs_shape) == 1:
        kind = "vector"
    else:
        raise UsageError(f"unsupported observation shape {obs_shape}")
    space = dataset.action_space
    return Spaces(
        obs_shape=obs_shape,
        obs_kind=kind,
        action_low=tuple(float(x) for x in np.broadcast_to(space.low, space.shape)),
        action_high=tuple(float(x) for x in np.broadcast_to(space.high, space.shape)),
    )


class Transitions(NamedTuple):
    """Every real transition of the dataset, flattened, as the later stages read them."""

    states: jax.Array  # [M, S] planning state s_t = [z_t, h_t]
    next_states: jax.Array  # [M, S]
    phi: jax.Array  # [M, P] cumulants of s_t
    dones: jax.Array  # [M]
    actions: jax.Array  # [M, A]
    weights: jax.Array  # [M] return weights for cloning
    observations: jax.Array  # [M, *obs] for goal tasks, [M, 0] without them
    mc_psi: jax.Array  # [M, P] discounted sum of the cumulants that followed, in the data


def in_chunks(fn: Callable, arrays: tuple, chunk: int = 256):
    """fn over the leading axis in fixed-size (zero-padded) chunks: one compilation."""
    n = arrays[0].shape[0]
    outputs = []
    for i in range(0, n, chunk):
        part = [a[i : i + chunk] for a in arrays]
        pad = chunk - part[0].shape[0]
        part = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in part]
        out = fn(*part)
        outputs.append(jax.tree.map(lambda x, keep=chunk - pad: x[:keep], out))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs)


def encode_sequences(model: Networks, params: dict, observations):
    """(mu, logvar) of V for every observation of every window, [N, L+1, Z] each."""
    encode = jax.jit(
        lambda x: model.vae.apply(
            {"params": params["vae"]}, normalise(x, params["normaliser"]), method="encode"
        )
    )
    return in_chunks(encode, (observations,))


def window_positions(episode: np.ndarray) -> np.ndarray:
    """0 for an episode's first window, 1 for its second, ..."""
    index = np.arange(len(episode))
    starts = np.r_[True, episode[1:] != episode[:-1]]
    return index - np.maximum.accumulate(np.where(starts, index, 0))


def unroll_episodes(model: Networks, params: dict, zs, actions, episode: np.ndarray):
    """M's state h before each observation, [N, L+1, H], driven by the mean latents, with
    the state carried from each window of an episode into the next, as when acting."""
    unroll = jax.jit(
        lambda c, h, z, a: model.mdn.apply({"params": params["mdn"]}, (c, h), z, a)[:2]
    )
    n, hidden = actions.shape[0], model.mdn.hidden
    positions = window_positions(episode)
    final_c, final_h = jnp.zeros((n, hidden)), jnp.zeros((n, hidden))
    hs = jnp.zeros((n, actions.shape[1] + 1, hidden))
    for k in range(int(positions.max()) + 1):
        rows = np.flatnonzero(positions == k)
        if k:
            start_c, start_h = final_c[rows - 1], final_h[rows - 1]
        else:
            start_c = start_h = jnp.zeros((len(rows), hidden))
        (c, h), window_hs = in_chunks(unroll, (start_c, start_h, zs[rows], actions[rows]))
        final_c, final_h = final_c.at[rows].set(c), final_h.at[rows].set(h)
        hs = hs.at[rows].set(jnp.concatenate([window_hs, h[:, None]], axis=1))
    return hs


def monte_carlo_psi(phi: np.ndarray, dones: np.ndarray, episode: np.ndarray, gamma: float):
    """Discounted sums of future cumulants along each episode, for transitions given in
    chronological order within each episode: the psi each transition actually had."""
    psi = np.zeros_like(phi)
    running = np.zeros(phi.shape[-1], phi.dtype)
    for t in range(len(phi) - 1, -1, -1):
        if t == len(phi) - 1 or episode[t] != episode[t + 1]:
            running = np.zeros_like(running)
        running = phi[t] + gamma * (1.0 - dones[t]) * running
        psi[t] = running
    return psi


def psi_statistics(mc_psi: np.ndarray) -> dict:
    return {
        "mean": jnp.asarray(mc_psi.mean(0), jnp.float32),
        "std": jnp.asarray(np.maximum(mc_psi.std(0), 1e-2), jnp.float32),
    }


def build_transitions(model: Networks, params: dict, data: DeviceData, episode: np.ndarray):
    cfg = model.config
    mu, _ = encode_sequences(model, params, data.observations)
    hs = unroll_episodes(model, params, mu[:, :-1], data.actions, episode)
    states = jnp.concatenate([mu, hs], axis=-1)
    phi = model.phi(params, data.observations[:, :-1], mu[:, :-1])
    returns = discounted_returns(data.rewards, data.dones, cfg.controller.gamma)
    weights = return_weights(returns, data.mask, cfg.controller.return_temperature)
    observations = data.observations[:, :-1]
    if model.goal_decoder is None:
        observations = jnp.zeros((*observations.shape[:2], 0))
    valid = np.asarray(data.mask) > 0
    phi, dones = np.asarray(phi[valid]), np.asarray(data.dones[valid])
    episodes = np.broadcast_to(episode[:, None], valid.shape)[valid]
    return Transitions(
        states[:, :-1][valid],
        states[:, 1:][valid],
        jnp.asarray(phi),
        jnp.asarray(dones),
        data.actions[valid],
        weights[valid],
        observations[valid].astype(jnp.float32),
        jnp.asarray(monte_carlo_psi(phi, dones, episodes, cfg.successor.gamma)),
    )


def with_aux(stage: str, config: Config) -> bool:
    """Whether a staged stage trains the auxiliary losses: V's, with joint.aux_losses."""
    return stage == "vae" and config.joint.aux_losses


def controller_inputs(model: Networks, params: dict, data: DeviceData, episode: np.ndarray):
    """What C's trainer reads, other than the transitions: the data's windows, the dreams'
    starts, or (in the real environment) nothing."""
    trainer = model.config.train.controller_trainer
    if trainer in WINDOW_TRAINERS:
        rows = np.arange(len(episode))
        return joint.make_windows(data, episode, rows, model.config.controller.gamma)
    if trainer == "cmaes_dream":
        return evolution.dream_starts(model, params, data, episode)
    return jnp.zeros(())


def prepare_stage(
    stage: str,
    model: Networks,
    params: dict,
    data: DeviceData,
    episode,
    trans: Transitions | None = None,
):
    """(params, inputs) for a stage; the psi stage also sets the psi normalisation. A
    transition stage reads `trans` when given, built from V and M when not."""
    if stage == "joint":
        return params, joint.prepare(model.config, data, episode)
    if with_aux(stage, model.config):
        windows = np.arange(len(episode))
        return params, joint.make_windows(data, episode, windows, model.config.controller.gamma)
    if stage == "controller" and not reads_transitions(stage, model.config):
        return params, controller_inputs(model, params, data, episode)
    if stage == "vae":
        return params, (data.frames,)
    if stage == "geometry":
        return params, (data.observations, data.mask)
    if stage == "mdn":
        mu, logvar = encode_sequences(model, params, data.observations)
        return params, (mu, logvar, data.actions, data.rewards, data.dones, data.mask)
    if model.step_map is not None and stage in TRANSITION_STAGES:
        params = {**params, "step_scale": step_scale(model, params, data)}
    if trans is None:
        trans = build_transitions(model, params, data, episode)
    if stage == "psi":
        params = {**params, "psi_norm": psi_statistics(np.asarray(trans.mc_psi))}
    if stage == "value" and model.config.value.goal_weights == "least_squares":
        params = {**params, GOAL_DECODER: fit_goal_weights(model, params, trans.observations)}
    return params, trans


def step_scale(model: Networks, params: dict, data: DeviceData, windows: int = 4096):
    """The trained step map's median length of one step of the data (consecutive real
    observations of up to `windows` windows): dividing by it makes a unit one step. The
    map's fit counts steps only up to a scale, which its far pairs' hinge inflates."""
    raw = model.steps_point({**params, "step_scale": jnp.ones(())}, data.observations[:windows])
    lengths = jnp.linalg.norm(raw[:, 1:] - raw[:, :-1], axis=-1)  # [N, L]
    real = np.asarray(data.mask[:windows]) > 0
    return jnp.asarray(np.median(np.asarray(lengths)[real]), jnp.float32)


def fit_goal_weights(model: Networks, params: dict, observations: jax.Array) -> dict:
    """The least-squares goal fit (GoalFit's params): the data's states it keeps and the
    ridge map from the rewards at those states to cumulant weights. Drawn by the config's
    seed. With goal dimensions, half of the states are moved anywhere in the box the goal
    dimensions span grown by a goal's width (the goal reward is known everywhere, so the
    fit need not stop where the data thins out).

    The margin matters at the outer walls: without states beyond the data the fit is free
    there, overshoots, and a goal near a wall rewards pressing into it, where M imagines
    the agent going on."""
    n_states = model.goal_decoder.n_states
    value = model.config.value
    k_rows, k_moved = jax.random.split(jax.random.fold_in(jax.random.key(model.config.seed), 7))
    obs = observations[jax.random.randint(k_rows, (n_states,), 0, observations.shape[0])]
    if model.step_map is None:
        dims = jnp.asarray(value.goal_dims)
        low, high = goal_box(observations, dims)
        obs = half_moved(k_moved, obs, dims, low - value.goal_sigma, high + value.goal_sigma)
    phi = model.phi(params, obs, model.encode(params, obs))
    return {"positions": model.state_point(params, obs), "solve": ridge_solve(phi)}


def goal_box(observations: jax.Array, dims: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The lowest and highest of the data's goal dimensions: where goals are drawn."""
    positions = observations[:, dims]
    return jnp.min(positions, axis=0), jnp.max(positions, axis=0)


def half_moved(key: jax.Array, obs: jax.Array, dims: jax.Array, low, high) -> jax.Array:
    """`obs` with the goal dimensions of its first half moved anywhere in [low, high]."""
    n = obs.shape[0] // 2
    moved = jax.random.uniform(key, (n, dims.shape[0]), minval=low, maxval=high)
    return obs.at[:n, dims].set(moved)
