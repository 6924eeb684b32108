"""A load generator: S sessions stepping as fast as answers come back, for T seconds, over
HTTP (httpx) or the policy stream (a WebSocket each, as openpi-client's robots connect).

`worldplan loadtest URL --sessions 32 --duration 20 [--transport stream]` reports
throughput, p50/p90/p99/max latency and errors, and writes loadtest.json and a latency
histogram (loadtest.png). Loops are bounded in time and in count, so a run always ends by
itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import websockets

from service import codec
from service.clients.client import AsyncClient, ServiceError, stream_url

MAX_STEPS_PER_SESSION = 1_000_000


def probe_observation(model: dict, rng: np.random.Generator) -> np.ndarray:
    space = model["observation_space"]
    if space["dtype"] == "uint8":
        return rng.integers(0, 256, space["shape"], dtype=np.uint8)
    return rng.normal(0.0, 1.0, space["shape"]).astype(np.float32)


async def run_loadtest(
    url: str,
    sessions: int,
    duration_s: float,
    api_key: str | None = None,
    planner: str | None = None,
    transport: str = "http",
) -> dict:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    latencies: list[float] = []
    errors: Counter = Counter()
    async with AsyncClient(url, api_key=api_key, retries=0) as client:
        model = await client.model()
        deadline = time.perf_counter() + duration_s
        loop = stream_loop if transport == "stream" else http_loop
        started = time.perf_counter()
        await asyncio.gather(*(
            loop(client, url, api_key, model, planner, index, deadline, latencies, errors)
            for index in range(sessions)
        ))  # fmt: skip
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "url": url,
        "model_version": model["model_version"],
        "transport": transport,
        "sessions": sessions,
        "duration_s": round(elapsed, 3),
        "planner": planner or "session default",
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 3),
            "p90": round(float(np.percentile(ms, 90)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3),
            "max": round(float(ms.max()), 3),
        },
        "errors": dict(errors),
        "latencies_ms": [round(x, 3) for x in latencies],
    }


TRANSPORTS = ("http", "stream")


async def http_loop(client, url, api_key, model, planner, index, deadline, latencies, errors):
    """One session over HTTP: /act after /act until the deadline, then deleted."""
    overrides = {"planner": planner} if planner else None
    session_id = await client.create_session(planner=overrides, seed=index)
    rng = np.random.default_rng(index)
    for step in range(MAX_STEPS_PER_SESSION):
        if time.perf_counter() >= deadline:
            break
        started = time.perf_counter()
        try:
            await client.act(session_id, probe_observation(model, rng), step=step)
            latencies.append(1000 * (time.perf_counter() - started))
        except ServiceError as err:
            errors[f"{err.status} {err.code}"] += 1
            break  # this session's step sequence is broken: stop it
        except httpx.HTTPError as err:
            errors[type(err).__name__] += 1
            break
    await client.delete_session(session_id)


async def stream_loop(client, url, api_key, model, planner, index, deadline, latencies, errors):
    """One session over the policy stream: a message after each reply until the deadline."""
    ws_url = stream_url(url, index, planner={"planner": planner} if planner else None)
    headers = {"X-API-Key": api_key} if api_key else None
    rng = np.random.default_rng(index)
    try:
        async with websockets.connect(ws_url, additional_headers=headers, max_size=None) as ws:
            session_id = codec.decode_body(await ws.recv(), codec.MSGPACK)["session_id"]
            for _ in range(MAX_STEPS_PER_SESSION):
                if time.perf_counter() >= deadline:
                    break
                started = time.perf_counter()
                await ws.send(codec.encode_openpi({"observation": probe_observation(model, rng)}))
                answer = await ws.recv()
                if isinstance(answer, str):  # an error frame: the stream closes after it
                    errors[json.loads(answer)["error"]["code"]] += 1
                    return
                latencies.append(1000 * (time.perf_counter() - started))
    except (websockets.WebSocketException, OSError) as err:
        errors[type(err).__name__] += 1
        return
    await client.delete_session(session_id)


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    from service.clients.plots import plot_latency_histogram
    from training.analysis.provenance import provenance, write_result

    out_dir = Path(out_dir)
    json_path, png_path = out_dir / "loadtest.json", out_dir / "loadtest.png"
    origin = provenance(model_version=report["model_version"], url=report["url"],
                        transport=report["transport"], sessions=report["sessions"],
                        planner=report["planner"])  # fmt: skip
    write_result(json_path, report, origin)
    title = f"{report['sessions']} sessions, {report['throughput_rps']:.0f} req/s"
    plot_latency_histogram(report["latencies_ms"], title, png_path)
    return json_path, png_path
