"""`worldplan serve`: uvicorn with a drain on SIGTERM.

On the first SIGTERM the app starts draining at once: /readyz answers 503, so that a
balancer stops sending to this replica, and every new request answers 503 with
Retry-After (and closes its connection), while the requests already in flight finish and
store their steps. After `drain_s` uvicorn's own graceful shutdown follows: it stops
listening, waits for what is still running, then closes the batcher and the store. A
second signal stops at once, as uvicorn does.
"""

from __future__ import annotations

import signal
import threading

import uvicorn
from fastapi import FastAPI


def begin_drain(app: FastAPI) -> None:
    app.state.draining = True


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float):
        super().__init__(config)
        self.app, self.drain_s = app, drain_s
        self._drain_started = False

    def handle_exit(self, sig, frame) -> None:
        if sig != signal.SIGTERM or self._drain_started:
            return super().handle_exit(sig, frame)
        self._drain_started = True
        begin_drain(self.app)
        # A timer, not the event loop: this runs in a signal handler.
        timer = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def serve(app: FastAPI, host: str, port: int, drain_s: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    DrainingServer(config, app, drain_s).run()
