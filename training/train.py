"""Training a bundle: the world model V, M, C, then the successor-feature psi-model, its
readout policy and the goal decoder on the planning states [z, h] that V and M give.

The world model trains in one of three modes (`train.mode`):
- staged: V, then M on V's latents, then C with V and M frozen, each its own stage;
- end_to_end and alternating: one `joint` stage on the joint loss (training/joint.py).

One global step counter runs through the stages. Every step's randomness is
`fold_in(seed, step)`, and each checkpoint holds parameters and optimiser states, so a run
that is interrupted and re-run on the same directory continues from its latest saved step
and ends with the same parameters as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from training import checkpoint, joint
from training.config import Config, ConfigError
from training.data import Sequences, dataset_info, load_sequences, open_dataset
from training.diffusion import v_loss
from training.envs import get_env_spec
from training.models.mdn_rnn import initial_state
from training.models.successor import ema_update
from training.models.value import goal_reward
from training.models.world import (
    Spaces,
    WorldModel,
    denormalise,
    normalise,
    observation_stats,
)
from training.objectives import (
    discounted_returns,
    mdn_loss,
    return_weights,
    vae_loss,
    weighted_bc_loss,
    weighted_sum,
)
from training.optim import make_optimizer
from training.parallel import check_batches, make_mesh, replicated, split_rows
from training.plots import plot_lambda_trajectory, plot_loss_curves

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"
LAMBDA_FILE = "lambda_trajectory.png"


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
            raise ValueError(f"pixel observations must be 64x64x3, the dataset has {obs_shape}")
        kind = "pixels"
    elif len(obs_shape) == 1:
        kind = "vector"
    else:
        raise ValueError(f"unsupported observation shape {obs_shape}")
    space = dataset.action_space
    return Spaces(
        obs_shape=obs_shape,
        obs_kind=kind,
        action_low=tuple(float(x) for x in np.broadcast_to(space.low, space.shape)),
        action_high=tuple(float(x) for x in np.broadcast_to(space.high, space.shape)),
    )


# --- the losses of the stages: pure functions of (params, inputs, key) -----------------
# Each reads the whole parameter tree; the stage's own entry is the one differentiated.


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


def sample_rows(key: jax.Array, n: int, batch_size: int) -> jax.Array:
    return split_rows(jax.random.randint(key, (batch_size,), 0, n))


def vae_objective(model: WorldModel, params, inputs, key, step):
    (frames,) = inputs
    k_rows, k_z = jax.random.split(key)
    rows = sample_rows(k_rows, frames.shape[0], model.config.train.batch_size)
    x = normalise(frames[rows], params["normaliser"])
    recon, mu, logvar, _ = model.vae.apply({"params": params["vae"]}, x, k_z)
    return vae_loss(recon, x, mu, logvar, model.config.vae.kl_tolerance, model.config.vae.beta)


def vae_aux_objective(model: WorldModel, params, windows: joint.Windows, key, step):
    """staged with joint.aux_losses: V and the value head on batches of windows, V's loss
    plus the auxiliary losses with the joint stage's weights."""
    k_rows, k_z, k_aux = jax.random.split(key, 3)
    batch = joint.sample_windows(windows, k_rows, model.config.train.batch_size)
    loss, metrics, (z, mu, frames) = joint.vae_term(model, params, batch, k_z)
    aux = joint.aux_terms(model, params, batch, z, mu, frames, k_aux)
    total = loss + weighted_sum(aux, joint.aux_weights(model.config))
    return total, {**metrics, **{f"term_{k}": v for k, v in aux.items()}}


def mdn_objective(model: WorldModel, params, inputs, key, step):
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


def controller_objective(model: WorldModel, params, trans: Transitions, key, step):
    rows = sample_rows(key, trans.actions.shape[0], model.config.train.batch_size)
    z, h = jnp.split(trans.states[rows], [model.latent_dim], axis=-1)
    mean, log_std = model.controller.apply({"params": params["controller"]}, z, h)
    ones = jnp.ones(rows.shape)
    return weighted_bc_loss(mean, log_std, trans.actions[rows], trans.weights[rows], ones)


def bellman_target(model: WorldModel, params, trans: Transitions, rows, key):
    """Normalised psi = phi(s) + gamma (1 - done) psi', psi' drawn from the EMA model at s'."""
    sf = model.config.successor
    noise = jax.random.normal(key, (rows.shape[0], model.psi_dim))
    psi_next = model.sample_psi(
        params["psi_ema"], trans.next_states[rows], noise, sf.target_sample_steps
    )
    psi_next = denormalise(psi_next, params["psi_norm"])
    target = trans.phi[rows] + sf.gamma * (1.0 - trans.dones[rows])[:, None] * psi_next
    return jax.lax.stop_gradient(normalise(target, params["psi_norm"]))


def psi_objective(model: WorldModel, params, trans: Transitions, key, step):
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
    loss = v_loss(model.predict_v, params["psi"], model.schedule, x0, trans.states[rows], k_loss)
    return loss, {"target_abs": jnp.mean(jnp.abs(x0))}


def readout_objective(model: WorldModel, params, trans: Transitions, key, step):
    k_rows, k_target = jax.random.split(key)
    rows = sample_rows(k_rows, trans.states.shape[0], model.config.successor.batch_size)
    psi = bellman_target(model, params, trans, rows, k_target)
    action = model.readout.apply({"params": params["readout"]}, trans.states[rows], psi)
    return jnp.mean(jnp.sum(jnp.square(action - trans.actions[rows]), axis=-1)), {}


def value_objective(model: WorldModel, params, trans: Transitions, key, step):
    """phi(s) . w(g) regressed on the goal reward r_g(s), for goals spread uniformly over
    the box the data's goal dimensions span, at the data's states and at the same states
    moved anywhere in that box: the reward is known everywhere, so its fit need not stop
    where the data thins out."""
    cfg, n = model.config, trans.states.shape[0]
    k_rows, k_goals, k_moved = jax.random.split(key, 3)
    dims = jnp.asarray(cfg.value.goal_dims)
    positions = trans.observations[:, dims]
    low, high = jnp.min(positions, axis=0), jnp.max(positions, axis=0)
    batch = cfg.successor.batch_size
    obs = trans.observations[sample_rows(k_rows, n, batch)]
    moved = jax.random.uniform(k_moved, (batch // 2, dims.shape[0]), minval=low, maxval=high)
    obs = obs.at[: batch // 2, dims].set(moved)
    goals = jax.random.uniform(k_goals, (batch, dims.shape[0]), minval=low, maxval=high)
    phi = model.phi(params, obs, model.encode(params, obs))
    weights = model.goal_decoder.apply({"params": params["value"]}, goals)  # [B, P]
    predicted = phi @ weights.T  # [states, goals]
    reward = goal_reward(obs[:, dims][:, None], goals[None], cfg.value.goal_sigma)
    return jnp.mean(jnp.square(predicted - reward)), {"reward_mean": jnp.mean(reward)}


OBJECTIVES = {
    "vae": vae_objective,
    "mdn": mdn_objective,
    "controller": controller_objective,
    "psi": psi_objective,
    "readout": readout_objective,
    "value": value_objective,
}


def with_aux(stage: str, config: Config) -> bool:
    """Whether a staged stage trains the auxiliary losses: V's, with joint.aux_losses."""
    return stage == "vae" and config.joint.aux_losses


def stage_params(stage: str, config: Config, params: dict) -> dict:
    """The parameter groups a (non-joint) stage trains: its own, and the value head
    beside V's when the auxiliary losses train with it."""
    groups = (stage, "value_head") if with_aux(stage, config) else (stage,)
    return {k: params[k] for k in groups}


def stage_update(stage: str, model: WorldModel, tx) -> Callable:
    """The jitted update of one stage: (params, opt_state, inputs, key, step) -> (params,
    opt_state, metrics)."""
    if stage == "joint":
        return joint.make_update(model, stage_bounds(model.config)["joint"][0])
    objective = vae_aux_objective if with_aux(stage, model.config) else OBJECTIVES[stage]

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


# --- what each stage needs from the stages before it ------------------------------------


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


def encode_sequences(model: WorldModel, params: dict, observations):
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


def unroll_episodes(model: WorldModel, params: dict, zs, actions, episode: np.ndarray):
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


def build_transitions(model: WorldModel, params: dict, data: DeviceData, episode: np.ndarray):
    cfg = model.config
    mu, _ = encode_sequences(model, params, data.observations)
    hs = unroll_episodes(model, params, mu[:, :-1], data.actions, episode)
    states = jnp.concatenate([mu, hs], axis=-1)
    phi = model.phi(params, data.observations[:, :-1], mu[:, :-1])
    returns = discounted_returns(data.rewards, data.dones, cfg.controller.gamma)
    weights = return_weights(returns, data.mask, cfg.controller.return_temperature)
    observations = data.observations[:, :-1]
    if cfg.value.goal_dims is None:
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


def prepare_stage(stage: str, model: WorldModel, params: dict, data: DeviceData, episode):
    """(params, inputs) for a stage; the psi stage also sets the psi normalisation."""
    if stage == "joint":
        return params, joint.prepare(model.config, data, episode)
    if with_aux(stage, model.config):
        windows = np.arange(len(episode))
        return params, joint.make_windows(data, episode, windows, model.config.controller.gamma)
    if stage == "vae":
        return params, (data.frames,)
    if stage == "mdn":
        mu, logvar = encode_sequences(model, params, data.observations)
        return params, (mu, logvar, data.actions, data.rewards, data.dones, data.mask)
    trans = build_transitions(model, params, data, episode)
    if stage == "psi":
        params = {**params, "psi_norm": psi_statistics(np.asarray(trans.mc_psi))}
    return params, trans


# --- the run -----------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    step: int
    resumed_from: int | None
    params: dict
    summary: dict
    wall_seconds: float


def run_metadata(model: WorldModel, data_path: str, data_info: dict | None, stage: str, summary):
    config, spaces = model.config, model.spaces
    return {
        "format": "worldplan-bundle/1",
        "env": config.env,
        "gym_id": get_env_spec(config.env).gym_id,
        "config": config.model_dump(mode="json"),
        "spaces": spaces.to_json(),
        "sizes": {
            "latent_dim": config.vae.latent_dim,
            "lstm_hidden": config.mdn.hidden,
            "n_mixtures": config.mdn.n_mixtures,
            "action_dim": spaces.action_dim,
            "n_cumulants": model.psi_dim,
            "state_dim": model.state_dim,
        },
        "dataset": data_path,
        "dataset_info": data_info,
        "stage": stage,
        "summary": summary,
        "versions": checkpoint.library_versions(),
    }


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drops lines logged after `step`: a resumed run logs those steps again."""
    kept = [m for m in read_metrics(run_dir) if m["step"] <= step]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in kept))


def summarise(metrics: list[dict]) -> dict:
    """The last logged metrics of each stage."""
    summary = {}
    for m in metrics:
        summary[m["stage"]] = {k: v for k, v in m.items() if k not in ("stage", "wall_s")}
    return summary


def check_same_config(run_dir: Path, manager, step: int, config: Config) -> None:
    saved = checkpoint.restore_item(manager, step, "metadata")["config"]
    if saved != config.model_dump(mode="json"):
        raise ConfigError(
            f"{run_dir} was trained with a different config; resume it with the same config "
            "and --steps, or train into a new --out directory"
        )


def initial_opt_states(config: Config, params: dict, tx) -> dict:
    """An optimiser state per stage, as saved in (and restored from) every checkpoint."""
    states = {}
    for stage in config.train.stage_steps():
        if stage == "joint":
            states[stage] = joint.init_opt_state(config, params)
        elif stage in params:
            states[stage] = tx.init(stage_params(stage, config, params))
    return states


class NewRun(NamedTuple):
    """What a run starts from: the dataset (on the mesh), the model, its initial params."""

    seqs: Sequences
    data: DeviceData
    data_info: dict | None
    model: WorldModel
    params: dict
    tx: optax.GradientTransformation


def new_run(config: Config, data_path: str | Path, mesh) -> NewRun:
    dataset = open_dataset(data_path)
    seqs = load_sequences(dataset, config.data.seq_len)
    spaces = spaces_of(dataset, seqs)
    model = WorldModel.build(config, spaces)
    params = model.init(jax.random.split(jax.random.key(config.seed))[0])
    params["normaliser"] = observation_stats(real_frames(seqs), spaces.obs_kind)
    data = replicated(device_data(seqs), mesh)
    return NewRun(seqs, data, dataset_info(dataset), model, params, make_optimizer(config.train))


def train(
    config: Config,
    data_path: str | Path,
    run_dir: str | Path,
    progress: bool = True,
    devices: int | None = None,
) -> RunResult:
    """Trains (or resumes) a run, data-parallel over `devices` devices (all by default)."""
    started = time.perf_counter()
    mesh = make_mesh(devices)
    check_batches(config, mesh.size)
    primary = jax.process_index() == 0  # of several hosts, the one that writes the logs
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    total = config.train.total_steps
    if total == 0:
        raise ConfigError("the config trains no stage: every *_steps is 0")

    seqs, data, data_info, model, params, tx = new_run(config, data_path, mesh)
    opt_states = initial_opt_states(config, params, tx)
    seed_key = jax.random.split(jax.random.key(config.seed))[1]

    manager = checkpoint.open_manager(run_dir)
    start = manager.latest_step() or 0
    resumed_from = start or None
    if start:
        check_same_config(run_dir, manager, start, config)
        params = checkpoint.restore_item(manager, start, "params", params)
        opt_states = checkpoint.restore_item(manager, start, "opt_state", opt_states)
        if primary:
            truncate_metrics(run_dir, start)
    elif primary and (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()
    params, opt_states = replicated((params, opt_states), mesh)

    def save(step: int, stage: str) -> None:
        summary = summarise(read_metrics(run_dir))
        metadata = run_metadata(model, str(data_path), data_info, stage, summary)
        checkpoint.save(manager, step, params, opt_states, metadata)

    bar = tqdm(
        total=total, initial=start, disable=not (progress and primary), desc="train", unit="step"
    )
    bounds = stage_bounds(config)
    stage, update, inputs, window = None, None, None, []
    log_path = run_dir / METRICS_FILE if primary else os.devnull
    with open(log_path, "a") as log, jax.set_mesh(mesh):
        for step in range(start, total):
            if stage_at(config, step) != stage:
                stage = stage_at(config, step)
                update = stage_update(stage, model, tx)
                params, inputs = prepare_stage(stage, model, params, data, seqs.episode)
                params, inputs = replicated((params, inputs), mesh)
            key = jax.random.fold_in(seed_key, step)
            params, opt_states[stage], metrics = update(
                params, opt_states[stage], inputs, key, step
            )
            window.append(metrics)
            done = step + 1
            stage_end = bounds[stage][1]
            if done % config.train.log_every == 0 or done == stage_end:
                means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                record = {"step": done, "stage": stage, **means}
                record["wall_s"] = round(time.perf_counter() - started, 3)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(stage=stage, loss=f"{means['loss']:.4g}")
                window = []
            if done % config.train.checkpoint_every == 0 or done == stage_end:
                save(done, stage)
            bar.update(1)
    bar.close()
    manager.wait_until_finished()
    manager.close()

    metrics = read_metrics(run_dir)
    if metrics and primary:
        plot_loss_curves(metrics, run_dir / CURVES_FILE)
    if config.joint.meta_learning and metrics and primary:
        plot_lambda_trajectory(metrics, run_dir / LAMBDA_FILE)
    return RunResult(
        run_dir=run_dir,
        step=total,
        resumed_from=resumed_from,
        params=params,
        summary=summarise(metrics),
        wall_seconds=time.perf_counter() - started,
    )
