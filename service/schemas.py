"""The HTTP API contract in code: request and response bodies of /sessions, /act, /adapt
and /model (DESIGN §4). Arrays arrive in any form `service.codec.to_array` accepts; their
shapes and values are checked against the bundle by the handlers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PlannerName = Literal["controller", "random_shooting", "guided_diffusion", "online_adaptation"]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RewardWeightsTask(Body):
    kind: Literal["reward_weights"]
    weights: list[float]


class GoalTask(Body):
    kind: Literal["goal"]
    goal: list[float]


class RewardSamplesTask(Body):
    kind: Literal["reward_samples"]
    observations: Any = Field(description="[n, *observation shape] array")
    rewards: list[float]


class EmbeddingTask(Body):
    kind: Literal["embedding"]
    embedding: list[float]


Task = Annotated[
    RewardWeightsTask | GoalTask | RewardSamplesTask | EmbeddingTask, Field(discriminator="kind")
]


class PlannerOverrides(Body):
    """Per-session or per-request planner settings, within the limits /model publishes."""

    planner: PlannerName | None = None
    adaptation_steps: int | None = Field(None, ge=0)
    n_adaptation_samples: int | None = Field(None, ge=1)
    delta_phi_lr: float | None = Field(None, gt=0.0)
    kl_coef: float | None = Field(None, gt=0.0)
    guidance_scale: float | None = Field(None, ge=0.0)
    warm_start: bool | None = Field(
        None, description="each step's Δφ starts from the previous step's (until a reset)"
    )


class CreateSession(Body):
    task: Task | None = None
    planner: PlannerOverrides | None = None
    seed: int | None = Field(None, ge=0, lt=2**32, description="PRNG seed; random if unset")


class SessionCreated(Body):
    session_id: str
    model_version: str


class SessionInfo(Body):
    session_id: str
    step: int = Field(description="the last applied step, -1 before the first")
    task: dict | None
    planner: dict
    idle_seconds: float


class ActRequest(Body):
    session_id: str
    observation: Any
    step: int | None = Field(None, ge=0, description="the client's step index; retries repeat it")
    reset: bool = Field(False, description="start a new episode: zero LSTM state first")
    planner: PlannerOverrides | None = None
    deadline_ms: float | None = Field(None, gt=0)


class ActResponse(Body):
    session_id: str
    step: int
    action: list[float]
    planner: str
    diagnostics: dict
    timing: dict
    model_version: str


class AdaptRequest(Body):
    session_id: str
    task: Task | None = None
    observation: Any | None = None
    steps: int | None = Field(None, ge=1)
    persist: bool = False
    deadline_ms: float | None = Field(None, gt=0)


class AdaptResponse(Body):
    session_id: str
    task_embedding: list[float]
    diagnostics: dict
    timing: dict


class SpaceInfo(Body):
    shape: list[int]
    dtype: str | None = None
    low: list[float] | None = None
    high: list[float] | None = None


class ModelInfo(Body):
    model_version: str
    env_id: str
    observation_space: SpaceInfo
    action_space: SpaceInfo
    default_task: dict
    planner_defaults: dict
    planner_limits: dict


class ErrorDetail(Body):
    code: str
    message: str
    detail: dict | None = None


class ErrorBody(Body):
    error: ErrorDetail
