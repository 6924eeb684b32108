"""A session's state machine: load it, prepare a step (check the request, build the
engine's input), apply an outcome (the new state), store it. Any refusal happens before a
session changes; the handlers in service.routes only put these in order."""

from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from service import codec
from service.engine import (
    Carried,
    InvalidTask,
    Outcome,
    Planning,
    StepInput,
    after_act,
    after_adapt,
    starting_delta,
)
from service.errors import ApiError, expired, not_found
from service.guard import as_float32, non_finite_paths
from service.runtime import Runtime
from service.schemas import LIMITS, ActRequest, AdaptRequest, CreateSession, PlannerOverrides
from service.sessions import Session, SessionExpired, SessionNotFound, StaleWrite

SESSION_ID_BYTES = 16  # 128 random bits


def carried(session: Session) -> Carried:
    return Carried(delta=session.delta, program=session.delta_program)


def keep(session: Session, carried: Carried) -> None:
    session.delta, session.delta_program = carried.delta, carried.program


@contextmanager
def store_errors(session_id: str):
    """The store's missing-session exceptions as the API's 404 and 410."""
    try:
        yield
    except SessionNotFound:
        raise not_found(session_id) from None
    except SessionExpired:
        raise expired(session_id) from None


async def load_session(rt: Runtime, owner: str | None, session_id: str) -> Session:
    """The session, if the caller's key created it: another key's session is 404, as if
    it did not exist."""
    with store_errors(session_id):
        session = await rt.store.get(session_id)
    if session.owner != owner:
        raise not_found(session_id)
    return session


async def save_session(rt: Runtime, session: Session, route: str) -> bool:
    """Stores the session; False when the store refused a stale write (another replica
    wrote the session since it was read here), counted in /metrics."""
    # The last line of defence: the handlers checked every input and result already.
    if paths := non_finite_paths(vars(session)):
        raise ApiError(500, "non_finite_state", f"refused to store non-finite {paths[:5]}")
    session.last_used = time.time()
    try:
        with store_errors(session.session_id):
            await rt.store.put(session)
    except StaleWrite:
        rt.metrics.stale_writes.labels(route).inc()
        return False
    return True


async def answer_of_stored_step(rt: Runtime, owner: str | None, session_id: str, step: int):
    """After a stale write of `step`: the answer a retry of it gets, when another replica
    stored that step meanwhile; else 409, and the caller learns the step to send."""
    stored = await load_session(rt, owner, session_id)
    if stored.step == step and stored.last_response:
        return stored.last_response
    raise ApiError(
        409,
        "step_conflict",
        "another replica changed this session meanwhile",
        {"expected_step": stored.step + 1, "last_step": stored.step},
    )


def check_queue(rt: Runtime) -> None:
    """429 when MAX_QUEUE pieces of work wait for the engine already: decisions, adaptations
    and tasks' weights alike."""
    if rt.batcher.pending >= rt.settings.max_queue:
        raise ApiError(
            429, "queue_full", "too much work waiting for the engine", headers={"Retry-After": "1"}
        )


async def resolve_task(rt: Runtime, task: dict | None) -> tuple[dict, np.ndarray]:
    """The task (the default for None) and its weights, computed on the engine's worker."""
    check_queue(rt)
    try:
        return await rt.batcher.task_weights(task)
    except InvalidTask as err:
        raise ApiError(422, "invalid_task", str(err)) from None


def planner_limits(rt: Runtime) -> dict:
    oa = [s for s in rt.shapes if s.planner == "online_adaptation"]
    return {
        "planners": sorted({s.planner for s in rt.shapes}),
        "adaptation_steps": {"ge": 0, "le": rt.engine.planning_defaults.max_adaptation_steps},
        "n_adaptation_samples": sorted({s.n_adaptation_samples for s in oa}),
        "action_horizon": sorted({s.action_horizon for s in rt.shapes}),
        **LIMITS,
        "delta_bytes": {"per_session": rt.delta_bytes, "le": rt.settings.max_delta_bytes},
    }


def planning_for(rt: Runtime, session: Session, overrides: PlannerOverrides | None) -> Planning:
    """The bundle's defaults, then the session's overrides, then the request's; shapes
    that were not compiled are refused."""
    request = overrides.model_dump(exclude_none=True) if overrides else {}
    try:
        planning = rt.engine.planning(session.planner, request)
    except ValidationError as err:
        raise ApiError.from_validation(err.errors()) from None
    if planning.shape not in rt.shapes:
        raise ApiError(
            422,
            "unsupported_planner_shape",
            "n_adaptation_samples or action_horizon outside the published set",
            {"planner_limits": planner_limits(rt)},
        )
    return planning


def check_observation(rt: Runtime, value: Any, route: str) -> np.ndarray:
    """The observation as the model takes it (float32), or 400. It is checked after the
    conversion: a finite number beyond float32 would reach the model as Inf."""
    space = rt.engine.observation_space
    try:
        obs = codec.to_array(value, "observation", dtype=None)
    except codec.CodecError as err:
        raise ApiError(400, "bad_observation", str(err)) from None
    if list(obs.shape) != space["shape"]:
        raise ApiError(
            400,
            "bad_observation",
            f"observation has shape {list(obs.shape)}, the model takes {space['shape']}",
            {"expected_shape": space["shape"]},
        )
    if space["dtype"] == "uint8" and obs.dtype != np.uint8:
        raise ApiError(400, "bad_observation", f"pixels must be uint8, got {obs.dtype}")
    if obs.dtype.kind not in "biuf":
        raise ApiError(400, "bad_observation", f"observation dtype {obs.dtype} is not numeric")
    obs = as_float32(obs)
    if not np.all(np.isfinite(obs)):
        rt.metrics.non_finite.labels(route, "input").inc()
        raise ApiError(
            400, "bad_observation", "observation holds NaN, Inf or values beyond float32"
        )
    if "low" in space and not (np.all(obs >= space["low"]) and np.all(obs <= space["high"])):
        bounds = {"low": space["low"], "high": space["high"]}
        raise ApiError(400, "bad_observation", "observation outside its space's bounds", bounds)
    return obs


async def new_session(rt: Runtime, body: CreateSession, owner: str | None) -> Session:
    """A session before its first step, with its task's weights; overrides that no
    compiled program serves are refused."""
    task, weights = await resolve_task(rt, body.task.model_dump() if body.task else None)
    lstm_c, lstm_h = rt.engine.initial_state()
    now = time.time()
    session = Session(
        session_id=secrets.token_urlsafe(SESSION_ID_BYTES),
        seed=body.seed if body.seed is not None else secrets.randbits(32),
        step=-1,
        lstm_c=lstm_c,
        lstm_h=lstm_h,
        task=task,
        task_weights=weights,
        planner=body.planner.model_dump(exclude_none=True) if body.planner else {},
        last_response=None,
        delta=None,
        created_at=now,
        last_used=now,
        owner=owner,
    )
    planning_for(rt, session, None)
    return session


def prepare_act(rt: Runtime, session: Session, body: ActRequest) -> tuple[Planning, StepInput]:
    """The checked /act request as the engine takes it; any refusal here changes nothing."""
    expected = session.step + 1
    if body.step is not None and body.step != expected:
        raise ApiError(
            409,
            "step_conflict",
            f"step {body.step} is neither the last applied step nor the next",
            {"expected_step": expected, "last_step": session.step},
        )
    obs = check_observation(rt, body.observation, "/act")
    planning = planning_for(rt, session, body.planner)
    state = rt.engine.initial_state() if body.reset else (session.lstm_c, session.lstm_h)
    warm_start = planning.config.warm_start
    step = rt.engine.step_input(
        obs,
        state,
        rt.engine.aim(session.task, session.task_weights, obs),
        session.seed,
        expected,
        planning.config,
        starting_delta(carried(session), planning.shape, warm_start, body.reset),
    )
    check_queue(rt)
    return planning, step


def apply_act(
    rt: Runtime,
    session: Session,
    body: ActRequest,
    planning: Planning,
    step: StepInput,
    outcome: Outcome,
    response: dict,
) -> None:
    """The session after a step: M's new state, the answer a retry gets, and Δφ."""
    session.step = step.step
    session.lstm_c, session.lstm_h = outcome.lstm_c, outcome.lstm_h
    session.last_response = response
    session.last_observation = step.observation
    shape, warm_start = planning.shape, planning.config.warm_start
    delta = outcome.delta
    keep(session, after_act(carried(session), shape, warm_start, body.reset, delta, rt.keeps_delta))


@dataclass
class CheckedAdapt:
    """A checked /adapt request: its task, step count, planner and the engine's input."""

    task: dict
    weights: np.ndarray
    steps: int
    planning: Planning
    step: StepInput


async def prepare_adapt(rt: Runtime, session: Session, body: AdaptRequest) -> CheckedAdapt:
    """The checked /adapt request as the engine takes it; any refusal here changes nothing."""
    if body.task is not None:
        task, weights = await resolve_task(rt, body.task.model_dump())
    else:
        task, weights = session.task, session.task_weights
    if body.observation is not None:
        obs = check_observation(rt, body.observation, "/adapt")
    elif session.last_observation is not None:
        obs = session.last_observation
    else:
        raise ApiError(422, "no_observation", "send an observation: the session has not acted")
    if body.persist and not rt.keeps_delta:
        limit = rt.settings.max_delta_bytes
        message = f"a Δφ takes {rt.delta_bytes} bytes, over the {limit} a session may keep"
        raise ApiError(422, "delta_too_large", message)
    check_queue(rt)
    steps = body.steps or rt.settings.default_adapt_steps
    overrides = PlannerOverrides(planner="online_adaptation", adaptation_steps=steps)
    planning = planning_for(rt, session, overrides)
    warm_start, new_task = planning.config.warm_start, task != session.task
    step = rt.engine.step_input(
        obs,
        (session.lstm_c, session.lstm_h),
        weights,
        session.seed,
        session.step + 1,
        planning.config,
        starting_delta(carried(session), planning.shape, warm_start, False, new_task),
    )
    return CheckedAdapt(task=task, weights=weights, steps=steps, planning=planning, step=step)


def apply_adapt(session: Session, adaptation: CheckedAdapt, delta: dict, persist: bool) -> None:
    """The session after an adaptation: its task, and Δφ when asked to keep it."""
    new_task = adaptation.task != session.task
    keep(
        session, after_adapt(carried(session), adaptation.planning.shape, delta, persist, new_task)
    )
    session.task, session.task_weights = adaptation.task, adaptation.weights
