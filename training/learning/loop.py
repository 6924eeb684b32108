"""Training a bundle: the world model V, M, C, then the successor-feature psi-model, its
readout policy and the goal decoder on the planning states [z, h] that V and M give.

The world model trains in one of three modes (`train.mode`):
- staged: V, then M on V's latents, then C with V and M frozen, each its own stage;
- end_to_end and alternating: one `joint` stage on the joint loss (training/learning/joint.py).

One global step counter runs through the stages. Every step's randomness is
`fold_in(seed, step)`, and each checkpoint holds parameters and optimiser states, so a run
that is interrupted and re-run on the same directory continues from its latest saved step
and ends with the same parameters as a run that was never interrupted.

The stages' losses and updates are in training/learning/stages.py, what each reads in
training/learning/stage_inputs.py; this module runs them in order and keeps the checkpoints and
metrics.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from training.config import Config, ConfigError
from training.data.datasets import (
    Sequences,
    dataset_env_name,
    dataset_info,
    load_sequences,
    open_dataset,
)
from training.data.envs import get_env_spec, gym_id_of
from training.learning import checkpoint, evolution, joint
from training.learning.curves import plot_lambda_trajectory, plot_loss_curves
from training.learning.optim import make_optimizer
from training.learning.parallel import check_batches, make_mesh, replicated
from training.learning.stage_inputs import (
    EVOLUTION_TRAINERS,
    DeviceData,
    Transitions,
    device_data,
    prepare_stage,
    reads_transitions,
    real_frames,
    spaces_of,
)
from training.learning.stages import stage_at, stage_bounds, stage_params, stage_update
from training.models.networks import Networks, observation_stats
from training.models.value import least_squares_weights

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"
LAMBDA_FILE = "lambda_trajectory.png"


# --- the run -----------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    step: int
    resumed_from: int | None
    params: dict
    summary: dict
    wall_seconds: float


def run_metadata(
    model: Networks, data_path: str, data_info: dict | None, stage: str, summary, task=None
):
    config, spaces = model.config, model.spaces
    return {
        "format": "worldplan-bundle/1",
        "env": config.env,
        "gym_id": get_env_spec(config.env).gym_id,
        "default_task": task,
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


REWARD_FIT_ROWS = 4096  # (observation, reward) pairs the default task is fitted on


def reward_task(model: Networks, params: dict, seqs: Sequences) -> dict | None:
    """A bundle's default task when it has no goal tasks: the reward weights that least
    squares fits to the data's (observation, reward) pairs, so that V = ψ·w is the data's
    own return. None with goal tasks, or when every recorded reward is zero."""
    real = seqs.mask > 0
    rewards = seqs.rewards[real]
    if model.goal_decoder is not None or not np.any(rewards):
        return None
    observations = seqs.observations[:, :-1][real]
    rows = np.random.default_rng(0).permutation(len(rewards))[:REWARD_FIT_ROWS]
    obs = jnp.asarray(observations[rows])
    phi = model.phi(params, obs, model.encode(params, obs))
    weights = least_squares_weights(phi, jnp.asarray(rewards[rows]))
    return {"kind": "reward_weights", "weights": [round(float(w), 6) for w in weights]}


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
        elif stage == "controller" and config.train.controller_trainer in EVOLUTION_TRAINERS:
            states[stage] = evolution.init_state(config, params)
        elif stage in params:
            states[stage] = tx.init(stage_params(stage, config, params))
    return states


class NewRun(NamedTuple):
    """What a run starts from: the dataset (on the mesh), the model, its initial params."""

    seqs: Sequences
    data: DeviceData
    data_info: dict | None
    model: Networks
    params: dict
    tx: optax.GradientTransformation


def check_dataset_env(dataset, config: Config, data_path: str | Path) -> None:
    """Refuses a dataset recorded in another environment than the config's (a dataset that
    records none is taken at the config's word)."""
    recorded = dataset_env_name(dataset)
    if recorded is not None and gym_id_of(recorded) != gym_id_of(config.env):
        raise ConfigError(
            f"{data_path} was recorded in {gym_id_of(recorded)!r}, but the config is for "
            f"{config.env!r} ({gym_id_of(config.env)!r}): pass that environment's config, or "
            "no --config to use the dataset's own"
        )


def new_run(config: Config, data_path: str | Path, mesh) -> NewRun:
    dataset = open_dataset(data_path)
    check_dataset_env(dataset, config, data_path)
    seqs = load_sequences(dataset, config.data.seq_len)
    spaces = spaces_of(dataset, seqs)
    model = Networks.build(config, spaces)
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

    task = None  # the default task, fitted again at the end of each stage

    def save(step: int, stage: str) -> None:
        summary = summarise(read_metrics(run_dir))
        metadata = run_metadata(model, str(data_path), data_info, stage, summary, task)
        checkpoint.save(manager, step, params, opt_states, metadata)

    bar = tqdm(
        total=total, initial=start, disable=not (progress and primary), desc="train", unit="step"
    )
    bounds = stage_bounds(config)
    stage, update, inputs, window = None, None, None, []
    trans: Transitions | None = None  # built at the first stage that reads them, then kept
    log_path = run_dir / METRICS_FILE if primary else os.devnull
    with open(log_path, "a") as log, jax.set_mesh(mesh):
        for step in range(start, total):
            if stage_at(config, step) != stage:
                stage = stage_at(config, step)
                update = stage_update(stage, model, tx)
                params, inputs = prepare_stage(stage, model, params, data, seqs.episode, trans)
                params, inputs = replicated((params, inputs), mesh)
                if reads_transitions(stage, config):
                    trans = inputs
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
            if done == stage_end:
                task = reward_task(model, jax.device_get(params), seqs)
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
