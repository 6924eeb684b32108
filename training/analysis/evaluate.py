"""Closed-loop evaluation in the simulator, in process, and the ablation of online adaptation.

An episode runs the whole decision the service runs (V encode -> plan -> read out -> M
step) at every step of a real episode. In a PointMaze bundle with goal tasks, an episode
goes from a given start cell to a given goal; goals are drawn with a fixed seed, half of
them in the cells the skewed dataset rarely visits, so every planner faces the same
held-out goals. In any other environment, every planner runs the same fixed reset seeds on
the bundle's default task (the reward weights fitted to its data's rewards).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from training.analysis.provenance import provenance, write_result
from training.config import PlanningConfig, planning_with
from training.data.envs import (
    bfs_path,
    check_observation_shape,
    free_cells,
    is_goal_maze,
    make_env,
    reported_success,
    select_observation,
)
from training.errors import UsageError
from training.learning.checkpoint import Bundle
from training.models.mdn_rnn import initial_state
from training.planning.planners import PLANNERS, Knobs, PlanShape, compile_decide, zero_delta
from training.planning.step_rule import NOTHING, after_act, starting_delta
from training.planning.tasks import default_task, task_weights

# The original formulation's online adaptation: gradient ascent through the sampler on all
# of the psi-model, its KL proxy, no warm start, no guard, its knob values.
ORIGINAL_ADAPTATION = {
    "planner": "online_adaptation",
    "adaptation": "gradient",
    "kl_estimator": "proxy",
    "adapt_params": "all",
    "support_guard": False,
    "warm_start": False,
    "delta_phi_lr": 1e-3,
    "adaptation_steps": 10,
    "kl_coef": 1.0,
    "n_adaptation_samples": 32,
}
# What `worldplan eval` can compare: the planners, and two variants that are baselines.
VARIANTS = {
    **{name: {"planner": name} for name in PLANNERS},
    "online_adaptation_original": ORIGINAL_ADAPTATION,
    # n_samples is set to what fits in online adaptation's time per decision
    "random_shooting_matched": {"planner": "random_shooting"},
}
# Each planner, followed by the baselines that vary it.
EVAL_ORDER = tuple(v for p in PLANNERS for v in VARIANTS if VARIANTS[v]["planner"] == p)
# One setting moved at a time off the bundle's defaults; `rule` names the adaptation rule
# and, for the gradient rule, its KL estimator.
ABLATION_GRID = {
    "rule": ["reweighted", "gradient/path", "gradient/proxy"],
    "adapt_params": ["head", "film", "all"],
    "warm_start": [True, False],
    "prior_source": ["base", "warm"],
    "support_guard": [True, False],
    "choice": ["max_value", "tilted_mode"],
    "kl_coef": [0.1, 0.3, 1.0, 3.0, 10.0],
    "adaptation_steps": [0, 2, 5, 10, 20],
    "delta_phi_lr": [1e-3, 3e-3, 1e-2, 3e-2],
    "n_adaptation_samples": [32, 64, 128, 256],
    "n_fit_samples": [16, 32, 64, 256],
}


def ablation_update(knob: str, value) -> dict:
    """The planning-config fields one ablation setting changes."""
    if knob == "rule":
        adaptation, _, estimator = str(value).partition("/")
        return {"adaptation": adaptation, **({"kl_estimator": estimator} if estimator else {})}
    return {knob: value}


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Student t interval of the mean of `values` (None with fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(np.std(values, ddof=1))
    half /= float(np.sqrt(n))
    return (mean - half, mean + half)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a success rate (None without trials)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # It holds p; at 0 or 1 rounding can leave an end a hair short of it.
    return (float(max(0.0, min(p, centre - half))), float(min(1.0, max(p, centre + half))))


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
        raise UsageError(f"goal evaluation needs a pointmaze bundle, not {bundle.env_id!r}")
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
    ess: float  # mean over steps of the effective sample size of the reweighted samples
    fallback_rate: float  # fraction of steps the support guard fell back to Δφ = 0
    prior_choice_rate: float  # fraction of steps whose outcome was one of the prior's samples
    objective: list[float]  # mean over steps of the objective trace, relative to its start


@dataclass
class Decisions:
    """What an episode's decisions measured, whatever its task."""

    success: bool | None  # None: the environment reports no success
    episode_return: float
    steps: int
    plan_ms: list[float]
    value_gain: float
    kl: float
    ess: float
    fallback_rate: float
    prior_choice_rate: float
    objective: list[float]


@dataclass
class TaskEpisodeResult(Decisions):
    """An episode from a reset seed on the bundle's default task (environments without
    goals)."""

    seed: int


class EpisodeRunner:
    """Compiles the decision once per planner configuration and runs episodes with it:
    goal-reaching episodes of a maze (`run`), or episodes of any environment on the
    bundle's default task (`run_task`)."""

    def __init__(self, bundle: Bundle, planning: PlanningConfig, max_steps: int | None = None):
        self.bundle, self.planning = bundle, planning
        self.shape, self.knobs = PlanShape.of(planning), Knobs.of(planning)
        kwargs = {"continuing_task": False} if is_goal_maze(bundle.env_id) else {}
        self.env = make_env(bundle.env_id, max_episode_steps=max_steps, **kwargs)
        # A bundle of another environment is refused here, before any decision or step.
        self.obs_key = check_observation_shape(
            self.env, bundle.env_id, bundle.model.spaces.obs_shape
        )
        self.decide = compile_decide(bundle.model, self.shape)

    def run(self, spec: GoalSpec) -> EpisodeResult:
        model, params = self.bundle.model, self.bundle.params
        options = {"reset_cell": np.array(spec.start_cell), "goal_cell": np.array(spec.goal_cell)}
        obs, _ = self.env.reset(seed=spec.seed, options=options)
        goal = np.asarray(obs["desired_goal"], np.float32)
        weights = jnp.asarray(task_weights(model, params, {"kind": "goal", "goal": goal}))
        decisions = self.decisions(obs, weights, spec.seed)
        return EpisodeResult(
            start_cell=spec.start_cell,
            goal_cell=spec.goal_cell,
            goal=goal.tolist(),
            rare=spec.rare,
            **{**asdict(decisions), "success": bool(decisions.success)},
        )

    def run_task(self, seed: int, weights: jax.Array) -> TaskEpisodeResult:
        """An episode from reset seed `seed` on the task of cumulant weights `weights`."""
        obs, _ = self.env.reset(seed=seed)
        return TaskEpisodeResult(**asdict(self.decisions(obs, weights, seed)), seed=seed)

    def decisions(self, obs, weights: jax.Array, seed: int) -> Decisions:
        """Decides and steps from the reset observation `obs` to the episode's end."""
        params = self.bundle.params
        adapts = self.shape.planner == "online_adaptation"
        zero = zero_delta(params, self.shape) if adapts else None
        carried, warm = NOTHING, self.planning.warm_start  # each episode starts without Δφ
        n_steps = self.planning.adaptation_steps if adapts else 0
        lstm = initial_state((), self.bundle.model.mdn.hidden)
        key = jax.random.key(seed)
        plan_ms, gains, kls, traces = [], [], [], []
        ess, fallbacks, chose_prior = [], [], []
        total, success, step = 0.0, None, 0
        while True:
            delta = starting_delta(carried, self.shape, warm, reset=False)
            delta = zero if delta is None else delta
            started = time.perf_counter()
            out = self.decide(
                params, lstm, jnp.asarray(select_observation(obs, self.obs_key), jnp.float32),
                weights, jax.random.fold_in(key, step), self.knobs, delta,
            )  # fmt: skip
            chunk = np.asarray(out.actions)  # waits for the result
            plan_ms.append(1000 * (time.perf_counter() - started))
            lstm = out.lstm
            carried = after_act(
                carried, self.shape, self.planning.warm_start, False, out.plan.delta
            )
            gains.append(float(out.plan.value_after - out.plan.value_before))
            kls.append(float(out.plan.kl))
            ess.append(float(out.plan.ess))
            fallbacks.append(bool(out.plan.fallback))
            chose_prior.append(bool(out.plan.chose_prior))
            trace = np.asarray(out.plan.objective)[: n_steps + 1]
            traces.append(trace - trace[0])
            for action in chunk:  # an action chunk runs whole, unless the episode ends
                obs, reward, terminated, truncated, info = self.env.step(action)
                total += float(reward)
                step += 1
                reported = reported_success(info)
                if reported is not None:
                    success = bool(success) or reported
                if terminated or truncated:
                    break
            if terminated or truncated:
                break
        return Decisions(
            success=success,
            episode_return=total,
            steps=step,
            plan_ms=[round(ms, 3) for ms in plan_ms],
            value_gain=float(np.mean(gains)),
            kl=float(np.mean(kls)),
            ess=float(np.mean(ess)),
            fallback_rate=float(np.mean(fallbacks)),
            prior_choice_rate=float(np.mean(chose_prior)),
            objective=np.mean(traces, axis=0).tolist(),
        )


def decision_means(episodes: list) -> dict:
    """What the decisions of episodes cost and report of their adaptation, on average."""
    plan_ms = np.concatenate([e.plan_ms for e in episodes])
    return {
        "plan_ms_median": float(np.median(plan_ms)),
        "plan_ms_p90": float(np.percentile(plan_ms, 90)),
        "value_gain": float(np.mean([e.value_gain for e in episodes])),
        "kl": float(np.mean([e.kl for e in episodes])),
        "ess": float(np.mean([e.ess for e in episodes])),
        "fallback_rate": float(np.mean([e.fallback_rate for e in episodes])),
        "prior_choice_rate": float(np.mean([e.prior_choice_rate for e in episodes])),
        "objective": np.mean([e.objective for e in episodes], axis=0).tolist(),
    }


def summarise_episodes(episodes: list[EpisodeResult]) -> dict:
    def rate(items):
        return float(np.mean([e.success for e in items])) if items else None

    def interval(items):
        return wilson_interval(sum(e.success for e in items), len(items))

    rare = [e for e in episodes if e.rare]
    common = [e for e in episodes if not e.rare]

    reached = [e.steps for e in episodes if e.success]
    return {
        "episodes": len(episodes),
        "episodes_rare": len(rare),
        "success_rate": rate(episodes),
        "success_rare": rate(rare),
        "success_common": rate(common),
        "interval": interval(episodes),
        "interval_rare": interval(rare),
        "interval_common": interval(common),
        "mean_return": float(np.mean([e.episode_return for e in episodes])),
        "mean_steps_to_goal": float(np.mean(reached)) if reached else None,
        **decision_means(episodes),
    }


def evaluate(
    bundle: Bundle,
    planning: PlanningConfig,
    goals: list[GoalSpec],
    max_steps: int | None = None,
    progress: bool = True,
    label: str | None = None,
) -> dict:
    label = label or planning.planner
    runner = EpisodeRunner(bundle, planning, max_steps)
    episodes = [
        runner.run(spec) for spec in tqdm(goals, desc=label, unit="ep", disable=not progress)
    ]
    return {
        "label": label,
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


def with_interval(summary: dict, which: str = "") -> str:
    """`0.75 [0.57, 0.87]`: a success rate and its 95% Wilson interval."""
    suffix = f"_{which}" if which else ""
    rate, interval = summary[f"success{suffix or '_rate'}"], summary[f"interval{suffix}"]
    if rate is None:
        return "–"
    return f"{rate:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def sample_counts(result: dict) -> str:
    """The psi samples a decision draws: online adaptation's prior samples + adapted ones."""
    planning = result["planning"]
    if result["planner"] == "controller":
        return "–"
    if result["planner"] == "online_adaptation":
        return f"{planning['n_adaptation_samples']} + {planning['n_samples']}"
    return str(planning["n_samples"])


def comparison_table(env_id: str, results: list[dict]) -> str:
    header = [f"{env_id} planner", "samples", "success [95% CI]", "rare goals", "common goals"]
    header += ["steps to goal", "plan ms (p50)"]
    rows = [
        [
            f"`{r['label']}`",
            sample_counts(r),
            with_interval(r["summary"]),
            with_interval(r["summary"], "rare"),
            with_interval(r["summary"], "common"),
            fmt(r["summary"]["mean_steps_to_goal"], ".0f"),
            fmt(r["summary"]["plan_ms_median"], ".1f"),
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def decision_ms(bundle: Bundle, planning: PlanningConfig, repeats: int = 30) -> float:
    """Median wall time of one whole decision of `planning` (compiled first), in ms."""
    model, params = bundle.model, bundle.params
    shape = PlanShape.of(planning)
    decide = compile_decide(model, shape)
    lstm = initial_state((), model.mdn.hidden)
    obs = jnp.asarray(params["normaliser"]["mean"])
    weights = jnp.asarray(task_weights(model, params, default_task(model, params)))
    delta = zero_delta(params, shape) if planning.planner == "online_adaptation" else None
    times = []
    for i in range(repeats + 1):  # the first call compiles
        started = time.perf_counter()
        out = decide(params, lstm, obs, weights, jax.random.key(i), Knobs.of(planning), delta)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times[1:]))


def matched_sample_count(bundle: Bundle, budget_ms: float, largest: int = 4096) -> int:
    """The most random-shooting samples (a power of two) whose decision takes no longer
    than `budget_ms`: random shooting given online adaptation's compute."""
    base = bundle.config.planning.model_copy(update={"planner": "random_shooting"})
    best, n = base.n_samples, base.n_samples
    while n <= largest:
        if decision_ms(bundle, base.model_copy(update={"n_samples": n})) > budget_ms:
            break
        best, n = n, 2 * n
    return best


def check_variants(planners: list[str]) -> None:
    """Refuses a planner name that is not one of VARIANTS."""
    unknown = sorted(set(planners) - set(VARIANTS))
    if unknown:
        raise UsageError(f"unknown planner(s) {unknown}; known: {', '.join(VARIANTS)}")


def with_planning(bundle: Bundle, update: dict) -> Bundle:
    """The bundle with the planning defaults `update` names changed (`eval --planning`)."""
    planning = planning_with(bundle.config.planning, update, "--planning")
    return replace(bundle, config=bundle.config.model_copy(update={"planning": planning}))


def variant_planning(bundle: Bundle, name: str) -> PlanningConfig:
    planning = bundle.config.planning.model_copy(update=VARIANTS[name])
    if name == "random_shooting_matched":
        adaptation = bundle.config.planning.model_copy(update={"planner": "online_adaptation"})
        budget_ms = decision_ms(bundle, adaptation)
        planning = planning.model_copy(
            update={"n_samples": matched_sample_count(bundle, budget_ms)}
        )
    return planning


def compare_planners(
    bundle: Bundle,
    planners: list[str],
    n_goals: int,
    episodes_per_goal: int,
    seed: int,
    out_dir: Path,
    max_steps: int | None = None,
    progress: bool = True,
    rare_only: bool = False,
) -> list[dict]:
    """Every planner (or variant) on the same goals (only those in rare cells when
    rare_only); writes eval.json and eval.md into out_dir. The compute-matched random
    shooting gets the samples that fit in online adaptation's time per decision, timed
    here on this machine."""
    check_variants(planners)
    drawn = [g for g in evaluation_goals(bundle, n_goals, seed) if g.rare or not rare_only]
    if not drawn:
        raise UsageError(f"none of the {n_goals} goals lies in a rare cell")
    goals = repeat_goals(drawn, episodes_per_goal)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"env": bundle.env_id, "seed": seed, "goals": [asdict(g) for g in goals]}
    origin = provenance(bundle, seed=seed, planners=planners, goals=n_goals,
                        episodes_per_goal=episodes_per_goal, rare_only=rare_only,
                        max_steps=max_steps)  # fmt: skip
    results = []
    for name in planners:
        planning = variant_planning(bundle, name)
        results.append(evaluate(bundle, planning, goals, max_steps, progress, label=name))
        # Written after every planner: a long evaluation that stops keeps what it measured.
        write_result(out_dir / "eval.json", {**record, "results": results}, origin)
    (out_dir / "eval.md").write_text(comparison_table(bundle.env_id, results))
    return results


# ----- environments without goals: fixed reset seeds, the bundle's default task -----

INTERVALS = {
    "return": "95% Student t interval of the mean return",
    "success": "95% Wilson score interval, where the environment reports success",
}


def has_goal_episodes(bundle: Bundle) -> bool:
    """Whether eval draws goal-reaching episodes (a PointMaze bundle with goal tasks), or
    runs the environment's own episodes on the bundle's default task."""
    return bundle.model.goal_decoder is not None and is_goal_maze(bundle.env_id)


def default_task_weights(bundle: Bundle) -> tuple[dict, jax.Array]:
    """The bundle's default task (the recorded reward weights, when it has them) and its
    cumulant weights."""
    model, params = bundle.model, bundle.params
    task = default_task(model, params, bundle.metadata.get("default_task"))
    return task, jnp.asarray(task_weights(model, params, task))


def check_environment(bundle: Bundle) -> None:
    """Refuses, before anything runs, a bundle whose environment's observations are not
    the shape its model was trained on."""
    env = make_env(bundle.env_id)
    try:
        check_observation_shape(env, bundle.env_id, bundle.model.spaces.obs_shape)
    finally:
        env.close()


def summarise_task_episodes(episodes: list[TaskEpisodeResult]) -> dict:
    returns = [e.episode_return for e in episodes]
    reported = [e.success for e in episodes if e.success is not None]
    return {
        "episodes": len(episodes),
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns, ddof=1)) if len(returns) > 1 else 0.0,
        "return_interval": mean_interval(returns),
        "success_rate": float(np.mean(reported)) if reported else None,
        "interval": wilson_interval(sum(reported), len(reported)),
        "mean_steps": float(np.mean([e.steps for e in episodes])),
        **decision_means(episodes),
    }


def evaluate_task(
    bundle: Bundle,
    planning: PlanningConfig,
    seeds: list[int],
    weights: jax.Array,
    max_steps: int | None = None,
    progress: bool = True,
    label: str | None = None,
) -> dict:
    label = label or planning.planner
    runner = EpisodeRunner(bundle, planning, max_steps)
    episodes = [
        runner.run_task(seed, weights)
        for seed in tqdm(seeds, desc=label, unit="ep", disable=not progress)
    ]
    runner.env.close()
    return {
        "label": label,
        "planner": planning.planner,
        "planning": planning.model_dump(mode="json"),
        "summary": summarise_task_episodes(episodes),
        "episodes": [asdict(e) for e in episodes],
    }


def compare_planners_on_task(
    bundle: Bundle,
    planners: list[str],
    episodes: int,
    seed: int,
    out_dir: Path,
    max_steps: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every planner (or variant) for `episodes` episodes from the reset seeds seed,
    seed + 1, ..., on the bundle's default task; writes eval.json and eval.md into out_dir."""
    check_variants(planners)
    if episodes < 1:
        raise UsageError(f"--episodes must be at least 1, got {episodes}")
    check_environment(bundle)
    task, weights = default_task_weights(bundle)
    seeds = [seed + i for i in range(episodes)]
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "env": bundle.env_id,
        "gym_id": bundle.metadata.get("gym_id"),
        "seed": seed,
        "reset_seeds": seeds,
        "task": task,
        "intervals": INTERVALS,
    }
    origin = provenance(bundle, seed=seed, reset_seeds=seeds, planners=planners,
                        max_steps=max_steps)  # fmt: skip
    results = []
    for name in planners:
        planning = variant_planning(bundle, name)
        results.append(evaluate_task(bundle, planning, seeds, weights, max_steps, progress, name))
        # Written after every planner: a long evaluation that stops keeps what it measured.
        write_result(out_dir / "eval.json", {**record, "results": results}, origin)
    (out_dir / "eval.md").write_text(task_report(bundle.env_id, results, seeds))
    return results


def with_mean_interval(summary: dict) -> str:
    """`-12.31 [-15.02, -9.60]`: a mean return and its 95% t interval."""
    interval = summary["return_interval"]
    if interval is None:
        return fmt(summary["mean_return"])
    return f"{summary['mean_return']:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def task_table(env_id: str, results: list[dict]) -> str:
    header = [f"{env_id} planner", "samples", "return [95% CI]", "success [95% CI]"]
    header += ["steps", "plan ms (p50)"]
    rows = [
        [
            f"`{r['label']}`",
            sample_counts(r),
            with_mean_interval(r["summary"]),
            with_interval(r["summary"]),
            fmt(r["summary"]["mean_steps"], ".0f"),
            fmt(r["summary"]["plan_ms_median"], ".1f"),
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def task_report(env_id: str, results: list[dict], seeds: list[int]) -> str:
    """The table and what it measured."""
    return (
        f"{task_table(env_id, results)}\n"
        f"{len(seeds)} episodes per planner from the reset seeds {seeds[0]} to {seeds[-1]}, on "
        "the bundle's default task. Return: the mean and its 95% Student t interval; success "
        "(where the environment reports it): the rate and its 95% Wilson interval.\n"
    )


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
    from training.analysis.plots import plot_ablation

    grid = grid or ABLATION_GRID
    goals = evaluation_goals(bundle, n_goals, seed)
    base = bundle.config.planning.model_copy(update={"planner": "online_adaptation"})
    out_dir.mkdir(parents=True, exist_ok=True)
    origin = provenance(bundle, seed=seed, goals=n_goals, grid=grid, max_steps=max_steps)
    rows = []
    # Every knob's row at its default value is the same run: measured once, shown in each.
    summaries: dict[str, dict] = {}
    for knob, values in grid.items():
        for value in values:
            planning = base.model_copy(update=ablation_update(knob, value))
            key = planning.model_dump_json()
            if key not in summaries:
                label = f"{knob}={value}"
                result = evaluate(bundle, planning, goals, max_steps, progress, label)
                summaries[key] = result["summary"]
            rows.append({"knob": knob, "value": value, "summary": summaries[key]})
            # Written after every setting: a long sweep that stops keeps what it measured.
            record = {"env": bundle.env_id, "seed": seed, "defaults": base.model_dump()}
            write_result(out_dir / "ablation.json", {**record, "rows": rows}, origin)
    (out_dir / "ablation.md").write_text(ablation_table(bundle.env_id, rows))
    plot_ablation(rows, out_dir, ablation_defaults(base))
    return rows


def ablation_defaults(planning: PlanningConfig) -> dict:
    """The value every swept setting has in `planning`, as the grid names it."""
    values = planning.model_dump()
    rule = planning.adaptation
    if rule == "gradient":
        rule += f"/{planning.kl_estimator}"
    return {**{knob: values.get(knob) for knob in ABLATION_GRID}, "rule": rule}


def ablation_table(env_id: str, rows: list[dict]) -> str:
    header = [f"{env_id}: setting", "value", "success [95% CI]", "rare goals", "value gain"]
    header += ["KL", "ESS", "fallbacks", "ms / decision"]
    cells = [
        [
            r["knob"],
            str(r["value"]),
            with_interval(r["summary"]),
            with_interval(r["summary"], "rare"),
            fmt(r["summary"]["value_gain"], ".3g"),
            fmt(r["summary"]["kl"], ".3g"),
            fmt(r["summary"]["ess"], ".3g"),
            fmt(r["summary"]["fallback_rate"], ".2f"),
            fmt(r["summary"]["plan_ms_median"], ".1f"),
        ]
        for r in rows
    ]
    return markdown_table(header, cells)
