"""Real servers on free loopback ports: a uvicorn thread in this process (for tests), or a
`worldplan serve` process of its own (for the benchmark, as it is deployed)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    url: str,
    timeout_s: float,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> list[int]:
    """Polls /readyz until it says 200; returns the statuses seen on the way. A server
    `process` that exits first is an error that quotes the end of its `log`."""
    deadline = time.monotonic() + timeout_s
    seen: list[int] = []
    while not seen or seen[-1] != 200:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"the server at {url} exited ({process.returncode})\n{tail}")
        with contextlib.suppress(httpx.TransportError):
            seen.append(httpx.get(f"{url}/readyz").status_code)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server was not ready within {timeout_s:.0f} s")
        time.sleep(0.05)
    return seen


def settings_env(settings: Settings) -> dict[str, str]:
    """The WORLDPLAN_* variables that give a `worldplan serve` process these settings."""
    env = {}
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        env[f"WORLDPLAN_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


@contextlib.contextmanager
def serving_process(settings: Settings, timeout_s: float = 600.0, log=subprocess.DEVNULL):
    """Yields the url of a `worldplan serve` process once its /readyz says 200."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    env = {**os.environ, **settings_env(settings)}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s, process)
        yield url
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Ends a child process: politely, then for good."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_server(settings: Settings, timeout_s: float = 300.0, app=None):
    """Yields (url, the /readyz answers seen while it prepared) once /readyz says 200. It
    serves `app` when given (a test that looks inside it), else create_app(settings)."""
    from service.app import create_app

    port = free_port()
    app = app if app is not None else create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, wait_ready(url, timeout_s)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
