"""At the stuck corner state: the goal reward field round it, and imagined worth and end of
eight straight actions."""

import sys
from pathlib import Path

import jax
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
from training.planning.subgoals import data_route, data_target, load_data_graph
from training.planning.tasks import task_weights

run = sys.argv[1]
T = 10
bundle = with_planning(
    restore_bundle(run),
    {"planner": "imagination", "imagination_steps": T, "imagination_value": False},
)
params, model = bundle.params, bundle.model
g, look = load_data_graph(Path(run) / "subgoals.npz")
shape = PlanShape.of(bundle.config.planning)
knobs = Knobs.of(bundle.config.planning)
decide = compile_decide(model, shape)
gamma = model.config.successor.gamma
st = [s for s in episode_starts(tuning_tasks("pointmaze-medium-v0", 1), 1, 0) if s.task == 1][0]
env = make_env("pointmaze-medium-v0")
obs, info = reset_episode(env, st)
goal = np.asarray(info["goal"], np.float32)
route = data_route(g, goal)
gw = jnp.asarray(task_weights(model, params, {"kind": "goal", "goal": goal}))
lstm = initial_state((), model.mdn.hidden)


@jax.jit
def imagine(lstm, z, action, w):
    def step(carry, _):
        carry, out = model.mdn.apply(
            {"params": params["mdn"]}, carry[0], carry[1], action, method=MDNRNN.step
        )
        zn = most_likely_latent(out)
        dec = model.vae.apply({"params": params["vae"]}, zn, method="decode")
        return (carry, zn), (model.imagined_phi(params, zn) @ w, dec)

    _, (r, dec) = jax.lax.scan(step, (lstm, z), None, length=T)
    return r, dec


for t in range(300):
    tgt = data_target(g, route, obs[:2], look)
    w = gw if tgt is None else jnp.asarray(g.weights[tgt])
    out = decide(
        params,
        lstm,
        jnp.asarray(obs, jnp.float32),
        w,
        session_key(jnp.uint32(st.seed), jnp.uint32(t)),
        knobs,
        None,
    )
    lstm = out.lstm
    obs, *_, info = env.step(np.asarray(out.actions[0]))
print("pos", obs[:2].round(2), "goal", goal.round(2), "obs", obs.round(2))
# reward field: phi of true states (obs with position replaced)
for y in [22.0, 21.3, 20.5, 20.0, 19.0, 18.0]:
    row = []
    for x in [18.0, 19.0, 20.0, 20.5, 21.3, 22.0]:
        o = obs.copy()
        o[0], o[1] = x, y
        oo = jnp.asarray(o, jnp.float32)[None]
        row.append(float(model.phi(params, oo, model.encode(params, oo))[0] @ gw))
    print("y", y, np.round(row, 2))
z = model.encode(params, jnp.asarray(obs, jnp.float32)[None])[0]
for ang in range(0, 360, 45):
    a = jnp.asarray([np.cos(np.radians(ang)), np.sin(np.radians(ang))], jnp.float32)
    r, dec = imagine(lstm, z, a, gw)
    p = np.asarray(denormalise(dec, params["normaliser"]))[:, :2]
    print(
        "angle",
        ang,
        "sum r",
        round(float(gamma ** jnp.arange(1, T + 1) @ r), 3),
        "r",
        np.asarray(r).round(2)[[0, 4, 9]],
        "imag",
        p[0].round(2),
        p[4].round(2),
        p[-1].round(2),
    )
