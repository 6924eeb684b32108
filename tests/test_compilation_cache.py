"""WORLDPLAN_COMPILATION_CACHE: replicas that start together on one cache directory compile
each program once: the first compiles, the other waits for it and reads every program back,
as a restarted replica does (`worldplan bench-start`'s starts)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.benchmarks.startup import timed_start
from service.settings import Settings


@pytest.mark.slow
def test_two_starts_at_once_compile_each_program_once(trained, tmp_path):
    cache = tmp_path / "cache"
    settings = Settings(
        model_dir=trained.run_dir, compilation_cache=cache, batch_sizes=(1,), max_batch=1
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    with ThreadPoolExecutor(2) as pool:
        starts = dict(zip(logs, pool.map(timed_start, [settings] * 2, logs.values()), strict=True))
    first, then = sorted(starts, key=lambda name: -starts[name]["compiled"])
    cold, warm = starts[first], starts[then]
    assert cold["programs"] > 0 and cold["compiled"] > 0 and any(cache.iterdir())
    assert warm["programs"] == cold["programs"]
    assert warm["cache_requests"] > 0 and warm["cache_hits"] == warm["cache_requests"]
    assert warm["compiled"] == 0
    assert "waiting to read its programs back" in logs[then].read_text()
