"""`worldplan compare`: trained runs side by side, on the same episodes and the same data.

For each run: the closed-loop return (and the success rate, where the environment reports
one) of one planner on episodes every run shares (a maze's held-out goals, else the reset
seeds of the bundle's own environment on its default task), V's reconstruction loss and
M's NLL on the same windows of the dataset, the world model's training time and steps per
second. Writes compare.md, compare.json and compare.png (recon and NLL over the training
steps, return per run).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from training.analysis.evaluate import (
    EpisodeRunner,
    check_environment,
    default_task_weights,
    evaluation_goals,
    fmt,
    has_goal_episodes,
    markdown_table,
    mean_interval,
    wilson_interval,
)
from training.analysis.plots import plt, save_figure
from training.analysis.provenance import provenance, write_result
from training.data.datasets import load_sequences
from training.errors import UsageError
from training.learning import joint
from training.learning.checkpoint import Bundle, model_version, restore_bundle
from training.learning.loop import read_metrics
from training.learning.stage_inputs import device_data


def run_label(bundle: Bundle) -> str:
    """The mode and the options that tell runs apart."""
    train, j = bundle.config.train, bundle.config.joint
    parts = [train.mode]
    if train.mode != "staged":
        parts.append(f"tbptt {train.tbptt}" if train.tbptt else "full BPTT")
        parts.append(j.policy_loss)
    if j.aux_losses:
        parts.append("aux")
    if j.meta_learning:
        parts.append("meta λ")
    if train.controller is not None:
        parts.append(f"C by {train.controller}")
    return ", ".join(parts)


def world_model_losses(bundle: Bundle, data_path: str, n_windows: int = 256, seed: int = 0):
    """Mean reconstruction and MDN NLL over the same windows (first `n_windows`) of the
    dataset, one fixed key: the same measurement whatever the mode trained."""
    seqs = load_sequences(data_path, bundle.config.data.seq_len)
    data = device_data(seqs)
    rows = np.arange(min(n_windows, len(seqs)))
    windows = joint.make_windows(data, seqs.episode, rows, bundle.config.controller.gamma)
    terms = jax.jit(lambda p, w, k: joint.joint_terms(bundle.model, p, w, k)[1])
    metrics = terms(bundle.params, windows, jax.random.key(seed))
    return {"recon": float(metrics["recon"]), "nll": float(metrics["nll"])}


def training_time(metrics: list[dict], world_stages: tuple[str, ...]) -> dict:
    """Wall seconds and steps until the world model was done (its last logged line)."""
    rows = [m for m in metrics if m["stage"] in world_stages]
    if not rows:
        return {"seconds": None, "steps": 0, "steps_per_second": None}
    seconds, steps = rows[-1]["wall_s"], rows[-1]["step"]
    return {"seconds": seconds, "steps": steps, "steps_per_second": steps / max(seconds, 1e-9)}


def vector_episode_returns(
    bundle: Bundle, planning, episodes: int, seed: int, max_steps, progress: bool = False
):
    """Closed-loop returns (and successes, where the environment reports them, else None)
    of the planner from `episodes` fixed reset seeds of the bundle's own environment, on
    the bundle's default task (environments without goals). A bundle whose environment
    observes another shape than its model is refused before the first step."""
    runner = EpisodeRunner(bundle, planning, max_steps)
    _, weights = default_task_weights(bundle)
    seeds = tqdm(range(seed, seed + episodes), disable=not progress, desc=planning.planner)
    results = [runner.run_task(s, weights) for s in seeds]
    runner.env.close()
    successes = [r.success for r in results]
    return [r.episode_return for r in results], None if None in successes else successes


def closed_loop(bundle: Bundle, planner: str, episodes: int, seed: int, max_steps, progress):
    planning = bundle.config.planning.model_copy(update={"planner": planner})
    if has_goal_episodes(bundle):  # a maze with goal tasks: the held-out goals eval draws
        runner = EpisodeRunner(bundle, planning, max_steps)
        goals = evaluation_goals(bundle, episodes, seed)
        results = [runner.run(g) for g in tqdm(goals, disable=not progress, desc=planner)]
        return [r.episode_return for r in results], [r.success for r in results]
    return vector_episode_returns(bundle, planning, episodes, seed, max_steps, progress)


def compare_runs(
    run_dirs: list[str],
    out: str | Path,
    planner: str = "controller",
    episodes: int = 10,
    seed: int = 0,
    max_steps: int | None = None,
    data: str | None = None,
    progress: bool = True,
) -> list[dict]:
    bundles = [restore_bundle(d) for d in run_dirs]
    envs = {b.env_id for b in bundles}
    if len(envs) > 1:
        raise UsageError(f"runs of different environments cannot share episodes: {sorted(envs)}")
    for bundle in bundles:  # each run's observations, before any episode
        check_environment(bundle)
    data = data or bundles[0].metadata["dataset"]
    rows = []
    for run_dir, bundle in zip(run_dirs, bundles, strict=True):
        returns, successes = closed_loop(bundle, planner, episodes, seed, max_steps, progress)
        metrics = read_metrics(Path(run_dir))
        rows.append(
            {
                "run": str(run_dir),
                "label": run_label(bundle),
                "env": bundle.env_id,
                "planner": planner,
                "returns": returns,
                "mean_return": float(np.mean(returns)),
                "std_return": float(np.std(returns)),
                "success_rate": None if successes is None else float(np.mean(successes)),
                **world_model_losses(bundle, data),
                "training": training_time(metrics, bundle.config.train.world_stages()),
                "curves": curves_of(metrics),
            }
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = by_configuration(rows)
    record = {"runs": rows, "by_configuration": groups}
    versions = {str(run): model_version(b) for run, b in zip(run_dirs, bundles, strict=True)}
    origin = provenance(planner=planner, episodes=episodes, seed=seed, max_steps=max_steps,
                        data=data, model_versions=versions)  # fmt: skip
    write_result(out / "compare.json", record, origin)
    (out / "compare.md").write_text(compare_table(rows, groups))
    plot_comparison(rows, out / "compare.png")
    return rows


def curves_of(metrics: list[dict]) -> dict:
    """recon and NLL against the step, from whichever stage logged them."""
    return {
        key: [
            [m["step"], m[key]]
            for m in metrics
            if key in m and m["stage"] in ("vae", "mdn", "joint")
        ]
        for key in ("recon", "nll")
    }


def success_cell(row: dict) -> str:
    """The success rate with its 95% Wilson interval, where the environment reports one."""
    if row["success_rate"] is None:
        return "–"
    n = len(row["returns"])
    low, high = wilson_interval(round(row["success_rate"] * n), n)
    return f"{row['success_rate']:.2f} [{low:.2f}, {high:.2f}]"


def compare_table(rows: list[dict], groups: list[dict]) -> str:
    header = ["run", "mode", "return", "success", "recon", "MDN NLL", "world-model s", "steps/s"]
    body = [
        [
            Path(r["run"]).name,
            r["label"],
            f"{r['mean_return']:.1f} ± {r['std_return']:.1f}",
            success_cell(r),
            fmt(r["recon"], ".3f"),
            fmt(r["nll"], ".3f"),
            fmt(r["training"]["seconds"], ".0f"),
            fmt(r["training"]["steps_per_second"], ".1f"),
        ]
        for r in rows
    ]
    title = f"{rows[0]['env']}, planner {rows[0]['planner']}, {len(rows[0]['returns'])} episodes"
    table = f"{title}\n\n{markdown_table(header, body)}"
    if any(g["runs"] > 1 for g in groups):
        table += "\n\n" + configuration_table(groups)
    return table


def by_configuration(rows: list[dict]) -> list[dict]:
    """Runs of the same configuration (label), several training seeds: each run's mean
    return, their mean and its 95% t interval over the runs, and the mean losses and time."""
    groups = []
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label]
        returns = [r["mean_return"] for r in runs]
        seconds = [r["training"]["seconds"] for r in runs if r["training"]["seconds"] is not None]
        groups.append(
            {
                "label": label,
                "runs": len(runs),
                "run_returns": returns,
                "mean_return": float(np.mean(returns)),
                "return_interval": mean_interval(returns),
                "recon": float(np.mean([r["recon"] for r in runs])),
                "nll": float(np.mean([r["nll"] for r in runs])),
                "seconds": float(np.mean(seconds)) if seconds else None,
            }
        )
    return groups


def configuration_table(groups: list[dict]) -> str:
    header = ["configuration", "runs", "return over runs [95% t]", "recon", "MDN NLL",
              "world-model s"]  # fmt: skip
    body = []
    for g in groups:
        interval = g["return_interval"]
        spread = "" if interval is None else f" [{interval[0]:.1f}, {interval[1]:.1f}]"
        losses = [fmt(g["recon"], ".3f"), fmt(g["nll"], ".3f"), fmt(g["seconds"], ".0f")]
        body.append([g["label"], str(g["runs"]), f"{g['mean_return']:.1f}{spread}", *losses])
    note = "Each run's return is its mean over the episodes; the interval is over the runs."
    return f"By configuration (training seeds):\n\n{markdown_table(header, body)}\n\n{note}"


def plot_comparison(rows: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for key, ax in zip(("recon", "nll"), axes[:2], strict=True):
        for r in rows:
            points = np.asarray(r["curves"][key]).reshape(-1, 2)
            ax.plot(points[:, 0], points[:, 1], label=Path(r["run"]).name)
        ax.set_title(f"{key} while training")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    names = [Path(r["run"]).name for r in rows]
    axes[2].bar(names, [r["mean_return"] for r in rows], yerr=[r["std_return"] for r in rows])
    for i, r in enumerate(rows):
        axes[2].plot([i] * len(r["returns"]), r["returns"], "k.", alpha=0.5)
    axes[2].set_title("closed-loop return")
    axes[2].tick_params(axis="x", rotation=30)
    return save_figure(fig, path)
