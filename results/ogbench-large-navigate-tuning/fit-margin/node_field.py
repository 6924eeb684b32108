"""The reward field of a data-graph node's weights (and of the exact Gaussian) on a grid."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from training.learning.checkpoint import restore_bundle
from training.models.value import goal_reward
from training.planning.subgoals import load_data_graph

run, node = sys.argv[1], int(sys.argv[2])
xs = [float(v) for v in sys.argv[3].split(",")]
ys = [float(v) for v in sys.argv[4].split(",")]
b = restore_bundle(run)
m, p = b.model, b.params
g, _ = load_data_graph(Path(run) / "subgoals.npz")
w = jnp.asarray(g.weights[node])
aim = g.positions[node]
print("node", node, "at", aim.round(2))
for y in ys:
    o = jnp.asarray([[x, y] for x in xs], jnp.float32)
    f = np.asarray(m.phi(p, o, m.encode(p, o)) @ w)
    t = np.asarray(goal_reward(o, jnp.asarray(aim), b.config.value.goal_sigma))
    print("y", y, "fit", f.round(2), "true", t.round(2))
