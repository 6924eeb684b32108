"""Trace imagination through the bundle's data graph on one tuning episode: position, aim,
action every few steps, and where it ends."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from training.analysis.evaluate import with_planning
from training.analysis.ogbench_suite import episode_starts, reset_episode, tuning_tasks
from training.data.envs import make_env
from training.learning.checkpoint import restore_bundle
from training.models.mdn_rnn import initial_state
from training.planning.planners import Knobs, PlanShape, compile_decide, session_key
from training.planning.subgoals import data_route, data_target, load_data_graph
from training.planning.tasks import task_weights

run, seed, task, ep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bundle = with_planning(
    restore_bundle(run),
    {"planner": "imagination", "imagination_steps": 10, "imagination_value": False},
)
params, model = bundle.params, bundle.model
g, look = load_data_graph(Path(run) / "subgoals.npz")
cfg = bundle.config.planning
shape = PlanShape.of(cfg)
knobs = Knobs.of(cfg)
decide = compile_decide(model, shape)
starts = [s for s in episode_starts(tuning_tasks(bundle.env_id, seed), ep + 1, 0) if s.task == task]
st = starts[ep]
env = make_env(bundle.env_id)
obs, info = reset_episode(env, st)
goal = np.asarray(info["goal"], np.float32)
route = data_route(g, goal)
gw = task_weights(model, params, {"kind": "goal", "goal": goal})
lstm = initial_state((), model.mdn.hidden)
print("task", st.task, "seed", st.seed, "start", obs[:2].round(2), "goal", goal.round(2))
for t in range(1000):
    tgt = data_target(g, route, obs[:2], look)
    aim = goal if tgt is None else g.positions[tgt]
    w = jnp.asarray(gw if tgt is None else g.weights[tgt])
    out = decide(
        params,
        lstm,
        jnp.asarray(obs, jnp.float32),
        w,
        session_key(jnp.uint32(st.seed), jnp.uint32(t)),
        knobs,
        None,
    )
    a = np.asarray(out.actions[0])
    if t % 10 == 0:
        print(
            t,
            "pos",
            obs[:2].round(2),
            "aim",
            tgt,
            aim.round(1),
            "a",
            a.round(2),
            "dist",
            round(float(np.linalg.norm(goal - obs[:2])), 2),
            flush=True,
        )
    lstm = out.lstm
    obs, _, term, trunc, info = env.step(a)
    if info.get("success"):
        print("success at", t)
        break
print("final", obs[:2].round(2), "dist", np.linalg.norm(goal - obs[:2]).round(2))
