"""Staged training of the world model: V, then M on V's latents, then C with V and M frozen.

One global step counter runs through the three stages. Every step's randomness is
`fold_in(seed, step)`, and each checkpoint holds parameters and optimiser states, so a run
that is interrupted and re-run on the same directory continues from its latest saved step
and ends with the same parameters as a run that was never interrupted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from training import checkpoint
from training.config import Config, ConfigError
from training.data import Sequences, load_sequences, open_dataset
from training.envs import get_env_spec
from training.models.mdn_rnn import initial_state
from training.models.world import Spaces, WorldModel, normalise, observation_stats
from training.objectives import (
    discounted_returns,
    mdn_loss,
    return_weights,
    vae_loss,
    weighted_bc_loss,
)
from training.plots import plot_loss_curves

STAGES = ("vae", "mdn", "controller")
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"


def stage_bounds(config: Config) -> dict[str, tuple[int, int]]:
    """[start, end) of each stage on the global step counter."""
    lengths = (config.train.vae_steps, config.train.mdn_steps, config.train.controller_steps)
    ends = np.cumsum(lengths)
    return {s: (int(e - n), int(e)) for s, n, e in zip(STAGES, lengths, ends, strict=True)}


def stage_at(config: Config, step: int) -> str:
    for stage, (start, end) in stage_bounds(config).items():
        if start <= step < end:
            return stage
    raise ValueError(f"step {step} is past the end of training")


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.train.max_grad_norm),
        optax.adam(config.train.learning_rate),
    )


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


# --- one update per stage: pure functions of (params, opt_state, data, key) -------------


def sample_rows(key: jax.Array, n: int, batch_size: int) -> jax.Array:
    return jax.random.randint(key, (batch_size,), 0, n)


def vae_update(model, config, tx, params, opt_state, frames, stats, key):
    k_rows, k_z = jax.random.split(key)
    x = normalise(frames[sample_rows(k_rows, frames.shape[0], config.train.batch_size)], stats)

    def loss_fn(p):
        recon, mu, logvar, _ = model.vae.apply({"params": p}, x, k_z)
        return vae_loss(recon, x, mu, logvar, config.vae.kl_tolerance, config.vae.beta)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}


def mdn_update(model, config, tx, params, opt_state, latents, data: DeviceData, key):
    k_rows, k_z = jax.random.split(key)
    rows = sample_rows(k_rows, data.actions.shape[0], config.train.batch_size)
    mu, logvar = latents[0][rows], latents[1][rows]
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mu.shape)
    state = initial_state((rows.shape[0],), config.mdn.hidden)

    def loss_fn(p):
        _, _, out = model.mdn.apply({"params": p}, state, z[:, :-1], data.actions[rows])
        return mdn_loss(
            out,
            z[:, 1:],
            data.rewards[rows],
            data.dones[rows],
            data.mask[rows],
            config.mdn.reward_weight,
            config.mdn.done_weight,
        )

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}


def controller_update(model, config, tx, params, opt_state, inputs, data: DeviceData, key):
    zs, hs, weights = inputs
    rows = sample_rows(key, data.actions.shape[0], config.train.batch_size)

    def loss_fn(p):
        mean, log_std = model.controller.apply({"params": p}, zs[rows], hs[rows])
        return weighted_bc_loss(mean, log_std, data.actions[rows], weights[rows], data.mask[rows])

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}


# --- what each stage needs from the stages before it ------------------------------------


def encode_sequences(model: WorldModel, params: dict, observations, chunk: int = 256):
    """(mu, logvar) of V for every observation of every window, [N, L+1, Z] each."""
    encode = jax.jit(
        lambda p, s, x: model.vae.apply({"params": p}, normalise(x, s), method="encode")
    )
    parts = [
        encode(params["vae"], params["normaliser"], observations[i : i + chunk])
        for i in range(0, observations.shape[0], chunk)
    ]
    return tuple(jnp.concatenate([p[i] for p in parts]) for i in range(2))


def unroll_sequences(model: WorldModel, params: dict, zs, actions, chunk: int = 256):
    """M's state h_t before each step, [N, L, H], driven by the mean latents."""
    unroll = jax.jit(
        lambda p, z, a: model.mdn.apply(
            {"params": p}, initial_state((z.shape[0],), model.mdn.hidden), z, a
        )[1]
    )
    return jnp.concatenate(
        [
            unroll(params["mdn"], zs[i : i + chunk], actions[i : i + chunk])
            for i in range(0, zs.shape[0], chunk)
        ]
    )


def stage_inputs(stage: str, model: WorldModel, config: Config, params: dict, data: DeviceData):
    if stage == "vae":
        return data.frames, params["normaliser"]
    mu, logvar = encode_sequences(model, params, data.observations)
    if stage == "mdn":
        return ((mu, logvar), data)
    zs = mu[:, :-1]
    hs = unroll_sequences(model, params, zs, data.actions)
    returns = discounted_returns(data.rewards, data.dones, config.controller.gamma)
    weights = return_weights(returns, data.mask, config.controller.return_temperature)
    return ((zs, hs, weights), data)


def stage_update(stage: str, model: WorldModel, config: Config, tx) -> Callable:
    update = {"vae": vae_update, "mdn": mdn_update, "controller": controller_update}[stage]
    return jax.jit(partial(update, model, config, tx))


# --- the run -----------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    step: int
    resumed_from: int | None
    params: dict
    summary: dict
    wall_seconds: float


def run_metadata(config: Config, spaces: Spaces, data_path: str, stage: str, summary: dict):
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
        },
        "dataset": data_path,
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


def train(
    config: Config, data_path: str | Path, run_dir: str | Path, progress: bool = True
) -> RunResult:
    started = time.perf_counter()
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    total = config.train.total_steps
    if total == 0:
        raise ConfigError("the config trains no stage: every *_steps is 0")

    seqs = load_sequences(data_path, config.data.seq_len)
    spaces = spaces_of(open_dataset(data_path), seqs)
    data = DeviceData(
        observations=jnp.asarray(seqs.observations),
        frames=jnp.asarray(real_frames(seqs)),
        actions=jnp.asarray(seqs.actions),
        rewards=jnp.asarray(seqs.rewards),
        dones=jnp.asarray(seqs.dones),
        mask=jnp.asarray(seqs.mask),
    )
    model = WorldModel.build(config, spaces)
    tx = make_optimizer(config)
    init_key, seed_key = jax.random.split(jax.random.key(config.seed))
    params = {
        **model.init(init_key),
        "normaliser": observation_stats(real_frames(seqs), spaces.obs_kind),
    }
    opt_states = {stage: tx.init(params[stage]) for stage in STAGES}

    manager = checkpoint.open_manager(run_dir)
    start = manager.latest_step() or 0
    resumed_from = start or None
    if start:
        check_same_config(run_dir, manager, start, config)
        params = checkpoint.restore_item(manager, start, "params", params)
        opt_states = checkpoint.restore_item(manager, start, "opt_state", opt_states)
        truncate_metrics(run_dir, start)
    elif (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()

    def save(step: int, stage: str) -> None:
        summary = summarise(read_metrics(run_dir))
        metadata = run_metadata(config, spaces, str(data_path), stage, summary)
        checkpoint.save(manager, step, params, opt_states, metadata)

    bar = tqdm(total=total, initial=start, disable=not progress, desc="train", unit="step")
    stage, update, inputs, window = None, None, None, []
    with open(run_dir / METRICS_FILE, "a") as log:
        for step in range(start, total):
            if stage_at(config, step) != stage:
                stage = stage_at(config, step)
                update = stage_update(stage, model, config, tx)
                inputs = stage_inputs(stage, model, config, params, data)
            key = jax.random.fold_in(seed_key, step)
            params[stage], opt_states[stage], metrics = update(
                params[stage], opt_states[stage], *inputs, key
            )
            window.append(metrics)
            done = step + 1
            stage_end = stage_bounds(config)[stage][1]
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
    if metrics:
        plot_loss_curves(metrics, run_dir / CURVES_FILE)
    return RunResult(
        run_dir=run_dir,
        step=total,
        resumed_from=resumed_from,
        params=params,
        summary=summarise(metrics),
        wall_seconds=time.perf_counter() - started,
    )
