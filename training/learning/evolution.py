"""C trained by CMA-ES (evosax) on its return, V and M held fixed: the controller stage with
train.controller cmaes_dream or cmaes_env (docs/training.md, the controller's trainers).

- cmaes_dream: every candidate acts in M's dream from the data's own episode starts, all
  candidates and all their dreams at once, in one compiled program per generation. The
  return is M's predicted rewards, each step weighted by M's chance that the episode is
  still on.
- cmaes_env: every candidate drives the real environment, as World Models did: V encodes
  each observation, C acts on [z, h], M carries h.

One generation is one step of the stage. CMA-ES's state is the stage's optimiser state, so
it is saved in every checkpoint and a resumed run continues the same search. The search
starts from C as the stage finds it (the jointly trained C after a joint stage), and C's
weights are the search's mean after each generation. Only C's mean is searched: the
controller planner acts on the mean, so the learned log-std plays no part in a return.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from training.config import Config
from training.data.envs import check_observation_shape, make_env, select_observation
from training.learning.losses import imagined_return
from training.models.mdn_rnn import MDNRNN, initial_state, sample_next_latent
from training.models.networks import Networks

if TYPE_CHECKING:
    from evosax.algorithms import CMA_ES

FIXED = ("log_std",)  # C's parameters the search leaves alone


def searched(controller: dict) -> dict:
    return {k: v for k, v in controller.items() if k not in FIXED}


def controller_template(model: Networks) -> dict:
    """C's parameters as a fresh C has them: the shapes the search is over."""
    z, h = jnp.zeros((1, model.latent_dim)), jnp.zeros((1, model.mdn.hidden))
    return model.controller.init(jax.random.key(0), z, h)["params"]


def strategy(config: Config, controller: dict) -> tuple[CMA_ES, object]:
    """CMA-ES over C's searched weights, and its parameters (the initial step size)."""
    # Imported here: evosax makes arrays when imported, which starts JAX's backend, and a
    # run over several hosts must join them before that (training/learning/parallel.py).
    from evosax.algorithms import CMA_ES

    es = CMA_ES(population_size=config.evolution.population, solution=searched(controller))
    return es, es.default_params.replace(std_init=jnp.asarray(config.evolution.sigma))


def init_state(config: Config, params: dict):
    es, es_params = strategy(config, params["controller"])
    return es.init(jax.random.key(config.seed), searched(params["controller"]), es_params)


def ask(es: CMA_ES, es_params, state, controller: dict, key):
    """A generation's candidates. The first generation centres the search on C as the stage
    found it: the state was made before the stages that came first had trained C."""
    start, _ = ravel_pytree(searched(controller))  # evosax's own flattening of a solution
    state = state.replace(mean=jnp.where(state.generation_counter == 0, start, state.mean))
    return es.ask(key, state, es_params)


def tell(es: CMA_ES, es_params, state, population, returns, params: dict, key):
    """(params with C at the search's new mean, state, metrics) after candidates' returns
    [P, R] (R episodes each)."""
    per_candidate = jnp.mean(returns, axis=1)
    state, _ = es.tell(key, population, -per_candidate, state, es_params)
    controller = {**params["controller"], **es.get_mean(state)}
    metrics = {
        "loss": -jnp.mean(per_candidate),
        "return_mean": jnp.mean(per_candidate),
        "return_best": jnp.max(per_candidate),
        "sigma": state.std,
    }
    return {**params, "controller": controller}, state, metrics


def act(model: Networks, params: dict, candidate: dict, carry, z):
    """C's mean action on [z, h] for one candidate, and M's state after it."""
    controller = {**params["controller"], **candidate}
    action, _ = model.controller.apply({"params": controller}, z, carry[1])
    carry, out = model.mdn.apply({"params": params["mdn"]}, carry, z, action, method=MDNRNN.step)
    return action, carry, out


# --- in the dream ------------------------------------------------------------------------


def dream_starts(model: Networks, params: dict, data, episode: np.ndarray) -> jax.Array:
    """V's mean latents of the first observation of every episode: where dreams begin."""
    first = np.r_[True, episode[1:] != episode[:-1]]
    return model.encode(params, data.observations[np.flatnonzero(first), 0])


def dream_return(model: Networks, params: dict, candidate: dict, z0, keys) -> jax.Array:
    """The return M predicts for one candidate from one start, one key per dream step."""
    temperature = model.config.evolution.temperature

    def step(carry, key):
        state, z = carry
        _, state, out = act(model, params, candidate, state, z)
        return (state, sample_next_latent(key, out, temperature)), (out.reward, out.done_logit)

    start = (initial_state((), model.mdn.hidden), z0)
    _, (rewards, done_logits) = jax.lax.scan(step, start, keys)
    return imagined_return(rewards, done_logits, 1.0)


def dream_returns(model: Networks, params: dict, population: dict, z0, key) -> jax.Array:
    """[P, R]: every candidate from the same R start latents z0 [R, Z] with the same dream
    noise, so that candidates differ by their weights alone."""
    keys = jax.random.split(key, (z0.shape[0], model.config.evolution.horizon))
    one = jax.vmap(lambda c, z, k: dream_return(model, params, c, z, k), (None, 0, 0))
    return jax.vmap(one, (0, None, None))(population, z0, keys)


def make_dream_update(model: Networks) -> Callable:
    """One generation in the dream, one compiled program: (params, state, starts, key,
    step) -> (params, state, metrics)."""
    es, es_params = strategy(model.config, controller_template(model))

    def update(params, state, starts, key, step):
        k_ask, k_rows, k_dream, k_tell = jax.random.split(key, 4)
        population, state = ask(es, es_params, state, params["controller"], k_ask)
        rows = jax.random.randint(k_rows, (model.config.evolution.rollouts,), 0, starts.shape[0])
        returns = dream_returns(model, params, population, starts[rows], k_dream)
        return tell(es, es_params, state, population, returns, params, k_tell)

    return jax.jit(update)


# --- in the environment ------------------------------------------------------------------


class EnvironmentPool:
    """P x R copies of the model's environment, stepped together: candidate p's r-th
    episode in copy [p, r]; every candidate meets the same R reset seeds."""

    def __init__(self, model: Networks, candidates: int, rollouts: int):
        cfg = model.config
        steps = cfg.evolution.max_episode_steps
        self.envs = [make_env(cfg.env, steps) for _ in range(candidates * rollouts)]
        self.obs_key = check_observation_shape(self.envs[0], cfg.env, model.spaces.obs_shape)
        self.shape = (candidates, rollouts)

    def reset(self, seeds: list[int]) -> np.ndarray:
        rollouts = self.shape[1]
        obs = [env.reset(seed=seeds[i % rollouts])[0] for i, env in enumerate(self.envs)]
        return np.stack([select_observation(o, self.obs_key) for o in obs])

    def step(self, actions: np.ndarray, live: np.ndarray, obs: np.ndarray):
        """Steps the live copies; (observations, rewards, still live), flat over P x R."""
        rewards = np.zeros(len(self.envs), np.float32)
        live = live.copy()
        obs = obs.copy()
        for i in np.flatnonzero(live):
            o, r, terminated, truncated, _ = self.envs[i].step(actions[i])
            obs[i], rewards[i] = select_observation(o, self.obs_key), r
            live[i] = not (terminated or truncated)
        return obs, rewards, live

    def close(self) -> None:
        for env in self.envs:
            env.close()


def env_returns(model: Networks, params: dict, population: dict, pool: EnvironmentPool,
                seeds: list[int], policy: Callable) -> np.ndarray:  # fmt: skip
    """[P, R] returns of every candidate's episodes from the reset seeds."""
    candidates, rollouts = pool.shape
    obs = pool.reset(seeds)
    carry = initial_state((candidates, rollouts), model.mdn.hidden)
    live = np.ones(candidates * rollouts, bool)
    returns = np.zeros(candidates * rollouts, np.float64)
    while live.any():
        frames = obs.reshape(*pool.shape, *obs.shape[1:])
        actions, carry = policy(params, population, carry, frames)
        actions = np.asarray(actions).reshape(candidates * rollouts, -1)
        obs, rewards, live_after = pool.step(actions, live, obs)
        returns += rewards * live
        live = live_after
    return returns.reshape(pool.shape)


def make_policy(model: Networks) -> Callable:
    """(params, population, carry [P, R, H], observations [P, R, *obs]) -> (actions, carry):
    each candidate acting on its own episodes, one compiled call per environment step."""

    def per_candidate(params, candidate, carry, obs):
        action, carry, _ = act(model, params, candidate, carry, model.encode(params, obs))
        return action, carry

    return jax.jit(jax.vmap(per_candidate, (None, 0, 0, 0)))


def make_env_update(model: Networks) -> Callable:
    """One generation in the environment: (params, state, inputs, key, step) -> (params,
    state, metrics). The reset seeds follow from the run's seed and the step."""
    cfg = model.config
    es, es_params = strategy(cfg, controller_template(model))
    pool = EnvironmentPool(model, cfg.evolution.population, cfg.evolution.rollouts)
    policy = make_policy(model)
    ask_jit = jax.jit(lambda state, controller, key: ask(es, es_params, state, controller, key))
    tell_jit = jax.jit(
        lambda state, population, returns, params, key: tell(
            es, es_params, state, population, returns, params, key
        )
    )

    def update(params, state, inputs, key, step):
        k_ask, k_tell = jax.random.split(key)
        population, state = ask_jit(state, params["controller"], k_ask)
        first = (cfg.seed * 1_000_003 + int(step) * cfg.evolution.rollouts) % 2**31
        seeds = [first + r for r in range(cfg.evolution.rollouts)]
        returns = env_returns(model, params, population, pool, seeds, policy)
        return tell_jit(state, population, jnp.asarray(returns, jnp.float32), params, k_tell)

    return update


def make_update(model: Networks) -> Callable:
    trainer = model.config.train.controller_trainer
    return make_dream_update(model) if trainer == "cmaes_dream" else make_env_update(model)
