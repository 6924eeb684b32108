"""Task inference: every kind of task becomes cumulant weights w, so that V(psi) = psi . w.

- `reward_weights`: w given directly (length = number of cumulants);
- `embedding`: the same, named as the task embedding z*;
- `goal`: w = GoalDecoder(goal's point), the weights of the goal's reward (the goal names
  the goal dimensions of an observation, or with a learned geometry a whole observation);
- `reward_samples`: (observation, reward) pairs, w by least squares on phi(observation)
  (the zero-shot transfer of distributional successor features).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from training.errors import UsageError
from training.models.networks import GOAL_DECODER, Networks
from training.models.value import least_squares_weights

TASK_KINDS = ("reward_weights", "embedding", "goal", "reward_samples")


class TaskError(UsageError):
    """A task that does not fit the model, with a message saying why."""


def _vector(values, name: str, size: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise TaskError(f"{name} must be a list of numbers") from None
    if array.ndim != 1 or (size is not None and array.shape[0] != size):
        want = f"length {size}" if size is not None else "a flat list"
        raise TaskError(f"{name} must be {want}, got shape {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise TaskError(f"{name} must be finite")
    return array


def task_weights(model: Networks, params: dict, task: dict) -> np.ndarray:
    """The cumulant weights [P] of a task given as a dict with a `kind`."""
    kind = task.get("kind")
    if kind in ("reward_weights", "embedding"):
        field = "weights" if kind == "reward_weights" else "embedding"
        return _vector(task.get(field), field, model.psi_dim)
    if kind == "goal":
        if model.goal_decoder is None:
            raise TaskError("this model was trained without goal tasks")
        goal = _vector(task.get("goal"), "goal", model.goal_size)
        point = model.goal_point(params, jnp.asarray(goal))
        return np.asarray(model.goal_decoder.apply({"params": params[GOAL_DECODER]}, point))
    if kind == "reward_samples":
        return fit_reward_weights(model, params, task.get("observations"), task.get("rewards"))
    raise TaskError(f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")


def fit_reward_weights(model: Networks, params: dict, observations, rewards) -> np.ndarray:
    try:
        obs = np.asarray(observations, dtype=np.float32)
    except (TypeError, ValueError):
        raise TaskError("observations must be an array of numbers") from None
    rewards = _vector(rewards, "rewards")
    shape = model.spaces.obs_shape
    if obs.ndim != len(shape) + 1 or obs.shape[1:] != shape:
        raise TaskError(f"observations must have shape [n, {', '.join(map(str, shape))}]")
    if obs.shape[0] != rewards.shape[0] or obs.shape[0] < 2:
        raise TaskError("need as many rewards as observations, and at least two of each")
    if not np.all(np.isfinite(obs)):
        raise TaskError("observations must be finite")
    z = model.encode(params, jnp.asarray(obs))
    phi = model.phi(params, jnp.asarray(obs), z)
    return np.asarray(least_squares_weights(phi, jnp.asarray(rewards)))


def default_task(model: Networks, params: dict, recorded: dict | None = None) -> dict:
    """The task of a session that names none: with goal tasks, a goal at the data's mean
    (of the goal dimensions, or the whole observation); else the task the bundle recorded
    (the reward weights fitted to its data's rewards); else the all-zero embedding (every
    outcome of equal value)."""
    if model.goal_decoder is not None:
        mean = np.asarray(params["normaliser"]["mean"])
        if model.step_map is None:
            mean = mean[list(model.config.value.goal_dims)]
        return {"kind": "goal", "goal": [round(float(x), 4) for x in mean]}
    if recorded is not None:
        return recorded
    return {"kind": "embedding", "embedding": [0.0] * model.psi_dim}
