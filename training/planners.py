"""The four decision-time planners, as pure functions compiled once per configuration.

Every planner maps (params, planning state s = [z, h], task weights w, key) to an action:
- `controller`: C(z, h), the World Models reactive baseline;
- `random_shooting`: N samples of psi from p(psi | s), keep the best by V, read out;
- `guided_diffusion`: the same with grad V added to the score while sampling;
- `online_adaptation`: K Adam steps on Δφ to maximise E[V(psi)] - λ KL for the
  psi-model with parameters φ + Δφ, then as random shooting with the adapted model.

Values are V(psi) = psi . w on un-normalised psi. Shapes (sample counts, step counts) are
static and fix a compilation; the learning rate, KL coefficient and guidance scale are
ordinary inputs, so changing them compiles nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from training.config import PlanningConfig
from training.models.mdn_rnn import MDNRNN, LSTMState
from training.models.value import linear_value
from training.models.world import WorldModel, denormalise

PLANNERS = ("controller", "random_shooting", "guided_diffusion", "online_adaptation")


@dataclass(frozen=True)
class PlanShape:
    """What fixes a compiled planning program."""

    planner: str
    sample_steps: int
    n_samples: int
    adaptation_steps: int
    n_adaptation_samples: int

    @classmethod
    def of(cls, config: PlanningConfig) -> PlanShape:
        return cls(
            config.planner,
            config.sample_steps,
            config.n_samples,
            config.adaptation_steps,
            config.n_adaptation_samples,
        )

    def __str__(self) -> str:
        sizes = f"sample_steps={self.sample_steps}, n_samples={self.n_samples}"
        if self.planner == "online_adaptation":
            sizes += f", adaptation_steps={self.adaptation_steps}, "
            sizes += f"n_adaptation_samples={self.n_adaptation_samples}"
        return f"{self.planner}({sizes})"


class Knobs(NamedTuple):
    """The planner's continuous settings: inputs of the program, not part of its shape."""

    delta_phi_lr: jax.Array
    kl_coef: jax.Array
    guidance_scale: jax.Array

    @classmethod
    def of(cls, config: PlanningConfig) -> Knobs:
        return cls(
            jnp.float32(config.delta_phi_lr),
            jnp.float32(config.kl_coef),
            jnp.float32(config.guidance_scale),
        )


class Plan(NamedTuple):
    action: jax.Array  # [A]
    value: jax.Array  # V of the chosen outcome
    objective: jax.Array  # [K + 1]: the adaptation objective at Δφ start, after 1 ... K steps
    kept_step: jax.Array  # which of those iterates was kept (the one of highest objective)
    kl: jax.Array  # the KL term after adaptation
    value_before: jax.Array  # mean V of the samples before adaptation
    value_after: jax.Array  # mean V of the samples after adaptation
    delta: dict | None  # Δφ after adaptation (online_adaptation only)


def tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def zeros_like_psi(params: dict) -> dict:
    """Δφ = 0: a warm start that changes nothing."""
    return jax.tree.map(jnp.zeros_like, params["psi_ema"])


def value_fn(params: dict, weights: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """V of normalised psi samples for the task weights."""
    return lambda psi: linear_value(denormalise(psi, params["psi_norm"]), weights)


def choose_and_read_out(model: WorldModel, params, psi_params, state, weights, noise, steps):
    """Samples psi with `psi_params`, keeps the one of highest value, reads out its action."""
    cond = jnp.broadcast_to(state, (noise.shape[0], state.shape[-1]))
    psi = model.sample_psi(psi_params, cond, noise, steps)
    values = value_fn(params, weights)(psi)
    best = jnp.argmax(values)
    action = model.readout.apply({"params": params["readout"]}, state, psi[best])
    return action, values[best], jnp.mean(values)


def plan_controller(model: WorldModel, shape: PlanShape, params, state, weights, key, knobs, delta):
    z, h = jnp.split(state, [model.latent_dim])
    action, _ = model.controller.apply({"params": params["controller"]}, z, h)
    zero = jnp.float32(0.0)
    return Plan(action, zero, jnp.zeros(1), 0, zero, zero, zero, None)


def plan_random_shooting(model, shape: PlanShape, params, state, weights, key, knobs, delta):
    # The same key split as online adaptation: with Δφ = 0 both choose among the same samples.
    _, k_choose = jax.random.split(key)
    noise = jax.random.normal(k_choose, (shape.n_samples, model.psi_dim))
    action, best, mean = choose_and_read_out(
        model, params, params["psi_ema"], state, weights, noise, shape.sample_steps
    )
    return Plan(action, best, mean[None], 0, jnp.float32(0.0), mean, mean, None)


def plan_guided_diffusion(model, shape: PlanShape, params, state, weights, key, knobs, delta):
    _, k_choose = jax.random.split(key)
    noise = jax.random.normal(k_choose, (shape.n_samples, model.psi_dim))
    cond = jnp.broadcast_to(state, (shape.n_samples, state.shape[-1]))
    value = value_fn(params, weights)
    # V is linear in psi: dividing by |grad V| makes the scale a step in standard deviations.
    grad_norm = jnp.linalg.norm(weights * params["psi_norm"]["std"]) + 1e-8
    psi = model.sample_psi(
        params["psi_ema"],
        cond,
        noise,
        shape.sample_steps,
        guide_fn=lambda x0: value(x0) / grad_norm,
        guidance_scale=knobs.guidance_scale,
    )
    values = value(psi)
    best = jnp.argmax(values)
    action = model.readout.apply({"params": params["readout"]}, state, psi[best])
    mean = jnp.mean(values)
    return Plan(action, values[best], mean[None], 0, jnp.float32(0.0), mean, mean, None)


def adapt_delta(model: WorldModel, shape: PlanShape, params, state, weights, key, knobs, delta):
    """K Adam steps on -(mean V(psi ~ p_{φ+Δφ}) - λ KL), with
    KL = 0.5 Σ Δφ² + 0.1 mean((V_adapted - V_prior)²).

    The same reparameterised noise serves every step (common random numbers), so the
    objectives of the iterates compare fairly; the iterate with the highest objective,
    the starting one included, is kept. Adam's steps have the size of the learning rate
    whatever the gradient's scale, so with a large λ the later iterates oscillate around
    Δφ = 0 at a cost in KL: keeping the best one returns the start instead.
    Returns (Δφ, objective trace [K + 1], index of the kept iterate, its KL, mean V
    before adaptation, mean V of the kept iterate).
    """
    base = params["psi_ema"]
    noise = jax.random.normal(key, (shape.n_adaptation_samples, model.psi_dim))
    cond = jnp.broadcast_to(state, (noise.shape[0], state.shape[-1]))
    value = value_fn(params, weights)

    def sample_values(psi_params):
        return value(model.sample_psi(psi_params, cond, noise, shape.sample_steps))

    v_prior = jax.lax.stop_gradient(sample_values(base))

    def objective(d):
        v = sample_values(tree_add(base, d))
        param_kl = 0.5 * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(d))
        kl = param_kl + 0.1 * jnp.mean(jnp.square(v - v_prior))
        return jnp.mean(v) - knobs.kl_coef * kl, (kl, jnp.mean(v))

    tx = optax.adam(knobs.delta_phi_lr)

    def keep_better(best, candidate):
        better = candidate[1] > best[1]
        return jax.tree.map(lambda b, c: jnp.where(better, c, b), best, candidate)

    def step(carry, k):
        d, opt_state, best = carry
        (obj, aux), grads = jax.value_and_grad(objective, has_aux=True)(d)
        best = keep_better(best, (d, obj, aux, k))
        ascent = jax.tree.map(jnp.negative, grads)
        updates, opt_state = tx.update(ascent, opt_state, d)
        return (optax.apply_updates(d, updates), opt_state, best), obj

    start = (delta, jnp.float32(-jnp.inf), (jnp.float32(0.0), jnp.float32(0.0)), 0)
    steps = jnp.arange(shape.adaptation_steps)
    (last, _, best), trace = jax.lax.scan(step, (delta, tx.init(delta), start), steps)
    final, aux = objective(last)
    kept, _, (kl, v_after), index = keep_better(best, (last, final, aux, shape.adaptation_steps))
    return kept, jnp.append(trace, final), index, kl, jnp.mean(v_prior), v_after


def plan_online_adaptation(model, shape: PlanShape, params, state, weights, key, knobs, delta):
    k_adapt, k_choose = jax.random.split(key)
    delta, trace, kept, kl, v_before, v_after = adapt_delta(
        model, shape, params, state, weights, k_adapt, knobs, delta
    )
    noise = jax.random.normal(k_choose, (shape.n_samples, model.psi_dim))
    adapted = tree_add(params["psi_ema"], delta)
    action, best, _ = choose_and_read_out(
        model, params, adapted, state, weights, noise, shape.sample_steps
    )
    return Plan(action, best, trace, kept, kl, v_before, v_after, delta)


PLANNER_FNS = {
    "controller": plan_controller,
    "random_shooting": plan_random_shooting,
    "guided_diffusion": plan_guided_diffusion,
    "online_adaptation": plan_online_adaptation,
}


def plan(model: WorldModel, shape: PlanShape, params, state, weights, key, knobs, delta=None):
    """One decision for one planning state. `delta` warm-starts Δφ (zero when None)."""
    if shape.planner not in PLANNER_FNS:
        raise ValueError(f"unknown planner {shape.planner!r}; known: {', '.join(PLANNERS)}")
    if delta is None:
        delta = zeros_like_psi(params)
    p = PLANNER_FNS[shape.planner](model, shape, params, state, weights, key, knobs, delta)
    low = jnp.asarray(model.spaces.action_low)
    high = jnp.asarray(model.spaces.action_high)
    return p._replace(action=jnp.clip(p.action, low, high))


class Decision(NamedTuple):
    plan: Plan
    lstm: LSTMState  # M's state after consuming (z_t, a_t)


def decide(model: WorldModel, shape: PlanShape, params, lstm, obs, weights, key, knobs, delta):
    """A whole decision: V encode -> plan on [z, h] -> M step with (z, a)."""
    z = model.encode(params, obs)
    state = jnp.concatenate([z, lstm[1]], axis=-1)
    p = plan(model, shape, params, state, weights, key, knobs, delta)
    lstm, _ = model.mdn.apply({"params": params["mdn"]}, lstm, z, p.action, method=MDNRNN.step)
    return Decision(p, lstm)


@functools.cache
def compile_decide(model: WorldModel, shape: PlanShape, batched: bool = False) -> Callable:
    """jit(decide) for one planner configuration, made once per (model, shape); `batched`
    vmaps it over sessions (every input but the parameters has a leading batch axis)."""

    def fn(params, lstm, obs, weights, key, knobs, delta):
        return decide(model, shape, params, lstm, obs, weights, key, knobs, delta)

    if batched:
        fn = jax.vmap(fn, in_axes=(None, 0, 0, 0, 0, 0, 0))
    return jax.jit(fn)


def session_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of a session's step: a retry or a replay draws the same numbers."""
    return jax.random.fold_in(jax.random.key(seed), step)


@functools.cache
def compile_adapt(model: WorldModel, shape: PlanShape) -> Callable:
    """jit of Δφ adaptation alone at the state [V(obs), h]: what /adapt runs."""

    def fn(params, lstm_h, obs, weights, key, knobs, delta):
        state = jnp.concatenate([model.encode(params, obs), lstm_h], axis=-1)
        return adapt_delta(model, shape, params, state, weights, key, knobs, delta)

    return jax.jit(fn)
