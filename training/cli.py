"""The `worldplan` command: collect datasets, train and inspect model bundles."""

from __future__ import annotations

import argparse
import json
import sys
import time

from training.config import ConfigError


def cmd_collect(args: argparse.Namespace) -> None:
    from training.data import collect

    started = time.perf_counter()
    path = collect(
        args.env,
        args.episodes,
        args.out or f"data/{args.env}",
        seed=args.seed,
        skew=args.skew,
        max_episode_steps=args.max_episode_steps,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.episodes} episodes of {args.env} to {path} in "
        f"{time.perf_counter() - started:.1f} s"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from training.config import load_config, with_steps
    from training.train import CURVES_FILE, METRICS_FILE, train

    config = with_steps(load_config(args.config), args.steps)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data DIR or set data.path in the config")
    result = train(config, data, args.out, progress=not args.quiet)
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from}")
    print(f"trained {config.env} to step {result.step} in {result.wall_seconds:.1f} s")
    for stage, metrics in result.summary.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
        print(f"  {stage:<10} {shown}")
    print(f"bundle: {result.run_dir}  metrics: {METRICS_FILE}  curves: {CURVES_FILE}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from training.checkpoint import params_digest, restore_bundle

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldplan", description="World models trained offline, planning at decision time."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="collect a Minari dataset from a simulator")
    p.add_argument("env", help="environment name, e.g. pointmaze-umaze, pendulum, carracing")
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--out", help="directory the dataset is written to (default: data/ENV)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="pointmaze: fraction of free cells (the far end of the maze) kept free of starts "
        "and behaviour goals, so they are rarely visited",
    )
    p.add_argument("--max-episode-steps", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train V, M and C (staged) into a model bundle")
    p.add_argument("--config", required=True, help="YAML path or packaged name (pointmaze-umaze)")
    p.add_argument("--data", help="dataset directory or Minari id (overrides data.path)")
    p.add_argument("--steps", type=int, help="steps for every stage (overrides the config)")
    p.add_argument("--out", required=True, help="run directory; re-run on it to resume")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect", help="restore a bundle and print its metadata")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"worldplan: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
