"""A fan of 16 held actions at one state of a tuning episode: where M imagines each takes
the agent in 10 steps and what the imagination planner scores it (the discounted goal
reward of the imagined states, rewards alone), beside where the environment takes it and
the same score of the true positions. The episode runs as `eval` runs it (imagination
through the bundle's saved data graph) for STEPS steps first.
Usage: python fan.py RUN TUNING_SEED TASK STEPS AIM_X,AIM_Y"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from training.analysis.evaluate import with_planning
from training.analysis.ogbench_suite import episode_starts, reset_episode, tuning_tasks
from training.data.envs import make_env
from training.learning.checkpoint import restore_bundle
from training.models.mdn_rnn import MDNRNN, initial_state
from training.models.networks import denormalise
from training.planning.planners import (
    Knobs,
    PlanShape,
    compile_decide,
    most_likely_latent,
    session_key,
)
from training.planning.subgoals import data_route, data_target, goal_weights, load_data_graph
from training.planning.tasks import task_weights

HELD = 10
run, seed, task, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
aim = np.array([float(v) for v in sys.argv[5].split(",")], np.float32)
planning = {"planner": "imagination", "imagination_steps": HELD, "imagination_value": False}
bundle = with_planning(restore_bundle(run), planning)
model, params = bundle.model, bundle.params
graph, lookahead = load_data_graph(Path(run) / "subgoals.npz")
config = bundle.config.planning
decide = compile_decide(model, PlanShape.of(config))
start = next(s for s in episode_starts(tuning_tasks(bundle.env_id, seed), 1, 0) if s.task == task)
env = make_env(bundle.env_id)
obs, info = reset_episode(env, start)
goal = np.asarray(info["goal"], np.float32)
route = data_route(graph, goal)
own = task_weights(model, params, {"kind": "goal", "goal": goal})
lstm = initial_state((), model.mdn.hidden)
for t in range(steps):
    target = data_target(graph, route, obs[:2], lookahead)
    weights = jnp.asarray(own if target is None else graph.weights[target])
    key = session_key(jnp.uint32(start.seed), jnp.uint32(t))
    out = decide(params, lstm, jnp.asarray(obs, jnp.float32), weights, key, Knobs.of(config), None)
    lstm = out.lstm
    obs, *_ = env.step(np.asarray(out.actions[0]))

weights = jnp.asarray(goal_weights(model, params, aim[None])[0])
z = model.encode(params, jnp.asarray(obs, jnp.float32))
sigma = model.config.value.goal_sigma
discounts = model.config.successor.gamma ** np.arange(1, HELD + 1)
qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
print(f"at {obs[:2].round(2)}, aim {aim}")
print("angle  action          M: score  end            env: score  end")
for angle in np.arange(0.0, 360.0, 22.5):
    action = np.array([np.cos(np.radians(angle)), np.sin(np.radians(angle))], np.float32)
    carry, latent, imagined_rewards = lstm, z, []
    for _ in range(HELD):
        carry, prediction = model.mdn.apply({"params": params["mdn"]}, carry, latent,
                                            jnp.asarray(action), method=MDNRNN.step)  # fmt: skip
        latent = most_likely_latent(prediction)
        imagined_rewards.append(float(model.imagined_phi(params, latent) @ weights))
    decoded = model.vae.apply({"params": params["vae"]}, latent, method="decode")
    imagined_end = np.asarray(denormalise(decoded, params["normaliser"]))[:2]
    env.unwrapped.set_state(qpos, qvel)
    true = np.stack([env.step(action)[0][:2] for _ in range(HELD)])
    true_rewards = np.exp(-np.sum((true - aim) ** 2, axis=1) / (2 * sigma**2))
    imagined_score, true_score = discounts @ imagined_rewards, discounts @ true_rewards
    print(f"{angle:5.1f}  {action.round(2)}  {imagined_score:6.2f}  {imagined_end.round(2)}  "
          f"{true_score:6.2f}  {true[-1].round(2)}")  # fmt: skip
