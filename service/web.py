"""What every handler needs of HTTP, as FastAPI dependencies: readiness, the caller's key,
the body (JSON or msgpack) read and checked; and the answer, encoded as the client asked.
The dependencies are coroutines so that FastAPI runs them on the event loop, not on a
thread of its pool."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import HTTPConnection

from service import codec
from service.errors import ApiError
from service.guard import non_finite_paths
from service.runtime import Runtime


async def runtime(request: HTTPConnection) -> Runtime:
    """The runtime once every program is compiled, else 503 (with the warm-up's progress)."""
    rt = getattr(request.app.state, "runtime", None)
    if rt is None or not rt.ready:
        failure = getattr(request.app.state, "failure", None)
        message = f"the model failed to load: {failure}" if failure else "the model is loading"
        detail = None
        if rt is not None:  # restored, compiling
            detail = {"compiled": rt.engine.compiled, "programs": rt.engine.programs}
        raise ApiError(503, "not_ready", message, detail, headers={"Retry-After": "1"})
    return rt


Ready = Annotated[Runtime, Depends(runtime)]  # the runtime, once ready


async def not_draining(request: Request) -> None:
    """503 at once while draining, so that a balancer takes this replica out."""
    if request.app.state.draining:
        raise ApiError(503, "shutting_down", "draining", headers={"Retry-After": "1"})


def sent_key(headers) -> str:
    """The API key a request carries: `X-API-Key`, or `Authorization: Api-Key …` (what
    openpi-client sends)."""
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return headers.get("x-api-key") or (key.strip() if scheme.lower() == "api-key" else "")


def caller(request: HTTPConnection) -> str | None:
    """Who is calling (a request or a WebSocket): a digest of its API key (None when no key
    is configured), or 401. Every key is compared, in constant time each, whichever
    matches."""
    keys = request.app.state.settings.keys
    if not keys:
        return None
    sent = sent_key(request.headers).encode()
    matched = [secrets.compare_digest(sent, key.encode()) for key in keys]
    if not any(matched):
        raise ApiError(
            401, "unauthorized", "missing or wrong X-API-Key (or Authorization: Api-Key)"
        )
    return hashlib.sha256(sent).hexdigest()[:32]


async def authorised(request: Request, rt: Ready) -> Runtime:
    """The runtime, for a request that carries an accepted API key (when keys are set);
    the caller's identity is kept in request.state.owner. Readiness is checked first."""
    request.state.owner = caller(request)
    return rt


Authorised = Annotated[Runtime, Depends(authorised)]  # the runtime, for an accepted key


async def docs_allowed(request: Request) -> None:
    """The document and its page are behind the key unless docs_public is set."""
    if not request.app.state.settings.docs_public:
        caller(request)


def read_body(model: type[BaseModel]) -> Any:
    """A dependency that reads the request's body (JSON or msgpack, at most max_body_bytes)
    and validates it as `model`; after the key is checked."""

    async def read(request: Request, rt: Authorised) -> BaseModel:
        limit = rt.settings.max_body_bytes
        too_large = ApiError(413, "body_too_large", f"body over {limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large  # refused before reading it
        raw_body = await request.body()
        if len(raw_body) > limit:
            raise too_large
        try:
            raw = codec.decode_body(raw_body, request.headers.get("content-type"))
            return model.model_validate(raw if raw is not None else {})
        except codec.CodecError as err:
            raise ApiError(400, "bad_body", str(err)) from None
        except ValidationError as err:
            raise ApiError.from_validation(err.errors()) from None

    return Depends(read)


def answer(request: Request, payload: dict, status: int = 200) -> Response:
    """The payload encoded as the client asked. Handlers encode before they store, so that
    an answer that cannot be sent leaves the session as it was."""
    kind = codec.negotiate(request.headers.get("accept"), request.headers.get("content-type"))
    return Response(codec.encode_body(payload, kind), status_code=status, media_type=kind)


async def within_deadline(rt, work, deadline_ms: float | None, started: float):
    """The result of `work`, or 504 once the request's deadline (or the default), counted
    from `started` (perf_counter), passes: waiting for the session's lock counts too."""
    deadline = (deadline_ms or rt.settings.default_deadline_ms) / 1000.0
    try:
        return await asyncio.wait_for(work, max(0.0, started + deadline - time.perf_counter()))
    except TimeoutError:
        message = f"no answer within {deadline * 1000:.0f} ms"
        raise ApiError(504, "deadline_exceeded", message) from None


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
