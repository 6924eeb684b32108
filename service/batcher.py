"""Dynamic batching: concurrent decisions of different sessions run as one engine call.

Decisions queue per plan shape (only decisions of one shape can share a program). A batch
is cut when the engine is free, and then holds everything queued so far (up to
`max_batch`): decisions that arrive while a batch computes join the next one. Before
cutting, a queue waits for decisions still being prepared (`arriving`: requests read and
checked but not yet queued), at most `max_wait_ms` after its oldest; with none arriving it
does not wait, so a lone session pays no batching delay. Engine calls run one at a time on
a worker thread, off the event loop; `call` runs any other engine work (an adaptation, a
task's weights) on that worker under the same lock, and counts in `pending` while it
waits. The lock is held until the worker's call has ended, even when the request that
made it was cancelled (a thread cannot be stopped). Ordering within a session is the
caller's business (the routes hold a lock per session).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from service.engine import Engine, PlanShape, StepInput


@dataclass
class Pending:
    decision: StepInput
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
        self._flushers: dict[PlanShape, asyncio.Task] = {}
        self._changed = asyncio.Event()  # a decision was queued or stopped arriving
        self._arriving = 0
        self._calls_waiting = 0  # `call`s not yet on the worker
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._compute = asyncio.Lock()  # one engine call at a time: one device

    @property
    def pending(self) -> int:
        """Work waiting for the engine: decisions queued and calls not yet begun."""
        return sum(len(queue) for queue in self._queues.values()) + self._calls_waiting

    @contextmanager
    def arriving(self):
        """Marks a decision being prepared, so that a queue about to be cut waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._changed.set()

    def enqueue(self, shape: PlanShape, decision: StepInput) -> asyncio.Future:
        """Queues a decision at once; the future resolves to its Outcome."""
        future = asyncio.get_running_loop().create_future()
        self._queues[shape].append(Pending(decision, future))
        if shape not in self._flushers or self._flushers[shape].done():
            self._flushers[shape] = asyncio.create_task(self._flush(shape))
        self._changed.set()
        return future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the engine's worker, between batches: one engine call at a time.
        A caller cancelled meanwhile (its deadline passed) returns at once, but the engine
        lock is released only when the thread has ended: a thread cannot be stopped."""
        self._calls_waiting += 1
        try:
            await self._compute.acquire()
        finally:
            self._calls_waiting -= 1
        try:
            work = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except BaseException:
            self._compute.release()
            raise
        work.add_done_callback(lambda _: self._compute.release())
        return await asyncio.shield(work)

    async def adapt(self, shape: PlanShape, step: StepInput) -> tuple[dict, dict]:
        """Δφ adaptation alone (engine.adapt), on the worker."""
        return await self.call(self.engine.adapt, shape, step)

    async def task_weights(self, task: dict | None) -> tuple[dict, Any]:
        """A task and its weights (engine.task_weights), on the worker."""
        return await self.call(self.engine.task_weights, task)

    async def _flush(self, shape: PlanShape) -> None:
        queue = self._queues[shape]
        while queue:
            await self._gather(queue)
            async with self._compute:
                batch = [p for p in queue[: self.max_batch] if not p.future.done()]
                del queue[: self.max_batch]
                if batch:
                    await self._run(shape, batch)

    async def _gather(self, queue: list[Pending]) -> None:
        """Waits while the batch is not full, decisions are arriving and time is left."""
        deadline = queue[0].queued_at + self.max_wait_s
        while len(queue) < self.max_batch and self._arriving:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    async def _run(self, shape: PlanShape, batch: list[Pending]) -> None:
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
