"""Figures a person would rather look at than read, written as PNG: training's and the
evaluation's (the service's are in service/clients/plots.py)."""

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


def _knob_panels(rows: list[dict], metrics: dict[str, str], title: str, path: Path) -> None:
    """One panel per knob: each metric of `metrics` (summary key -> label) against the value."""
    knobs = list(dict.fromkeys(r["knob"] for r in rows))
    fig, axes = plt.subplots(1, len(knobs), figsize=(4 * len(knobs), 3.4), squeeze=False)
    for ax, knob in zip(axes[0], knobs, strict=True):
        sub = [r for r in rows if r["knob"] == knob]
        for key, label in metrics.items():
            ys = [r["summary"][key] for r in sub]
            if all(y is None for y in ys):
                continue
            xs = [r["value"] if isinstance(r["value"], float | int) else str(r["value"])
                  for r in sub]  # fmt: skip
            ax.plot(xs, ys, "o-", label=label)
        if knob in ("delta_phi_lr", "kl_coef"):
            ax.set_xscale("log")
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_ablation(rows: list[dict], out_dir: str | Path, defaults: dict) -> list[Path]:
    """The ablation of online adaptation as four figures beside ablation.json."""
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in ("success.png", "objective.png", "value_gain.png")]
    paths += [out_dir / "cost.png", out_dir / "success_vs_cost.png"]
    _knob_panels(
        rows,
        {"success_rate": "all goals", "success_rare": "rare goals"},
        "success rate",
        paths[0],
    )
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in rows:
        if r["knob"] == "adaptation_steps":
            trace = r["summary"]["objective"]
            ax.plot(range(len(trace)), trace, "o-", ms=3, label=f"{r['value']} steps")
    ax.set_xlabel("adaptation step")
    ax.set_ylabel("objective - objective at Δφ = 0")
    ax.set_title("adaptation objective (mean over decisions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, paths[1])
    _knob_panels(rows, {"value_gain": "V after - V before"}, "value gain", paths[2])
    _knob_panels(rows, {"plan_ms_median": "median ms", "plan_ms_p90": "p90 ms"}, "cost", paths[3])
    plot_success_against_cost(rows, paths[4], defaults)
    return paths


def plot_success_against_cost(rows: list[dict], path: Path, defaults: dict) -> Path:
    """Rare-goal success (with its 95% interval) against the median ms per decision: one
    colour per setting swept, each point labelled with its value; the defaults, which every
    sweep passes through, as one black star."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = dict(zip(dict.fromkeys(r["knob"] for r in rows), plt.cm.tab10.colors, strict=False))
    shown = set()
    for r in rows:
        s = r["summary"]
        if s["success_rare"] is None:
            continue
        x, y = s["plan_ms_median"], s["success_rare"]
        low, high = s["interval_rare"]
        is_default = defaults.get(r["knob"], r["value"]) == r["value"]
        style = {"color": "k", "marker": "*", "ms": 10} if is_default else {
            "color": colours[r["knob"]], "marker": "o", "ms": 5}  # fmt: skip
        label = "defaults" if is_default else r["knob"]
        ax.errorbar(x, y, yerr=[[y - low], [high - y]], capsize=2, alpha=0.75, ls="none",
                    label=None if label in shown else label, **style)  # fmt: skip
        shown.add(label)
        if not is_default:
            ax.annotate(str(r["value"]), (x, y), fontsize=7, xytext=(4, 2),
                        textcoords="offset points", color=colours[r["knob"]])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks([t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if ax.get_xlim()[0]
                   <= t <= ax.get_xlim()[1]])  # fmt: skip
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ms per decision (median)")
    ax.set_ylabel("success on rarely visited goals (95% interval)")
    ax.set_title("online adaptation settings: success against cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
