"""`worldplan bench` runs end to end (its figures are reported, never asserted)."""

import json

import pytest

from service.benchmarks.bench import run_bench, write_bench
from training.learning.checkpoint import model_version, restore_bundle
from training.planning.planners import PLANNERS


@pytest.mark.slow
def test_bench_measures_every_part(trained, tmp_path):
    report = run_bench(trained.run_dir, sessions=[1, 2], duration_s=0.5, repeats=3)
    assert set(report["in_process_p50_ms"]) == set(PLANNERS)
    lines = [
        f"{p} {t}" for p in ("random_shooting", "online_adaptation") for t in ("http", "stream")
    ]
    for line in lines:
        assert report["one_session_ms"][line]["p50"] > 0
    assert set(report["throughput"]) == {*lines, "online_adaptation http, no batching"}
    for rows in report["throughput"].values():
        for n in ("1", "2"):
            assert rows[n]["decisions_per_s"] > 0 and rows[n]["errors"] == {}
    json_path, png_path = write_bench(report, tmp_path)
    assert png_path.stat().st_size > 5_000
    origin = json.loads(json_path.read_text())["provenance"]
    assert origin["model_version"] == model_version(restore_bundle(trained.run_dir))
    assert origin["settings"]["sessions"] == [1, 2]
