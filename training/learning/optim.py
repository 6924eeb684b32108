"""Optimisers as optax transforms: gradient clipping, Adam, and frozen parameter groups."""

from __future__ import annotations

import optax

from training.config import TrainConfig


def clipping_transforms(max_grad_norm: float, clip_value: float | None = None) -> list:
    """Per-value clipping of every gradient entry to [-clip_value, clip_value] (when set),
    then scaling of the whole gradient down to a global norm of at most max_grad_norm."""
    per_value = [] if clip_value is None else [optax.clip(clip_value)]
    return [*per_value, optax.clip_by_global_norm(max_grad_norm)]


def gradient_clipping(
    max_grad_norm: float, clip_value: float | None = None
) -> optax.GradientTransformation:
    return optax.chain(*clipping_transforms(max_grad_norm, clip_value))


def make_optimizer(train: TrainConfig, eps_root: float = 0.0) -> optax.GradientTransformation:
    """Clipping, then Adam. `eps_root` > 0 keeps Adam differentiable where a gradient is
    exactly zero, for meta-gradients through its updates."""
    return optax.chain(
        *clipping_transforms(train.max_grad_norm, train.clip_value),
        optax.adam(train.learning_rate, eps_root=eps_root),
    )


def with_frozen(
    tx: optax.GradientTransformation, groups: dict[str, str], trained: tuple[str, ...]
) -> optax.GradientTransformation:
    """`tx` on the parameter groups whose label (groups: top-level key -> label) is in
    `trained`; zero updates, and no optimiser state, for the others. Clipping inside `tx`
    then sees only the trained groups' gradients."""

    def labels(params: dict) -> dict:
        return {key: "train" if groups[key] in trained else "frozen" for key in params}

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
