"""The OpenAPI document of the API. The handlers read their bodies themselves (JSON or
msgpack), so the request and response schemas of service.schemas are attached here.

This module knows the app only as the FastAPI object it is handed: service.app imports it,
never the other way round. `worldplan openapi > openapi/openapi.json` writes the committed
copy; a test keeps the two identical.
"""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from service import schemas

REQUESTS = {
    ("/sessions", "post"): schemas.CreateSession,
    ("/act", "post"): schemas.ActRequest,
    ("/adapt", "post"): schemas.AdaptRequest,
}
RESPONSES = {
    ("/sessions", "post"): ("201", schemas.SessionCreated),
    ("/sessions/{session_id}", "get"): ("200", schemas.SessionInfo),
    ("/act", "post"): ("200", schemas.ActResponse),
    ("/adapt", "post"): ("200", schemas.AdaptResponse),
    ("/model", "get"): ("200", schemas.ModelInfo),
}
ERRORS = {
    "400": "bad observation or body: shape, dtype, NaN/Inf or beyond float32, malformed",
    "401": "missing or wrong X-API-Key",
    "404": "unknown session, or one that another key created",
    "409": "step conflict (detail.expected_step), or (/adapt) the session changed meanwhile",
    "410": "session expired or evicted",
    "413": "body too large",
    "422": "schema, task or planner limits, or a result that is not finite",
    "429": "session or queue limit (Retry-After)",
    "500": "internal error (logged by the server)",
    "503": "not ready, shutting down, the session store unreachable (Retry-After), or "
    "(/healthz) the model failed to load",
    "504": "deadline exceeded",
    "426": "(/stream) a plain GET: the stream needs `Upgrade: websocket`",
}
# The errors each operation can answer.
COMMON = ("401", "500", "503")
BODY = ("400", "413", "422")
SESSION = ("404", "410")
OPERATION_ERRORS = {
    ("/sessions", "post"): (*COMMON, *BODY, "429"),
    ("/sessions/{session_id}", "get"): (*COMMON, *SESSION),
    ("/sessions/{session_id}", "delete"): (*COMMON, *SESSION),
    ("/act", "post"): (*COMMON, *BODY, *SESSION, "409", "429", "504"),
    ("/adapt", "post"): (*COMMON, *BODY, *SESSION, "409", "504"),
    ("/model", "get"): COMMON,
    ("/metrics", "get"): COMMON,
    ("/readyz", "get"): ("503",),
    ("/healthz", "get"): ("503",),
    ("/stream", "get"): ("426",),
}
OBS = [-1.0, 1.0, 0.0, 0.0]
SID = "kTq4vQb0TnS3yWmF1cXh2A"
EXAMPLES = {
    ("/sessions", "post"): {
        "goal": {"task": {"kind": "goal", "goal": [1.0, -1.0]}, "seed": 7},
        "overrides": {"planner": {"planner": "online_adaptation", "adaptation_steps": 20}},
        "empty": {},
    },
    ("/act", "post"): {
        "first step": {"session_id": SID, "observation": OBS, "step": 0},
        "reset": {"session_id": SID, "observation": OBS, "reset": True, "deadline_ms": 500},
        "b64": {
            "session_id": SID,
            "observation": {"dtype": "float32", "shape": [4], "b64": "AACAvwAAgD8AAAAAAAAAAA=="},
        },
    },
    ("/adapt", "post"): {
        "new goal": {
            "session_id": SID,
            "task": {"kind": "goal", "goal": [0.9, -0.9]},
            "observation": OBS,
            "steps": 20,
            "persist": True,
        },
        "samples": {
            "session_id": SID,
            "task": {"kind": "reward_samples", "observations": [OBS, OBS], "rewards": [0, 1]},
        },
    },
}
MEDIA = ("application/json", "application/msgpack")


def ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


# OpenAPI has no WebSocket operation: the stream is described as the GET that upgrades.
STREAM = {
    "summary": "The policy stream (WebSocket), as openpi's policy servers speak it",
    "description": (
        "One connection is one session: the query's seed, task and planner (JSON) create "
        "it, session_id resumes one. On connect the server sends its metadata (/model's "
        "description, session_id, step) in openpi's msgpack-numpy. Each message is a dict "
        "{observation, step?, reset?, planner?, deadline_ms?}; each reply {actions [H, A], "
        "session_id, step, planner, diagnostics, model_version, server_timing}. A step is "
        "/act's step. The key comes as `Authorization: Api-Key …` or X-API-Key. An error "
        "is a text frame {status, error} and then the close: 1008 for the client's errors, "
        "1013 for 429 and 503, 1011 for the server's; the reason is '<status> <code>'."
    ),
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": text,
        }
        for name, text in (
            ("session_id", "resume this session"),
            ("seed", "a new session's PRNG seed"),
            ("task", "a new session's task, as JSON"),
            ("planner", "a new session's planner overrides, as JSON"),
        )
    ],  # fmt: skip
    "responses": {"101": {"description": "Switching Protocols: the stream is open"}},
}


def build_openapi(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = {*REQUESTS.values(), *(m for _, m in RESPONSES.values()), schemas.ErrorBody}
    _, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    for (path, method), model in REQUESTS.items():
        examples = {name: {"value": v} for name, v in EXAMPLES[path, method].items()}
        content = {media: {"schema": ref(model)} for media in MEDIA}
        content["application/json"]["examples"] = examples
        doc["paths"][path][method]["requestBody"] = {"required": True, "content": content}
    for (path, method), (status, model) in RESPONSES.items():
        responses = doc["paths"][path][method]["responses"]
        responses.pop("200", None)
        responses[status] = {
            "description": model.__doc__ or "OK",
            "content": {media: {"schema": ref(model)} for media in MEDIA},
        }
    doc["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    doc["paths"]["/stream"] = {"get": {**STREAM, "responses": dict(STREAM["responses"])}}
    for (path, method), statuses in OPERATION_ERRORS.items():
        responses = doc["paths"][path][method]["responses"]
        if "422" not in statuses:
            responses.pop("422", None)  # FastAPI's own shape, which this API never answers
        for status in statuses:
            responses[status] = {
                "description": ERRORS[status],
                "content": {"application/json": {"schema": ref(schemas.ErrorBody)}},
            }
    components = doc["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{name}" not in json.dumps(doc["paths"]):
            components.pop(name, None)
    return doc


def document(app: FastAPI) -> str:
    """The document as committed in openapi/openapi.json."""
    return json.dumps(build_openapi(app), indent=2, sort_keys=True) + "\n"
