"""The handlers: each puts in order the dependencies (service.web), a session's steps
(service.stepping), the batcher and the answer."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from service.errors import ApiError
from service.runtime import Runtime
from service.schemas import ActRequest, ActResponse, AdaptRequest, CreateSession
from service.sessions import SessionLimit
from service.stepping import (
    answer_of_stored_step,
    apply_act,
    apply_adapt,
    load_session,
    new_session,
    planner_limits,
    prepare_act,
    prepare_adapt,
    save_session,
    store_errors,
)
from service.web import (
    Authorised,
    answer,
    check_result,
    docs_allowed,
    not_draining,
    read_body,
    runtime,
    within_deadline,
)

router = APIRouter()
T = TypeVar("T")


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(docs_allowed)])
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[Depends(docs_allowed)])
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="worldplan")


@router.get("/healthz")
async def healthz(request: Request) -> dict:
    """Alive, unless the model failed to load: then 503, so that an orchestrator's
    liveness probe restarts the process instead of keeping a replica that never serves."""
    if failure := getattr(request.app.state, "failure", None):
        raise ApiError(503, "model_load_failed", f"the model failed to load: {failure}")
    return {"status": "alive"}


# Draining is checked first: a replica shutting down says so even while it loads.
@router.get("/readyz", dependencies=[Depends(not_draining), Depends(runtime)])
async def readyz() -> dict:
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(rt: Authorised) -> Response:
    text = rt.metrics.render(await rt.store.count(), rt.store.evictions)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/model")
async def model_info(request: Request, rt: Authorised) -> Response:
    info = {**rt.engine.describe(), "planner_limits": planner_limits(rt)}
    return answer(request, info)


@router.post("/sessions", status_code=201)
async def create_session(
    request: Request, rt: Authorised, body: Annotated[CreateSession, read_body(CreateSession)]
) -> Response:
    session = await new_session(rt, body, request.state.owner)
    try:
        await rt.store.create(session)
    except SessionLimit as err:
        retry = str(math.ceil(err.retry_after_s or 1))
        raise ApiError(429, "session_limit", str(err), headers={"Retry-After": retry}) from None
    payload = {"session_id": session.session_id, "model_version": rt.model_version}
    return answer(request, payload, status=201)


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request, rt: Authorised) -> Response:
    s = await load_session(rt, request.state.owner, session_id)
    info = {
        "session_id": s.session_id,
        "step": s.step,
        "task": s.task,
        "planner": s.planner,
        "idle_seconds": round(time.time() - s.last_used, 3),
    }
    return answer(request, info)


@router.delete("/sessions/{session_id}", status_code=204)
async def delete_session(session_id: str, request: Request, rt: Authorised) -> Response:
    async with rt.lock(session_id):  # no step of it is half way
        await load_session(rt, request.state.owner, session_id)
        with store_errors(session_id):
            await rt.store.delete(session_id)
    return Response(status_code=204)


@router.post("/act")
async def act(
    request: Request, rt: Authorised, body: Annotated[ActRequest, read_body(ActRequest)]
) -> Response:
    return await act_step(rt, request.state.owner, body, lambda payload: answer(request, payload))


async def act_step(
    rt: Runtime, owner: str | None, body: ActRequest, encode: Callable[[dict], T]
) -> T:
    """One step of a session, as every transport takes it: the answer `encode` makes of
    the response, made before the session changes (an answer that cannot be sent changes
    nothing)."""
    started = time.perf_counter()
    async with rt.lock(body.session_id):
        with rt.batcher.arriving():  # a batch about to be cut waits for this decision
            session = await load_session(rt, owner, body.session_id)
            if body.step is not None and body.step == session.step and session.last_response:
                return encode(session.last_response)  # a retry: nothing advances
            planning, step = prepare_act(rt, session, body)
            queued = time.perf_counter()
            decided = rt.batcher.enqueue(planning.shape, step)
        outcome = await within_deadline(rt, decided, body.deadline_ms, started)
        check_result(rt, "/act", vars(outcome))
        response = ActResponse(
            session_id=session.session_id,
            step=step.step,
            action=[float(a) for a in outcome.action],
            actions=np.asarray(outcome.actions, np.float64).tolist(),
            planner=planning.config.planner,
            diagnostics=outcome.diagnostics,
            timing={
                "total_ms": round(1000 * (time.perf_counter() - started), 3),
                "plan_ms": round(1000 * (time.perf_counter() - queued), 3),
            },
            model_version=rt.model_version,
        ).model_dump()
        answered = encode(response)  # before the session changes
        rt.metrics.observe_decision(planning.config.planner, outcome.diagnostics)
        apply_act(rt, session, body, planning, step, outcome, response)
        if not await save_session(rt, session, "/act"):
            return encode(await answer_of_stored_step(rt, owner, session.session_id, step.step))
    return answered


@router.post("/adapt")
async def adapt(
    request: Request, rt: Authorised, body: Annotated[AdaptRequest, read_body(AdaptRequest)]
) -> Response:
    started = time.perf_counter()
    async with rt.lock(body.session_id):
        session = await load_session(rt, request.state.owner, body.session_id)
        adaptation = await prepare_adapt(rt, session, body)
        work = rt.batcher.adapt(adaptation.planning.shape, adaptation.step)  # /act's worker
        delta, diagnostics = await within_deadline(rt, work, body.deadline_ms, started)
        check_result(rt, "/adapt", {"delta": delta, "diagnostics": diagnostics})
        payload = {
            "session_id": session.session_id,
            "task_embedding": [float(w) for w in adaptation.weights],
            "diagnostics": {**diagnostics, "steps": adaptation.steps, "persisted": body.persist},
            "timing": {"total_ms": round(1000 * (time.perf_counter() - started), 3)},
        }
        answered = answer(request, payload)  # before the session changes
        rt.metrics.observe_adaptation(diagnostics)
        apply_adapt(session, adaptation, delta, body.persist)
        if not await save_session(rt, session, "/adapt"):
            message = "another replica changed this session meanwhile: send /adapt again"
            raise ApiError(409, "session_changed", message)
    return answered
