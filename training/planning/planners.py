"""The five decision-time planners, as pure functions compiled once per configuration.

Every planner maps (params, planning state s = [z, h], task weights w, key) to an action:
- `controller`: C(z, h), the World Models reactive baseline;
- `random_shooting`: N samples of psi from p(psi | s), keep the best by V, read out;
- `guided_diffusion`: the same with grad V added to the score while sampling;
- `online_adaptation`: adapt Δφ so that p_{φ+Δφ}(psi | s) leans towards high values,
  E[V(psi)] - λ KL(p_{φ+Δφ} || p_φ), then as random shooting with the adapted model;
- `imagination`: N actions, each held for T steps of M from M's own LSTM state, scored by
  the task's reward at the states M imagines and the psi-model's value at the last; the
  best one is the action (no readout: the action is what was imagined).

Online adaptation has two rules (`planning.adaptation`):
- `reweighted` (the default): the maximiser of E_q[V] - λ KL(q || p) is q* ∝ p exp(V / λ),
  which never leaves p's support. Prior samples are weighted by exp(V / λ) (self-normalised)
  and Δφ takes K Adam steps on their weighted denoising loss: no backpropagation through
  the sampler. With `prior_source: warm` the prior's samples come from φ + the warm
  start's Δφ, the last decision's adapted model, so the tilt compounds over decisions.
- `gradient` (the original formulation's): K Adam steps on mean V(psi ~ p_{φ+Δφ}) - λ KL
  through the DDIM sampler, with KL either the path KL between the two samplers
  (`kl_estimator: path`, on a stochastic sampler) or the original formulation's proxy
  0.5 Σ Δφ² + 0.1 mean((V - V_prior)²) (`kl_estimator: proxy`).
Δφ covers the layers `planning.adapt_params` names (all, the FiLM layers and the output, or
the output alone). The support guard falls back to Δφ = 0, that is to the prior's own
samples, when the chosen adapted outcome lies farther from the prior's samples than they
lie from each other.

Every sampling planner chooses its outcome by `planning.choice`: the sample of highest V,
or the mode of q* ∝ p exp(V / λ) among the samples (V / λ plus a kernel density of the
prior's samples).

Values are V(psi) = psi . w on un-normalised psi. Shapes (sample counts, the rule) are
static and fix a compilation; the learning rate, KL coefficient, guidance scale and the
number of adaptation steps (up to `max_adaptation_steps`) are ordinary inputs, so changing
them compiles nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from training.config import PLANNERS, PlanningConfig
from training.models.diffusion import sample_with_path_kl
from training.models.mdn_rnn import MDNRNN, LSTMState, MDNOutput
from training.models.networks import Networks, denormalise
from training.models.value import linear_value

# Which psi-network layers Δφ adapts, by name prefix (None: every layer).
ADAPTED_LAYERS = {"all": None, "film": ("film_", "out"), "head": ("out",)}
FIT_DRAWS = 4  # noise draws per prior sample in the reweighted denoising loss
GUARD_QUANTILE = 0.95  # of the prior samples' spacing: how far a chosen outcome may lie
PATH_KL_ETA = 1.0  # the stochastic sampler of the path KL: DDPM-like steps


@dataclass(frozen=True)
class PlanShape:
    """What fixes a compiled planning program."""

    planner: str
    sample_steps: int
    n_samples: int
    n_adaptation_samples: int
    adaptation: str = "reweighted"
    kl_estimator: str = "path"
    adapt_params: str = "head"
    support_guard: bool = True
    prior_source: str = "base"
    max_adaptation_steps: int = 200
    choice: str = "max_value"
    n_fit_samples: int | None = None
    action_horizon: int = 1
    imagination_steps: int = 20
    imagination_value: bool = True
    imagination_rounds: int = 1

    @classmethod
    def of(cls, config: PlanningConfig) -> PlanShape:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def __str__(self) -> str:
        sizes = f"sample_steps={self.sample_steps}, n_samples={self.n_samples}"
        if self.choice != "max_value":
            sizes += f", choice={self.choice}"
        if self.planner == "online_adaptation":
            sizes += f", n_adaptation_samples={self.n_adaptation_samples}, "
            sizes += f"adaptation={self.adaptation}"
            if self.adaptation == "reweighted" and self.n_fit_samples is not None:
                sizes += f", n_fit_samples={self.n_fit_samples}"
            if self.adaptation == "reweighted" and self.prior_source != "base":
                sizes += f", prior_source={self.prior_source}"
            if self.adaptation == "gradient":
                sizes += f", kl_estimator={self.kl_estimator}"
            sizes += f", adapt_params={self.adapt_params}, support_guard={self.support_guard}"
        if self.planner == "imagination":
            sizes += f", imagination_steps={self.imagination_steps}"
            if not self.imagination_value:
                sizes += ", imagination_value=False"
            if self.imagination_rounds > 1:
                sizes += f", imagination_rounds={self.imagination_rounds}"
        if self.action_horizon > 1:
            sizes += f", action_horizon={self.action_horizon}"
        return f"{self.planner}({sizes})"


class Knobs(NamedTuple):
    """The planner's continuous settings: inputs of the program, not part of its shape."""

    delta_phi_lr: jax.Array
    kl_coef: jax.Array
    guidance_scale: jax.Array
    adaptation_steps: jax.Array  # a whole number, up to the shape's max_adaptation_steps

    @classmethod
    def of(cls, config: PlanningConfig) -> Knobs:
        """The knobs of a planning config, as the program's float32 inputs."""
        return cls(*(jnp.float32(x) for x in knob_values(config)))


def knob_values(config: PlanningConfig) -> Knobs:
    """The knobs of a planning config as plain numbers (a host-side record)."""
    return Knobs(**{name: getattr(config, name) for name in Knobs._fields})


class Plan(NamedTuple):
    action: jax.Array  # [A]
    value: jax.Array  # V of the chosen outcome
    objective: jax.Array  # [max steps + 1]: the objective at Δφ start, after 1 ... K steps
    kept_step: jax.Array  # which of those iterates was kept (the one of highest objective)
    kl: jax.Array  # the KL term of the kept iterate
    value_before: jax.Array  # mean V of the prior's samples
    value_after: jax.Array  # mean V of the adapted model's samples
    ess: jax.Array  # effective sample size of the reweighted prior samples (reweighted rule)
    fallback: jax.Array  # the support guard fell back to Δφ = 0
    chose_prior: jax.Array  # the chosen outcome is one of the prior's samples
    delta: dict | None  # Δφ after adaptation (online_adaptation only): the next warm start


def tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def adapted_part(psi_params: dict, adapt_params: str) -> dict:
    """The layers of the psi network that Δφ covers."""
    prefixes = ADAPTED_LAYERS[adapt_params]
    if prefixes is None:
        return psi_params
    return {name: layer for name, layer in psi_params.items() if name.startswith(prefixes)}


def zero_delta(params: dict, shape: PlanShape) -> dict:
    """Δφ = 0 over the adapted layers: a warm start that changes nothing."""
    part = adapted_part(params["psi_ema"], shape.adapt_params)
    return jax.tree.map(jnp.zeros_like, part)


def with_delta(psi_params: dict, delta: dict) -> dict:
    """φ + Δφ, where Δφ covers some of φ's layers."""
    return {**psi_params, **{name: tree_add(psi_params[name], d) for name, d in delta.items()}}


def squared_norm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def value_fn(params: dict, weights: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """V of normalised psi samples for the task weights."""
    return lambda psi: linear_value(denormalise(psi, params["psi_norm"]), weights)


def broadcast_state(state: jax.Array, n: int) -> jax.Array:
    return jnp.broadcast_to(state, (n, state.shape[-1]))


def plan_without_adaptation(action, value, mean) -> Plan:
    """The plan of a planner that adapts nothing: no objective trace, no KL, no Δφ."""
    zero, no = jnp.float32(0.0), jnp.bool_(False)
    return Plan(
        action=action,
        value=value,
        objective=mean[None],
        kept_step=0,
        kl=zero,
        value_before=mean,
        value_after=mean,
        ess=zero,
        fallback=no,
        chose_prior=no,
        delta=None,
    )


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """[len(a), len(b)] squared Euclidean distances, from a Gram matrix (no [N, M, P])."""
    sq = jnp.sum(jnp.square(a), axis=-1)[:, None] + jnp.sum(jnp.square(b), axis=-1)[None]
    return jnp.maximum(sq - 2.0 * a @ b.T, 0.0)


def nearest_spacing(samples: jax.Array) -> jax.Array:
    """Each sample's distance to its nearest other sample."""
    gaps = squared_distances(samples, samples)
    gaps = jnp.where(jnp.eye(samples.shape[0], dtype=bool), jnp.inf, gaps)
    return jnp.sqrt(jnp.min(gaps, axis=1))


def log_density(candidates: jax.Array, prior: jax.Array, is_prior: jax.Array) -> jax.Array:
    """Log of a Gaussian kernel density of the prior's samples at each candidate, up to a
    constant; a candidate that is prior sample i leaves sample i out (`is_prior` [C, N]
    marks it), so prior and adapted candidates are judged alike. The bandwidth is the
    prior samples' median nearest-neighbour spacing: in normalised psi an outcome far
    from every sample the model drew pays for it."""
    bandwidth2 = jnp.square(jnp.median(nearest_spacing(prior)))
    logits = -squared_distances(candidates, prior) / (2.0 * bandwidth2)
    return jax.nn.logsumexp(jnp.where(is_prior, -jnp.inf, logits), axis=1)


def choice_scores(choice: str, values, candidates, prior, is_prior, kl_coef) -> jax.Array:
    """What the chosen outcome maximises among candidate samples: V (`max_value`), or
    V / λ + log p (`tilted_mode`), the mode of q* ∝ p exp(V / λ), the optimum of
    E_q[V] - λ KL(q || p): an outcome of high value that the model also makes often, so
    one sample whose value is overestimated does not win by itself."""
    if choice == "max_value":
        return values
    return values / kl_coef + log_density(candidates, prior, is_prior)


def best_sample_plan(model: Networks, shape: PlanShape, params, state, values, psi,
                     knobs) -> Plan:  # fmt: skip
    """Reads out the sample the planner's choice rule scores highest."""
    is_self = jnp.eye(psi.shape[0], dtype=bool)
    best = jnp.argmax(choice_scores(shape.choice, values, psi, psi, is_self, knobs.kl_coef))
    action = model.read_out(params, state, psi[best])
    return plan_without_adaptation(action, values[best], jnp.mean(values))


def plan_controller(model, shape: PlanShape, params, state, weights, key, knobs, delta, lstm):
    z, h = jnp.split(state, [model.latent_dim])
    action, _ = model.controller.apply({"params": params["controller"]}, z, h)
    return plan_without_adaptation(action, jnp.float32(0.0), jnp.float32(0.0))


def plan_random_shooting(model, shape: PlanShape, params, state, weights, key, knobs, delta, lstm):
    # The same key split as online adaptation: with Δφ = 0 both choose among the same samples.
    _, k_choose = jax.random.split(key)
    noise = jax.random.normal(k_choose, (shape.n_samples, model.psi_dim))
    psi = model.sample_psi(params["psi_ema"], broadcast_state(state, noise.shape[0]), noise,
                           shape.sample_steps)  # fmt: skip
    return best_sample_plan(model, shape, params, state, value_fn(params, weights)(psi), psi,
                            knobs)  # fmt: skip


def plan_guided_diffusion(model, shape: PlanShape, params, state, weights, key, knobs, delta, lstm):
    _, k_choose = jax.random.split(key)
    noise = jax.random.normal(k_choose, (shape.n_samples, model.psi_dim))
    value = value_fn(params, weights)
    # V is linear in psi: dividing by |grad V| makes the scale a step in standard deviations.
    grad_norm = jnp.linalg.norm(weights * params["psi_norm"]["std"]) + 1e-8
    psi = model.sample_psi(
        params["psi_ema"],
        broadcast_state(state, shape.n_samples),
        noise,
        shape.sample_steps,
        guide_fn=lambda x0: value(x0) / grad_norm,
        guidance_scale=knobs.guidance_scale,
    )
    return best_sample_plan(model, shape, params, state, value(psi), psi, knobs)


TERMINAL_SAMPLES = 4  # psi samples that value the last imagined state of each action
ELITE_FRACTION = 8  # a refinement draws about the best 1/8 of the last round's actions


def plan_imagination(model, shape: PlanShape, params, state, weights, key, knobs, delta, lstm):
    """Shooting through M's imagination: n_samples actions drawn uniformly in the action
    box, each held for imagination_steps steps of M (the mean of its most likely component
    each step) from M's LSTM carry. An action is worth the discounted reward phi . w of the
    states it imagines, then gamma^T times the mean value of TERMINAL_SAMPLES psi samples at
    the last one (the same noise for every action: they differ only by where they lead);
    without `imagination_value`, the rewards of every imagined state alone. Each of
    `imagination_rounds - 1` further rounds (the cross-entropy method) draws n_samples
    actions from the normal fitted to the last round's best eighth; the action worth most
    of every round is the plan."""
    k_actions, k_psi = jax.random.split(key)
    low = jnp.asarray(model.spaces.action_low)
    high = jnp.asarray(model.spaces.action_high)
    draw_shape = (shape.n_samples, low.shape[0])
    actions = jax.random.uniform(k_actions, draw_shape, minval=low, maxval=high)
    steps, gamma = shape.imagination_steps, model.config.successor.gamma
    value = value_fn(params, weights)
    noise = jax.random.normal(k_psi, (TERMINAL_SAMPLES, model.psi_dim))
    z = state[: model.latent_dim]

    def worth(action):
        def step(carry, _):
            carry, out = model.mdn.apply({"params": params["mdn"]}, carry[0], carry[1], action,
                                         method=MDNRNN.step)  # fmt: skip
            z_next = most_likely_latent(out)
            return (carry, z_next), model.imagined_phi(params, z_next) @ weights

        (carry, z_last), rewards = jax.lax.scan(step, (lstm, z), None, length=steps)
        if not shape.imagination_value:
            return gamma ** jnp.arange(1, steps + 1) @ rewards
        last = jnp.concatenate([z_last, carry[1]])
        psi = model.sample_psi(params["psi_ema"], broadcast_state(last, TERMINAL_SAMPLES), noise,
                               shape.sample_steps)  # fmt: skip
        # psi at the last state counts its own reward: the sum stops one step before it.
        discounts = gamma ** jnp.arange(1, steps)
        return discounts @ rewards[:-1] + gamma**steps * jnp.mean(value(psi))

    values = jax.vmap(worth)(actions)
    first_mean = jnp.mean(values)

    def refine(carry, k):
        actions, values, best_action, best_value = carry
        elite = actions[jnp.argsort(values)[-max(2, shape.n_samples // ELITE_FRACTION) :]]
        spread = jnp.std(elite, axis=0) + 1e-3 * (high - low)  # never a point
        actions = jnp.clip(jnp.mean(elite, axis=0) + spread * jax.random.normal(k, draw_shape),
                           low, high)  # fmt: skip
        values = jax.vmap(worth)(actions)
        i = jnp.argmax(values)
        better = values[i] > best_value
        best_action = jnp.where(better, actions[i], best_action)
        return (actions, values, best_action, jnp.maximum(values[i], best_value)), None

    i = jnp.argmax(values)
    keys = jax.random.split(jax.random.fold_in(key, 1), shape.imagination_rounds - 1)
    (_, _, action, best), _ = jax.lax.scan(refine, (actions, values, actions[i], values[i]), keys)
    return plan_without_adaptation(action, best, first_mean)


class Steps(NamedTuple):
    """What K optimiser steps on Δφ leave: the kept iterate and the objective trace."""

    delta: dict
    objective: jax.Array  # [max steps + 1], zero past the steps taken
    kept_step: jax.Array
    kl: jax.Array  # the KL term of the kept iterate


def ascend(objective_fn, delta: dict, knobs: Knobs, max_steps: int) -> Steps:
    """knobs.adaptation_steps Adam steps (a run-time count, at most max_steps) up
    `objective_fn(Δφ) -> (objective, kl)`, keeping the iterate of highest objective (the
    start included). Adam's first step has the size of the learning rate on every
    parameter whatever the gradient; keeping the best iterate means no step is taken that
    makes the objective worse than where it started."""
    n = jnp.clip(jnp.round(knobs.adaptation_steps).astype(jnp.int32), 0, max_steps)
    tx = optax.adam(knobs.delta_phi_lr)
    grad_fn = jax.value_and_grad(objective_fn, has_aux=True)

    def keep_better(best, candidate):
        better = candidate[1] > best[1]
        return jax.tree.map(lambda b, c: jnp.where(better, c, b), best, candidate)

    def step(k, carry):
        d, opt_state, best, trace = carry
        (obj, kl), grads = grad_fn(d)
        best = keep_better(best, (d, obj, kl, k))
        updates, opt_state = tx.update(jax.tree.map(jnp.negative, grads), opt_state, d)
        return optax.apply_updates(d, updates), opt_state, best, trace.at[k].set(obj)

    start = (delta, jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.int32(0))
    trace = jnp.zeros(max_steps + 1)
    last, _, best, trace = jax.lax.fori_loop(0, n, step, (delta, tx.init(delta), start, trace))
    final, kl = objective_fn(last)
    kept, _, kl, index = keep_better(best, (last, final, kl, n))
    return Steps(delta=kept, objective=trace.at[n].set(final), kept_step=index, kl=kl)


class Adaptation(NamedTuple):
    """One adaptation at a planning state, and the outcome it chooses."""

    steps: Steps
    ess: jax.Array
    value_before: jax.Array  # mean V of the prior's samples
    value_after: jax.Array  # mean V of the adapted model's samples
    psi: jax.Array  # the chosen outcome (normalised)
    value: jax.Array  # its V
    fallback: jax.Array  # the guard rejected the adapted outcome: psi is the prior's best
    chose_prior: jax.Array  # psi is the prior's best (fallback, or it had the higher value)


def tilt_weights(values: jax.Array, kl_coef: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Self-normalised weights exp(V / λ) of prior samples, which turn them into samples of
    q* ∝ p exp(V / λ), and their effective sample size 1 / Σ w²."""
    w = jax.nn.softmax(values / kl_coef)
    return w, 1.0 / jnp.sum(jnp.square(w))


def heaviest(prior: jax.Array, w: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """The m prior samples of largest weight and their weights, renormalised: the tilted
    target's mass sits on few samples (ESS well below N), and the fit's cost grows with
    the samples it runs over."""
    w_top, index = jax.lax.top_k(w, m)
    return prior[index], w_top / jnp.sum(w_top)


def reweighted_steps(model, shape, params, state, value, key, knobs, delta):
    """Δφ fitted to q* ∝ p exp(V / λ): weighted denoising loss on the prior's samples (the
    n_fit_samples heaviest of them when set). Returns (Steps, prior samples, their values,
    ESS). The KL reported is that of the reweighted samples from the prior, Σ w log(N w):
    the KL the target pays."""
    base = params["psi_ema"]
    # A warm prior is the last decision's adapted model: q_t ∝ q_{t-1} exp(V / λ), so few
    # samples search where earlier decisions found value.
    prior_params = with_delta(base, delta) if shape.prior_source == "warm" else base
    n = shape.n_adaptation_samples
    k_prior, k_t, k_noise = jax.random.split(key, 3)
    prior = model.sample_psi(prior_params, broadcast_state(state, n),
                             jax.random.normal(k_prior, (n, model.psi_dim)),
                             shape.sample_steps)  # fmt: skip
    values = value(prior)
    w, ess = tilt_weights(values, knobs.kl_coef)
    kl = jnp.sum(w * jnp.log(jnp.maximum(n * w, 1e-30)))
    m = min(shape.n_fit_samples or n, n)
    fit, w_fit = heaviest(prior, w, m) if m < n else (prior, w)
    cond = broadcast_state(state, m)
    # Fixed noise levels and noise (common random numbers): the iterates compare fairly.
    schedule = model.schedule
    t = jax.random.randint(k_t, (FIT_DRAWS, m), 1, schedule.n_steps + 1)
    eps = jax.random.normal(k_noise, (FIT_DRAWS, m, model.psi_dim))
    ab = schedule.alpha_bar[t][..., None]
    x_t = jnp.sqrt(ab) * fit + jnp.sqrt(1.0 - ab) * eps
    target = jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * fit
    t_fraction = t / schedule.n_steps
    if shape.adapt_params == "head":
        # Δφ leaves the layers below the output alone: their features are computed once.
        features = jax.vmap(lambda x, tf: model.psi_features(base, x, tf, cond))(x_t, t_fraction)

        def predict(d):
            out = with_delta(base, d)["out"]
            return features @ out["kernel"] + out["bias"]

    else:

        def predict(d):
            psi_params = with_delta(base, d)
            return jax.vmap(lambda x, tf: model.predict_v(psi_params, x, tf, cond))(x_t, t_fraction)

    def objective(d):
        loss = jnp.sum(w_fit * jnp.mean(jnp.square(predict(d) - target), axis=(0, 2)))
        return -loss, kl

    steps = ascend(objective, delta, knobs, shape.max_adaptation_steps)
    return steps, prior, values, ess


def gradient_steps(model, shape, params, state, value, key, knobs, delta):
    """The original formulation's rule: Adam steps on mean V - λ KL through the sampler,
    with the path KL of stochastic samplers or its proxy. Returns (Steps, prior samples,
    their values, N): unweighted, every prior sample counts."""
    base = params["psi_ema"]
    n = shape.n_adaptation_samples
    k_noise, k_path = jax.random.split(key)
    noise = jax.random.normal(k_noise, (n, model.psi_dim))
    cond = broadcast_state(state, n)
    if shape.kl_estimator == "path":
        path_noise = jax.random.normal(k_path, (shape.sample_steps, n, model.psi_dim))

        def sample(psi_params):
            return sample_with_path_kl(model.predict_v, psi_params, base, model.schedule, cond,
                                       noise, path_noise, PATH_KL_ETA)  # fmt: skip

        prior = sample(base)[0]

        def objective(d):
            psi, kl = sample(with_delta(base, d))
            kl = jnp.mean(kl)
            return jnp.mean(value(psi)) - knobs.kl_coef * kl, kl

    else:
        prior = model.sample_psi(base, cond, noise, shape.sample_steps)
        v_prior = value(prior)

        def objective(d):
            v = value(model.sample_psi(with_delta(base, d), cond, noise, shape.sample_steps))
            kl = 0.5 * squared_norm(d) + 0.1 * jnp.mean(jnp.square(v - v_prior))
            return jnp.mean(v) - knobs.kl_coef * kl, kl

    prior = jax.lax.stop_gradient(prior)
    steps = ascend(objective, delta, knobs, shape.max_adaptation_steps)
    return steps, prior, value(prior), jnp.float32(n)


def outside_support(prior: jax.Array, prior_best: jax.Array, candidate: jax.Array) -> jax.Array:
    """Whether the candidate outcome lies farther from the prior's samples than they lie
    from each other: its distance to the nearest prior sample exceeds both the
    GUARD_QUANTILE of the prior samples' nearest-neighbour distances and that of the
    prior's own choice, which lies in the tail where samples are sparse (normalised psi)."""
    spacing = nearest_spacing(prior)
    distance = jnp.min(jnp.linalg.norm(prior - candidate, axis=-1))
    return distance > jnp.maximum(jnp.quantile(spacing, GUARD_QUANTILE), spacing[prior_best])


def adapt(model: Networks, shape: PlanShape, params, state, weights, key, knobs, delta):
    """Δφ adaptation from the warm start `delta`, then `n_samples` outcomes of the adapted
    model; the choice rule picks one unless the support guard sends the choice back to
    the prior's samples (and Δφ back to 0). Under the reweighted rule the prior's samples
    compete with the adapted model's: weighted, they are samples of the target q* too."""
    k_adapt, k_choose = jax.random.split(key)
    value = value_fn(params, weights)
    rule = reweighted_steps if shape.adaptation == "reweighted" else gradient_steps
    steps, prior, prior_values, ess = rule(model, shape, params, state, value, k_adapt, knobs,
                                           delta)  # fmt: skip
    noise = jax.random.normal(k_choose, (shape.n_samples, model.psi_dim))
    psi = model.sample_psi(with_delta(params["psi_ema"], steps.delta),
                           broadcast_state(state, shape.n_samples), noise,
                           shape.sample_steps)  # fmt: skip
    values = value(psi)
    n_prior = prior.shape[0]
    candidates = jnp.concatenate([prior, psi])
    candidate_values = jnp.concatenate([prior_values, values])
    is_prior = jnp.eye(len(candidates), n_prior, dtype=bool)
    scores = choice_scores(shape.choice, candidate_values, candidates, prior, is_prior,
                           knobs.kl_coef)  # fmt: skip
    fallback = jnp.bool_(False)
    if shape.support_guard:
        adapted_best = n_prior + jnp.argmax(scores[n_prior:])
        fallback = outside_support(prior, jnp.argmax(prior_values), candidates[adapted_best])
    from_prior = jnp.arange(len(candidates)) < n_prior
    # The gradient rule's prior samples are unweighted: they only stand in on a fallback.
    eligible = from_prior if shape.adaptation == "reweighted" else jnp.zeros_like(from_prior)
    eligible = jnp.where(fallback, from_prior, eligible | ~from_prior)
    chosen = jnp.argmax(jnp.where(eligible, scores, -jnp.inf))
    kept = jax.tree.map(lambda d: jnp.where(fallback, jnp.zeros_like(d), d), steps.delta)
    return Adaptation(
        steps=steps._replace(delta=kept),
        ess=ess,
        value_before=jnp.mean(prior_values),
        value_after=jnp.mean(values),
        psi=candidates[chosen],
        value=candidate_values[chosen],
        fallback=fallback,
        chose_prior=chosen < n_prior,
    )


def plan_online_adaptation(model, shape, params, state, weights, key, knobs, delta, lstm):
    a = adapt(model, shape, params, state, weights, key, knobs, delta)
    action = model.read_out(params, state, a.psi)
    return Plan(
        action=action,
        value=a.value,
        objective=a.steps.objective,
        kept_step=a.steps.kept_step,
        kl=a.steps.kl,
        value_before=a.value_before,
        value_after=a.value_after,
        ess=a.ess,
        fallback=a.fallback,
        chose_prior=a.chose_prior,
        delta=a.steps.delta,
    )


# The planners by name (the names PLANNERS, re-exported here, lists), the registry the
# evaluation, the service and its clients read.
PLANNER_FNS = {
    "controller": plan_controller,
    "random_shooting": plan_random_shooting,
    "guided_diffusion": plan_guided_diffusion,
    "online_adaptation": plan_online_adaptation,
    "imagination": plan_imagination,
}


def plan(model: Networks, shape: PlanShape, params, lstm, z, weights, key, knobs, delta=None):
    """One decision at the planning state [z, h] of V's latent z and M's LSTM carry
    lstm = (c, h). `delta` warm-starts Δφ (zero when None)."""
    if shape.planner not in PLANNER_FNS:
        raise ValueError(f"unknown planner {shape.planner!r}; known: {', '.join(PLANNERS)}")
    if delta is None:
        delta = zero_delta(params, shape)
    state = jnp.concatenate([z, lstm[1]], axis=-1)
    p = PLANNER_FNS[shape.planner](model, shape, params, state, weights, key, knobs, delta, lstm)
    low = jnp.asarray(model.spaces.action_low)
    high = jnp.asarray(model.spaces.action_high)
    return p._replace(action=jnp.clip(p.action, low, high))


class Decision(NamedTuple):
    plan: Plan  # the decision at the observation
    lstm: LSTMState  # M's state after consuming the chunk's (z, a) pairs
    actions: jax.Array  # [H, A]: plan.action, then one for each state M imagines


def most_likely_latent(out: MDNOutput) -> jax.Array:
    """M's prediction of z_{t+1}: the mean of its most likely mixture component."""
    component = jnp.argmax(out.logits, axis=-1)
    return jnp.take_along_axis(out.mu, component[..., None, None], axis=-2)[..., 0, :]


def decide(model: Networks, shape: PlanShape, params, lstm, obs, weights, key, knobs, delta):
    """A whole decision: V encode -> plan on [z, h] -> M step with (z, a); then, for an
    action chunk, plan again at each z M predicts, action_horizon - 1 times, each warm
    started from the Δφ of the plan before."""

    def plan_and_step(lstm, z, key, delta):
        p = plan(model, shape, params, lstm, z, weights, key, knobs, delta)
        lstm, out = model.mdn.apply({"params": params["mdn"]}, lstm, z, p.action,
                                    method=MDNRNN.step)  # fmt: skip
        return p, lstm, out

    first, lstm, out = plan_and_step(lstm, model.encode(params, obs), key, delta)
    actions, last = [first.action], first
    for k in range(1, shape.action_horizon):  # unrolled: H is part of the program's shape
        warm = delta if last.delta is None else last.delta
        last, lstm, out = plan_and_step(lstm, most_likely_latent(out), jax.random.fold_in(key, k),
                                        warm)  # fmt: skip
        actions.append(last.action)
    return Decision(first, lstm, jnp.stack(actions))


def compile_decide(model: Networks, shape: PlanShape, batched: bool = False) -> Callable:
    """jit(decide) for one planner configuration; `batched` vmaps it over sessions (every
    input but the parameters has a leading batch axis). The caller holds the program: a
    new one compiles again on its first call."""

    def fn(params, lstm, obs, weights, key, knobs, delta):
        return decide(model, shape, params, lstm, obs, weights, key, knobs, delta)

    if batched:
        fn = jax.vmap(fn, in_axes=(None, 0, 0, 0, 0, 0, 0))
    return jax.jit(fn)


def session_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of a session's step: a retry or a replay draws the same numbers."""
    return jax.random.fold_in(jax.random.key(seed), step)


def compile_adapt(model: Networks, shape: PlanShape) -> Callable:
    """jit of Δφ adaptation alone at the state [V(obs), h] (no action, no M step): what
    /adapt runs."""

    def fn(params, lstm_h, obs, weights, key, knobs, delta):
        state = jnp.concatenate([model.encode(params, obs), lstm_h], axis=-1)
        return adapt(model, shape, params, state, weights, key, knobs, delta)

    return jax.jit(fn)
