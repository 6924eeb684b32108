"""The policy stream: a WebSocket as openpi's policy servers speak it, so that a robot
stack built on `openpi-client` drives worldplan unchanged.

One connection is one session: `/stream` creates one (query `seed`, `task` and `planner`,
the last two as JSON), `/stream?session_id=…` resumes one. On connect the server sends its
metadata (what `/model` says, the session id and its last step). Each message is an
observation dict in openpi's msgpack-numpy (`observation`, and optionally `step`,
`reset`, `planner`, `deadline_ms`, as in `/act`); each reply holds `actions` [H, A], the
step, the diagnostics and `server_timing`. A step is `/act`'s step (service.routes.act_step):
the same batcher, limits, guards and idempotent retries, so a client that reconnects
resends its last step and gets the same answer. An error is a text frame (the API's error
shape, as JSON) and then the close, as openpi's server does, with the code in the reason.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from service import codec
from service.errors import ApiError, error_body
from service.routes import act_step
from service.runtime import Runtime
from service.schemas import ActRequest, CreateSession
from service.sessions import SessionLimit, StoreUnavailable
from service.stepping import load_session, new_session, planner_limits
from service.web import caller, runtime

router = APIRouter()
log = logging.getLogger("worldplan")
STEP_FIELDS = ("step", "reset", "planner", "deadline_ms")  # what a message may add to /act's


def close_code(status: int) -> int:
    """The WebSocket close code of an HTTP status: try again later (1013) for 429 and 503,
    an internal error (1011) for other 5xx, a policy violation (1008) for the rest."""
    if status in (429, 503):
        return 1013
    return 1011 if status >= 500 else 1008


async def refuse(websocket: WebSocket, err: ApiError) -> None:
    """openpi's convention: the error as a text frame, then the close; our code in both."""
    await websocket.send_text(json.dumps({**error_body(err), "status": err.status}))
    await websocket.close(code=close_code(err.status), reason=f"{err.status} {err.code}")


async def ready_runtime(websocket: WebSocket) -> Runtime:
    """The runtime, once ready and while not draining (else 503, as over HTTP)."""
    if websocket.app.state.draining:
        raise ApiError(503, "shutting_down", "this replica is shutting down: reconnect to another")
    return await runtime(websocket)


def query_json(websocket: WebSocket, name: str) -> dict | None:
    text = websocket.query_params.get(name)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(400, "bad_query", f"query parameter {name!r} is not JSON") from None


async def open_session(websocket: WebSocket, rt: Runtime, owner: str | None) -> str:
    """The session this connection drives: the one named by `session_id`, else a new one."""
    if session_id := websocket.query_params.get("session_id"):
        return (await load_session(rt, owner, session_id)).session_id
    seed = websocket.query_params.get("seed")
    if seed is not None and not seed.isdigit():
        raise ApiError(400, "bad_query", f"seed must be a non-negative integer, not {seed!r}")
    try:
        body = CreateSession(task=query_json(websocket, "task"),
                             planner=query_json(websocket, "planner"),
                             seed=None if seed is None else int(seed))  # fmt: skip
    except ValidationError as err:
        raise ApiError.from_validation(err.errors()) from None
    session = await new_session(rt, body, owner)
    try:
        await rt.store.create(session)
    except SessionLimit as err:
        retry = {"retry_after_s": math.ceil(err.retry_after_s or 1)}
        raise ApiError(429, "session_limit", str(err), retry) from None
    return session.session_id


def act_request(session_id: str, message: bytes) -> ActRequest:
    """A message as /act's request: its observation and the step fields it carries."""
    try:
        frame = codec.decode_body(message, codec.MSGPACK)
    except codec.CodecError as err:
        raise ApiError(400, "bad_body", str(err)) from None
    if not isinstance(frame, dict) or "observation" not in frame:
        raise ApiError(400, "bad_body", "each message is a dict with an `observation`")
    fields = {name: frame[name] for name in STEP_FIELDS if name in frame}
    try:
        return ActRequest(session_id=session_id, observation=frame["observation"], **fields)
    except ValidationError as err:
        raise ApiError.from_validation(err.errors()) from None


def reply(response: dict) -> bytes:
    """/act's response as a policy server's reply: `actions` [H, A] and `server_timing`."""
    return codec.encode_openpi({
        "actions": np.asarray(response["actions"], np.float32),
        "session_id": response["session_id"],
        "step": response["step"],
        "planner": response["planner"],
        "diagnostics": response["diagnostics"],
        "model_version": response["model_version"],
        "server_timing": {"infer_ms": response["timing"]["total_ms"],
                          "plan_ms": response["timing"]["plan_ms"]},
    })  # fmt: skip


@router.get("/stream", include_in_schema=False)  # documented by service.openapi.STREAM
async def stream_needs_an_upgrade() -> None:
    """A plain GET (curl, a browser) learns what the address is, instead of a 404."""
    raise ApiError(
        426, "upgrade_required",
        "/stream is a WebSocket: connect with `Upgrade: websocket` (openpi-client's "
        "WebsocketClientPolicy, or any WebSocket client); /act is the same step over HTTP",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )  # fmt: skip


@router.websocket("/stream")
async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        rt = await ready_runtime(websocket)
        owner = caller(websocket)
        session_id = await open_session(websocket, rt, owner)
        session = await load_session(rt, owner, session_id)
        metadata = {**rt.engine.describe(), "planner_limits": planner_limits(rt),
                    "session_id": session_id, "step": session.step}  # fmt: skip
        await websocket.send_bytes(codec.encode_openpi(metadata))
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is None:
                raise ApiError(400, "bad_body", "send binary msgpack frames, not text")
            await ready_runtime(websocket)  # a drain that began closes the stream between steps
            body = act_request(session_id, message["bytes"])
            await websocket.send_bytes(await act_step(rt, owner, body, reply))
    except ApiError as err:
        await refuse(websocket, err)
    except StoreUnavailable as err:
        await refuse(websocket, ApiError(503, "store_unavailable", str(err)))
    except WebSocketDisconnect:
        return
    except Exception as err:  # logged with its traceback; the client gets the error shape
        log.exception("the policy stream failed")
        await refuse(
            websocket, ApiError(500, "internal_error", f"internal error: {type(err).__name__}")
        )
