"""Closed-loop evaluation in the simulator, in process, and the ablation of online adaptation.

An episode runs the whole decision the service runs (V encode -> plan -> read out -> M
step) at every step of a real PointMaze episode, from a given start cell to a given goal.
Goals are drawn with a fixed seed, half of them in the cells the skewed dataset rarely
visits, so every planner faces the same held-out goals.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from training.checkpoint import Bundle
from training.config import PlanningConfig
from training.envs import bfs_path, free_cells, make_env
from training.models.mdn_rnn import initial_state
from training.planners import PLANNERS, Knobs, PlanShape, compile_decide, zeros_like_psi
from training.tasks import task_weights

ABLATION_GRID = {
    "kl_coef": [0.1, 0.5, 1.0, 2.0, 5.0],
    "adaptation_steps": [5, 10, 15, 20],
    "delta_phi_lr": [1e-4, 5e-4, 1e-3, 5e-3],
    "n_adaptation_samples": [16, 32, 64],
}


@dataclass(frozen=True)
class GoalSpec:
    start_cell: tuple[int, int]
    goal_cell: tuple[int, int]
    rare: bool  # the goal lies in a cell the dataset rarely visits
    seed: int


def rare_cells_of(bundle: Bundle) -> list[tuple[int, int]]:
    info = bundle.metadata.get("dataset_info") or {}
    return [(int(r), int(c)) for r, c in info.get("rare_cells", [])]


def evaluation_goals(bundle: Bundle, n_goals: int, seed: int = 0) -> list[GoalSpec]:
    """n_goals (start, goal) pairs: half the goals in rare cells (when the dataset has
    any), starts in common cells at least two cells away from the goal."""
    if not bundle.env_id.startswith("pointmaze"):
        raise ValueError(f"goal evaluation needs a pointmaze bundle, not {bundle.env_id!r}")
    maze_map = make_env(bundle.env_id).unwrapped.maze.maze_map
    rare = rare_cells_of(bundle)
    common = [cell for cell in free_cells(maze_map) if cell not in rare]
    rng = np.random.default_rng(seed)
    goals = []
    for i in range(n_goals):
        in_rare = bool(rare) and i % 2 == 0
        cells = rare if in_rare else common
        goal = cells[rng.integers(len(cells))]
        starts = [c for c in common if len(bfs_path(maze_map, c, goal)) > 2] or common
        start = starts[rng.integers(len(starts))]
        goals.append(GoalSpec(start, goal, in_rare, int(rng.integers(2**31))))
    return goals


@dataclass
class EpisodeResult:
    start_cell: tuple[int, int]
    goal_cell: tuple[int, int]
    goal: list[float]
    rare: bool
    success: bool
    episode_return: float
    steps: int
    plan_ms: list[float]
    value_gain: float  # mean over steps of V after - V before adaptation
    kl: float  # mean over steps
    objective: list[float]  # mean over steps of the objective trace, relative to its start


class EpisodeRunner:
    """Compiles the decision once per planner configuration and runs episodes with it."""

    def __init__(self, bundle: Bundle, planning: PlanningConfig, max_steps: int | None = None):
        self.bundle, self.planning = bundle, planning
        self.shape, self.knobs = PlanShape.of(planning), Knobs.of(planning)
        self.decide = compile_decide(bundle.model, self.shape)
        self.env = make_env(bundle.env_id, max_episode_steps=max_steps, continuing_task=False)

    def run(self, spec: GoalSpec) -> EpisodeResult:
        model, params = self.bundle.model, self.bundle.params
        options = {"reset_cell": np.array(spec.start_cell), "goal_cell": np.array(spec.goal_cell)}
        obs, _ = self.env.reset(seed=spec.seed, options=options)
        goal = np.asarray(obs["desired_goal"], np.float32)
        weights = jnp.asarray(task_weights(model, params, {"kind": "goal", "goal": goal}))
        delta = zeros_like_psi(params) if self.shape.planner == "online_adaptation" else None
        lstm = initial_state((), model.mdn.hidden)
        key = jax.random.key(spec.seed)
        plan_ms, gains, kls, traces = [], [], [], []
        total, success, step = 0.0, False, 0
        while True:
            started = time.perf_counter()
            out = self.decide(
                params, lstm, jnp.asarray(obs["observation"], jnp.float32), weights,
                jax.random.fold_in(key, step), self.knobs, delta,
            )  # fmt: skip
            action = np.asarray(out.plan.action)  # waits for the result
            plan_ms.append(1000 * (time.perf_counter() - started))
            lstm = out.lstm
            gains.append(float(out.plan.value_after - out.plan.value_before))
            kls.append(float(out.plan.kl))
            trace = np.asarray(out.plan.objective)
            traces.append(trace - trace[0])
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            step += 1
            success = success or bool(info.get("success", False))
            if terminated or truncated:
                break
        return EpisodeResult(
            start_cell=spec.start_cell,
            goal_cell=spec.goal_cell,
            goal=goal.tolist(),
            rare=spec.rare,
            success=success,
            episode_return=total,
            steps=step,
            plan_ms=[round(ms, 3) for ms in plan_ms],
            value_gain=float(np.mean(gains)),
            kl=float(np.mean(kls)),
            objective=np.mean(traces, axis=0).tolist(),
        )


def summarise_episodes(episodes: list[EpisodeResult]) -> dict:
    def rate(items):
        return float(np.mean([e.success for e in items])) if items else None

    reached = [e.steps for e in episodes if e.success]
    plan_ms = np.concatenate([e.plan_ms for e in episodes])
    return {
        "episodes": len(episodes),
        "success_rate": rate(episodes),
        "success_rare": rate([e for e in episodes if e.rare]),
        "success_common": rate([e for e in episodes if not e.rare]),
        "mean_return": float(np.mean([e.episode_return for e in episodes])),
        "mean_steps_to_goal": float(np.mean(reached)) if reached else None,
        "plan_ms_median": float(np.median(plan_ms)),
        "plan_ms_p90": float(np.percentile(plan_ms, 90)),
        "value_gain": float(np.mean([e.value_gain for e in episodes])),
        "kl": float(np.mean([e.kl for e in episodes])),
        "objective": np.mean([e.objective for e in episodes], axis=0).tolist(),
    }


def evaluate(
    bundle: Bundle,
    planning: PlanningConfig,
    goals: list[GoalSpec],
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    runner = EpisodeRunner(bundle, planning, max_steps)
    episodes = [
        runner.run(spec)
        for spec in tqdm(goals, desc=planning.planner, unit="ep", disable=not progress)
    ]
    return {
        "planner": planning.planner,
        "planning": planning.model_dump(mode="json"),
        "summary": summarise_episodes(episodes),
        "episodes": [asdict(e) for e in episodes],
    }


def repeat_goals(goals: list[GoalSpec], episodes_per_goal: int) -> list[GoalSpec]:
    """Each goal from `episodes_per_goal` seeds (the start cell stays)."""
    return [
        GoalSpec(g.start_cell, g.goal_cell, g.rare, g.seed + k)
        for g in goals
        for k in range(episodes_per_goal)
    ]


def fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_table(env_id: str, results: list[dict]) -> str:
    header = [f"{env_id} planner", "success", "rare goals", "common goals", "return"]
    header += ["steps to goal", "plan ms (p50)"]
    rows = [
        [
            f"`{r['planner']}`",
            fmt(r["summary"]["success_rate"]),
            fmt(r["summary"]["success_rare"]),
            fmt(r["summary"]["success_common"]),
            fmt(r["summary"]["mean_return"]),
            fmt(r["summary"]["mean_steps_to_goal"], ".0f"),
            fmt(r["summary"]["plan_ms_median"], ".1f"),
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def compare_planners(
    bundle: Bundle,
    planners: list[str],
    n_goals: int,
    episodes_per_goal: int,
    seed: int,
    out_dir: Path,
    max_steps: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every planner on the same goals; writes eval.json and eval.md into out_dir."""
    unknown = sorted(set(planners) - set(PLANNERS))
    if unknown:
        raise ValueError(f"unknown planner(s) {unknown}; known: {', '.join(PLANNERS)}")
    goals = repeat_goals(evaluation_goals(bundle, n_goals, seed), episodes_per_goal)
    results = []
    for planner in planners:
        planning = bundle.config.planning.model_copy(update={"planner": planner})
        results.append(evaluate(bundle, planning, goals, max_steps, progress))
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"env": bundle.env_id, "seed": seed, "goals": [asdict(g) for g in goals]}
    (out_dir / "eval.json").write_text(json.dumps({**record, "results": results}, indent=1))
    (out_dir / "eval.md").write_text(comparison_table(bundle.env_id, results))
    return results


def ablate(
    bundle: Bundle,
    n_goals: int,
    seed: int,
    out_dir: Path,
    grid: dict[str, list] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Online adaptation with one knob at a time moved off the bundle's defaults."""
    from training.plots import plot_ablation

    grid = grid or ABLATION_GRID
    goals = evaluation_goals(bundle, n_goals, seed)
    base = bundle.config.planning.model_copy(update={"planner": "online_adaptation"})
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for knob, values in grid.items():
        for value in values:
            planning = base.model_copy(update={knob: value})
            result = evaluate(bundle, planning, goals, max_steps, progress)
            rows.append({"knob": knob, "value": value, "summary": result["summary"]})
            # Written after every setting: a long sweep that stops keeps what it measured.
            record = {"env": bundle.env_id, "seed": seed, "defaults": base.model_dump()}
            (out_dir / "ablation.json").write_text(json.dumps({**record, "rows": rows}, indent=1))
    (out_dir / "ablation.md").write_text(ablation_table(bundle.env_id, rows))
    plot_ablation(rows, out_dir)
    return rows


def ablation_table(env_id: str, rows: list[dict]) -> str:
    header = [f"{env_id}: knob", "value", "success", "rare goals", "value gain", "KL"]
    header.append("ms / decision")
    cells = [
        [
            r["knob"],
            f"{r['value']:g}",
            fmt(r["summary"]["success_rate"]),
            fmt(r["summary"]["success_rare"]),
            fmt(r["summary"]["value_gain"], ".3g"),
            fmt(r["summary"]["kl"], ".3g"),
            fmt(r["summary"]["plan_ms_median"], ".1f"),
        ]
        for r in rows
    ]
    return markdown_table(header, cells)
