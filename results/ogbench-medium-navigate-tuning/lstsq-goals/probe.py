"""Probe: a bundle trained with the goal decoder, its goal weights replaced by the exact
least-squares fit of the goal reward on every 20th state of its data, on the tuning tasks
(seed 1, 10 episodes each) through the data graph (96 nodes, edges of at most 20 steps,
lookahead 15). Usage: python probe.py RUN OUT PLANNERS [KEY=VALUE ...] (planning settings)."""

import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from training.analysis.evaluate import with_planning
from training.analysis.ogbench_suite import SubgoalSettings, compare_on_suite, dataset_episodes
from training.learning.checkpoint import restore_bundle
from training.models.value import goal_reward, ridge_solve

run, out, planners = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
settings = {key: yaml.safe_load(value) for key, value in (kv.split("=") for kv in sys.argv[4:])}
bundle = with_planning(restore_bundle(run), settings)
model, params = bundle.model, bundle.params
states = jnp.asarray(np.concatenate(dataset_episodes(bundle))[::20].astype(np.float32))
solve = ridge_solve(model.phi(params, states, model.encode(params, states)))  # [P, N]
positions, sigma = states[:, :2], bundle.config.value.goal_sigma


class LeastSquaresGoals:
    """Stands in for the goal decoder: goal -> the ridge fit of its reward."""

    def apply(self, variables, goal):
        return goal_reward(positions, jnp.asarray(goal)[..., None, :], sigma) @ solve.T


model = dataclasses.replace(model, goal_decoder=LeastSquaresGoals())
bundle = dataclasses.replace(bundle, model=model)
subgoals = SubgoalSettings(96, 20, "data", 15)
compare_on_suite(bundle, planners, 10, 1, out, 50, None, False, True, subgoals)
print((out / "ogbench.md").read_text())
