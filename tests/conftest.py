"""Shared fixtures: a tiny PointMaze dataset and a tiny bundle trained on it through all stages."""

import atexit
import fcntl
import os
import pickle
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import redis

from service.clients.local import (
    free_port,
    running_server,  # noqa: F401  (the tests' server)
    stop,
)
from training.config import parse_config
from training.data.datasets import collect
from training.learning.checkpoint import restore_bundle
from training.learning.loop import train
from training.models.mdn_rnn import initial_state
from training.planning.planners import Knobs, PlanShape, compile_decide
from training.planning.tasks import default_task, task_weights

# Tests train the same tiny models many times, in every xdist worker and in subprocesses:
# one compilation cache for the whole run makes every compilation after the first a lookup.
# pytest's own process makes it (its workers and their subprocesses inherit the variable)
# and removes it at exit.
if "WORLDPLAN_TEST_JAX_CACHE" not in os.environ:
    os.environ["WORLDPLAN_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="worldplan-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["WORLDPLAN_TEST_JAX_CACHE"], ignore_errors=True)
_CACHE = Path(os.environ["WORLDPLAN_TEST_JAX_CACHE"])
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

T = TypeVar("T")

TINY = {
    "env": "pointmaze-umaze",
    "seed": 3,
    "data": {"seq_len": 8},
    "vae": {"latent_dim": 4, "hidden": [16]},
    "mdn": {"hidden": 16, "n_mixtures": 2},
    "successor": {
        "feature_dims": [0, 1],
        "n_features": 15,
        "hidden": 32,
        "depth": 1,
        "batch_size": 32,
        "diffusion_steps": 100,
        "mc_warmup_steps": 10,
    },
    "readout": {"hidden": 32},
    "value": {"goal_dims": [0, 1], "hidden": 32},
    "planning": {
        "sample_steps": 4,
        "n_samples": 8,
        "adaptation_steps": 5,
        "n_adaptation_samples": 8,
    },
    "train": {
        "batch_size": 8,
        "vae_steps": 20,
        "mdn_steps": 20,
        "controller_steps": 20,
        "psi_steps": 20,
        "readout_steps": 20,
        "value_steps": 20,
        "checkpoint_every": 10,
        "log_every": 5,
    },
}
TINY_STEPS = 120


def built_once(tmp_path_factory, name: str, build: Callable[[Path], T]) -> T:
    """`build(folder)`, run by the first xdist worker that asks; the others wait for it and
    read its result back, so that a fixture that trains is paid once a run, not once a
    worker. Without xdist, the run's own temporary folder holds it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    result = shared / f"{name}.pickle"
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not result.exists():
            built = build(shared / name)
            result.write_bytes(pickle.dumps(built))
            return built
    return pickle.loads(result.read_bytes())


@pytest.fixture(scope="session")
def umaze_data(tmp_path_factory) -> Path:
    def build(out: Path) -> Path:
        collect("pointmaze-umaze", 4, out, seed=1, skew=0.3, max_episode_steps=60, progress=False)
        return out

    return built_once(tmp_path_factory, "umaze", build)


@pytest.fixture(scope="session")
def trained(umaze_data, tmp_path_factory):
    """The tiny bundle every service and planner test shares (tests copy it to change it)."""
    return built_once(
        tmp_path_factory,
        "tiny",
        lambda run_dir: train(parse_config(TINY), umaze_data, run_dir, progress=False),
    )


def decide_once(run_dir) -> np.ndarray:
    """One decision of the controller planner and of random shooting from the bundle."""
    bundle = restore_bundle(run_dir)
    model, params = bundle.model, bundle.params
    weights = jnp.asarray(task_weights(model, params, default_task(model, params)))
    obs = jnp.zeros(model.spaces.obs_shape)
    actions = []
    for planner in ("controller", "random_shooting"):
        config = bundle.config.planning.model_copy(update={"planner": planner})
        decide = compile_decide(model, PlanShape.of(config))
        lstm = initial_state((), model.mdn.hidden)
        out = decide(params, lstm, obs, weights, jax.random.key(0), Knobs.of(config), None)
        actions.append(np.asarray(out.plan.action))
    return np.stack(actions)


def installed_composes() -> list[list[str]]:
    """Every compose installed, in order of preference: `docker compose` (v2), then
    docker-compose (1.29, Debian's)."""
    found = []
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        found.append([docker, "compose"])
    if legacy := shutil.which("docker-compose"):
        found.append([legacy])
    return found


REDIS_SERVER = shutil.which("redis-server")


def launch_redis(workdir: Path, port: int, *options: str) -> subprocess.Popen:
    """A redis-server on a loopback port, returned once it answers PING."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found on PATH (Debian: apt-get install redis-server)")
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    proc = subprocess.Popen([*argv, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    client.close()
    return proc


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server on a free loopback port, for one test module."""
    port = free_port()
    proc = launch_redis(tmp_path_factory.mktemp("redis"), port, "--save", "", "--appendonly", "no")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@pytest.fixture
def start_redis():
    """launch_redis for one test; what it started is stopped at the end."""
    started = []
    yield lambda *args: started.append(launch_redis(*args)) or started[-1]
    for proc in started:
        stop(proc)


# The heaviest modules first (minutes on 2 cores, measured with --durations): `make test`
# hands whole modules to the xdist workers in collection order (--dist loadscope), so that
# the two workers end together instead of one running a heavy module alone at the end.
HEAVY_FIRST = (
    "test_end_to_end.py",
    "test_train.py",
    "test_service.py",
    "test_planners.py",
    "test_parallel.py",
    "test_ogbench_suite.py",
    "test_models.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
