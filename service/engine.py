"""The compiled batch programs of the service: one per planner shape and batch size.

A batch of decisions of different sessions runs as one vmapped call of
`training.planners.decide` (V encode -> plan -> read out -> clip -> M step), padded to the
smallest compiled batch size that holds it. The mathematics lives in `training`; this
module only gathers inputs, pads, calls and splits.
"""

from __future__ import annotations

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
    zeros_like_psi,
)


@dataclass
class Decision:
    """One session's step as the engine takes it."""

    observation: np.ndarray  # as the bundle's observation space, float32
    lstm_c: np.ndarray  # [H]
    lstm_h: np.ndarray  # [H]
    weights: np.ndarray  # [P] task cumulant weights
    seed: int
    step: int
    knobs: tuple[float, float, float]  # delta_phi_lr, kl_coef, guidance_scale
    delta: dict | None = None  # Δφ warm start (online adaptation), None = 0


@dataclass
class Outcome:
    action: np.ndarray
    lstm_c: np.ndarray
    lstm_h: np.ndarray
    diagnostics: dict
    delta: dict | None  # Δφ after adaptation (online adaptation), else None


class Engine:
    def __init__(self, bundle: Bundle, batch_sizes: tuple[int, ...] = (1, 8, 32)):
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError("batch_sizes must be positive")
        self.model = bundle.model
        self.params = jax.device_put(bundle.params)
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self._zero_delta = zeros_like_psi(self.params)
        self._keys = jax.jit(jax.vmap(session_key))

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def padded_size(self, n: int) -> int:
        for size in self.batch_sizes:
            if size >= n:
                return size
        raise ValueError(f"a batch of {n} exceeds the largest compiled size {self.max_batch}")

    def run(self, shape: PlanShape, decisions: list[Decision]) -> list[Outcome]:
        """Decisions of one planner shape, at most `max_batch` of them, in one call."""
        n = len(decisions)
        rows = decisions + [decisions[0]] * (self.padded_size(n) - n)  # padding is discarded
        adapts = shape.planner == "online_adaptation"
        stack = lambda values: jnp.asarray(np.stack(values))  # noqa: E731
        keys = self._keys(
            jnp.asarray([d.seed for d in rows], jnp.uint32),
            jnp.asarray([d.step for d in rows], jnp.uint32),
        )
        knobs = Knobs(*jnp.asarray([d.knobs for d in rows], jnp.float32).T)
        delta = None
        if adapts:
            deltas = [d.delta if d.delta is not None else self._zero_delta for d in rows]
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
                    "objective": plan.objective[i].tolist(),
                    "kept_step": int(plan.kept_step[i]),
                    "kl": float(plan.kl[i]),
                    "value_before": float(plan.value_before[i]),
                    "value_after": float(plan.value_after[i]),
                },
                delta=jax.tree.map(lambda x, i=i: x[i], plan.delta) if adapts else None,
            )
            for i in range(n)
        ]

    def adapt(self, shape: PlanShape, decision: Decision) -> tuple[dict, dict]:
        """Δφ adaptation alone (no action, no M step): (Δφ, diagnostics)."""
        key = jax.random.fold_in(session_key(decision.seed, decision.step), 1)
        delta = decision.delta if decision.delta is not None else self._zero_delta
        out = compile_adapt(self.model, shape)(
            self.params,
            jnp.asarray(decision.lstm_h),
            jnp.asarray(decision.observation),
            jnp.asarray(decision.weights),
            key,
            Knobs(*jnp.asarray(decision.knobs, jnp.float32)),
            delta,
        )
        delta, trace, kept, kl, before, after = jax.device_get(out)
        diagnostics = {
            "objective": trace.tolist(),
            "kept_step": int(kept),
            "kl": float(kl),
            "value_before": float(before),
            "value_after": float(after),
        }
        return delta, diagnostics

    def probe(self, weights: np.ndarray, knobs: tuple[float, float, float]) -> Decision:
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
        """Compiles every (shape, batch size) program; returns the seconds it took."""
        started = time.perf_counter()
        probe = self.probe(np.zeros(self.model.psi_dim, np.float32), (1e-3, 1.0, 1.0))
        for shape in shapes:
            for size in self.batch_sizes:
                self.run(shape, [probe] * size)
            if shape.planner == "online_adaptation":
                self.adapt(shape, probe)
        return time.perf_counter() - started
