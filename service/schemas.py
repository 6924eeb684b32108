"""The HTTP API contract in code: request and response bodies of /sessions, /act, /adapt
and /model (docs/design.md §4). Arrays arrive in any form `service.codec.to_array` accepts; their
shapes and values are checked against the bundle by the handlers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine import PLANNERS
from service.guard import FLOAT32_MAX

PlannerName = Literal[PLANNERS]


class Body(BaseModel):
    # NaN and Inf are refused in every number field (msgpack can carry them, JSON cannot).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# A number the model takes as float32: a finite float64 beyond its range would become Inf.
Float32 = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class RewardWeightsTask(Body):
    kind: Literal["reward_weights"]
    weights: list[Float32]


class GoalTask(Body):
    kind: Literal["goal"]
    goal: list[Float32] = Field(
        description="as long as /model's default_task goal: the goal's dimensions of an "
        "observation, or a whole observation (a bundle with a learned geometry)"
    )


class RewardSamplesTask(Body):
    kind: Literal["reward_samples"]
    observations: Any = Field(description="[n, *observation shape] array")
    rewards: list[Float32]


class EmbeddingTask(Body):
    kind: Literal["embedding"]
    embedding: list[Float32]


Task = Annotated[
    RewardWeightsTask | GoalTask | RewardSamplesTask | EmbeddingTask, Field(discriminator="kind")
]


# The published bounds of the float knobs (/model's planner_limits). Each keeps the knob's
# float32 value away from 0 where the planner divides by it, and from overflow.
LIMITS = {
    "delta_phi_lr": {"ge": 1e-6, "lt": 1.0},
    "kl_coef": {"ge": 1e-3, "le": 1e3},
    "guidance_scale": {"ge": 0.0, "le": 100.0},
}
MAX_DEADLINE_MS = 600_000.0


class PlannerOverrides(Body):
    """Per-session or per-request planner settings, within the limits /model publishes."""

    planner: PlannerName | None = None
    adaptation_steps: int | None = Field(None, ge=0)
    n_adaptation_samples: int | None = Field(None, ge=1)
    delta_phi_lr: float | None = Field(None, ge=LIMITS["delta_phi_lr"]["ge"], lt=1.0)
    kl_coef: float | None = Field(None, ge=LIMITS["kl_coef"]["ge"], le=LIMITS["kl_coef"]["le"])
    guidance_scale: float | None = Field(None, ge=0.0, le=LIMITS["guidance_scale"]["le"])
    warm_start: bool | None = Field(
        None, description="each step's Δφ starts from the previous step's (until a reset)"
    )
    action_horizon: int | None = Field(
        None, ge=1, description="actions per step (an action chunk), among those published"
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
    deadline_ms: float | None = Field(None, gt=0, le=MAX_DEADLINE_MS)


class ActResponse(Body):
    session_id: str
    step: int
    action: list[float]
    actions: list[list[float]]  # [H, A]: the action chunk (planner action_horizon), action first
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
    deadline_ms: float | None = Field(None, gt=0, le=MAX_DEADLINE_MS)


class AdaptResponse(Body):
    session_id: str
    task_embedding: list[float]
    diagnostics: dict
    timing: dict


class SpaceInfo(Body):
    shape: list[int]
    dtype: str | None = None
    low: float | list[float] | None = Field(None, description="one bound for all, or one each")
    high: float | list[float] | None = None


class ModelInfo(Body):
    model_version: str
    env_id: str
    observation_space: SpaceInfo
    action_space: SpaceInfo
    default_task: dict
    planner_defaults: dict
    planner_limits: dict
    subgoals: dict | None = Field(
        None, description="the subgoal graph goal tasks aim through (nodes, lookahead), if any"
    )


class ErrorDetail(Body):
    code: str
    message: str
    detail: dict | None = None


class ErrorBody(Body):
    error: ErrorDetail
