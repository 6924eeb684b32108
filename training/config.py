"""Training configuration: pydantic models read from YAML, so a bad value fails with its path."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from training.errors import UsageError

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("vae", "mdn", "controller", "geometry", "psi", "readout", "value")
# The world-model stages of each mode, before the successor-feature stages: staged ends with
# C's own stage, the joint modes with one only when train.controller names a trainer.
WORLD_STAGES = {"staged": ("vae", "mdn", "controller"), "end_to_end": ("joint",),
                "alternating": ("joint",)}  # fmt: skip
SUCCESSOR_STAGES = ("geometry", "psi", "readout", "value")
# How the controller stage trains C, V and M held fixed: cloning the data's actions weighted
# by their returns, REINFORCE on the data's windows, the imagined return backpropagated
# through M, or CMA-ES on C's weights by its return in M's dream or in the real environment.
CONTROLLER_TRAINERS = ("imitation", "reinforce", "imagination", "cmaes_dream", "cmaes_env")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    path: str | None = Field(None, description="Minari dataset directory or id; --data overrides")
    seq_len: int = Field(32, gt=1, le=1000)


class VAEConfig(Strict):
    latent_dim: int = Field(32, gt=0, le=1024)
    hidden: tuple[int, ...] = Field((256, 256), min_length=1)
    kl_tolerance: float = Field(0.5, ge=0.0, description="free bits per latent dimension")
    beta: float = Field(1.0, ge=0.0)


class MDNConfig(Strict):
    hidden: int = Field(256, gt=0, le=4096)
    n_mixtures: int = Field(5, gt=0, le=64)
    temperature: float = Field(1.0, gt=0.0)
    reward_weight: float = Field(1.0, ge=0.0)
    done_weight: float = Field(1.0, ge=0.0)


class ControllerConfig(Strict):
    kind: Literal["linear", "mlp"] = "linear"
    hidden: int = Field(64, gt=0)
    return_temperature: float = Field(1.0, gt=0.0, description="return weighting of cloned actions")
    gamma: float = Field(0.99, gt=0.0, le=1.0)


class EvolutionConfig(Strict):
    """CMA-ES on C's weights (train.controller cmaes_dream or cmaes_env): one generation is
    one step of the controller stage, train.controller_steps generations in all."""

    population: int = Field(64, gt=1, le=4096, description="candidates per generation")
    sigma: float = Field(0.1, gt=0.0, description="CMA-ES's initial step size")
    rollouts: int = Field(
        16, gt=0, le=1024, description="episodes each candidate is scored on (the same for all)"
    )
    horizon: int = Field(200, gt=0, le=10_000, description="cmaes_dream: steps of each dream")
    temperature: float = Field(
        1.0, gt=0.0, description="cmaes_dream: M's sampling temperature in the dream"
    )
    max_episode_steps: int | None = Field(
        None, gt=0, description="cmaes_env: episode limit (the environment's when unset)"
    )


class SuccessorConfig(Strict):
    cumulant_input: Literal["observation", "latent"] = Field(
        "observation", description="phi reads the normalised observation, or V's mean latent"
    )
    feature_dims: tuple[int, ...] | None = Field(
        None, description="observation dimensions phi reads (all when unset)"
    )
    n_features: int = Field(64, gt=0, le=4096, description="random Fourier features (+1 bias)")
    lengthscale: float = Field(
        0.5, gt=0.0, description="of the Fourier features: normalised units, or steps (geometry)"
    )
    gamma: float = Field(0.99, gt=0.0, lt=1.0)
    hidden: int = Field(256, gt=0)
    depth: int = Field(3, gt=0)
    diffusion_steps: int = Field(1000, gt=1, description="noise levels of the VP schedule")
    target_sample_steps: int = Field(5, gt=0, description="DDIM steps for Bellman targets")
    mc_warmup_steps: int = Field(
        2000, ge=0, description="first psi steps fit the data's discounted sums, not Bellman"
    )
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    batch_size: int = Field(256, gt=0, description="batch of the psi, readout and value stages")
    history: bool = Field(
        True,
        description="whether the psi-model and the readout read M's history h beside z. Off "
        "where the observation is the whole state (OGBench's point mazes: the position): "
        "there a history only tells where the data's own agent was heading, and the "
        "planner's own past actions would read as that intent and narrow the futures it sees",
    )
    history_dropout: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="fraction of psi-training rows whose LSTM state is replaced by the initial "
        "one: the model then also learns the futures a state allows whatever its history",
    )


class ReadoutConfig(Strict):
    hidden: int = Field(256, gt=0)
    depth: int = Field(2, gt=0)
    target: Literal["bellman", "monte_carlo"] = Field(
        "bellman",
        description="the outcome paired with each dataset action: phi(s) + gamma psi' with psi' "
        "drawn from the psi-model at s', or the discounted sum of the cumulants that followed",
    )


class GeometryConfig(Strict):
    space: Literal["position", "steps"] = Field(
        "position",
        description="where goals, the cumulants and the subgoal graph measure: `position`, "
        "the observation's own dimensions (value.goal_dims, successor.feature_dims) in its "
        "own units; `steps`, a map of the whole observation learned from the data, in which "
        "distance counts the steps between states (the geometry stage), so that goal "
        "widths and every length of the graph are counted in steps",
    )
    dim: int = Field(16, gt=0, le=256, description="steps: the learned map's dimensions")
    hidden: int = Field(256, gt=0)
    depth: int = Field(3, gt=0)
    expectile: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="steps: the distance between two states of a window fits this expectile "
        "of the steps the data took between them (below a half: the quicker ways count)",
    )


class ValueConfig(Strict):
    goal_dims: tuple[int, ...] | None = Field(
        None, description="observation dimensions a goal names; unset: no goal tasks"
    )
    goal_sigma: float = Field(
        0.5, gt=0.0, description="width of the goal reward: goal units, or steps (geometry)"
    )
    goal_weights: Literal["decoder", "least_squares"] = Field(
        "decoder",
        description="a goal's cumulant weights: from a learned decoder of the goal, or by "
        "least squares of its reward on states of the data kept with the bundle (exact; the "
        "decoder underfits narrow goal rewards)",
    )
    hidden: int = Field(256, gt=0, description="the goal decoder's width")


# The planners' names, which training/planning/planners.py maps to its functions and every other
# module reads from there. Spelled here, below that module, because the config checks them.
PLANNERS = ("controller", "random_shooting", "guided_diffusion", "online_adaptation", "imagination")


MAX_ACTION_HORIZON = 16  # the longest action chunk a decision may return


class PlanningConfig(Strict):
    planner: Literal[PLANNERS] = "online_adaptation"
    action_horizon: int = Field(
        1,
        ge=1,
        le=MAX_ACTION_HORIZON,
        description="actions per decision: the first planned at the observation, each next "
        "one at the state M imagines after the one before (an action chunk)",
    )
    sample_steps: int = Field(10, gt=0, le=100, description="DDIM steps at decision time")
    n_samples: int = Field(
        32, gt=0, le=4096, description="psi samples to choose from (imagination: actions)"
    )
    imagination_steps: int = Field(
        20,
        ge=1,
        le=200,
        description="imagination: the steps of M each candidate action is held for, before "
        "the psi-model values the state M imagines at their end",
    )
    imagination_value: bool = Field(
        True,
        description="imagination: the psi-model values the last imagined state (off: an "
        "action is worth the rewards of the states it imagines alone)",
    )
    imagination_rounds: int = Field(
        1,
        ge=1,
        le=20,
        description="imagination: rounds of the cross-entropy method, each drawing n_samples "
        "actions about the best eighth of the round before (1: one uniform draw)",
    )
    guidance_scale: float = Field(1.0, ge=0.0)
    adaptation: Literal["reweighted", "gradient"] = Field(
        "reweighted",
        description="Δφ rule: fit the prior's samples weighted by exp(V / λ), or the original "
        "formulation's gradient ascent through the sampler",
    )
    kl_estimator: Literal["path", "proxy"] = Field(
        "path",
        description="gradient rule's KL: between the samplers' paths, or the original "
        "formulation's proxy 0.5 Σ Δφ² + 0.1 mean((V - V_prior)²)",
    )

    @field_validator("kl_estimator", mode="before")
    @classmethod
    def renamed_estimator(cls, value):
        """`seed`, the estimator's former name, is still read."""
        if value == "seed":
            warnings.warn(
                "kl_estimator: seed is now spelled kl_estimator: proxy",
                DeprecationWarning,
                stacklevel=2,
            )
            return "proxy"
        return value

    adapt_params: Literal["all", "film", "head"] = Field(
        "head", description="psi-network layers Δφ covers: all, FiLM and output, output"
    )
    support_guard: bool = Field(
        True, description="fall back to Δφ = 0 when the chosen outcome is off the prior's support"
    )
    warm_start: bool = Field(
        True, description="each step's Δφ starts from the previous step's (reset per episode)"
    )
    prior_source: Literal["base", "warm"] = Field(
        "base",
        description="reweighted rule: the prior's samples come from φ, or from φ + the warm "
        "start's Δφ, so that each decision's tilt compounds the ones before it",
    )
    choice: Literal["max_value", "tilted_mode"] = Field(
        "max_value",
        description="which sample is the chosen outcome: the one of highest V, or the mode of "
        "q* ∝ p exp(V / λ) among them (V / λ plus the log density of the prior's samples there)",
    )
    delta_phi_lr: float = Field(1e-3, gt=0.0, lt=1.0)
    adaptation_steps: int = Field(10, ge=0, le=1000)
    max_adaptation_steps: int = Field(
        200, gt=0, le=1000, description="most adaptation steps one compiled program takes"
    )
    kl_coef: float = Field(1.0, gt=0.0)
    n_adaptation_samples: int = Field(32, gt=0, le=4096)
    n_fit_samples: int | None = Field(
        None,
        gt=0,
        le=4096,
        description="the reweighted rule fits Δφ on this many of the prior's samples, those of "
        "largest weight (all of them when unset)",
    )

    @model_validator(mode="after")
    def _steps_within_maximum(self) -> PlanningConfig:
        if self.adaptation_steps > self.max_adaptation_steps:
            raise UsageError(
                f"adaptation_steps {self.adaptation_steps} exceeds max_adaptation_steps "
                f"{self.max_adaptation_steps}"
            )
        return self


class JointConfig(Strict):
    """The joint objective of the end_to_end and alternating modes:
    lambda_V (recon + KL) + lambda_M (MDN NLL + reward + done) + lambda_pi policy loss."""

    vae_weight: float = Field(1.0, ge=0.0, description="lambda_V0")
    mdn_weight: float = Field(1.0, ge=0.0, description="lambda_M")
    policy_weight: float = Field(0.1, ge=0.0, description="lambda_pi0")
    schedule: bool = Field(
        True, description="ramp lambda_pi up and lambda_V down over the joint steps"
    )
    policy_warmup_steps: int = Field(10_000, gt=0, description="lambda_pi reaches lambda_pi0")
    recon_decay_steps: int = Field(50_000, gt=0, description="lambda_V decays to its floor")
    recon_floor: float = Field(0.1, ge=0.0, le=1.0, description="lambda_V's floor / lambda_V0")
    policy_loss: Literal["reinforce", "imagination"] = Field(
        "reinforce",
        description="REINFORCE on the dataset's actions, or the imagined return in M",
    )
    imagination_horizon: int = Field(15, gt=0, le=1000, description="steps C acts in M")
    aux_losses: bool = Field(False, description="the value head on z and InfoNCE")
    value_head_weight: float = Field(0.1, ge=0.0)
    infonce_weight: float = Field(0.1, ge=0.0)
    infonce_negatives: int = Field(8, gt=0, le=1024)
    infonce_temperature: float = Field(0.1, gt=0.0)
    world_epochs: int = Field(5, ge=0, description="alternating: epochs of V and M, C frozen")
    controller_epochs: int = Field(10, ge=0, description="alternating: epochs of C, V, M frozen")
    joint_epochs: int = Field(1, ge=0, description="alternating: epochs of the joint fine-tune")
    epoch_steps: int = Field(20, gt=0, description="alternating: steps in one epoch")
    meta_learning: bool = Field(
        False, description="learn the lambdas by meta-gradients on held-out windows"
    )
    meta_inner_steps: int = Field(4, gt=0, le=100, description="inner updates per outer step")
    meta_lr: float = Field(1e-2, gt=0.0, lt=1.0)
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="episodes held out")

    @model_validator(mode="after")
    def _consistent(self) -> JointConfig:
        if self.world_epochs + self.controller_epochs + self.joint_epochs == 0:
            raise UsageError("the alternating epochs are all 0")
        if self.meta_learning and self.schedule:
            raise UsageError("meta_learning learns the weights: set schedule: false with it")
        return self


class TrainConfig(Strict):
    mode: Literal["staged", "end_to_end", "alternating"] = Field(
        "staged", description="V, M, C in stages, on one joint loss, or alternating"
    )
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(1e-3, gt=0.0, lt=1.0)
    vae_steps: int = Field(2000, ge=0)
    mdn_steps: int = Field(2000, ge=0)
    controller_steps: int = Field(1000, ge=0)
    geometry_steps: int = Field(0, ge=0, description="geometry.space steps: the map's steps")
    psi_steps: int = Field(4000, ge=0)
    readout_steps: int = Field(2000, ge=0)
    value_steps: int = Field(0, ge=0)
    joint_steps: int = Field(2000, ge=0, description="end_to_end and alternating: V, M, C")
    tbptt: int | None = Field(
        None, gt=0, description="truncated BPTT chunk length (unset: full BPTT over a window)"
    )
    controller: Literal[CONTROLLER_TRAINERS] | None = Field(
        None,
        description="the controller stage's trainer, V and M fixed (unset: imitation in "
        "staged mode, and no controller stage after a joint one)",
    )
    checkpoint_every: int = Field(500, gt=0)
    log_every: int = Field(50, gt=0)
    max_grad_norm: float = Field(1.0, gt=0.0, description="global-norm gradient clipping")
    clip_value: float | None = Field(None, gt=0.0, description="per-value gradient clipping")

    @property
    def controller_trainer(self) -> str | None:
        """How C's own stage trains it; None: there is no such stage."""
        if self.controller is None and self.mode == "staged":
            return "imitation"
        return self.controller

    def world_stages(self) -> tuple[str, ...]:
        """The world-model stages, in training order."""
        stages = WORLD_STAGES[self.mode]
        if self.mode != "staged" and self.controller is not None:
            stages += ("controller",)
        return stages

    def stage_steps(self) -> dict[str, int]:
        """Steps of each stage, in training order."""
        stages = self.world_stages() + SUCCESSOR_STAGES
        return {stage: getattr(self, f"{stage}_steps") for stage in stages}

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps().values())


class Config(Strict):
    env: str = Field(description="a packaged environment (pointmaze-umaze) or a gymnasium id")
    seed: int = 0
    data: DataConfig = DataConfig()
    vae: VAEConfig = VAEConfig()
    mdn: MDNConfig = MDNConfig()
    controller: ControllerConfig = ControllerConfig()
    successor: SuccessorConfig = SuccessorConfig()
    readout: ReadoutConfig = ReadoutConfig()
    geometry: GeometryConfig = GeometryConfig()
    value: ValueConfig = ValueConfig()
    planning: PlanningConfig = PlanningConfig()
    joint: JointConfig = JointConfig()
    evolution: EvolutionConfig = EvolutionConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        from training.data.envs import ENVIRONMENTS, get_env_spec

        try:
            get_env_spec(self.env)  # a packaged environment or a registered gymnasium id
        except ValueError:
            known = ", ".join(sorted(ENVIRONMENTS))
            raise UsageError(
                f"unknown env {self.env!r}; known: {known}, or a registered gymnasium id"
            ) from None
        steps = self.geometry.space == "steps"
        if self.train.value_steps and self.value.goal_dims is None and not steps:
            raise UsageError(
                "train.value_steps > 0 needs goal tasks: value.goal_dims (the goal's "
                "dimensions) or geometry.space: steps (goals are whole observations)"
            )
        if steps != (self.train.geometry_steps > 0):
            raise UsageError("geometry.space: steps and train.geometry_steps > 0 go together")
        if steps and (self.value.goal_dims is not None or self.successor.feature_dims
                      or self.successor.cumulant_input != "observation"):  # fmt: skip
            raise UsageError(
                "geometry.space: steps measures goals and cumulants in the learned map of the "
                "whole observation: leave value.goal_dims and successor.feature_dims unset "
                "and successor.cumulant_input at observation"
            )
        tbptt = self.train.tbptt
        if tbptt is not None and self.data.seq_len % tbptt:
            raise UsageError(f"train.tbptt {tbptt} must divide data.seq_len {self.data.seq_len}")
        if self.train.mode == "staged" and (tbptt is not None or self.joint.meta_learning):
            raise UsageError(
                "train.tbptt and joint.meta_learning need mode end_to_end (tbptt: or alternating)"
            )
        if self.train.mode == "alternating" and self.joint.meta_learning:
            raise UsageError("joint.meta_learning needs mode end_to_end, not alternating")
        return self


class ConfigError(UsageError):
    """A config file that cannot be used, with a message naming the file and the bad fields."""


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A path as given, or the name of a packaged config (`pointmaze-umaze`)."""
    path = Path(path_or_name)
    if path.exists():
        return path
    packaged = CONFIG_DIR / f"{path_or_name}.yaml"
    if packaged.exists():
        return packaged
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {path_or_name!r} not found (packaged configs: {known})")


def problems(err: ValidationError) -> str:
    """A validation error's bad fields and what is wrong with each, on one line."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors()
    )


def parse_config(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {problems(err)}") from None


def planning_with(planning: PlanningConfig, update: dict, source: str) -> PlanningConfig:
    """`planning` with the settings `update` names changed, checked as a config file's are."""
    try:
        return PlanningConfig.model_validate({**planning.model_dump(), **update})
    except ValidationError as err:
        raise ConfigError(f"{source}: {problems(err)}") from None


GENERIC = "generic"  # the packaged config of any vector dataset; its env is the dataset's


def read_config_file(path_or_name: str | Path) -> tuple[dict, Path]:
    """The mapping a config file holds, and the file's path."""
    path = resolve_config_path(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw, path


def load_config(path_or_name: str | Path, env: str | None = None) -> Config:
    """A config file; `env` fills in an environment the file leaves out (the generic one)."""
    raw, path = read_config_file(path_or_name)
    if env is not None:
        raw.setdefault("env", env)
    return parse_config(raw, str(path))


def dataset_config(data: str | Path, path_or_name: str | Path | None = None) -> Config:
    """The config to train on a dataset: the one named (its env, when it names none, the
    dataset's); else the packaged config of the dataset's environment; else the generic one.
    The dataset is opened only when the config leaves its environment to it."""
    from training.data.datasets import dataset_env_name, open_dataset

    if path_or_name is not None:
        raw, path = read_config_file(path_or_name)
        if "env" not in raw:
            raw["env"] = dataset_env_name(open_dataset(data))
        return parse_config(raw, str(path))
    env = dataset_env_name(open_dataset(data))
    if env is None:
        raise ConfigError(f"{data} records no environment: pass --config")
    packaged = CONFIG_DIR / f"{env}.yaml"
    return load_config(packaged if packaged.exists() else GENERIC, env)


def with_overrides(
    config: Config, mode: str | None = None, tbptt: int | None = None, seed: int | None = None
) -> Config:
    """`--mode`, `--tbptt K` and `--seed N` on the command line, validated as the YAML is."""
    if mode is None and tbptt is None and seed is None:
        return config
    raw = config.model_dump(mode="json")
    if seed is not None:
        raw["seed"] = seed
    if mode is not None:
        raw["train"]["mode"] = mode
    if tbptt is not None:
        raw["train"]["tbptt"] = tbptt
    return parse_config(raw, "command line")


def with_steps(config: Config, steps: int | None) -> Config:
    """`--steps N` sets every stage that trains at all to N steps."""
    if steps is None:
        return config
    if steps <= 0:
        raise ConfigError("--steps must be positive")
    train = config.train.model_copy(
        update={
            f"{stage}_steps": steps if n else 0 for stage, n in config.train.stage_steps().items()
        }
    )
    return config.model_copy(update={"train": train})
