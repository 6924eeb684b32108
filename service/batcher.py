"""Dynamic batching: concurrent decisions of different sessions run as one engine call.

Decisions queue per plan shape (only decisions of one shape can share a program). A
queue is flushed when it holds `max_batch` decisions or when its oldest has waited
`max_wait_ms`. Engine calls run one at a time on a worker thread, off the event loop, so
that requests keep arriving while a batch computes. Ordering within a session is the
caller's business (the routes hold a lock per session).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.engine import Decision, Engine, Outcome
from training.planners import PlanShape


@dataclass
class Pending:
    decision: Decision
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What one flushed batch looked like, for metrics."""

    size: int
    queue_wait_s: list[float]
    compute_s: float


class Batcher:
    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        if not 1 <= max_batch <= engine.max_batch:
            raise ValueError(f"max_batch must lie in [1, {engine.max_batch}], got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queues: dict[PlanShape, list[Pending]] = defaultdict(list)
        self._wakeups: dict[PlanShape, asyncio.Event] = {}
        self._flushers: dict[PlanShape, asyncio.Task] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._compute = asyncio.Lock()  # one engine call at a time: one device

    @property
    def pending(self) -> int:
        """Decisions queued and not yet handed to the engine."""
        return sum(len(queue) for queue in self._queues.values())

    async def submit(self, shape: PlanShape, decision: Decision) -> Outcome:
        future = asyncio.get_running_loop().create_future()
        self._queues[shape].append(Pending(decision, future))
        if shape not in self._flushers or self._flushers[shape].done():
            self._wakeups[shape] = asyncio.Event()
            self._flushers[shape] = asyncio.create_task(self._flush(shape))
        self._wakeups[shape].set()
        return await future

    async def _flush(self, shape: PlanShape) -> None:
        queue = self._queues[shape]
        while queue:
            deadline = queue[0].queued_at + self.max_wait_s
            while len(queue) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                self._wakeups[shape].clear()
                try:
                    await asyncio.wait_for(self._wakeups[shape].wait(), left)
                except TimeoutError:
                    break
            batch = [p for p in queue[: self.max_batch] if not p.future.done()]
            del queue[: self.max_batch]
            if batch:
                await self._run(shape, batch)

    async def _run(self, shape: PlanShape, batch: list[Pending]) -> None:
        async with self._compute:
            started = time.perf_counter()
            waits = [started - p.queued_at for p in batch]
            loop = asyncio.get_running_loop()
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, self.engine.run, shape, [p.decision for p in batch]
                )
            except Exception as err:  # every waiter learns of the failure
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                return
            compute = time.perf_counter() - started
        for p, outcome in zip(batch, outcomes, strict=True):
            if not p.future.done():
                p.future.set_result(outcome)
        if self.on_batch:
            self.on_batch(BatchStats(len(batch), waits, compute))

    async def close(self) -> None:
        for task in self._flushers.values():
            task.cancel()
        self._executor.shutdown(wait=True)
