"""create_app(settings): the FastAPI application. Its lifespan restores the bundle, builds
the engine, compiles every published program and only then turns /readyz to 200."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import compilation_cache
from service.batcher import Batcher
from service.engine import Engine
from service.errors import ApiError, error_response
from service.metrics import Metrics
from service.openapi import build_openapi
from service.routes import router
from service.runtime import Runtime
from service.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionStore,
    StoreUnavailable,
)
from service.settings import Settings
from service.stream import router as stream_router

log = logging.getLogger("worldplan")
DRAIN_EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})


def make_store(settings: Settings) -> SessionStore:
    if settings.session_store == "redis":
        return RedisSessionStore(settings.redis_url, settings.session_ttl_s)
    return MemorySessionStore(
        settings.max_sessions, settings.session_ttl_s, min_idle_to_evict_s=settings.evict_idle_s
    )


def default_model_dir():
    from importlib.resources import files

    return files("service") / "default_model"


async def prepare(app: FastAPI, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    if settings.compilation_cache:  # before anything compiles
        compilation_cache.enable(settings.compilation_cache)
    # Replicas starting together on one cache compile each program once: one at a time.
    async with compilation_cache.in_turn(settings.compilation_cache):
        runtime = await load_and_warm_up(app, settings, loop)
    runtime.ready = True
    log.info("ready: %d programs compiled in %.1f s", runtime.engine.compiled, runtime.warm_up_s)
    if settings.compilation_cache:
        cache = compilation_cache.counts
        log.info(
            "compilation cache %s: %d of %d compilations read back, %d compiled",
            settings.compilation_cache, cache.hits, cache.requests, cache.misses,
        )  # fmt: skip


async def load_and_warm_up(app: FastAPI, settings: Settings, loop) -> Runtime:
    """The model restored, the runtime published (so that /readyz can say what it waits
    for) and, unless turned off, every program compiled."""
    model_dir = settings.model_dir or default_model_dir()
    engine = await loop.run_in_executor(
        None, Engine.restore, model_dir, settings.batch_sizes, settings.planning
    )
    runtime = Runtime(
        settings=settings,
        engine=engine,
        batcher=Batcher(
            engine, settings.max_batch, settings.max_wait_ms, app.state.metrics.observe_batch
        ),
        store=make_store(settings),
        metrics=app.state.metrics,
        model_version=engine.model_version,
        shapes=engine.published_shapes(settings.sample_counts, settings.action_horizons),
    )
    runtime.delta_bytes = await loop.run_in_executor(None, engine.delta_bytes, runtime.shapes)
    if not runtime.keeps_delta:
        log.warning(
            "a Δφ warm start takes %d bytes, over WORLDPLAN_MAX_DELTA_BYTES (%d): sessions keep "
            "none", runtime.delta_bytes, settings.max_delta_bytes,
        )  # fmt: skip
    app.state.runtime = runtime
    log.info("restored %s from %s on %s", runtime.model_version, model_dir, engine.device)
    if settings.warm_up:
        runtime.warm_up_s = await loop.run_in_executor(None, engine.warm_up, runtime.shapes)
    return runtime


async def prepare_or_report(app: FastAPI, settings: Settings) -> None:
    try:
        await prepare(app, settings)
    except Exception as err:  # the process stays up and /readyz says why
        log.exception("could not load the model")
        app.state.failure = f"{type(err).__name__}: {err}"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loading and compiling run in the background so that /healthz answers at once
        # and /readyz says 503 until every program is compiled.
        app.state.runtime, app.state.failure = None, None
        preparing = asyncio.create_task(prepare_or_report(app, settings))
        yield
        preparing.cancel()
        runtime = app.state.runtime
        if runtime is not None:
            await runtime.batcher.close()
            await runtime.store.close()

    # /docs and /openapi.json are routes of service.routes, behind the key when one is set.
    app = FastAPI(
        title="worldplan", version="1", lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,
    )  # fmt: skip
    app.state.metrics = Metrics()
    app.state.settings = settings
    app.state.draining = False  # set on SIGTERM (service.server)

    @app.middleware("http")
    async def refuse_while_draining(request: Request, call_next):
        # Requests already running when the drain began go on; new ones are sent elsewhere.
        if app.state.draining and request.url.path not in DRAIN_EXEMPT:
            headers = {"Retry-After": "1", "Connection": "close"}
            message = "this replica is shutting down: retry on another"
            return error_response(ApiError(503, "shutting_down", message, headers=headers))
        return await call_next(request)

    @app.middleware("http")
    async def time_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        app.state.metrics.request_seconds.labels(
            getattr(route, "path", "unmatched"), request.method, str(response.status_code)
        ).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, err: StoreUnavailable) -> JSONResponse:
        log.warning("%s", err)
        headers = {"Retry-After": "1"}
        return error_response(ApiError(503, "store_unavailable", str(err), headers=headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        # Logged with its traceback by the server; the client gets the error shape.
        message = f"internal error: {type(err).__name__}"
        return error_response(ApiError(500, "internal_error", message))

    @app.exception_handler(RequestValidationError)
    async def schema_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(ApiError.from_validation(err.errors()))

    app.include_router(router)
    app.include_router(stream_router)

    def openapi() -> dict:  # the schemas the handlers check, attached once
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
    return app
