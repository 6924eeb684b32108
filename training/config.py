"""Training configuration: pydantic models read from YAML, so a bad value fails with its path."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"


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


class TrainConfig(Strict):
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(1e-3, gt=0.0, lt=1.0)
    vae_steps: int = Field(2000, ge=0)
    mdn_steps: int = Field(2000, ge=0)
    controller_steps: int = Field(1000, ge=0)
    checkpoint_every: int = Field(500, gt=0)
    log_every: int = Field(50, gt=0)
    max_grad_norm: float = Field(1.0, gt=0.0)

    @property
    def total_steps(self) -> int:
        return self.vae_steps + self.mdn_steps + self.controller_steps


class Config(Strict):
    env: str
    seed: int = 0
    data: DataConfig = DataConfig()
    vae: VAEConfig = VAEConfig()
    mdn: MDNConfig = MDNConfig()
    controller: ControllerConfig = ControllerConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _known_env(self) -> Config:
        from training.envs import ENVIRONMENTS

        if self.env not in ENVIRONMENTS:
            raise ValueError(f"unknown env {self.env!r}; known: {', '.join(sorted(ENVIRONMENTS))}")
        return self


class ConfigError(ValueError):
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


def parse_config(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path_or_name: str | Path) -> Config:
    path = resolve_config_path(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(raw, str(path))


def with_steps(config: Config, steps: int | None) -> Config:
    """`--steps N` sets every stage that trains at all to N steps."""
    if steps is None:
        return config
    if steps <= 0:
        raise ConfigError("--steps must be positive")
    train = config.train.model_copy(
        update={
            "vae_steps": steps if config.train.vae_steps else 0,
            "mdn_steps": steps if config.train.mdn_steps else 0,
            "controller_steps": steps if config.train.controller_steps else 0,
        }
    )
    return config.model_copy(update={"train": train})
