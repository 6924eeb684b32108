"""Does the psi-model keep the futures its data had? For each rare goal, the value of the
futures the dataset actually followed from near the start cell (their discounted cumulant
sums) against the value of the psi-model's samples at that cell.

A planner that samples from p(psi | s) can only choose an outcome the model produces: when
the data's best futures from a cell reach the goal and the model's best of thousands of
samples does not, no planner on that model reaches the goal from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from training.analysis.evaluate import GoalSpec, fmt, markdown_table
from training.data.datasets import episode_observations, open_dataset
from training.data.envs import make_env
from training.learning.checkpoint import Bundle
from training.learning.stage_inputs import monte_carlo_psi
from training.models.mdn_rnn import initial_state
from training.planning.planners import broadcast_state, value_fn
from training.planning.tasks import task_weights


@dataclass(frozen=True)
class Tail:
    start_cell: tuple[int, int]
    goal_cell: tuple[int, int]
    data_states: int  # dataset states within the radius of the start cell's centre
    data_p99: float | None  # V of their futures: 99th percentile
    data_max: float | None
    model_mean: float  # V of the model's samples at the cell's centre
    model_best_of_batch: float  # median over batches of the planner's n_samples of the best
    model_max: float  # best of all samples


def data_futures(bundle: Bundle, data_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Every dataset state's observation [N, *obs] and its discounted cumulant sum [N, P]."""
    model, params = bundle.model, bundle.params
    gamma = bundle.config.successor.gamma
    observations, futures = [], []
    for episode in open_dataset(data_path).iterate_episodes():
        obs = episode_observations(episode.observations)[:-1].astype(np.float32)
        z = model.encode(params, jnp.asarray(obs))
        phi = np.asarray(model.phi(params, jnp.asarray(obs), z))
        dones = np.asarray(episode.terminations, np.float32)
        futures.append(monte_carlo_psi(phi, dones, np.zeros(len(phi), int), gamma))
        observations.append(obs)
    return np.concatenate(observations), np.concatenate(futures)


def model_values(bundle: Bundle, obs: np.ndarray, weights, n_samples: int, key) -> np.ndarray:
    """V of n_samples psi drawn at the planning state of `obs` with a fresh LSTM state."""
    model, params = bundle.model, bundle.params
    z = model.encode(params, jnp.asarray(obs))
    state = jnp.concatenate([z, initial_state((), model.mdn.hidden)[1]])
    noise = jax.random.normal(key, (n_samples, model.psi_dim))
    psi = model.sample_psi(params["psi_ema"], broadcast_state(state, n_samples), noise,
                           bundle.config.planning.sample_steps)  # fmt: skip
    return np.asarray(value_fn(params, weights)(psi))


def outcome_tails(
    bundle: Bundle, data_path: str, goals: list[GoalSpec], n_samples: int = 4096,
    radius: float = 0.3,
) -> list[Tail]:  # fmt: skip
    """The data's and the model's outcome values for each (start, goal) pair."""
    maze = make_env(bundle.env_id).unwrapped.maze
    observations, futures = data_futures(bundle, data_path)
    batch = bundle.config.planning.n_samples  # what one random-shooting decision sees
    tails = []
    for i, spec in enumerate(goals):
        centre = np.asarray(maze.cell_rowcol_to_xy(np.array(spec.start_cell)), np.float32)
        goal = np.asarray(maze.cell_rowcol_to_xy(np.array(spec.goal_cell)), np.float32)
        weights = task_weights(bundle.model, bundle.params, {"kind": "goal", "goal": goal})
        near = np.linalg.norm(observations[:, :2] - centre, axis=1) < radius
        data_v = futures[near] @ weights
        obs = np.concatenate([centre, np.zeros(observations.shape[1] - 2, np.float32)])
        v = model_values(bundle, obs, jnp.asarray(weights), n_samples, jax.random.key(i))
        batches = v[: n_samples // batch * batch].reshape(-1, batch).max(axis=1)
        tails.append(
            Tail(
                spec.start_cell,
                spec.goal_cell,
                int(near.sum()),
                float(np.percentile(data_v, 99)) if near.any() else None,
                float(data_v.max()) if near.any() else None,
                float(v.mean()),
                float(np.median(batches)),
                float(v.max()),
            )
        )
    return tails


def tails_table(env_id: str, tails: list[Tail], batch: int, n_samples: int) -> str:
    header = [f"{env_id}: start → rare goal", "data states", "data V p99", "data V max"]
    header += ["model V mean", f"model best of {batch}", f"model best of {n_samples}"]
    rows = [
        [
            f"{t.start_cell} → {t.goal_cell}",
            str(t.data_states),
            fmt(t.data_p99, ".1f"),
            fmt(t.data_max, ".1f"),
            fmt(t.model_mean, ".1f"),
            fmt(t.model_best_of_batch, ".1f"),
            fmt(t.model_max, ".1f"),
        ]
        for t in tails
    ]
    return markdown_table(header, rows)
