"""The service's one door into `training`: the model, its compiled batch programs (one per
planner shape and batch size), task -> weights, planner overrides and the model's
description. No other server module imports `training`.

A batch of decisions of different sessions runs as vmapped calls of
`training.planning.planners.decide` (V encode -> plan -> read out -> clip -> M step): the compiled
batch sizes whose calls cover it at the least cost measured at warm-up, the last padded.
The mathematics lives in `training`; this module only gathers inputs, pads, calls and
splits. What here runs JAX runs off the event loop: at startup on an executor, once
serving on the batcher's worker, one call at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from service.guard import as_float32
from training.config import PlanningConfig, planning_with
from training.learning.checkpoint import Bundle, model_version, restore_bundle
from training.planning.planners import (
    PLANNERS,
    Knobs,
    PlanShape,
    compile_adapt,
    compile_decide,
    knob_values,
    session_key,
    zero_delta,
)
from training.planning.step_rule import Carried, after_act, after_adapt, starting_delta
from training.planning.subgoals import (
    SUBGOALS_FILE,
    DataGraph,
    DataRoute,
    data_aim,
    data_route,
    goal_weights,
    graph_lengths,
    load_data_graph,
    point_function,
)
from training.planning.tasks import TaskError, default_task, task_weights

# The step rule is re-exported for service.stepping: this module is the server's one door
# into training.
__all__ = [
    "Carried",
    "Engine",
    "InvalidTask",
    "Outcome",
    "PlanShape",
    "Planning",
    "StepInput",
    "after_act",
    "after_adapt",
    "starting_delta",
]

log = logging.getLogger("worldplan")


@dataclass
class StepInput:
    """One session's step as the engine takes it: built by `Engine.step_input`."""

    observation: np.ndarray  # as the bundle's observation space, float32
    lstm_c: np.ndarray  # [H]
    lstm_h: np.ndarray  # [H]
    weights: np.ndarray  # [P] task cumulant weights
    seed: int
    step: int
    knobs: Knobs  # of plain numbers (planners.knob_values)
    delta: dict | None = None  # Δφ warm start (online adaptation), None = 0


class InvalidTask(ValueError):
    """A task that gives no usable cumulant weights."""


class Planning(NamedTuple):
    """A step's planner configuration and the compiled program shape that serves it."""

    config: PlanningConfig
    shape: PlanShape


@dataclass
class Outcome:
    action: np.ndarray
    actions: np.ndarray  # [H, A]: the action chunk, `action` first
    lstm_c: np.ndarray
    lstm_h: np.ndarray
    diagnostics: dict
    delta: dict | None  # Δφ after adaptation (online adaptation), else None


def adaptation_diagnostics(
    steps, *, objective, kept_step, kl, value_before, value_after, ess, fallback, chose_prior
) -> dict:
    """What a decision reports of its adaptation: the objective at the start and after each
    of its `steps` steps, the kept step, the KL, mean V before and after, the effective
    sample size of the reweighted prior samples, whether the support guard fell back, and
    whether the chosen outcome was one of the prior's samples."""
    return {
        "objective": objective[: int(steps) + 1].tolist(),
        "kept_step": int(kept_step),
        "kl": float(kl),
        "value_before": float(value_before),
        "value_after": float(value_after),
        "ess": float(ess),
        "fallback": bool(fallback),
        "chose_prior": bool(chose_prior),
    }


MAX_ROUTES = 256  # goals whose routes through the subgoal graph an engine keeps


class Engine:
    def __init__(
        self,
        bundle: Bundle,
        batch_sizes: tuple[int, ...] = (1, 8, 32),
        subgoals: tuple[DataGraph, float] | None = None,
        planning: dict | None = None,
    ):
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError("batch_sizes must be positive")
        self.model = bundle.model
        self.params = jax.device_put(bundle.params)
        self.env_id = bundle.env_id
        self.model_version = model_version(bundle)
        # The bundle's planner defaults, under the deployment's (WORLDPLAN_PLANNING).
        self.planning_defaults = planning_with(
            bundle.config.planning, planning or {}, "WORLDPLAN_PLANNING"
        )
        self.default_task = default_task(
            bundle.model, bundle.params, bundle.metadata.get("default_task")
        )
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        # Seconds per call of each (shape, compiled size), measured by warm_up. Unmeasured
        # calls count 1 each, so a batch is then padded to one call.
        self.call_seconds: dict[tuple[PlanShape, int], float] = {}
        self.compiled, self.programs = 0, 0  # warm-up progress, for /readyz
        self._keys = jax.jit(jax.vmap(session_key))
        self._zero_deltas: dict[PlanShape, dict] = {}
        self._programs: dict[tuple[str, PlanShape], Callable] = {}
        # A subgoal graph over the data and its lookahead: goal tasks then aim through it.
        self.subgoals = subgoals
        self._routes: dict[tuple[float, ...], DataRoute] = {}
        # Where the graph measures a state and a goal (the learned map's are jitted once).
        self._state_point = point_function(self.model)
        self._goal_point = point_function(self.model, goal=True)
        self._routes_lock = threading.Lock()

    @property
    def device(self) -> str:
        return str(jax.devices()[0])

    @classmethod
    def restore(
        cls,
        model_dir: Path,
        batch_sizes: tuple[int, ...] = (1, 8, 32),
        planning: dict | None = None,
    ) -> Engine:
        """The engine of the bundle saved in `model_dir`, with the subgoal graph saved
        beside it if there is one (`worldplan subgoals`) and `planning` over its planner
        defaults."""
        graph = Path(model_dir) / SUBGOALS_FILE
        subgoals = load_data_graph(graph) if graph.exists() else None
        return cls(restore_bundle(model_dir), batch_sizes, subgoals, planning)

    def _program(self, kind: str, shape: PlanShape) -> Callable:
        """The program of `kind` ("decide", batched, or "adapt") for a shape, made once and
        held by this engine; jax.jit compiles it on its first call."""
        if (kind, shape) not in self._programs:
            if kind == "decide":
                program = compile_decide(self.model, shape, batched=True)
            else:
                program = compile_adapt(self.model, shape)
            self._programs[kind, shape] = program
        return self._programs[kind, shape]

    def initial_state(self) -> tuple[np.ndarray, np.ndarray]:
        """M's LSTM state (c, h) before a session's first step, or after a reset: zero."""
        hidden = self.model.mdn.hidden
        return np.zeros(hidden, np.float32), np.zeros(hidden, np.float32)

    @property
    def observation_space(self) -> dict:
        """The observation space /model publishes; pixels are bounded by their dtype."""
        spaces = self.model.spaces
        if spaces.obs_kind == "pixels":
            return {"shape": list(spaces.obs_shape), "dtype": "uint8", "low": 0.0, "high": 255.0}
        return {"shape": list(spaces.obs_shape), "dtype": "float32"}

    def describe(self) -> dict:
        """The model as /model describes it (the service adds its own limits)."""
        spaces = self.model.spaces
        return {
            "model_version": self.model_version,
            "env_id": self.env_id,
            "observation_space": self.observation_space,
            "action_space": {
                "shape": [spaces.action_dim],
                "low": list(spaces.action_low),
                "high": list(spaces.action_high),
            },
            "default_task": self.default_task,
            "planner_defaults": self.planning_defaults.model_dump(),
            "subgoals": None if self.subgoals is None else {
                "nodes": len(self.subgoals[0].positions),
                "max_edge_steps": self.subgoals[0].max_edge_steps,
                "lookahead": self.subgoals[1],
            },
        }  # fmt: skip

    def task_weights(self, task: dict | None) -> tuple[dict, np.ndarray]:
        """The task (the default one for None) and its cumulant weights [P], float32, or
        InvalidTask. JAX work (a goal decoder, a least-squares fit): run it on the worker."""
        task = task or self.default_task
        try:
            weights = as_float32(task_weights(self.model, self.params, task))
        except TaskError as err:
            raise InvalidTask(str(err)) from None
        if not np.all(np.isfinite(weights)):  # a goal far outside the data, a degenerate fit
            raise InvalidTask("the task's cumulant weights are not finite")
        if self.subgoals is not None and task.get("kind") == "goal":
            self.route(task["goal"])  # found here, on the worker, not on the first /act
        return task, weights

    def route(self, goal) -> DataRoute:
        """The goal's route through the subgoal graph (about 0.3 s on medium's), kept."""
        key = tuple(np.asarray(goal, np.float32).tolist())
        with self._routes_lock:
            if key in self._routes:
                return self._routes[key]
        point = self._goal_point(self.params, np.asarray(key, np.float32)[None])[0]
        route = data_route(self.subgoals[0], np.asarray(point))
        with self._routes_lock:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.pop(next(iter(self._routes)))
            self._routes[key] = route
        return route

    def aim(self, task: dict | None, weights: np.ndarray, observation: np.ndarray) -> np.ndarray:
        """The weights a step plans with: the task's own, or, for a goal task with a
        subgoal graph, those of the point the graph aims at from `observation` (the goal
        once it is near along the data's paths)."""
        task = task or self.default_task
        if self.subgoals is None or task.get("kind") != "goal":
            return weights
        graph, lookahead = self.subgoals
        point = np.asarray(self._state_point(self.params, np.asarray(observation)[None])[0])
        aim = data_aim(graph, self.route(task["goal"]), point, lookahead,
                       graph_lengths(self.model).aim_reach)  # fmt: skip
        if aim is None:
            return weights
        return as_float32(goal_weights(self.model, self.params, aim[None])[0])

    def planning(self, *overrides: dict) -> Planning:
        """The bundle's planner defaults under each of `overrides` in turn; the training
        config's bounds hold for overrides too (pydantic's ValidationError otherwise)."""
        merged = self.planning_defaults.model_dump()
        for layer in overrides:
            merged.update(layer)
        config = PlanningConfig.model_validate(merged)
        return Planning(config, PlanShape.of(config))

    def published_shapes(
        self, sample_counts: tuple[int, ...], action_horizons: tuple[int, ...] = (1,)
    ) -> list[PlanShape]:
        """Every plan shape a request may ask for: the defaults of each planner, and online
        adaptation at each published sample count (any step count up to the published
        maximum runs in one program), each at every published action horizon."""
        base = self.planning_defaults
        updates = [{"planner": name} for name in PLANNERS]
        updates += [{"planner": "online_adaptation", "n_adaptation_samples": samples}
                    for samples in {*sample_counts, base.n_adaptation_samples}]  # fmt: skip
        shapes = {
            PlanShape.of(base.model_copy(update={**update, "action_horizon": horizon}))
            for update in updates
            for horizon in {*action_horizons, base.action_horizon}
        }
        return sorted(shapes, key=lambda s: (s.planner, s.n_adaptation_samples, s.action_horizon))

    def delta_bytes(self, shapes: list[PlanShape]) -> int:
        """The largest Δφ a session could keep: that of the adaptation shapes."""
        sizes = [
            sum(leaf.nbytes for leaf in jax.tree.leaves(self.zero_delta(shape)))
            for shape in shapes
            if shape.planner == "online_adaptation"
        ]
        return max(sizes, default=0)

    def step_input(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, np.ndarray],
        weights: np.ndarray,
        seed: int,
        step: int,
        planning: PlanningConfig | Knobs,
        delta: dict | None = None,
    ) -> StepInput:
        """The engine's input record of one step; `planning` gives the knobs (a config, or
        the knob values themselves)."""
        knobs = knob_values(planning) if isinstance(planning, PlanningConfig) else planning
        return StepInput(
            observation=observation,
            lstm_c=state[0],
            lstm_h=state[1],
            weights=weights,
            seed=seed,
            step=step,
            knobs=Knobs(*knobs),
            delta=delta,
        )

    def zero_delta(self, shape: PlanShape) -> dict:
        """Δφ = 0 of a shape, made once. On the host, as the Δφ a session brings back is:
        one compiled program serves both."""
        if shape not in self._zero_deltas:
            self._zero_deltas[shape] = jax.device_get(zero_delta(self.params, shape))
        return self._zero_deltas[shape]

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def chunk_sizes(self, shape: PlanShape, n: int) -> list[int]:
        """The compiled sizes of the calls that serve n decisions at the least measured cost.

        On a GPU a call costs about the same at any size, so this pads n to one call; on a
        CPU a call costs about its rows, so this splits n exactly (9 -> 8 + 1) instead of
        padding it to 32."""
        if n < 1:
            raise ValueError("an empty batch")
        if n > self.max_batch:
            raise ValueError(f"a batch of {n} exceeds the largest compiled size {self.max_batch}")
        cost = {size: self.call_seconds.get((shape, size), 1.0) for size in self.batch_sizes}
        best: list[tuple[float, list[int]]] = [(0.0, [])]  # best[m]: cheapest cover of m rows
        for m in range(1, n + 1):
            best.append(
                min((cost[s] + best[max(0, m - s)][0], [s, *best[max(0, m - s)][1]])
                    for s in self.batch_sizes)
            )  # fmt: skip
        return best[n][1]

    def run(self, shape: PlanShape, decisions: list[StepInput]) -> list[Outcome]:
        """Decisions of one planner shape, at most `max_batch` of them."""
        outcomes, start = [], 0
        for size in self.chunk_sizes(shape, len(decisions)):
            outcomes += self._call(shape, decisions[start : start + size], size)
            start += size
        return outcomes

    def _call(self, shape: PlanShape, decisions: list[StepInput], size: int) -> list[Outcome]:
        """One call of the program compiled for `size`; padding rows are discarded."""
        n = len(decisions)
        rows = decisions + [decisions[0]] * (size - n)
        adapts = shape.planner == "online_adaptation"
        stack = lambda values: jnp.asarray(np.stack(values))  # noqa: E731
        keys = self._keys(
            jnp.asarray([d.seed for d in rows], jnp.uint32),
            jnp.asarray([d.step for d in rows], jnp.uint32),
        )
        knobs = Knobs(*jnp.asarray([d.knobs for d in rows], jnp.float32).T)
        delta = None
        if adapts:
            zero = self.zero_delta(shape)
            deltas = [d.delta if d.delta is not None else zero for d in rows]
            delta = jax.tree.map(lambda *xs: jnp.stack(xs), *deltas)
        out = self._program("decide", shape)(
            self.params,
            (stack([d.lstm_c for d in rows]), stack([d.lstm_h for d in rows])),
            stack([d.observation for d in rows]),
            stack([d.weights for d in rows]),
            keys,
            knobs,
            delta,
        )
        out = jax.device_get(out)
        plan = out.plan
        return [
            Outcome(
                action=plan.action[i],
                actions=out.actions[i],
                lstm_c=out.lstm[0][i],
                lstm_h=out.lstm[1][i],
                diagnostics={
                    "value": float(plan.value[i]),
                    **adaptation_diagnostics(
                        rows[i].knobs.adaptation_steps if adapts else 0,
                        objective=plan.objective[i],
                        kept_step=plan.kept_step[i],
                        kl=plan.kl[i],
                        value_before=plan.value_before[i],
                        value_after=plan.value_after[i],
                        ess=plan.ess[i],
                        fallback=plan.fallback[i],
                        chose_prior=plan.chose_prior[i],
                    ),
                },
                delta=jax.tree.map(lambda x, i=i: x[i], plan.delta) if adapts else None,
            )
            for i in range(n)
        ]

    def adapt(self, shape: PlanShape, decision: StepInput) -> tuple[dict, dict]:
        """Δφ adaptation alone (no action, no M step): (Δφ, diagnostics)."""
        key = jax.random.fold_in(session_key(decision.seed, decision.step), 1)
        delta = decision.delta if decision.delta is not None else self.zero_delta(shape)
        out = self._program("adapt", shape)(
            self.params,
            jnp.asarray(decision.lstm_h),
            jnp.asarray(decision.observation),
            jnp.asarray(decision.weights),
            key,
            Knobs(*jnp.asarray(decision.knobs, jnp.float32)),
            delta,
        )
        a = jax.device_get(out)
        s = a.steps
        diagnostics = adaptation_diagnostics(
            decision.knobs.adaptation_steps,
            objective=s.objective,
            kept_step=s.kept_step,
            kl=s.kl,
            value_before=a.value_before,
            value_after=a.value_after,
            ess=a.ess,
            fallback=a.fallback,
            chose_prior=a.chose_prior,
        )
        return s.delta, diagnostics

    def probe(self, weights: np.ndarray, knobs: Knobs) -> StepInput:
        """A first step of a session: zero observation and the initial LSTM state."""
        observation = np.zeros(self.model.spaces.obs_shape, np.float32)
        return self.step_input(observation, self.initial_state(), weights, 0, 0, knobs)

    def warm_up(self, shapes: list[PlanShape]) -> float:
        """Compiles every (shape, batch size) program and times one call of each, which
        `chunk_sizes` then weighs; logs each shape; returns the seconds it took."""
        started = time.perf_counter()
        self.compiled, self.programs = 0, len(shapes) * len(self.batch_sizes)
        knobs = Knobs(delta_phi_lr=1e-3, kl_coef=1.0, guidance_scale=1.0, adaptation_steps=1)
        probe = self.probe(np.zeros(self.model.psi_dim, np.float32), knobs)
        for shape in shapes:
            shape_started = time.perf_counter()
            for size in self.batch_sizes:
                self._call(shape, [probe] * size, size)  # compiles
                called = time.perf_counter()
                self._call(shape, [probe] * size, size)
                self.call_seconds[shape, size] = time.perf_counter() - called
                self.compiled += 1
            if shape.planner == "online_adaptation":
                self.adapt(shape, probe)
            calls = ", ".join(
                f"{size}: {1000 * self.call_seconds[shape, size]:.1f} ms"
                for size in self.batch_sizes
            )
            log.info(
                "compiled %s in %.1f s (%d of %d programs); one call per batch size: %s",
                shape, time.perf_counter() - shape_started, self.compiled, self.programs, calls,
            )  # fmt: skip
        return time.perf_counter() - started
