"""The training commands of `worldplan` (service/cli.py): collect datasets, train, evaluate
and inspect model bundles."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from training.config import ConfigError
from training.data.envs import MAZE_ACTION_NOISE, RARE_GOAL_PROB, SWING_UP_NOISE
from training.errors import UsageError

TASK_EPISODES = 10  # eval's episodes per planner in an environment without goals, unless told


def cmd_collect(args: argparse.Namespace) -> None:
    if args.env.startswith("ogbench/"):
        cmd_collect_ogbench(args)
        return
    from training.data.datasets import collect

    if args.episodes is None:
        raise UsageError("collect needs --episodes N (only ogbench/ datasets have a default)")
    if args.map_observations is not None:
        raise UsageError("--map-observations is for ogbench/ datasets")
    started = time.perf_counter()
    path = collect(
        args.env,
        args.episodes,
        args.out or f"data/{args.env}",
        seed=args.seed,
        skew=args.skew,
        noise=args.noise,
        waypoint_jitter=args.waypoint_jitter,
        rare_goal_prob=args.rare_goal_prob,
        swing_up=args.swing_up,
        max_episode_steps=args.max_episode_steps,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.episodes} episodes of {args.env} to {path} in "
        f"{time.perf_counter() - started:.1f} s"
    )


def cmd_collect_ogbench(args: argparse.Namespace) -> None:
    """`collect ogbench/NAME`: OGBench's own recipe for one of its datasets."""
    from training.data.ogbench_recipe import NPZ_DIR, collect_ogbench_dataset

    fixed = {
        "--skew": args.skew != 0.0,
        "--noise": args.noise is not None,
        "--waypoint-jitter": args.waypoint_jitter != 0.0,
        "--rare-goal-prob": args.rare_goal_prob != RARE_GOAL_PROB,
        "--swing-up": args.swing_up != 0.0,
        "--max-episode-steps": args.max_episode_steps is not None,
    }
    if given := [flag for flag, set_ in fixed.items() if set_]:
        raise UsageError(
            f"{', '.join(given)}: not for {args.env}, whose settings OGBench's recipe fixes"
        )
    started = time.perf_counter()
    path = collect_ogbench_dataset(
        args.env,
        args.out or f"data/{args.env}",
        seed=args.seed,
        episodes=args.episodes,
        workers=args.workers,
        progress=not args.quiet,
        map_seed=args.map_observations,
    )
    settings = json.loads((path / "worldplan.json").read_text())
    print(
        f"wrote {settings['episodes']} + {settings['val_episodes']} (validation) episodes of "
        f"{settings['dataset_name']} to {path} (Minari) and {path / NPZ_DIR} (OGBench npz) in "
        f"{time.perf_counter() - started:.1f} s"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from training.config import dataset_config, load_config, with_overrides, with_steps
    from training.learning.loop import CURVES_FILE, METRICS_FILE, train

    if args.data and args.data.endswith(".npz"):  # OGBench's own file: its Minari copy
        from training.data.ogbench_recipe import minari_copy

        args.data = str(minari_copy(args.data))
    if args.data:
        config = dataset_config(args.data, args.config)
    elif args.config:
        config = load_config(args.config)
    else:
        raise ConfigError(
            "pass --data DIR or FILE.npz (and --config, unless the dataset's own will do)"
        )
    config = with_steps(with_overrides(config, args.mode, args.tbptt, args.seed), args.steps)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data DIR or set data.path in the config")
    if args.coordinator:
        from training.learning.parallel import initialize_hosts

        initialize_hosts(args.coordinator, args.num_processes, args.process_id)
    result = train(config, data, args.out, progress=not args.quiet, devices=args.devices)
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from}")
    print(
        f"trained {config.env} ({config.train.mode}) to step {result.step} "
        f"in {result.wall_seconds:.1f} s"
    )
    for stage, metrics in result.summary.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
        print(f"  {stage:<10} {shown}")
    print(f"bundle: {result.run_dir}  metrics: {METRICS_FILE}  curves: {CURVES_FILE}")


def cmd_bench_train(args: argparse.Namespace) -> None:
    from training.analysis.bench_train import bench_train, parse_modes
    from training.config import load_config

    config = load_config(args.config)
    data = args.data or config.data.path
    modes = parse_modes(args.modes) if args.modes else None
    rows = bench_train(
        config, data, args.out, args.steps, args.repeats, args.devices, modes, not args.quiet
    )
    print((Path(args.out) / "bench_train.md").read_text())
    print(f"wrote bench_train.md and bench_train.json ({len(rows)} rows) to {args.out}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from training.learning.checkpoint import params_digest, restore_bundle

    bundle = restore_bundle(args.run_dir)
    report = {
        "run_dir": str(args.run_dir),
        "step": bundle.step,
        "env": bundle.env_id,
        "spaces": bundle.metadata["spaces"],
        "sizes": bundle.metadata["sizes"],
        "summary": bundle.metadata["summary"],
        "versions": bundle.metadata["versions"],
        "params_sha256": params_digest(bundle.params),
    }
    print(json.dumps(report, indent=2))


def episode_seed(args: argparse.Namespace) -> int:
    """--seed, or the suite's default: OGBench's own tasks take seeds tuning never uses."""
    from training.analysis.ogbench_suite import OFFICIAL_SEED

    if args.seed is not None:
        return args.seed
    suite = getattr(args, "suite", "goals")
    return {"ogbench": OFFICIAL_SEED, "ogbench-tuning": 1, "ogbench-reach": 1}.get(suite, 0)


def cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from training.analysis.evaluate import (
        EVAL_ORDER,
        compare_planners,
        compare_planners_on_task,
        comparison_table,
        has_goal_episodes,
        with_planning,
    )
    from training.data.envs import Shift
    from training.learning.checkpoint import restore_bundle

    bundle = with_planning(restore_bundle(args.run_dir), settings(args.planning))
    seed = episode_seed(args)
    shift = Shift.parse(args.shift)
    if shift and args.suite not in ("ogbench", "ogbench-tuning"):
        raise UsageError("--shift runs with --suite ogbench or ogbench-tuning")
    planners = list(EVAL_ORDER) if args.planner == "all" else args.planner.split(",")
    out = Path(args.out or Path(args.run_dir) / "eval")
    if args.suite == "ogbench-reach":
        from training.analysis.ogbench_suite import reach_on_suite

        reach_on_suite(bundle, planners, args.episodes or 40, seed, out, args.batch,
                       not args.quiet)  # fmt: skip
        print((out / "reach.md").read_text())
        print(f"wrote reach.json and reach.md to {out}")
        return
    if args.suite in ("ogbench", "ogbench-tuning"):
        from training.analysis.ogbench_suite import SubgoalSettings, compare_on_suite

        episodes = args.episodes or 50
        tuning = args.suite == "ogbench-tuning"
        subgoals = None
        if args.subgoals:
            subgoals = SubgoalSettings(args.subgoals, args.edge_steps, args.subgoal_edges,
                                       args.lookahead)  # fmt: skip
        compare_on_suite(bundle, planners, episodes, seed, out, args.batch, args.max_steps,
                         not args.quiet, tuning, subgoals, shift)  # fmt: skip
        print((out / "ogbench.md").read_text())
        print(f"wrote ogbench.json, ogbench.md and ogbench.png to {out}")
        return
    if not has_goal_episodes(bundle):  # any other environment: its own episodes, one task
        if args.rare_only:
            raise UsageError(f"--rare-only: only for maze bundles with goals, not {bundle.env_id}")
        compare_planners_on_task(
            bundle, planners, args.episodes or TASK_EPISODES, seed, out, args.max_steps,
            not args.quiet,
        )  # fmt: skip
        print((out / "eval.md").read_text())
        print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
        return
    results = compare_planners(
        bundle, planners, args.goals, args.episodes or 1, seed, out, args.max_steps,
        not args.quiet, args.rare_only,
    )  # fmt: skip
    print(comparison_table(bundle.env_id, results))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")


def cmd_ablate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from training.analysis.evaluate import ABLATION_GRID, ablate, ablation_table
    from training.learning.checkpoint import restore_bundle

    bundle = restore_bundle(args.run_dir)
    knobs = args.knobs.split(",") if args.knobs else list(ABLATION_GRID)
    unknown = sorted(set(knobs) - set(ABLATION_GRID))
    if unknown:
        raise UsageError(f"unknown knob(s) {unknown}; known: {', '.join(ABLATION_GRID)}")
    grid = {k: ABLATION_GRID[k] for k in knobs}
    out = Path(args.out or Path(args.run_dir) / "ablation")
    rows = ablate(bundle, args.goals, episode_seed(args), out, grid, args.max_steps, not args.quiet)
    print(ablation_table(bundle.env_id, rows))
    print(f"wrote ablation.json, ablation.md and plots to {out}")


def cmd_tails(args: argparse.Namespace) -> None:
    from dataclasses import asdict
    from pathlib import Path

    from training.analysis.evaluate import evaluation_goals
    from training.analysis.provenance import provenance, write_result
    from training.analysis.tails import outcome_tails, tails_table
    from training.learning.checkpoint import restore_bundle

    bundle = restore_bundle(args.run_dir)
    drawn = evaluation_goals(bundle, args.goals, args.seed)
    goals = list({(g.start_cell, g.goal_cell): g for g in drawn if g.rare}.values())
    tails = outcome_tails(bundle, args.data or bundle.metadata["dataset"], goals, args.samples)
    table = tails_table(bundle.env_id, tails, bundle.config.planning.n_samples, args.samples)
    print(table)
    if args.out:
        out = Path(args.out)
        origin = provenance(bundle, seed=args.seed, goals=args.goals, samples=args.samples,
                            data=args.data)  # fmt: skip
        write_result(out / "tails.json", {"tails": [asdict(t) for t in tails]}, origin)
        (out / "tails.md").write_text(table)
        print(f"wrote {out / 'tails.json'} and {out / 'tails.md'}")


def cmd_compare(args: argparse.Namespace) -> None:
    from training.analysis.compare import compare_runs

    compare_runs(
        args.run_dirs, args.out, args.planner, args.episodes, args.seed, args.max_steps,
        args.data, not args.quiet,
    )  # fmt: skip
    print((Path(args.out) / "compare.md").read_text())
    print(f"wrote compare.md, compare.json and compare.png to {args.out}")


def cmd_subgoals(args: argparse.Namespace) -> None:
    from pathlib import Path

    import numpy as np

    from training.analysis.ogbench_suite import SubgoalSettings, subgoals_for
    from training.learning.checkpoint import restore_bundle
    from training.planning.subgoals import SUBGOALS_FILE, save_data_graph

    settings = SubgoalSettings(args.nodes, args.edge_steps, "data", args.lookahead)
    bundle = restore_bundle(args.run_dir)
    if bundle.model.goal_decoder is None:
        raise UsageError(f"{args.run_dir} was trained without goal tasks: no subgoals to aim at")
    graph = subgoals_for(bundle, settings, data=args.data).graph
    path = Path(args.run_dir) / SUBGOALS_FILE
    save_data_graph(graph, args.lookahead, path)
    edges = int(np.isfinite(graph.steps).sum() - len(graph.positions))
    print(f"wrote {path}: {len(graph.positions)} nodes, {edges} edges of at most "
          f"{args.edge_steps} steps, lookahead {args.lookahead}; the service aims goal tasks "
          "through it")  # fmt: skip


def cmd_results_check(args: argparse.Namespace) -> None:
    from pathlib import Path

    from training.analysis.results_check import check_page

    checked, problems = check_page(Path(args.page), Path(args.root))
    if problems:
        raise UsageError(f"{len(problems)} of {checked} figures differ:\n" + "\n".join(problems))
    print(f"{checked} figures of {args.page} equal their result files")


def cmd_export(args: argparse.Namespace) -> None:
    from training.learning.checkpoint import export_bundle
    from training.planning.subgoals import SUBGOALS_FILE

    out = export_bundle(args.run_dir, args.out, beside=(SUBGOALS_FILE,))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {args.run_dir} to {out} ({size / 1e6:.1f} MB, params and metadata only)")


def add_episode_options(p: argparse.ArgumentParser, goals: int, out: str) -> None:
    """What eval and ablate share: the bundle, the goals and where results go."""
    p.add_argument("run_dir")
    p.add_argument("--goals", type=int, default=goals, help="held-out goals (half in rare cells)")
    p.add_argument(
        "--seed", type=int,
        help="seed of the goals and episodes (default 0; --suite ogbench: 1000, seeds that "
        "tuning never uses; the tuning suites: 1)",
    )  # fmt: skip
    p.add_argument("--max-steps", type=int, help="episode length (default: the env's)")
    p.add_argument("--out", help=f"output directory (default: RUN_DIR/{out})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings(items: list[str]) -> dict:
    """KEY=VALUE settings as a mapping, each value read as YAML reads it (10, 0.5, off)."""
    pairs = [item.partition("=") for item in items]
    for item, (key, eq, _) in zip(items, pairs, strict=True):
        if not (key.strip() and eq):
            raise UsageError(f"a setting is KEY=VALUE, not {item!r}")
    return {key.strip(): yaml.safe_load(value) for key, _, value in pairs}


# The failures a training command expects: printed as one line, exit status 2.
ERRORS = (UsageError, FileNotFoundError)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the training commands to the `worldplan` parser's subcommands."""
    p = sub.add_parser("collect", help="collect a Minari dataset from a simulator")
    p.add_argument(
        "env",
        help="environment name, e.g. pointmaze-umaze, pendulum, carracing; or an OGBench "
        "dataset made by OGBench's recipe, e.g. ogbench/pointmaze-medium-navigate-v0",
    )
    p.add_argument(
        "--episodes",
        type=int,
        help="episodes to collect (required, except for ogbench/ datasets: the published count)",
    )
    p.add_argument("--out", help="directory the dataset is written to (default: data/ENV)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int,
        help="ogbench/ manipulation datasets: processes sharing the episodes (default: every "
        "core); the files do not depend on it",
    )  # fmt: skip
    p.add_argument(
        "--map-observations", type=int, metavar="SEED",
        help="ogbench/ datasets: every observation through a random linear map drawn from "
        "SEED (rotated, scaled x10, 6 dimensions of small noise added); the evaluation's "
        "environment sees through the same map (the invariance test)",
    )  # fmt: skip
    p.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="pointmaze: fraction of free cells (the far end of the maze) kept free of starts "
        "and behaviour goals, so they are rarely visited",
    )
    p.add_argument(
        "--noise",
        type=float,
        help="standard deviation of the noise on the behaviour policy's actions: pointmaze "
        f"(default {MAZE_ACTION_NOISE}), pendulum's swing-ups (default {SWING_UP_NOISE})",
    )
    p.add_argument(
        "--waypoint-jitter",
        type=float,
        default=0.0,
        help="pointmaze: how far (in cells, per axis) each waypoint lies off its cell's "
        "centre, so the data covers cell edges and walls too",
    )
    p.add_argument(
        "--rare-goal-prob",
        type=float,
        default=RARE_GOAL_PROB,
        help="pointmaze with --skew: how often a behaviour goal lies in the rarely visited "
        "cells (default: %(default)s)",
    )
    p.add_argument(
        "--swing-up",
        type=float,
        default=0.0,
        help="pendulum: fraction of the episodes driven by a noisy swing-up instead of "
        "random torques",
    )
    p.add_argument("--max-episode-steps", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser(
        "train", help="train the world model and the successor-feature model into a bundle"
    )
    p.add_argument(
        "--config",
        help="YAML path or packaged name (pointmaze-umaze); default with --data: the packaged "
        "config of the dataset's environment, else `generic`",
    )
    p.add_argument(
        "--data",
        help="dataset directory, Minari id, or an OGBench file NAME.npz as OGBench publishes "
        "it (converted once into ~/.cache/worldplan/ogbench) (overrides data.path)",
    )
    p.add_argument("--steps", type=int, help="steps for every stage (overrides the config)")
    p.add_argument(
        "--mode",
        choices=("staged", "end_to_end", "alternating"),
        help="how V, M and C train (overrides train.mode)",
    )
    p.add_argument(
        "--tbptt", type=int, metavar="K", help="truncated BPTT in chunks of K steps (train.tbptt)"
    )
    p.add_argument("--seed", type=int, help="the run's seed (overrides the config's seed)")
    p.add_argument("--out", required=True, help="run directory; re-run on it to resume")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--devices", type=int, metavar="N", help="data-parallel over N devices (default: all)"
    )
    p.add_argument("--coordinator", metavar="HOST:PORT", help="several hosts: process 0's address")
    p.add_argument("--num-processes", type=int, default=1, help="several hosts: how many")
    p.add_argument("--process-id", type=int, default=0, help="several hosts: this one's index")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench-train", help="steps per second of each training mode's update")
    p.add_argument("--config", required=True, help="YAML path or packaged name")
    p.add_argument("--data", help="dataset directory (overrides data.path)")
    p.add_argument("--steps", type=int, default=20, help="timed updates per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timings; the median is reported")
    p.add_argument("--devices", type=int, metavar="N", help="data-parallel over N devices")
    p.add_argument("--modes", help="a comma list of the modes to time (default: all)")
    p.add_argument("--out", default="results/bench-train", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser(
        "eval",
        help="closed-loop episodes in the simulator: held-out goals of a maze, else the "
        "environment's own episodes on the bundle's default task",
    )
    add_episode_options(p, goals=30, out="eval")
    p.add_argument(
        "--planner",
        default="all",
        help="a planner, a comma list, or all; besides the five planners, "
        "random_shooting_matched (as many samples as fit in online adaptation's time) and "
        "online_adaptation_original (the original formulation's exact rule)",
    )
    p.add_argument(
        "--episodes",
        type=int,
        help="episodes per goal (default 1), or per task (--suite: 50); without goals, "
        f"episodes from the reset seeds SEED, SEED + 1, ... (default {TASK_EPISODES})",
    )
    p.add_argument(
        "--suite",
        choices=("goals", "ogbench", "ogbench-tuning", "ogbench-reach"),
        default="goals",
        help="goals: held-out goals of our mazes; ogbench: OGBench's five tasks of the "
        "environment the bundle was trained in (a maze, or the cubes); ogbench-tuning: five "
        "other tasks like them (drawn with --seed), to choose settings on; ogbench-reach: "
        "the planner alone, from a cell to one 1 or 2 cells away (--episodes pairs each)",
    )
    p.add_argument(
        "--batch", type=int, default=50, help="--suite ogbench: episodes run in lockstep"
    )
    p.add_argument(
        "--subgoals",
        type=int,
        default=0,
        metavar="K",
        help="--suite ogbench: aim through a subgoal graph over K states of the data (0: off)",
    )
    p.add_argument(
        "--edge-steps",
        type=float,
        default=50.0,
        help="--subgoals: the most steps an edge of the graph may stand for",
    )
    p.add_argument(
        "--subgoal-edges",
        choices=("value", "data"),
        default="value",
        help="--subgoals: edges from the ψ-model's values, or from the data's trajectories "
        "(which never cross a wall)",
    )
    p.add_argument(
        "--lookahead",
        type=float,
        default=25.0,
        help="--subgoal-edges data: aim at the node this many steps on along the path",
    )
    p.add_argument(
        "--rare-only", action="store_true", help="run only the goals drawn in rare cells"
    )
    p.add_argument(
        "--planning",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the planning section over the bundle's (repeatable), e.g. "
        "action_horizon=4, imagination_steps=10, imagination_value=off, n_samples=128",
    )
    p.add_argument(
        "--shift",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--suite ogbench: a robot whose drive differs from the data's, unknown to the "
        "planner (repeatable): rotate=DEGREES (the action's first two dimensions), gain=G, "
        "bias=B1,B2,..., delay=STEPS",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ablate", help="sweep the online-adaptation knobs one at a time")
    add_episode_options(p, goals=20, out="ablation")
    p.add_argument("--knobs", help="comma list of settings to sweep (default: all)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser(
        "tails", help="rare goals: the value of the data's futures against the psi-model's samples"
    )
    p.add_argument("run_dir")
    p.add_argument("--data", help="the bundle's dataset (default: the one it was trained on)")
    p.add_argument("--goals", type=int, default=20, help="goals drawn as eval draws them")
    p.add_argument("--seed", type=int, default=1, help="seed of the goals (default: the tuning 1)")
    p.add_argument("--samples", type=int, default=4096, help="psi samples per start cell")
    p.add_argument("--out", help="directory for tails.json and tails.md")
    p.set_defaults(func=cmd_tails)

    p = sub.add_parser(
        "compare", help="trained runs side by side: closed-loop return, recon, NLL, time"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--planner", default="controller", help="the planner every run is driven by")
    p.add_argument("--episodes", type=int, default=10, help="episodes (mazes: held-out goals)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes")
    p.add_argument("--max-steps", type=int, help="episode length (default: the env's)")
    p.add_argument("--data", help="dataset for recon and NLL (default: the first run's)")
    p.add_argument("--out", default="compare", help="output directory (default: compare)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "subgoals",
        help="save a subgoal graph over the bundle's data beside it: the service then aims "
        "goal tasks through it",
    )
    p.add_argument("run_dir")
    p.add_argument("--nodes", type=int, default=96, help="states of the data the graph spans")
    p.add_argument(
        "--edge-steps", type=int, default=20, help="the most steps of the data an edge stands for"
    )
    p.add_argument(
        "--lookahead", type=float, default=15.0, help="aim this many steps on along the path"
    )
    p.add_argument("--data", help="the dataset (default: the one the bundle was trained on)")
    p.set_defaults(func=cmd_subgoals)

    p = sub.add_parser("export", help="the latest step of a run as a serving bundle")
    p.add_argument("run_dir")
    p.add_argument("out", help="an empty or new directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="restore a bundle and print its metadata")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("results", help="the results page against its result files")
    checks = p.add_subparsers(dest="action", required=True)
    p = checks.add_parser(
        "check", help="every figure docs/results.md quotes equals the one in the file it names"
    )
    p.add_argument("--page", default="docs/results.md", help="the page (default: %(default)s)")
    p.add_argument(
        "--root", default=".", help="where the page's results/ paths start (default: here)"
    )
    p.set_defaults(func=cmd_results_check)
