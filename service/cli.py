"""The `worldplan` command: the training commands, plus `serve`."""

from __future__ import annotations

import argparse
import sys

from training import cli as training_cli


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    uvicorn.run(create_app(Settings()), host=args.host, port=args.port, log_level="info")


def cmd_drive(args: argparse.Namespace) -> None:
    import json

    from service.drive import run_drive

    print(json.dumps(run_drive(args), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser, sub = training_cli.new_parser()
    p = sub.add_parser(
        "serve",
        help="serve planning over HTTP (WORLDPLAN_MODEL_DIR, else the bundled pointmaze-umaze)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("drive", help="run a gymnasium environment through the service")
    p.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument("--env", default="pointmaze-umaze")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--start-cell", type=int, nargs=2, metavar=("ROW", "COL"))
    p.add_argument("--goal-cell", type=int, nargs=2, metavar=("ROW", "COL"))
    p.add_argument("--planner", help="override the session's planner")
    p.add_argument("--max-steps", type=int, help="episode length (default: the env's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=cmd_drive)
    return parser


def main(argv: list[str] | None = None) -> int:
    return training_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
