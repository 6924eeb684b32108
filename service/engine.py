"""The compiled batch programs of the service: one per planner shape and batch size.

A batch of decisions of different sessions runs as vmapped calls of
`training.planners.decide` (V encode -> plan -> read out -> clip -> M step): the compiled
batch sizes whose calls cover it at the least cost measured at warm-up, the last padded.
The mathematics lives in `training`; this module only gathers inputs, pads, calls and
splits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from training.checkpoint import Bundle
from training.planners import (
    Knobs,
    PlanShape,
    compile_adapt,
    compile_decide,
    session_key,
    zero_delta,
)

log = logging.getLogger("worldplan")


@dataclass
class Decision:
    """One session's step as the engine takes it."""

    observation: np.ndarray  # as the bundle's observation space, float32
    lstm_c: np.ndarray  # [H]
    lstm_h: np.ndarray  # [H]
    weights: np.ndarray  # [P] task cumulant weights
    seed: int
    step: int
    knobs: tuple[float, float, float, float]  # planners.knob_values: lr, λ, guidance, steps
    delta: dict | None = None  # Δφ warm start (online adaptation), None = 0


@dataclass
class Outcome:
    action: np.ndarray
    lstm_c: np.ndarray
    lstm_h: np.ndarray
    diagnostics: dict
    delta: dict | None  # Δφ after adaptation (online adaptation), else None


def adaptation_diagnostics(
    steps, objective, kept, kl, before, after, ess, fallback, chose_prior
) -> dict:
    """What a decision reports of its adaptation: the objective at the start and after each
    of its `steps` steps, the kept step, the KL, mean V before and after, the effective
    sample size of the reweighted prior samples, whether the support guard fell back, and
    whether the chosen outcome was one of the prior's samples."""
    return {
        "objective": objective[: int(steps) + 1].tolist(),
        "kept_step": int(kept),
        "kl": float(kl),
        "value_before": float(before),
        "value_after": float(after),
        "ess": float(ess),
        "fallback": bool(fallback),
        "chose_prior": bool(chose_prior),
    }


class Engine:
    def __init__(self, bundle: Bundle, batch_sizes: tuple[int, ...] = (1, 8, 32)):
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError("batch_sizes must be positive")
        self.model = bundle.model
        self.params = jax.device_put(bundle.params)
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        # Seconds per call of each (shape, compiled size), measured by warm_up. Unmeasured
        # calls count 1 each, so a batch is then padded to one call.
        self.call_seconds: dict[tuple[PlanShape, int], float] = {}
        self.compiled, self.programs = 0, 0  # warm-up progress, for /readyz
        self._keys = jax.jit(jax.vmap(session_key))
        self._zero_deltas: dict[PlanShape, dict] = {}

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

    def run(self, shape: PlanShape, decisions: list[Decision]) -> list[Outcome]:
        """Decisions of one planner shape, at most `max_batch` of them."""
        outcomes, start = [], 0
        for size in self.chunk_sizes(shape, len(decisions)):
            outcomes += self._call(shape, decisions[start : start + size], size)
            start += size
        return outcomes

    def _call(self, shape: PlanShape, decisions: list[Decision], size: int) -> list[Outcome]:
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
        out = compile_decide(self.model, shape, batched=True)(
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
                lstm_c=out.lstm[0][i],
                lstm_h=out.lstm[1][i],
                diagnostics={
                    "value": float(plan.value[i]),
                    **adaptation_diagnostics(
                        rows[i].knobs[3] if adapts else 0,
                        plan.objective[i],
                        plan.kept_step[i],
                        plan.kl[i],
                        plan.value_before[i],
                        plan.value_after[i],
                        plan.ess[i],
                        plan.fallback[i],
                        plan.chose_prior[i],
                    ),
                },
                delta=jax.tree.map(lambda x, i=i: x[i], plan.delta) if adapts else None,
            )
            for i in range(n)
        ]

    def adapt(self, shape: PlanShape, decision: Decision) -> tuple[dict, dict]:
        """Δφ adaptation alone (no action, no M step): (Δφ, diagnostics)."""
        key = jax.random.fold_in(session_key(decision.seed, decision.step), 1)
        delta = decision.delta if decision.delta is not None else self.zero_delta(shape)
        out = compile_adapt(self.model, shape)(
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
            decision.knobs[3], s.objective, s.kept_step, s.kl, a.value_before, a.value_after,
            a.ess, a.fallback, a.chose_prior,
        )  # fmt: skip
        return s.delta, diagnostics

    def probe(self, weights: np.ndarray, knobs: tuple[float, ...]) -> Decision:
        """A first decision of a session: zero observation and zero LSTM state."""
        model = self.model
        return Decision(
            observation=np.zeros(model.spaces.obs_shape, np.float32),
            lstm_c=np.zeros(model.mdn.hidden, np.float32),
            lstm_h=np.zeros(model.mdn.hidden, np.float32),
            weights=weights,
            seed=0,
            step=0,
            knobs=knobs,
        )

    def warm_up(self, shapes: list[PlanShape]) -> float:
        """Compiles every (shape, batch size) program and times one call of each, which
        `chunk_sizes` then weighs; logs each shape; returns the seconds it took."""
        started = time.perf_counter()
        self.compiled, self.programs = 0, len(shapes) * len(self.batch_sizes)
        probe = self.probe(np.zeros(self.model.psi_dim, np.float32), (1e-3, 1.0, 1.0, 1))
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
