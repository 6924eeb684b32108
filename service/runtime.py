"""Runtime: what the request handlers share once the application has started: the
settings, the engine and its batcher, the session store, the metrics and the per-session
locks."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

from service.batcher import Batcher
from service.engine import Engine, PlanShape
from service.metrics import Metrics
from service.sessions import SessionStore
from service.settings import Settings


@dataclass
class Runtime:
    """What the handlers share once the lifespan has started."""

    settings: Settings
    engine: Engine
    batcher: Batcher
    store: SessionStore
    metrics: Metrics
    model_version: str
    shapes: list[PlanShape]
    ready: bool = False
    warm_up_s: float = 0.0
    delta_bytes: int = 0  # the size of one session's Δφ warm start
    # Weak values: a lock lives while a request holds or awaits it, so the locks of
    # sessions that expired or were evicted do not pile up.
    locks: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)

    @property
    def keeps_delta(self) -> bool:
        """Whether a session may keep a Δφ warm start (bounded by max_delta_bytes)."""
        return self.delta_bytes <= self.settings.max_delta_bytes

    def lock(self, session_id: str) -> asyncio.Lock:
        """Requests of one session run in order."""
        lock = self.locks.get(session_id)
        if lock is None:
            lock = self.locks[session_id] = asyncio.Lock()
        return lock
