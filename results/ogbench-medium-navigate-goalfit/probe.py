"""Probe: how well a bundle's goal weights give the goal reward r_g(s) = exp(-|s - g|² / 2σ²).
For 64 goals drawn in the maze's box, the error of phi(s) . w(g) against r_g(s) on the
data's states (weighted by r_g: near the goal, where it matters) and the reward at the goal
(1.0 is meant): for the bundle's own weights, for the exact ridge fit on the data's states,
and for goal decoders trained afresh with more states, goals and steps a step.
Usage: python probe.py RUN"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from training.analysis.ogbench_suite import dataset_episodes
from training.learning.checkpoint import restore_bundle
from training.models.value import GoalDecoder, goal_reward, least_squares_weights
from training.planning.tasks import task_weights

bundle = restore_bundle(sys.argv[1])
model, params, sigma = bundle.model, bundle.params, bundle.config.value.goal_sigma
states = jnp.asarray(np.concatenate(dataset_episodes(bundle)).astype(np.float32))
low, high = states.min(0), states.max(0)


def phi_of(obs):
    return model.phi(params, obs, model.encode(params, obs))


goals = jax.random.uniform(jax.random.key(9), (64, 2), minval=low, maxval=high)
near = states[::50]
phi_near, phi_goals = phi_of(near), phi_of(goals)
rewards = goal_reward(near[:, None], goals[None], sigma)  # [states, goals]


def report(name, weights):  # weights [P, goals]
    err = jnp.sqrt(jnp.sum((phi_near @ weights - rewards) ** 2 * rewards) / jnp.sum(rewards))
    peak = jnp.mean(jnp.sum(phi_goals * weights.T, axis=1))
    print(f"{name}: error near goals {float(err):.3f}, reward at the goal {float(peak):.2f}")


own = np.stack([task_weights(model, params, {"kind": "goal", "goal": g.tolist()}) for g in goals])
report("the bundle's own weights", jnp.asarray(own).T)
fit = states[::10]
report(
    "exact ridge fit",
    least_squares_weights(phi_of(fit), goal_reward(fit[:, None], goals[None], sigma)),
)


def train_decoder(n_states, n_goals, steps):
    decoder = GoalDecoder(phi_goals.shape[1], bundle.config.value.hidden)
    weights = decoder.init(jax.random.key(0), jnp.zeros(2))["params"]
    tx = optax.adam(1e-3)
    opt = tx.init(weights)

    @jax.jit
    def update(weights, opt, key):
        k_rows, k_moved, k_goals = jax.random.split(key, 3)
        obs = states[jax.random.randint(k_rows, (n_states,), 0, len(states))]
        moved = jax.random.uniform(k_moved, (n_states // 2, 2), minval=low, maxval=high)
        obs = obs.at[: n_states // 2].set(moved)
        g = jax.random.uniform(k_goals, (n_goals, 2), minval=low, maxval=high)
        phi, r = phi_of(obs), goal_reward(obs[:, None], g[None], sigma)

        def loss(w):
            return jnp.mean(jnp.square(phi @ decoder.apply({"params": w}, g).T - r))

        grads = jax.grad(loss)(weights)
        updates, opt = tx.update(grads, opt, weights)
        return optax.apply_updates(weights, updates), opt

    started = time.time()
    for step in range(steps):
        weights, opt = update(weights, opt, jax.random.key(step))
    seconds = time.time() - started
    name = f"decoder, {n_states} states x {n_goals} goals, {steps} steps ({seconds:.0f} s)"
    report(name, decoder.apply({"params": weights}, goals).T)


for n_states, n_goals, steps in [(32, 32, 2000), (1024, 64, 2000), (1024, 64, 6000)]:
    train_decoder(n_states, n_goals, steps)
