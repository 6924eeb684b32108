"""JAX's persistent compilation cache for the service (WORLDPLAN_COMPILATION_CACHE).

The compiled programs are written to a directory, so that a restarted replica reads them
back instead of compiling them again. Replicas that start together on one directory warm up
in turn (`in_turn`): the first compiles every program, the others read them back, instead
of each compiling all of them at once on the same cores. How many compilations the cache
answered is counted from JAX's own monitoring events and reported when the service turns
ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jax
from jax import monitoring

log = logging.getLogger("worldplan")
REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
WARM_UP_LOCK = "warm-up.lock"  # held by the process warming up on the directory
HITS = "/jax/compilation_cache/cache_hits"


@dataclass
class CacheCounts:
    requests: int = 0  # compilations that asked the cache
    hits: int = 0  # of those, the ones it answered

    @property
    def misses(self) -> int:
        return self.requests - self.hits


counts = CacheCounts()
_lock = threading.Lock()
_listening = False


def _count(event: str, **_) -> None:
    if event in (REQUESTS, HITS):
        with _lock:
            if event == REQUESTS:
                counts.requests += 1
            else:
                counts.hits += 1


def enable(directory: Path) -> None:
    """Caches every compilation of this process in `directory` (created if missing)."""
    global _listening
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Every program, however quick to compile: the default threshold (1 s) would leave
    # the small ones out, and a warm start would still compile them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if not _listening:
        monitoring.register_event_listener(_count)
        _listening = True


@contextlib.asynccontextmanager
async def in_turn(directory: Path | None) -> AsyncIterator[None]:
    """While no other process loads and warms up on the cache `directory`: a replica that
    finds one doing so waits (polling, so that the event loop goes on answering /healthz),
    then reads that one's programs back. The lock is the kernel's, so a replica that dies
    while warming up releases it. No directory, no waiting."""
    if directory is None:
        yield
        return
    with (directory / WARM_UP_LOCK).open("a") as lock:
        waited = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("another replica warms up on %s: waiting to read its programs "
                             "back", directory)  # fmt: skip
                    waited = True
                await asyncio.sleep(0.2)
        yield  # the lock goes with the file
