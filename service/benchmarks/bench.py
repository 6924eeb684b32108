"""`worldplan bench`: the service's figures, measured in one run on one machine.

1. In-process latency per decision (p50) of each planner with the bundle's defaults.
2. For random shooting and online adaptation, over HTTP /act and over the policy stream
   (WebSocket): p50 and p99 of one session, and their ratio to the in-process p50.
3. Throughput at several session counts of each of those, with batching; and of the
   bundle's planner over HTTP without batching (a second server).

Each server is a `worldplan serve` process of its own, as deployed, so that the load
generator in this process does not share an interpreter with it.

Writes bench.json and bench.png. Timings are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jax
import numpy as np

from service.clients.loadtest import TRANSPORTS, run_loadtest
from service.clients.local import serving_process
from service.engine import Engine, StepInput
from service.settings import Settings
from training.analysis.provenance import provenance, write_result
from training.learning.checkpoint import restore_bundle
from training.planning.planners import PLANNERS, PlanShape, knob_values
from training.planning.tasks import default_task, task_weights


def in_process_p50_ms(engine: Engine, planner: str, repeats: int) -> float:
    """A whole decision (encode, plan, read out, M step) of one session, run directly."""
    model, params = engine.model, engine.params
    planning = model.config.planning.model_copy(update={"planner": planner})
    shape = PlanShape.of(planning)
    decision = engine.probe(
        task_weights(model, params, default_task(model, params)),
        knob_values(planning),
    )
    engine.run(shape, [decision])  # compiles
    times = []
    for step in range(repeats):
        started = time.perf_counter()
        engine.run(shape, [StepInput(**{**decision.__dict__, "step": step})])
        times.append(1000 * (time.perf_counter() - started))
    return float(np.median(times))


def server_settings(base: Settings, batching: bool, sessions: list[int]) -> Settings:
    if not batching:
        return base.model_copy(update={"batch_sizes": (1,), "max_batch": 1})
    top = max(sessions)  # no batch can be larger than the sessions stepping at once
    sizes = tuple(sorted({size for size in (1, 8, 32) if size < top} | {top}))
    return base.model_copy(update={"batch_sizes": sizes, "max_batch": max(sizes)})


BENCH_PLANNERS = ("random_shooting", "online_adaptation")


def run_bench(model_dir: Path | None, sessions: list[int], duration_s: float, repeats: int):
    from service.app import default_model_dir

    bundle = restore_bundle(model_dir or default_model_dir())
    engine = Engine(bundle, (1,))
    planner = bundle.config.planning.planner
    in_process = {p: round(in_process_p50_ms(engine, p, repeats), 3) for p in PLANNERS}
    report = {
        "device": str(jax.devices()[0]),
        "model_version": engine.model_version,
        "sessions": sessions,
        "duration_s": duration_s,
        "repeats": repeats,
        "planner": planner,
        "in_process_p50_ms": in_process,
        "one_session_ms": {},
        "throughput": {},
    }
    # Only the default shapes: overrides are not benchmarked, and each costs a compilation.
    base = Settings(model_dir=model_dir, sample_counts=())
    with serving_process(server_settings(base, True, sessions)) as url:
        for name in BENCH_PLANNERS:
            for transport in TRANSPORTS:
                label = f"{name} {transport}"

                def load(n: int, name=name, transport=transport) -> dict:
                    return asyncio.run(run_loadtest(url, n, duration_s, None, name, transport))

                one = load(1)["latency_ms"]
                report["one_session_ms"][label] = {
                    "p50": one["p50"], "p99": one["p99"],
                    "ratio_to_in_process": round(one["p50"] / in_process[name], 3),
                }  # fmt: skip
                report["throughput"][label] = {str(n): throughput(load(n)) for n in sessions}
    with serving_process(server_settings(base, False, sessions)) as url:
        report["throughput"][f"{planner} http, no batching"] = {
            str(n): throughput(asyncio.run(run_loadtest(url, n, duration_s)))
            for n in sessions
        }  # fmt: skip
    return report


def throughput(result: dict) -> dict:
    return {
        "decisions_per_s": result["throughput_rps"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "errors": result["errors"],
    }


def write_bench(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    from service.clients.plots import plot_throughput

    out_dir = Path(out_dir)
    json_path, png_path = out_dir / "bench.json", out_dir / "bench.png"
    origin = provenance(model_version=report["model_version"], sessions=report["sessions"],
                        duration_s=report["duration_s"], repeats=report["repeats"])  # fmt: skip
    write_result(json_path, report, origin)
    plot_throughput(report["throughput"], f"{report['planner']} on {report['device']}", png_path)
    return json_path, png_path
