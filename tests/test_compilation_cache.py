"""WORLDPLAN_COMPILATION_CACHE: a second start of `worldplan serve` on the same cache
directory reads every program back and compiles nothing."""

import os
import re
import subprocess
import sys

from service.clients.local import free_port, settings_env, stop, wait_ready
from service.settings import Settings

READY = re.compile(r"compilation cache .*: (\d+) of (\d+) compilations read back, (\d+) compiled")


def start_once(settings: Settings, log) -> tuple[int, int, int]:
    """Starts a server, waits for /readyz 200, stops it: its (hits, requests, compiled)."""
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    with log.open("wb") as out:
        env = {**os.environ, **settings_env(settings)}
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 300, process, log)
    finally:
        stop(process)
    found = READY.findall(log.read_text(errors="replace"))
    assert len(found) == 1, log.read_text(errors="replace")[-2000:]
    return tuple(int(x) for x in found[0])


def test_a_second_start_compiles_nothing_new(trained, tmp_path):
    cache = tmp_path / "cache"
    settings = Settings(
        model_dir=trained.run_dir, compilation_cache=cache, batch_sizes=(1, 4), max_batch=4
    )
    hits, requests, compiled = start_once(settings, tmp_path / "cold.log")
    assert requests > 0 and compiled > 0 and any(cache.iterdir())
    hits, requests, compiled = start_once(settings, tmp_path / "warm.log")
    assert requests > 0 and hits == requests and compiled == 0
