"""The whole model as one object: V, M and C, the successor-feature psi-model with its
readout policy and goal decoder, their parameter initialisation, and the normalisations
that sit in front of V (observations) and around the psi-model (psi).

The parameter tree of a bundle:
    vae, mdn, controller         the world model
    psi, psi_ema                 the psi noise model and its EMA (the EMA plans)
    readout                      pi(a | s, psi)
    value                        the goal decoder (only with goal tasks): GOAL_DECODER
    geometry                     the step map e (only with geometry.space steps)
    step_scale                   e's length of one step of the data (the same)
    value_head                   the value of z (only when training with auxiliary losses)
    cumulants                    the fixed random Fourier projection {W, b}
    normaliser                   observation {mean, std}
    psi_norm                     psi {mean, std}
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from training.config import Config
from training.errors import UsageError
from training.models.controller import Controller
from training.models.diffusion import Schedule, cosine_schedule, ddim_sample
from training.models.geometry import StepMap
from training.models.mdn_rnn import MDNRNN
from training.models.readout import Readout
from training.models.successor import PsiNoiseModel, cumulants, random_fourier_projection
from training.models.vae import ConvVAE, LatentValueHead, VectorVAE
from training.models.value import GoalDecoder, GoalFit

# The goal decoder's key in a bundle's params. Bundles store it under "value" (the name of
# its training stage); the key stays so that every saved bundle restores unchanged.
GOAL_DECODER = "value"


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


GOAL_FIT_STATES = 2048  # states of the data a least-squares goal fit keeps


def goal_weights_module(config: Config) -> GoalDecoder | GoalFit:
    """What maps a goal to its cumulant weights (`value.goal_weights`)."""
    n_cumulants = config.successor.n_features + 1
    if config.value.goal_weights == "least_squares":
        return GoalFit(n_cumulants, GOAL_FIT_STATES, config.value.goal_sigma)
    return GoalDecoder(n_cumulants, config.value.hidden)


@dataclass(frozen=True)
class Networks:
    """Every network of a bundle (V, M, C, the ψ-model, the readout, the goal decoder and
    the optional latent value head), their initialisation and their normalisations."""

    config: Config
    spaces: Spaces
    vae: VectorVAE | ConvVAE
    mdn: MDNRNN
    controller: Controller
    psi_net: PsiNoiseModel
    readout: Readout
    goal_decoder: GoalDecoder | GoalFit | None
    value_head: LatentValueHead | None = None
    step_map: StepMap | None = None

    @classmethod
    def build(cls, config: Config, spaces: Spaces) -> Networks:
        if spaces.obs_kind == "pixels":
            if config.successor.cumulant_input != "latent":
                raise UsageError("pixel observations need successor.cumulant_input: latent")
            if config.value.goal_dims is not None or config.geometry.space == "steps":
                raise UsageError("goal tasks need vector observations, not pixels")
            vae = ConvVAE(latent_dim=config.vae.latent_dim)
        else:
            (obs_dim,) = spaces.obs_shape
            vae = VectorVAE(obs_dim, config.vae.latent_dim, tuple(config.vae.hidden))
        mdn = MDNRNN(config.vae.latent_dim, config.mdn.hidden, config.mdn.n_mixtures)
        hidden = config.controller.hidden if config.controller.kind == "mlp" else 0
        sf, geometry = config.successor, config.geometry
        steps = geometry.space == "steps"
        goals = config.value.goal_dims is not None or steps
        return cls(
            config=config,
            spaces=spaces,
            vae=vae,
            mdn=mdn,
            controller=Controller(spaces.action_low, spaces.action_high, hidden),
            psi_net=PsiNoiseModel(sf.n_features + 1, sf.hidden, sf.depth),
            readout=Readout(
                spaces.action_low, spaces.action_high, config.readout.hidden, config.readout.depth
            ),
            goal_decoder=goal_weights_module(config) if goals else None,
            value_head=LatentValueHead() if config.joint.aux_losses else None,
            step_map=StepMap(geometry.dim, geometry.hidden, geometry.depth) if steps else None,
        )

    # --- sizes --------------------------------------------------------------------------

    @property
    def latent_dim(self) -> int:
        return self.config.vae.latent_dim

    @property
    def state_dim(self) -> int:
        """Size of the planning state s = [z, h]."""
        return self.config.vae.latent_dim + self.config.mdn.hidden

    @property
    def psi_dim(self) -> int:
        return self.config.successor.n_features + 1

    @property
    def goal_size(self) -> int | None:
        """The length of a goal as a task names it (None: no goal tasks): the goal's
        dimensions of an observation, or with a learned geometry a whole observation."""
        if self.step_map is not None:
            return self.spaces.obs_shape[0]
        dims = self.config.value.goal_dims
        return None if dims is None else len(dims)

    @property
    def goal_space_dim(self) -> int:
        """The size of a goal's point, where goal rewards and the subgoal graph measure."""
        return self.step_map.dim if self.step_map is not None else len(self.config.value.goal_dims)

    @property
    def cumulant_in_dim(self) -> int:
        sf = self.config.successor
        if sf.cumulant_input == "latent":
            return self.latent_dim
        if self.step_map is not None:
            return self.step_map.dim
        return len(sf.feature_dims) if sf.feature_dims else self.spaces.obs_shape[0]

    @property
    def schedule(self) -> Schedule:
        return cosine_schedule(self.config.successor.diffusion_steps)

    # --- parameters ---------------------------------------------------------------------

    def init(self, key: jax.Array) -> dict:
        """Fresh parameters for every model; normalisations start as the identity."""
        keys = jax.random.split(key, 8)
        obs = jnp.zeros((1, *self.spaces.obs_shape), jnp.float32)
        z = jnp.zeros((1, self.latent_dim))
        a = jnp.zeros((1, self.spaces.action_dim))
        s = jnp.zeros((1, self.state_dim))
        psi = jnp.zeros((1, self.psi_dim))
        lstm = (jnp.zeros((1, self.mdn.hidden)),) * 2
        psi_params = self.psi_net.init(keys[3], psi, jnp.ones((1,)), s)["params"]
        params = {
            "vae": self.vae.init(keys[0], obs, keys[7])["params"],
            "mdn": self.mdn.init(keys[1], lstm, z, a, method=MDNRNN.step)["params"],
            "controller": self.controller.init(keys[2], z, lstm[1])["params"],
            "psi": psi_params,
            "psi_ema": psi_params,
            "readout": self.readout.init(keys[4], s, psi)["params"],
            "cumulants": random_fourier_projection(
                keys[5],
                self.cumulant_in_dim,
                self.config.successor.n_features,
                self.config.successor.lengthscale,
            ),
            "normaliser": {
                "mean": jnp.zeros(self.spaces.obs_shape),
                "std": jnp.ones(self.spaces.obs_shape),
            },
            "psi_norm": {"mean": jnp.zeros(self.psi_dim), "std": jnp.ones(self.psi_dim)},
        }
        if self.step_map is not None:
            params["geometry"] = self.step_map.init(keys[7], obs)["params"]
            params["step_scale"] = jnp.ones(())
        if self.goal_decoder is not None:
            goal = jnp.zeros((1, self.goal_space_dim))
            params[GOAL_DECODER] = self.goal_decoder.init(keys[6], goal)["params"]
        if self.value_head is not None:
            params["value_head"] = self.value_head.init(jax.random.fold_in(key, 8), z)["params"]
        return params

    # --- pure functions of (params, inputs) ---------------------------------------------

    def encode(self, params: dict, obs: jax.Array) -> jax.Array:
        """V's mean latent of a raw observation."""
        x = normalise(obs, params["normaliser"])
        return self.vae.apply({"params": params["vae"]}, x, method="encode")[0]

    def steps_point(self, params: dict, obs: jax.Array) -> jax.Array:
        """An observation's point in the learned step space (geometry.space steps), in
        steps of the data (step_scale: set once the map is trained)."""
        x = normalise(obs, params["normaliser"])
        return self.step_map.apply({"params": params["geometry"]}, x) / params["step_scale"]

    def state_point(self, params: dict, obs: jax.Array) -> jax.Array:
        """Where goal rewards and the subgoal graph measure an observation: its point in
        the learned step space, or its goal dimensions."""
        if self.step_map is not None:
            return self.steps_point(params, obs)
        return obs[..., list(self.config.value.goal_dims)]

    def goal_point(self, params: dict, goal: jax.Array) -> jax.Array:
        """The same for a goal as a task names it: a whole observation, mapped; or its
        goal dimensions, as they are."""
        return self.steps_point(params, goal) if self.step_map is not None else goal

    def cumulant_input(self, params: dict, obs: jax.Array, z: jax.Array) -> jax.Array:
        """What phi reads: V's latent, the step-space point, or (vector observations) the
        normalised observation."""
        sf = self.config.successor
        if sf.cumulant_input == "latent":
            return z
        if self.step_map is not None:
            return self.steps_point(params, obs)
        x = normalise(obs, params["normaliser"])
        return x[..., list(sf.feature_dims)] if sf.feature_dims else x

    def phi(self, params: dict, obs: jax.Array, z: jax.Array) -> jax.Array:
        return cumulants(params["cumulants"], self.cumulant_input(params, obs, z))

    def psi_condition(self, state: jax.Array) -> jax.Array:
        """What the psi-model and the readout read of a planning state [z, h]: all of it,
        or (successor.history off) z with h at the initial LSTM state."""
        if self.config.successor.history:
            return state
        is_h = jnp.arange(state.shape[-1]) >= self.latent_dim
        return jnp.where(is_h, 0.0, state)

    def imagined_phi(self, params: dict, z: jax.Array) -> jax.Array:
        """phi of a state M imagines, known only by its latent: phi of the latent itself,
        or of V's decoding of it into an observation."""
        if self.config.successor.cumulant_input == "latent":
            return cumulants(params["cumulants"], z)
        decoded = self.vae.apply({"params": params["vae"]}, z, method="decode")
        return self.phi(params, denormalise(decoded, params["normaliser"]), z)

    def predict_v(self, psi_params: dict, psi_t, t_fraction, state) -> jax.Array:
        cond = self.psi_condition(state)
        return self.psi_net.apply({"params": psi_params}, psi_t, t_fraction, cond)

    def psi_features(self, psi_params: dict, psi_t, t_fraction, state) -> jax.Array:
        """What the psi network's output layer `out` reads: v = features @ kernel + bias."""
        cond = self.psi_condition(state)
        return self.psi_net.apply({"params": psi_params}, psi_t, t_fraction, cond, True)

    def read_out(self, params: dict, state: jax.Array, psi: jax.Array) -> jax.Array:
        """The readout's action for the outcome psi (normalised) at planning state s."""
        return self.readout.apply({"params": params["readout"]}, self.psi_condition(state), psi)

    def sample_psi(self, psi_params, state, noise, n_steps, guide_fn=None, guidance_scale=0.0):
        """Normalised psi samples for `noise` [..., P] at planning states [..., S]."""
        return ddim_sample(
            self.predict_v,
            psi_params,
            self.schedule,
            state,
            noise,
            n_steps,
            guide_fn,
            guidance_scale,
        )


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


def denormalise(x: jax.Array, stats: dict) -> jax.Array:
    return x * stats["std"] + stats["mean"]
