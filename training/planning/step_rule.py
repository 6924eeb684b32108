"""The step rule: what a session carries from one decision to the next, and what a decision
starts from. The service (service/stepping.py) and closed-loop evaluation
(training/analysis/evaluate.py) both follow it, so an episode in the simulator and a
session over HTTP take the same steps.

A session carries one Δφ, with the planning program that fitted it (`str(PlanShape)`). A
decision warm-starts from it only when it asks to, runs that same program, keeps the task
and does not reset; anything else starts from Δφ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.planning.planners import PlanShape


@dataclass(frozen=True)
class Carried:
    """The Δφ a session keeps between decisions (None: none kept)."""

    delta: Any | None = None  # a pytree of arrays
    program: str | None = None  # str(PlanShape) of the program that fitted it

    @classmethod
    def fitted(cls, delta: Any, shape: PlanShape) -> Carried:
        return cls(delta=delta, program=str(shape))


NOTHING = Carried()


def starting_delta(
    carried: Carried, shape: PlanShape, warm_start: bool, reset: bool, new_task: bool = False
) -> Any | None:
    """The Δφ a decision of `shape` starts from; None means Δφ = 0."""
    if carried.delta is None or not warm_start or reset or new_task:
        return None
    if shape.planner != "online_adaptation" or carried.program != str(shape):
        return None  # another program's Δφ fits another tree, or means something else
    return carried.delta


def after_act(
    carried: Carried,
    shape: PlanShape,
    warm_start: bool,
    reset: bool,
    delta: Any | None,
    keeps_delta: bool = True,
) -> Carried:
    """What a session carries after a decision that returned `delta`. A decision that keeps
    no Δφ of its own leaves the carried one for a later warm step, unless it reset."""
    if shape.planner == "online_adaptation" and warm_start and keeps_delta:
        return Carried.fitted(delta, shape)
    return NOTHING if reset else carried


def after_adapt(
    carried: Carried, shape: PlanShape, delta: Any, persist: bool, new_task: bool
) -> Carried:
    """What a session carries after /adapt: the new Δφ when asked to keep it; a Δφ of the
    old task is dropped when the task changed."""
    if persist:
        return Carried.fitted(delta, shape)
    return NOTHING if new_task else carried
