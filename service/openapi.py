"""The OpenAPI document of the API. The handlers read their bodies themselves (JSON or
msgpack), so the request and response schemas of service.schemas are attached here.

`python -m service.openapi > openapi/openapi.json` writes the committed copy; a test keeps
the two identical.
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
    "400": "bad observation or body",
    "401": "missing or wrong X-API-Key",
    "404": "unknown session",
    "409": "step conflict (detail.expected_step)",
    "410": "session expired or evicted",
    "413": "body too large",
    "422": "schema, task or planner limits",
    "429": "session or queue limit (Retry-After)",
    "503": "not ready, or the session store unreachable (Retry-After)",
    "504": "deadline exceeded",
    "500": "internal error (logged by the server)",
}
MEDIA = ("application/json", "application/msgpack")


def ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = {*REQUESTS.values(), *(m for _, m in RESPONSES.values()), schemas.ErrorBody}
    _, defs = models_json_schema(
        [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
        ref_template="#/components/schemas/{model}",
    )
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    for (path, method), model in REQUESTS.items():
        content = {media: {"schema": ref(model)} for media in MEDIA}
        doc["paths"][path][method]["requestBody"] = {"required": True, "content": content}
    for (path, method), (status, model) in RESPONSES.items():
        responses = doc["paths"][path][method]["responses"]
        responses.pop("200", None)
        responses[status] = {
            "description": model.__doc__ or "OK",
            "content": {media: {"schema": ref(model)} for media in MEDIA},
        }
    for path, operations in doc["paths"].items():
        if path in ("/healthz", "/readyz"):
            continue
        for operation in operations.values():
            for status, description in ERRORS.items():
                operation["responses"].setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": ref(schemas.ErrorBody)}},
                    },
                )
    return doc


def document() -> str:
    from service.app import create_app

    return json.dumps(build_openapi(create_app()), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(document(), end="")
