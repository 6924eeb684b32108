"""Figures a person would rather look at than read, written as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(metrics: list[dict], path: str | Path) -> Path:
    """One panel per training stage, every logged quantity against the global step."""
    stages = list(dict.fromkeys(m["stage"] for m in metrics))
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
