"""`worldplan bench-start`: how long `worldplan serve` takes to turn ready, cold (an empty
compilation cache) and then warm (the cache the cold start filled), in one run.

Each start is a real server process on loopback, timed from its launch to /readyz 200;
its log says how many programs it compiled and how many compilations the cache answered.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from service.clients.local import serving_process
from service.settings import Settings
from training.analysis.provenance import provenance, write_result

READY = re.compile(r"ready: (\d+) programs compiled in ([\d.]+) s")
RESTORED = re.compile(r"restored (\S+) from ")
CACHE = re.compile(r"compilation cache .*: (\d+) of (\d+) compilations read back, (\d+) compiled")


def ready_log(text: str) -> dict:
    """What a server's log says about its start: programs, warm-up seconds, cache counts."""
    ((programs, warm_up_s),) = READY.findall(text)  # one start: one line of each
    ((hits, requests, compiled),) = CACHE.findall(text)
    (version,) = RESTORED.findall(text)
    return {
        "model_version": version,
        "programs": int(programs),
        "warm_up_s": float(warm_up_s),
        "cache_hits": int(hits),
        "cache_requests": int(requests),
        "compiled": int(compiled),
    }


def timed_start(settings: Settings, log_path: Path) -> dict:
    """Starts a server, waits for /readyz 200, stops it: its seconds to ready and log."""
    with log_path.open("wb") as log:
        started = time.perf_counter()
        with serving_process(settings, log=log):
            ready_s = time.perf_counter() - started
    return {"ready_s": ready_s, **ready_log(log_path.read_text(errors="replace"))}


def run_start_bench(model_dir: Path | None, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="worldplan-cache-") as cache:
        settings = Settings(model_dir=model_dir, compilation_cache=Path(cache))
        report = {start: timed_start(settings, out / f"{start}.log") for start in ("cold", "warm")}
    origin = provenance(model_version=report["cold"]["model_version"],
                        model_dir=str(model_dir) if model_dir else "the bundled model")  # fmt: skip
    write_result(out / "start.json", report, origin)
    return report
