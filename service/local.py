"""A real uvicorn server on a free loopback port, in this process: for the benchmark and
the tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn

from service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(settings: Settings, timeout_s: float = 300.0):
    """Yields (url, the /readyz answers seen while it prepared) once /readyz says 200."""
    from service.app import create_app

    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    seen: list[int] = []
    try:
        while not seen or seen[-1] != 200:
            with contextlib.suppress(httpx.TransportError):
                seen.append(httpx.get(f"{url}/readyz").status_code)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {timeout_s:.0f} s")
            time.sleep(0.05)
        yield url, seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)
