"""The error shape of the API: {"error": {"code", "message", "detail"}} with the codes of
docs/design.md §4."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: dict | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.detail, self.headers = detail, headers

    @classmethod
    def from_validation(cls, errors: list[dict]) -> ApiError:
        fields = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "problem": e["msg"]}
            for e in errors
        ]
        summary = "; ".join(f"{f['field'] or '(body)'}: {f['problem']}" for f in fields)
        return cls(422, "invalid_request", summary, {"errors": fields})


def not_found(session_id: str) -> ApiError:
    return ApiError(404, "session_not_found", f"no session {session_id!r}")


def expired(session_id: str) -> ApiError:
    return ApiError(410, "session_expired", f"session {session_id!r} has expired or was evicted")


def error_body(err: ApiError) -> dict:
    return {"error": {"code": err.code, "message": err.message, "detail": err.detail}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)
