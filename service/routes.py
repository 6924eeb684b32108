"""Thin handlers: parse and check, call the store and the batcher, answer."""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ValidationError

from service import codec
from service.engine import InvalidTask, Planning, StepInput
from service.errors import ApiError, expired, not_found
from service.guard import as_float32, non_finite_paths
from service.schemas import (
    LIMITS,
    ActRequest,
    ActResponse,
    AdaptRequest,
    CreateSession,
    PlannerOverrides,
)
from service.sessions import Session, SessionExpired, SessionLimit, SessionNotFound

router = APIRouter()


def runtime(request: Request):
    rt = getattr(request.app.state, "runtime", None)
    if rt is None or not rt.ready:
        failure = getattr(request.app.state, "failure", None)
        message = f"the model failed to load: {failure}" if failure else "the model is loading"
        detail = None
        if rt is not None:  # restored, compiling
            detail = {"compiled": rt.engine.compiled, "programs": rt.engine.programs}
        raise ApiError(503, "not_ready", message, detail, headers={"Retry-After": "1"})
    return rt


SESSION_ID_BYTES = 16  # 128 random bits


def caller(request: Request) -> str | None:
    """Who is calling: a digest of the request's API key (None when no key is configured),
    or 401. Every key is compared, in constant time each, whichever matches."""
    keys = request.app.state.settings.keys
    if not keys:
        return None
    sent = request.headers.get("x-api-key", "").encode()
    matched = [secrets.compare_digest(sent, key.encode()) for key in keys]
    if not any(matched):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key")
    return hashlib.sha256(sent).hexdigest()[:32]


def authorised(request: Request):
    """The runtime, for a request that carries an accepted API key (when keys are set);
    the caller's identity is kept in request.state.owner."""
    rt = runtime(request)
    request.state.owner = caller(request)
    return rt


async def read_body(request: Request, model: type[BaseModel], rt) -> BaseModel:
    limit = rt.settings.max_body_bytes
    too_large = ApiError(413, "body_too_large", f"body over {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before reading it
    body = await request.body()
    if len(body) > limit:
        raise too_large
    try:
        raw = codec.decode_body(body, request.headers.get("content-type"))
        return model.model_validate(raw if raw is not None else {})
    except codec.CodecError as err:
        raise ApiError(400, "bad_body", str(err)) from None
    except ValidationError as err:
        raise ApiError.from_validation(err.errors()) from None


def answer(request: Request, payload: dict, status: int = 200) -> Response:
    """The payload encoded as the client asked. Handlers encode before they store, so that
    an answer that cannot be sent leaves the session as it was."""
    kind = codec.negotiate(request.headers.get("accept"), request.headers.get("content-type"))
    return Response(codec.encode_body(payload, kind), status_code=status, media_type=kind)


def check_result(rt, route: str, result: dict) -> None:
    """422 (counted in /metrics) when a result to be stored or sent is not finite: the
    input drove the model out of float32's range. Raised before the session is written."""
    paths = non_finite_paths(result)
    if not paths:
        return
    rt.metrics.non_finite.labels(route, "result").inc()
    raise ApiError(
        422,
        "non_finite_result",
        "the model's result for this input is not finite; the session is unchanged",
        {"fields": paths[:20]},
    )


@contextmanager
def store_errors(session_id: str):
    """The store's missing-session exceptions as the API's 404 and 410."""
    try:
        yield
    except SessionNotFound:
        raise not_found(session_id) from None
    except SessionExpired:
        raise expired(session_id) from None


async def load_session(rt, request: Request, session_id: str) -> Session:
    """The session, if the caller's key created it: another key's session is 404, as if
    it did not exist."""
    with store_errors(session_id):
        session = await rt.store.get(session_id)
    if session.owner != request.state.owner:
        raise not_found(session_id)
    return session


async def resolve_task(rt, task: dict | None) -> tuple[dict, np.ndarray]:
    """The task (the default for None) and its weights, computed on the engine's worker."""
    try:
        return await rt.batcher.task_weights(task)
    except InvalidTask as err:
        raise ApiError(422, "invalid_task", str(err)) from None


def planning_for(rt, session: Session, overrides: PlannerOverrides | None) -> Planning:
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
            "n_adaptation_samples outside the published set",
            {"planner_limits": planner_limits(rt)},
        )
    return planning


def planner_limits(rt) -> dict:
    oa = [s for s in rt.shapes if s.planner == "online_adaptation"]
    return {
        "planners": sorted({s.planner for s in rt.shapes}),
        "adaptation_steps": {"ge": 0, "le": rt.engine.planning_defaults.max_adaptation_steps},
        "n_adaptation_samples": sorted({s.n_adaptation_samples for s in oa}),
        **LIMITS,
        "delta_bytes": {"per_session": rt.delta_bytes, "le": rt.settings.max_delta_bytes},
    }


def check_observation(rt, value: Any, route: str) -> np.ndarray:
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


async def within_deadline(rt, work, deadline_ms: float | None, started: float):
    """The result of `work`, or 504 once the request's deadline (or the default), counted
    from `started` (perf_counter), passes: waiting for the session's lock counts too."""
    deadline = (deadline_ms or rt.settings.default_deadline_ms) / 1000.0
    try:
        return await asyncio.wait_for(work, max(0.0, started + deadline - time.perf_counter()))
    except TimeoutError:
        message = f"no answer within {deadline * 1000:.0f} ms"
        raise ApiError(504, "deadline_exceeded", message) from None


def docs_allowed(request: Request) -> None:
    if not request.app.state.settings.docs_public:
        caller(request)


@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request) -> JSONResponse:
    docs_allowed(request)
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    docs_allowed(request)
    return get_swagger_ui_html(openapi_url="/openapi.json", title="worldplan")


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> dict:
    if request.app.state.draining:  # at once, so that a balancer drains this replica
        raise ApiError(503, "shutting_down", "draining", headers={"Retry-After": "1"})
    runtime(request)
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    rt = authorised(request)
    text = rt.metrics.render(await rt.store.count(), rt.store.evictions)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/model")
async def model_info(request: Request) -> Response:
    rt = authorised(request)
    info = {**rt.engine.describe(), "planner_limits": planner_limits(rt)}
    return answer(request, info)


@router.post("/sessions", status_code=201)
async def create_session(request: Request) -> Response:
    rt = authorised(request)
    body = await read_body(request, CreateSession, rt)
    task, weights = await resolve_task(rt, body.task.model_dump() if body.task else None)
    now = time.time()
    lstm_c, lstm_h = rt.engine.initial_state()
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
        owner=request.state.owner,
    )
    planning_for(rt, session, None)  # refuses overrides that no program serves
    try:
        await rt.store.create(session)
    except SessionLimit as err:
        retry = str(math.ceil(err.retry_after_s or 1))
        raise ApiError(429, "session_limit", str(err), headers={"Retry-After": retry}) from None
    payload = {"session_id": session.session_id, "model_version": rt.model_version}
    return answer(request, payload, status=201)


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> Response:
    rt = authorised(request)
    s = await load_session(rt, request, session_id)
    info = {
        "session_id": s.session_id,
        "step": s.step,
        "task": s.task,
        "planner": s.planner,
        "idle_seconds": round(time.time() - s.last_used, 3),
    }
    return answer(request, info)


@router.delete("/sessions/{session_id}", status_code=204)
async def delete_session(session_id: str, request: Request) -> Response:
    rt = authorised(request)
    async with rt.lock(session_id):  # no step of it is half way
        await load_session(rt, request, session_id)
        with store_errors(session_id):
            await rt.store.delete(session_id)
    return Response(status_code=204)


@router.post("/act")
async def act(request: Request) -> Response:
    rt = authorised(request)
    body: ActRequest = await read_body(request, ActRequest, rt)
    started = time.perf_counter()
    async with rt.lock(body.session_id):
        with rt.batcher.arriving():  # a batch about to be cut waits for this decision
            session = await load_session(rt, request, body.session_id)
            if body.step is not None and body.step == session.step and session.last_response:
                return answer(request, session.last_response)  # a retry: nothing advances
            planning, decision = prepare_decision(rt, session, body)
            queued = time.perf_counter()
            decided = rt.batcher.enqueue(planning.shape, decision)
        outcome = await within_deadline(rt, decided, body.deadline_ms, started)
        check_result(rt, "/act", vars(outcome))
        response = ActResponse(
            session_id=session.session_id,
            step=decision.step,
            action=[float(a) for a in outcome.action],
            planner=planning.config.planner,
            diagnostics=outcome.diagnostics,
            timing={
                "total_ms": round(1000 * (time.perf_counter() - started), 3),
                "plan_ms": round(1000 * (time.perf_counter() - queued), 3),
            },
            model_version=rt.model_version,
        ).model_dump()
        answered = answer(request, response)  # before the session changes
        rt.metrics.observe_decision(planning.config.planner, outcome.diagnostics)
        session.step = decision.step
        session.lstm_c, session.lstm_h = outcome.lstm_c, outcome.lstm_h
        session.last_response = response
        session.last_observation = decision.observation
        config = planning.config
        if config.planner == "online_adaptation" and config.warm_start and rt.keeps_delta:
            session.delta = outcome.delta  # the next step's Δφ starts here
        elif body.reset:
            session.delta = None
        await save_session(rt, session)
    return answered


def prepare_decision(rt, session: Session, body: ActRequest) -> tuple[Planning, StepInput]:
    """The checked request as the engine takes it; any refusal here changes nothing."""
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
    decision = rt.engine.step_input(
        obs,
        state,
        session.task_weights,
        session.seed,
        expected,
        planning.config,
        None if body.reset else session.delta,
    )
    if rt.batcher.pending >= rt.settings.max_queue:
        raise ApiError(
            429, "queue_full", "too many decisions waiting", headers={"Retry-After": "1"}
        )
    return planning, decision


async def save_session(rt, session: Session) -> None:
    # The last line of defence: the handlers checked every input and result already.
    if paths := non_finite_paths(vars(session)):
        raise ApiError(500, "non_finite_state", f"refused to store non-finite {paths[:5]}")
    session.last_used = time.time()
    with store_errors(session.session_id):
        await rt.store.put(session)


DEFAULT_ADAPT_STEPS = 50


@router.post("/adapt")
async def adapt(request: Request) -> Response:
    rt = authorised(request)
    body: AdaptRequest = await read_body(request, AdaptRequest, rt)
    started = time.perf_counter()
    async with rt.lock(body.session_id):
        session = await load_session(rt, request, body.session_id)
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
        steps = body.steps or DEFAULT_ADAPT_STEPS
        overrides = PlannerOverrides(planner="online_adaptation", adaptation_steps=steps)
        planning = planning_for(rt, session, overrides)
        decision = rt.engine.step_input(
            obs,
            (session.lstm_c, session.lstm_h),
            weights,
            session.seed,
            session.step + 1,
            planning.config,
            None if task != session.task else session.delta,  # a new task starts at 0
        )
        work = rt.batcher.adapt(planning.shape, decision)  # the worker of /act's batches
        delta, diagnostics = await within_deadline(rt, work, body.deadline_ms, started)
        check_result(rt, "/adapt", {"delta": delta, "diagnostics": diagnostics})
        payload = {
            "session_id": session.session_id,
            "task_embedding": [float(w) for w in weights],
            "diagnostics": {**diagnostics, "steps": steps, "persisted": body.persist},
            "timing": {"total_ms": round(1000 * (time.perf_counter() - started), 3)},
        }
        answered = answer(request, payload)  # before the session changes
        rt.metrics.observe_adaptation(diagnostics)
        if body.persist:
            session.delta = delta
        elif task != session.task:
            session.delta = None  # a warm start adapted to another task
        session.task, session.task_weights = task, weights
        await save_session(rt, session)
    return answered
