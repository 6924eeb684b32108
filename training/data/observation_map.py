"""Observations seen through a fixed random linear map: rotated, scaled and padded with
small i.i.d. noise, in the data and in the environment alike (the goal observation too).

A planner with no length in the observation's own units plans the same through it: the
invariance test trains and evaluates on mapped observations with every setting unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
from scipy.stats import special_ortho_group


@dataclass(frozen=True)
class ObservationMap:
    """x -> [scale · R x, ε]: R a rotation drawn from `seed`, ε `noise_dims` numbers of
    N(0, noise²), noise a `noise_fraction` of the data's spread (its mean std)."""

    seed: int
    dim: int  # of the observation before the map
    spread: float
    scale: float = 10.0
    noise_dims: int = 6
    noise_fraction: float = 0.1

    @property
    def matrix(self) -> np.ndarray:
        rotation = special_ortho_group.rvs(self.dim, random_state=self.seed) if self.dim > 1 else 1
        return self.scale * np.atleast_2d(rotation)

    def apply(self, observations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[..., dim] -> [..., dim + noise_dims], float32."""
        mapped = observations @ self.matrix.T
        shape = (*observations.shape[:-1], self.noise_dims)
        noise = rng.normal(0.0, self.noise_fraction * self.spread, shape)
        return np.concatenate([mapped, noise], axis=-1).astype(np.float32)

    def to_json(self) -> dict:
        return asdict(self)


def map_npz(path: Path, observation_map: ObservationMap, seed: int) -> None:
    """Rewrites an OGBench npz file's observations through the map, its noise from `seed`."""
    with np.load(path) as file:
        arrays = {key: file[key] for key in file.files}
    rng = np.random.default_rng(seed)
    arrays["observations"] = observation_map.apply(arrays["observations"], rng)
    np.savez(path, **arrays)


def data_map(path: Path, seed: int) -> ObservationMap:
    """The map for the observations of the npz file at `path`, drawn from `seed`."""
    with np.load(path) as file:
        observations = file["observations"]
    spread = float(observations.std(axis=0).mean())
    return ObservationMap(seed, observations.shape[1], spread)


class MappedObservations(gym.Wrapper):
    """The environment seen through a map: its observations and its goal observation, each
    padded with fresh noise drawn from the episode's reset seed."""

    def __init__(self, env: gym.Env, observation_map: ObservationMap):
        super().__init__(env)
        self.map = observation_map
        size = observation_map.dim + observation_map.noise_dims
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.rng = np.random.default_rng(observation_map.seed)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.rng = np.random.default_rng([self.map.seed, seed or 0])
        return self.map.apply(obs, self.rng), self.mapped_goal(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.map.apply(obs, self.rng), reward, terminated, truncated, self.mapped_goal(info)

    def mapped_goal(self, info: dict) -> dict:
        if "goal" not in info:
            return info
        return {**info, "goal": self.map.apply(np.asarray(info["goal"], np.float64), self.rng)}
