"""Prometheus metrics of one app, in a registry of its own (several apps in one process,
as in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from service.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and the like
        self.request_seconds = Histogram(
            "worldplan_request_seconds", "HTTP request latency", ["route", "method", "status"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait_seconds = Histogram(
            "worldplan_queue_wait_seconds", "time a decision waited to be batched",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "worldplan_compute_seconds", "time of one batched engine call",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "worldplan_batch_size", "decisions per engine call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )  # fmt: skip
        self.active_sessions = Gauge("worldplan_active_sessions", "live sessions", registry=r)
        self.evictions = Gauge(
            "worldplan_session_evictions", "sessions evicted (TTL or LRU) so far", registry=r
        )
        self.adaptation_value_gain = Histogram(
            "worldplan_adaptation_value_gain", "mean V after - before Δφ adaptation",
            buckets=(-1, 0, 0.5, 1, 2, 5, 10, 20, 50), registry=r,
        )  # fmt: skip
        self.adaptation_kl = Histogram(
            "worldplan_adaptation_kl", "KL term of the kept Δφ",
            buckets=(0, 0.1, 0.5, 1, 2, 5, 10, 50), registry=r,
        )  # fmt: skip
        self.decisions = Counter("worldplan_decisions", "decisions made", ["planner"], registry=r)
        self.stale_writes = Counter(
            "worldplan_stale_writes",
            "session writes refused because another replica wrote the session meanwhile",
            ["route"],
            registry=r,
        )
        self.guard_fallbacks = Counter(
            "worldplan_adaptation_fallbacks",
            "adaptations whose outcome the support guard rejected (planned with Δφ = 0)",
            registry=r,
        )

        self.non_finite = Counter(
            "worldplan_non_finite",
            "requests refused for a non-finite input or result (nothing was stored)",
            ["route", "stage"], registry=r,
        )  # fmt: skip

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.compute_seconds.observe(stats.compute_s)
        for wait in stats.queue_wait_s:
            self.queue_wait_seconds.observe(wait)

    def observe_decision(self, planner: str, diagnostics: dict) -> None:
        self.decisions.labels(planner).inc()
        if planner == "online_adaptation":
            self.observe_adaptation(diagnostics)

    def observe_adaptation(self, diagnostics: dict) -> None:
        self.adaptation_value_gain.observe(diagnostics["value_after"] - diagnostics["value_before"])
        self.adaptation_kl.observe(diagnostics["kl"])
        if diagnostics["fallback"]:
            self.guard_fallbacks.inc()

    def render(self, active_sessions: int, evictions: int) -> bytes:
        self.active_sessions.set(active_sessions)
        self.evictions.set(evictions)
        return generate_latest(self.registry)
