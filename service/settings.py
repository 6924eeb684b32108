"""Service settings, read from WORLDPLAN_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORLDPLAN_", frozen=True)

    model_dir: Path | None = Field(None, description="bundle directory; unset: the bundled one")
    api_key: str | None = Field(None, description="required in X-API-Key when set")
    api_keys: tuple[str, ...] = Field(
        (), description="more accepted keys; a session is visible only to the key that made it"
    )
    docs_public: bool = Field(
        False, description="serve /docs and /openapi.json without a key even when keys are set"
    )
    batch_sizes: tuple[int, ...] = Field((1, 8, 32), description="compiled batch sizes")
    max_batch: int = Field(32, ge=1, description="most decisions gathered into one call")
    max_wait_ms: float = Field(2.0, ge=0.0, description="longest a decision waits for others")
    max_queue: int = Field(1024, ge=1, description="queued decisions before /act answers 429")
    sample_counts: tuple[int, ...] = Field(
        (32,), description="n_adaptation_samples values compiled for overrides"
    )
    action_horizons: tuple[int, ...] = Field(
        (1,), description="action_horizon values compiled for overrides (action chunks)"
    )
    planning: dict[str, Any] = Field(
        {}, description="planner defaults over the bundle's: a JSON object of settings of the "
        'planning section, e.g. {"planner": "imagination", "imagination_steps": 10}'
    )  # fmt: skip
    session_store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_sessions: int = Field(10_000, ge=1)
    evict_idle_s: float = Field(
        60.0, ge=0.0, description="a full memory store evicts its LRU session only once idle "
        "this long; until then creating a session answers 429"
    )  # fmt: skip
    session_ttl_s: float = Field(3600.0, gt=0.0, description="idle time before a session ends")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_delta_bytes: int = Field(
        4 * 1024 * 1024, ge=0,
        description="largest Δφ warm start a session keeps; a bundle whose Δφ is larger "
        "keeps none (each step adapts from Δφ = 0) and /adapt persist answers 422",
    )  # fmt: skip
    default_deadline_ms: float = Field(10_000.0, gt=0.0)
    default_adapt_steps: int = Field(
        50, ge=1, description="adaptation steps of an /adapt request that names none"
    )
    warm_up: bool = Field(True, description="compile every program before turning ready")
    compilation_cache: Path | None = Field(
        None, description="directory of JAX's persistent compilation cache; a restart with "
        "the same directory reads its programs back instead of compiling them"
    )  # fmt: skip
    drain_s: float = Field(
        5.0, ge=0.0, description="on SIGTERM: seconds of 503 to new requests before stopping"
    )

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted API key; none: the service is open."""
        return tuple(k for k in (self.api_key, *self.api_keys) if k)

    @model_validator(mode="after")
    def _batches_fit(self) -> Settings:
        if self.max_batch > max(self.batch_sizes):
            raise ValueError("max_batch exceeds the largest compiled batch size")
        return self
