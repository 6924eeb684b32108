"""httpx clients for robots and simulators, synchronous and asynchronous.

Every /act carries its step index, so a retry after a lost answer, a timeout or a
restarting replica is safe: the service answers a repeated step from its record and
never applies it twice. Retries back off, honour Retry-After, and stop after `retries`.
A session's requests also name the session in an X-Session-Id header, which a load
balancer can hash on to keep the session on one replica without reading the body
(docker/nginx.conf; docker/k8s/base/ingress.yaml on Kubernetes).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from service import codec

RETRY_STATUS = {429, 502, 503, 504}
SESSION_HEADER = "X-Session-Id"


def stream_url(base_url: str, seed: int, task: dict | None = None, planner: dict | None = None):
    """The policy stream's URL for a new session of this seed, task and planner overrides."""
    query = {"seed": str(seed)}
    if task is not None:
        query["task"] = json.dumps(task)
    if planner:
        query["planner"] = json.dumps(planner)
    return base_url.replace("http", "ws", 1) + "/stream?" + str(httpx.QueryParams(query))


class ServiceError(RuntimeError):
    """An error answer of the service: its status, code, message and detail."""

    def __init__(self, status: int, body: dict):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = error.get("code", "unknown")
        self.detail = error.get("detail")
        super().__init__(f"{status} {self.code}: {error.get('message', body)}")


@dataclass
class Options:
    base_url: str
    api_key: str | None = None
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.1
    use_msgpack: bool = False
    headers: dict = field(init=False)

    def __post_init__(self) -> None:
        kind = codec.MSGPACK if self.use_msgpack else codec.JSON
        self.headers = {"Content-Type": kind, "Accept": kind}
        if self.api_key:
            self.headers["X-API-Key"] = self.api_key

    def headers_for(self, session_id: str | None) -> dict:
        return self.headers if session_id is None else self.headers | {SESSION_HEADER: session_id}

    def encode(self, body: dict | None) -> bytes | None:
        if body is None:
            return None
        return codec.encode_body(body, self.headers["Content-Type"])

    def retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before trying again, or None when this answer is final. No
        response means the request was lost in transport."""
        if attempt >= self.retries:
            return None
        if response is not None and response.status_code not in RETRY_STATUS:
            return None
        retry_after = response.headers.get("retry-after") if response is not None else None
        return float(retry_after) if retry_after else self.backoff * 2**attempt


def decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    body = codec.decode_body(response.content, response.headers.get("content-type"))
    if response.status_code >= 400:
        raise ServiceError(response.status_code, body)
    return body


def session_body(task, planner, seed) -> dict:
    given = {"task": task, "planner": planner, "seed": seed}
    return {k: v for k, v in given.items() if v is not None}


def act_body(session_id, observation, step, reset, planner, use_msgpack) -> dict:
    obs = np.asarray(observation)
    body = {
        "session_id": session_id,
        "observation": obs if use_msgpack else obs.tolist(),
        "reset": reset,
    }
    if step is not None:
        body["step"] = step
    if planner:
        body["planner"] = planner
    return body


def adapt_body(session_id, task, observation, steps, persist) -> dict:
    body = {"session_id": session_id, "persist": persist}
    body |= {k: v for k, v in {"task": task, "steps": steps}.items() if v is not None}
    if observation is not None:
        body["observation"] = np.asarray(observation).tolist()
    return body


class Client:
    """Synchronous client. `with Client(url) as c: sid = c.create_session(); c.act(...)`."""

    def __init__(self, base_url: str, **options):
        self.options = Options(base_url, **options)
        self.http = httpx.Client(base_url=base_url, timeout=self.options.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def request(
        self, method: str, path: str, body: dict | None = None, session_id: str | None = None
    ) -> Any:
        opts = self.options
        for attempt in itertools.count():
            try:
                response = self.http.request(
                    method, path, content=opts.encode(body), headers=opts.headers_for(session_id)
                )
            except httpx.TransportError:
                if (wait := opts.retry_delay(attempt, None)) is None:
                    raise
            else:
                if (wait := opts.retry_delay(attempt, response)) is None:
                    return decode(response)
            time.sleep(wait)

    def model(self) -> dict:
        return self.request("GET", "/model")

    def create_session(self, task=None, planner=None, seed=None) -> str:
        return self.request("POST", "/sessions", session_body(task, planner, seed))["session_id"]

    def session(self, session_id: str) -> dict:
        return self.request("GET", f"/sessions/{session_id}", session_id=session_id)

    def delete_session(self, session_id: str) -> None:
        self.request("DELETE", f"/sessions/{session_id}", session_id=session_id)

    def act(self, session_id, observation, step=None, reset=False, planner=None) -> dict:
        body = act_body(session_id, observation, step, reset, planner, self.options.use_msgpack)
        return self.request("POST", "/act", body, session_id)

    def adapt(self, session_id, task=None, observation=None, steps=None, persist=False) -> dict:
        body = adapt_body(session_id, task, observation, steps, persist)
        return self.request("POST", "/adapt", body, session_id)


class AsyncClient:
    """The same calls, awaitable, for simulators that drive many sessions at once."""

    def __init__(self, base_url: str, **options):
        self.options = Options(base_url, **options)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(
            base_url=base_url, timeout=self.options.timeout, limits=limits
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def request(
        self, method: str, path: str, body: dict | None = None, session_id: str | None = None
    ) -> Any:
        opts = self.options
        for attempt in itertools.count():
            try:
                response = await self.http.request(
                    method, path, content=opts.encode(body), headers=opts.headers_for(session_id)
                )
            except httpx.TransportError:
                if (wait := opts.retry_delay(attempt, None)) is None:
                    raise
            else:
                if (wait := opts.retry_delay(attempt, response)) is None:
                    return decode(response)
            await asyncio.sleep(wait)

    async def model(self) -> dict:
        return await self.request("GET", "/model")

    async def create_session(self, task=None, planner=None, seed=None) -> str:
        body = session_body(task, planner, seed)
        return (await self.request("POST", "/sessions", body))["session_id"]

    async def session(self, session_id: str) -> dict:
        return await self.request("GET", f"/sessions/{session_id}", session_id=session_id)

    async def act(self, session_id, observation, step=None, reset=False, planner=None) -> dict:
        body = act_body(session_id, observation, step, reset, planner, self.options.use_msgpack)
        return await self.request("POST", "/act", body, session_id)

    async def adapt(
        self, session_id, task=None, observation=None, steps=None, persist=False
    ) -> dict:
        body = adapt_body(session_id, task, observation, steps, persist)
        return await self.request("POST", "/adapt", body, session_id)

    async def delete_session(self, session_id: str) -> None:
        await self.request("DELETE", f"/sessions/{session_id}", session_id=session_id)
