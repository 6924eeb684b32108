"""`worldplan bench-memory`: the memory one session takes in each store, with and without
a Δφ warm start. Sessions are made as /act leaves them (LSTM state, task, last answer,
last observation), from one real decision of the bundle's default planner.

- memory store: the Python heap the store grows by (tracemalloc), per session;
- Redis: the server's `used_memory` growth, per session (and the record's bytes).

Writes memory.json. A figure to report, never asserted.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
import uuid
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import redis

from service.app import default_model_dir
from service.engine import Engine
from service.sessions import MemorySessionStore, RedisSessionStore, Session, session_to_bytes
from training.analysis.provenance import provenance, write_result
from training.learning.checkpoint import restore_bundle
from training.planning.planners import PlanShape, knob_values
from training.planning.tasks import default_task, task_weights


def sample_session(engine: Engine, planning, with_delta: bool) -> Session:
    model, params = engine.model, engine.params
    task = default_task(model, params)
    weights = np.asarray(task_weights(model, params, task), np.float32)
    decision = engine.probe(weights, knob_values(planning))
    (outcome,) = engine.run(PlanShape.of(planning), [decision])
    now = time.time()
    return Session(
        session_id="",
        seed=0,
        step=0,
        lstm_c=outcome.lstm_c,
        lstm_h=outcome.lstm_h,
        task=task,
        task_weights=weights,
        planner={},
        last_response={
            "session_id": "x" * 22,
            "step": 0,
            "action": [float(a) for a in outcome.action],
            "planner": planning.planner,
            "diagnostics": outcome.diagnostics,
            "timing": {"total_ms": 1.0, "plan_ms": 1.0},
            "model_version": "m" * 40,
        },  # fmt: skip
        delta=jax.device_get(outcome.delta) if with_delta else None,
        created_at=now,
        last_used=now,
        last_observation=decision.observation,
        owner="o" * 32,
    )


def copies(template: Session, n: int) -> list[Session]:
    return [replace(template, session_id=uuid.uuid4().hex[:22]) for _ in range(n)]


async def memory_store_bytes(template: Session, n: int) -> float:
    store = MemorySessionStore(n, 3600)
    sessions = copies(template, n)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for s in sessions:
        await store.create(s)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return grown / n


async def redis_store_bytes(url: str, template: Session, n: int) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    store = RedisSessionStore(url, 3600, prefix=prefix)
    info = redis.Redis.from_url(url)
    before = info.info("memory")["used_memory"]
    for s in copies(template, n):
        await store.create(s)
    grown = info.info("memory")["used_memory"] - before
    for key in info.scan_iter(match=f"{prefix}*", count=1000):
        info.delete(key)
    await store.close()
    info.close()
    return grown / n


def run_memory_bench(model_dir, n: int, redis_url: str | None) -> dict:
    bundle = restore_bundle(model_dir or default_model_dir())
    engine = Engine(bundle, (1,))
    planning = bundle.config.planning.model_copy(update={"planner": "online_adaptation"})
    report = {"sessions": n, "planner": "online_adaptation", "bytes_per_session": {},
              "model_version": engine.model_version}  # fmt: skip
    for with_delta in (False, True):
        template = sample_session(engine, planning, with_delta)
        label = "with_delta" if with_delta else "without_delta"
        row = {
            "record": len(session_to_bytes(template)),
            "memory_store": round(asyncio.run(memory_store_bytes(template, n))),
        }
        if redis_url:
            row["redis_store"] = round(asyncio.run(redis_store_bytes(redis_url, template, n)))
        report["bytes_per_session"][label] = row
    delta = sample_session(engine, planning, True).delta
    report["delta_bytes"] = sum(leaf.nbytes for leaf in jax.tree.leaves(delta))
    return report


def write_memory(report: dict, out_dir: str | Path) -> Path:
    origin = provenance(model_version=report["model_version"], sessions=report["sessions"])
    return write_result(Path(out_dir) / "memory.json", report, origin)
