"""Deployment (docker/): the compose files against the Compose Specification and resolved
from the repository root as `docker compose -f docker/compose.yaml` resolves them, the
Dockerfile against the CLI, and docker/nginx.conf balancing two real `worldplan serve`
replicas that share a real redis-server, one of which is then killed."""

import asyncio
import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from service.cli import build_parser, cmd_loadtest, cmd_serve
from service.clients.client import SESSION_HEADER, Client
from service.clients.local import free_port, settings_env, stop, wait_ready
from service.sessions import RedisSessionStore, Session
from service.settings import Settings
from tests.conftest import installed_composes

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
OBSERVATION = [-1.0, 1.0, 0.0, 0.0]
JSON = {"Content-Type": "application/json"}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME:-default}` and `${NAME}`, from `env`."""
    pattern = r"\$\{(\w+)(?::-([^}]*))?\}"
    return re.sub(pattern, lambda m: env.get(m[1]) or (m[2] or ""), value)


def build_paths(build: dict) -> tuple[Path, Path]:
    """The build context and Dockerfile a compose `build:` names: the context relative to the
    compose file's folder, the Dockerfile relative to the context."""
    context = (DOCKER / build["context"]).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def instruction(name: str) -> list[str]:
    return [line[len(name) :].strip() for line in dockerfile() if line.startswith(name + " ")]


# --- the files --------------------------------------------------------------------------


def check_compose(*paths: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*command, *map(str, paths)], capture_output=True, text=True)


def test_compose_files_follow_the_compose_specification(tmp_path):
    files = ["compose.yaml", "compose.gpu.yaml", "compose.local.yaml"]
    checked = check_compose(*(DOCKER / name for name in files))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = load_yaml("compose.yaml")
    broken["services"]["worldplan"]["deploy"]["replica"] = 2  # a misspelt key
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "compose.yaml").returncode != 0


def test_compose_wires_replicas_redis_and_the_load_balancer(monkeypatch):
    compose = load_yaml("compose.yaml")
    # the project's name, not the folder's ("docker"), from docker/.env, which compose 1.29
    # and v2 both read beside the first file; 1.29 refuses a top-level `name:`
    assert "name" not in compose and "version" not in compose
    dotenv = dict(
        line.split("=", 1)
        for line in (DOCKER / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert dotenv == {"COMPOSE_PROJECT_NAME": "worldplan"}
    services = compose["services"]
    assert {name for name, s in services.items() if "profiles" not in s} == {
        "redis", "worldplan", "lb"
    }  # what a plain `up` starts  # fmt: skip
    redis, app, lb = services["redis"], services["worldplan"], services["lb"]
    assert redis["image"].startswith("redis:7") and redis["healthcheck"]["test"]

    # built from the repository root with the Dockerfile in docker/, whose .dockerignore
    # is the one at the root of the context
    assert build_paths(app["build"]) == (ROOT, DOCKER / "Dockerfile")
    assert (ROOT / ".dockerignore").is_file()
    assert app["deploy"]["replicas"] >= 2
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    env = app["environment"]
    assert "WORLDPLAN_API_KEY" in env and env["WORLDPLAN_API_KEY"] is None  # from the shell
    assert httpx.URL(env["WORLDPLAN_REDIS_URL"]).host == "redis"
    for name in env:  # every variable is a setting of the service
        assert name.startswith("WORLDPLAN_") and name[10:].lower() in Settings.model_fields
        monkeypatch.setenv(name, env[name] or "")
    assert Settings().session_store == "redis"

    assert lb["image"].startswith("nginx:")
    assert lb["depends_on"]["worldplan"]["condition"] == "service_healthy"
    (port,) = lb["ports"]  # on loopback unless LB_ADDRESS says otherwise
    assert interpolate(port, {}) == "127.0.0.1:8000:8000"
    assert interpolate(port, {"LB_ADDRESS": "0.0.0.0", "PORT": "9000"}) == "0.0.0.0:9000:8000"
    source, target, *_ = next(v for v in lb["volumes"] if "nginx.conf" in v).split(":")
    assert (DOCKER / source).resolve() == DOCKER / "nginx.conf"
    assert target == "/etc/nginx/nginx.conf"
    conf = (DOCKER / "nginx.conf").read_text()
    assert "server worldplan:8000;" in conf and "listen 8000;" in conf
    # the balancer is healthy once /readyz answers through it
    probe = " ".join(lb["healthcheck"]["test"])
    assert httpx.URL(probe.split()[-1]) == httpx.URL("http://127.0.0.1:8000/readyz")


def test_the_loadtest_profile_runs_worldplan_loadtest_against_the_balancer():
    services = load_yaml("compose.yaml")["services"]
    load, app, lb = services["loadtest"], services["worldplan"], services["lb"]
    assert load["profiles"] == ["loadtest"]  # `up` alone leaves it out
    assert load["image"] == app["image"] and load["build"] == app["build"]
    assert load["depends_on"]["lb"]["condition"] == "service_healthy"

    def argv(env: dict[str, str]) -> list[str]:
        return [interpolate(str(a), env) for a in [*load["entrypoint"], *load["command"]]]

    # the command as the image runs it, parsed by the real CLI
    assert argv({})[0] == "worldplan"
    args = build_parser().parse_args(argv({})[1:])
    assert args.func is cmd_loadtest and not args.mix
    url = httpx.URL(args.url)
    assert url.host == "lb" and url.port == 8000  # the balancer's listen port, inside
    assert "listen 8000;" in (DOCKER / "nginx.conf").read_text()
    assert any(str(port).endswith(":8000") for port in lb["ports"])
    assert (args.sessions, args.duration, args.api_key) == (32, 30.0, "")  # "": no key sent

    # the knobs, and the replicas' key, from the shell that runs compose
    env = {"LOADTEST_SESSIONS": "64", "LOADTEST_DURATION": "5", "WORLDPLAN_API_KEY": "k"}
    args = build_parser().parse_args(argv(env)[1:])
    assert (args.sessions, args.duration, args.api_key) == (64, 5.0, "k")


def docker_composes() -> list[list[str]]:
    """Every compose installed: `docker compose` (v2) and docker-compose (1.29)."""
    found = installed_composes()
    if not found:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    return found


def compose_config(compose: list[str], *files: str) -> dict:
    """compose's own reading of the files from the repository root, as `up` would see them
    (`config` prints YAML in both versions)."""
    paths = [arg for name in files for arg in ("-f", f"docker/{name}")]
    resolved = subprocess.run(
        [*compose, *paths, "--profile", "loadtest", "config"],
        cwd=ROOT, capture_output=True, text=True, env=os.environ | {"BASE_IMAGE": ""},
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr
    return yaml.safe_load(resolved.stdout)["services"]


def mount_source(volume: str | dict) -> Path:
    """1.29 prints a mount as SOURCE:TARGET[:MODE], v2 as a mapping."""
    return Path(volume["source"] if isinstance(volume, dict) else volume.split(":")[0])


def test_docker_compose_resolves_the_files_from_the_repository_root():
    """Where compose is installed (either version): its own reading of the files."""
    for compose in docker_composes():
        services = compose_config(compose, "compose.yaml", "compose.gpu.yaml")
        assert set(services) == {"redis", "worldplan", "lb", "loadtest"}
        assert Path(services["worldplan"]["build"]["context"]) == ROOT
        assert services["worldplan"]["build"]["args"]["EXTRAS"] == "cuda"
        assert Path(services["loadtest"]["build"]["context"]) == ROOT
        (mount,) = services["lb"]["volumes"]
        assert mount_source(mount) == DOCKER / "nginx.conf"


def test_the_local_override_builds_every_service_on_the_base_made_here():
    """compose.local.yaml: no image is pulled; every service is built on the image that
    docker/base-image.sh makes, with the host's network for apt."""
    base_image_sh = (DOCKER / "base-image.sh").read_text()
    (default_name,) = re.findall(r"^name=\$\{1:-(\S+)\}$", base_image_sh, re.M)
    local = load_yaml("compose.local.yaml")["services"]
    assert set(local) == set(load_yaml("compose.yaml")["services"])
    for name, service in local.items():
        build = service["build"]
        assert interpolate(build["args"]["BASE_IMAGE"], {}) == default_name, name
        assert build["network"] == "host"
        context, dockerfile = build_paths(build)
        assert dockerfile.is_file(), name
        # the Dockerfile's first stage is the base image the argument names
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE_IMAGE=\S+$", text, re.M), name
        assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M), name
    assert local["worldplan"]["image"] == local["loadtest"]["image"]
    assert build_paths(local["worldplan"]["build"]) == (ROOT, DOCKER / "Dockerfile")
    for compose in docker_composes():
        services = compose_config(compose, "compose.yaml", "compose.local.yaml")
        assert {s["image"] for s in services.values()} == {s["image"] for s in local.values()}
        assert all(s["build"]["args"]["BASE_IMAGE"] == default_name for s in services.values())


def test_sessions_outlive_a_crash_of_the_compose_redis(tmp_path, start_redis):
    """Redis run with compose.yaml's own options, killed with SIGKILL after a write and
    started again on the same directory, still holds the acknowledged session."""
    options = load_yaml("compose.yaml")["services"]["redis"]["command"][1:]
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    state = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    session = Session(
        session_id="robot-1", seed=1, step=-1, lstm_c=state[0], lstm_h=state[1], task=None,
        task_weights=None, planner={}, last_response=None, delta=None, created_at=0.0,
        last_used=0.0,
    )  # fmt: skip

    async def write() -> None:
        store = RedisSessionStore(url, idle_ttl_s=600)
        await store.create(session)
        session.step, session.lstm_h = 7, session.lstm_h + 1.0
        await store.put(session)  # acknowledged: from here on it must survive
        await store.close()

    async def read() -> Session:
        store = RedisSessionStore(url, idle_ttl_s=600)
        try:
            return await store.get(session.session_id)
        finally:
            await store.close()

    redis_process = start_redis(tmp_path, port, *options)
    asyncio.run(write())
    redis_process.send_signal(signal.SIGKILL)
    redis_process.wait()
    start_redis(tmp_path, port, *options)
    kept = asyncio.run(read())
    assert kept.step == 7
    np.testing.assert_array_equal(kept.lstm_h, session.lstm_h)


def test_the_gpu_override_builds_the_cuda_extra_and_reserves_a_gpu():
    app = load_yaml("compose.gpu.yaml")["services"]["worldplan"]
    assert build_paths(app["build"]) == (ROOT, DOCKER / "Dockerfile")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert app["build"]["args"]["EXTRAS"] in extras["optional-dependencies"]
    device = app["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_the_dockerfile_serves_with_the_real_cli_and_installs_the_extra():
    (cmd,) = instruction("CMD")
    argv = json.loads(cmd)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] == "worldplan" and scripts["worldplan"] == "service.cli:main"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_serve and args.host == "0.0.0.0"
    assert instruction("EXPOSE") == [str(args.port)]
    (health,) = instruction("HEALTHCHECK")
    assert f"127.0.0.1:{args.port}/readyz" in health
    # the base image is an argument: python:3.11-slim unless a build names another
    assert "BASE_IMAGE=python:3.11-slim" in instruction("ARG")
    assert instruction("FROM") == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    (user,) = instruction("USER")
    assert user not in ("root", "0")

    # the install, from wheelhouse/ alone when the context has one (what `make wheelhouse`
    # makes), else from the index; the target run through the shell with and without the
    # build argument
    (install,) = [run for run in instruction("RUN") if "pip install" in run]
    assert install.startswith("if [ -d wheelhouse ]; then")
    assert "--no-index --find-links wheelhouse" in install
    assert "WHEELHOUSE := wheelhouse" in (ROOT / "Makefile").read_text()
    targets = re.findall(r'"\.\$\{EXTRAS[^"]*"', install)
    assert len(targets) == 2  # one in each branch
    for target in targets:
        for extras, expected in [("", "."), ("cuda", ".[cuda]")]:
            shell = subprocess.run(
                ["sh", "-c", f"printf %s {target}"], env={"EXTRAS": extras}, capture_output=True
            )
            assert shell.stdout.decode() == expected
    # the image keeps the virtual environment, not the context the build stage copied
    assert "--from=build /opt/worldplan /opt/worldplan" in instruction("COPY")


def test_the_docker_context_keeps_what_the_image_installs():
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes for pat in patterns
        )

    tracked = subprocess.run(
        ["git", "ls-files", "pyproject.toml", "README.md", "service", "training"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert any(p.startswith("service/default_model/") for p in tracked)
    assert not [p for p in tracked if ignored(p)]
    assert all(ignored(p) for p in [".venv/bin/python", ".git/HEAD", "data/x", "runs/umaze"])
    assert not ignored("wheelhouse/numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl")


# --- nginx in front of two replicas -------------------------------------------------------


def need_nginx() -> str:
    if NGINX is None:
        message = "nginx not found (Debian: apt-get install nginx; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return NGINX


@contextlib.contextmanager
def processes():
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            stop(proc)


def start(started: list, argv: list[str], log: Path, env=None) -> subprocess.Popen:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    started.append(proc)
    return proc


def render_nginx_conf(prefix: Path, port: int, upstreams: list[int]) -> Path:
    """docker/nginx.conf with loopback replicas and port, and its temp files under prefix."""
    conf = (DOCKER / "nginx.conf").read_text()
    servers = "".join(f"server 127.0.0.1:{p};\n" for p in upstreams)
    temps = "".join(
        f"{kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    for old, new in [
        ("server worldplan:8000;", servers),
        ("listen 8000;", f"listen 127.0.0.1:{port};"),
        ("http {", "http {\n" + temps),
    ]:
        assert conf.count(old) == 1, old
        conf = conf.replace(old, new)
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return path


@pytest.mark.slow
def test_nginx_keeps_each_session_on_one_replica_and_fails_over(tmp_path, redis_url):
    nginx = need_nginx()
    ports = [free_port(), free_port()]
    lb_port = free_port()
    lb = f"http://127.0.0.1:{lb_port}"
    replica_settings = Settings(
        session_store="redis", redis_url=redis_url, warm_up=False,
        batch_sizes=(1,), max_batch=1, sample_counts=(),
    )  # fmt: skip
    env = os.environ | settings_env(replica_settings)
    conf = render_nginx_conf(tmp_path, lb_port, ports)
    user = " user root;" if os.geteuid() == 0 else ""  # workers that can use tmp_path
    nginx_argv = [nginx, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)]
    nginx_argv += ["-g", f"pid {tmp_path / 'nginx.pid'}; daemon off;{user}"]
    checked = subprocess.run([*nginx_argv, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr

    with processes() as started:
        replicas = {}
        for port in ports:
            argv = [str(BIN / "worldplan"), "serve", "--host", "127.0.0.1", "--port", str(port)]
            log = tmp_path / f"replica-{port}.log"
            replicas[f"127.0.0.1:{port}"] = (start(started, argv, log, env), log)
        nginx_log = tmp_path / "nginx.log"
        start(started, nginx_argv, nginx_log)
        for address, proc_log in replicas.items():
            wait_ready(f"http://{address}", 60, *proc_log)
        wait_ready(lb, 60, started[-1], nginx_log)  # /readyz through nginx

        seen: list[tuple[str, str, str | None]] = []  # (path, X-Session-Id, X-Upstream)

        def record(response: httpx.Response) -> None:
            request = response.request
            upstream = response.headers.get("x-upstream")
            seen.append((request.url.path, request.headers.get(SESSION_HEADER), upstream))

        with Client(lb, retries=0) as client:
            client.http.event_hooks = {"response": [record]}
            planner = {"planner": "random_shooting"}
            # an odd number: round robin would move every session between its steps
            sessions = [client.create_session(planner=planner, seed=i) for i in range(15)]
            for step in range(3):
                for sid in sessions:
                    assert client.act(sid, OBSERVATION, step=step)["step"] == step

            # every session's steps came from one replica, and both replicas served some
            home = {}
            for sid in sessions:
                upstreams = {up for path, header, up in seen if path == "/act" and header == sid}
                assert len(upstreams) == 1, (sid, upstreams)
                home[sid] = upstreams.pop()
            assert set(home.values()) == set(replicas)

            # with no header, the id in the path picks the same replica
            for sid in sessions:
                response = httpx.get(f"{lb}/sessions/{sid}")
                assert response.json()["step"] == 2
                assert response.headers["x-upstream"] == home[sid]

            # a body far over the limit: nginx refuses it in the API's error shape
            too_large = httpx.post(f"{lb}/act", content=b"0" * (10 << 20), headers=JSON)
            assert too_large.status_code == 413
            assert too_large.json()["error"]["code"] == "body_too_large"

            # one replica dies: its sessions continue on the other from the state in Redis
            dead, (proc, _) = next(iter(replicas.items()))
            (alive,) = set(replicas) - {dead}
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            seen.clear()
            after = {sid: [] for sid in sessions}
            for step in (3, 4):
                for sid in sessions:
                    answer = client.act(sid, OBSERVATION, step=step)
                    assert answer["step"] == step
                    after[sid].append(answer["action"])
            for _, sid, upstream in seen:
                assert upstream.split(", ")[-1] == alive, (sid, home[sid], upstream)
            assert {client.session(sid)["step"] for sid in sessions} == {4}

        # and they act as if nothing had happened: a twin of each moved session (same seed,
        # same observations) stepped on the surviving replica alone gives the same actions
        with Client(f"http://{alive}", retries=0) as direct:
            for seed, sid in enumerate(sessions):
                if home[sid] != dead:
                    continue
                twin = direct.create_session(planner=planner, seed=seed)
                actions = [direct.act(twin, OBSERVATION, step=t)["action"] for t in range(5)]
                np.testing.assert_allclose(actions[3:], after[sid], rtol=1e-6, atol=1e-7)


def test_the_compilation_cache_outlives_a_container():
    """The image caches compiled programs under /cache, and compose keeps /cache in a
    named volume the replicas share: a restarted replica reads its programs back."""
    (env,) = [line for line in instruction("ENV") if "WORLDPLAN_COMPILATION_CACHE" in line]
    name, value = env.split("=", 1)
    assert name.removeprefix("WORLDPLAN_").lower() in Settings.model_fields
    cache = Path(value)
    compose = load_yaml("compose.yaml")
    mounts = dict(m.split(":")[::-1] for m in compose["services"]["worldplan"]["volumes"])
    (mount,) = [target for target in mounts if cache.is_relative_to(target)]
    assert mounts[mount] in compose["volumes"]  # a named volume, not the container's layer
