"""WORLDPLAN_COMPILATION_CACHE: a second start of `worldplan serve` on the same cache
directory reads every program back and compiles nothing (`worldplan bench-start`'s two
starts)."""

import pytest

from service.benchmarks.startup import timed_start
from service.settings import Settings


@pytest.mark.slow
def test_a_second_start_compiles_nothing_new(trained, tmp_path):
    cache = tmp_path / "cache"
    settings = Settings(
        model_dir=trained.run_dir, compilation_cache=cache, batch_sizes=(1, 4), max_batch=4
    )
    cold = timed_start(settings, tmp_path / "cold.log")
    assert cold["programs"] > 0 and cold["compiled"] > 0 and any(cache.iterdir())
    warm = timed_start(settings, tmp_path / "warm.log")
    assert warm["programs"] == cold["programs"]
    assert warm["cache_requests"] > 0 and warm["cache_hits"] == warm["cache_requests"]
    assert warm["compiled"] == 0
