"""Figures of the evaluation, written as PNG (training's loss curves are in
training/learning/curves.py, the service's in service/clients/plots.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.learning.curves import save_figure  # noqa: E402


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


def plot_suite(results: list[dict], published: dict, name: str, path: Path) -> Path:
    """Success per OGBench task and overall, one bar group per planner, with 95% intervals;
    the published baselines' overall success as dashed lines."""
    groups = ["all", *(str(t) for t in results[0]["summary"]["tasks"])]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(results)
    for k, r in enumerate(results):
        entries = [r["summary"], *r["summary"]["tasks"].values()]
        xs = [g + (k - (len(results) - 1) / 2) * width for g in range(len(groups))]
        rates = [100 * (e["success"] or 0.0) for e in entries]
        errors = [
            [100 * ((e["success"] or 0.0) - e["interval"][0]) for e in entries],
            [100 * (e["interval"][1] - (e["success"] or 0.0)) for e in entries],
        ]
        ax.bar(xs, rates, width, yerr=errors, capsize=2, label=r["label"])
    for (method, value), style in zip(published.items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, color="grey", ls=style, lw=1, label=f"{method} (published)")
    ax.set_xticks(range(len(groups)), ["all tasks", *(f"task {g}" for g in groups[1:])])
    ax.set_ylabel("success %")
    ax.set_ylim(0, 105)
    ax.set_title(name)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
