"""Training's own figures, written as PNG next to metrics.jsonl: the loss curves of every
stage and the meta-learned loss weights."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(metrics: list[dict], path: str | Path) -> Path:
    """One panel per training stage, every logged quantity against the global step."""
    stages = list(dict.fromkeys(m["stage"] for m in metrics))
    cols = min(3, len(stages))
    rows = -(-len(stages) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(stages) :]:
        ax.set_visible(False)
    for ax, stage in zip(axes.flat, stages, strict=False):  # spare panels stay hidden
        rows = [m for m in metrics if m["stage"] == stage]
        steps = [m["step"] for m in rows]
        keys = [k for k in rows[0] if k not in ("step", "stage", "wall_s")]
        for key in keys:
            ax.plot(steps, [m[key] for m in rows], label=key, lw=1.5 if key == "loss" else 1.0)
        if all(m[k] > 0 for m in rows for k in keys):
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_lambda_trajectory(metrics: list[dict], path: str | Path) -> Path:
    """The meta-learned loss weights (the metrics' lam_* keys) against the step."""
    rows = [m for m in metrics if any(k.startswith("lam_") for k in m)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in [k for k in rows[0] if k.startswith("lam_")]:
        ax.plot([m["step"] for m in rows], [m[key] for m in rows], label=key[4:])
    ax.set_xlabel("step")
    ax.set_ylabel("loss weight λ")
    ax.set_title("meta-learned loss weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
