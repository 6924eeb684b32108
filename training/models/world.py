"""The V-M-C world model as one object: its modules, their parameter initialisation, and
the observation normalisation that sits in front of V."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from training.config import Config
from training.models.controller import Controller
from training.models.mdn_rnn import MDNRNN
from training.models.vae import ConvVAE, VectorVAE


@dataclass(frozen=True)
class Spaces:
    """What the models need to know of the environment."""

    obs_shape: tuple[int, ...]
    obs_kind: str  # "vector" or "pixels"
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]

    @property
    def action_dim(self) -> int:
        return len(self.action_low)

    def to_json(self) -> dict:
        return {
            "observation_shape": list(self.obs_shape),
            "observation_kind": self.obs_kind,
            "action_low": list(self.action_low),
            "action_high": list(self.action_high),
        }

    @classmethod
    def from_json(cls, d: dict) -> Spaces:
        return cls(
            obs_shape=tuple(d["observation_shape"]),
            obs_kind=d["observation_kind"],
            action_low=tuple(d["action_low"]),
            action_high=tuple(d["action_high"]),
        )


@dataclass(frozen=True)
class WorldModel:
    vae: VectorVAE | ConvVAE
    mdn: MDNRNN
    controller: Controller
    spaces: Spaces

    @classmethod
    def build(cls, config: Config, spaces: Spaces) -> WorldModel:
        if spaces.obs_kind == "pixels":
            vae = ConvVAE(latent_dim=config.vae.latent_dim)
        else:
            (obs_dim,) = spaces.obs_shape
            vae = VectorVAE(obs_dim, config.vae.latent_dim, tuple(config.vae.hidden))
        mdn = MDNRNN(config.vae.latent_dim, config.mdn.hidden, config.mdn.n_mixtures)
        hidden = config.controller.hidden if config.controller.kind == "mlp" else 0
        controller = Controller(spaces.action_low, spaces.action_high, hidden)
        return cls(vae, mdn, controller, spaces)

    def init(self, key: jax.Array) -> dict:
        """Fresh parameters for V, M and C."""
        k_v, k_m, k_c, k_s = jax.random.split(key, 4)
        obs = jnp.zeros((1, *self.spaces.obs_shape), jnp.float32)
        z = jnp.zeros((1, self.vae.latent_dim))
        a = jnp.zeros((1, self.spaces.action_dim))
        state = (jnp.zeros((1, self.mdn.hidden)),) * 2
        return {
            "vae": self.vae.init(k_v, obs, k_s)["params"],
            "mdn": self.mdn.init(k_m, state, z, a, method=MDNRNN.step)["params"],
            "controller": self.controller.init(k_c, z, state[1])["params"],
        }


def observation_stats(frames: np.ndarray, obs_kind: str) -> dict[str, np.ndarray]:
    """Per-element mean and scale applied before V, from frames [M, *obs_shape]:
    standardisation for vectors, /255 for pixels."""
    shape = frames.shape[1:]
    if obs_kind == "pixels":
        return {"mean": np.zeros(shape, np.float32), "std": np.full(shape, 255.0, np.float32)}
    frames = frames.astype(np.float64)
    return {
        "mean": frames.mean(axis=0).astype(np.float32),
        "std": np.maximum(frames.std(axis=0), 1e-3).astype(np.float32),
    }


def normalise(obs: jax.Array, stats: dict) -> jax.Array:
    return (obs.astype(jnp.float32) - stats["mean"]) / stats["std"]
