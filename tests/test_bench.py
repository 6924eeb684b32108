"""`worldplan bench` runs end to end (its figures are reported, never asserted)."""

import pytest

from service.benchmarks.bench import run_bench, write_bench


@pytest.mark.slow
def test_bench_measures_every_part(trained, tmp_path):
    report = run_bench(trained.run_dir, sessions=[1, 2], duration_s=0.5, repeats=3)
    assert set(report["in_process_p50_ms"]) == {
        "controller", "random_shooting", "guided_diffusion", "online_adaptation",
    }  # fmt: skip
    assert report["http_one_session_ms"]["p50"] > 0
    for mode in ("batching", "no_batching"):
        for n in ("1", "2"):
            row = report["throughput"][mode][n]
            assert row["decisions_per_s"] > 0 and row["errors"] == {}
    json_path, png_path = write_bench(report, tmp_path)
    assert json_path.exists() and png_path.stat().st_size > 5_000
