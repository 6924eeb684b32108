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


def build_parser() -> argparse.ArgumentParser:
    parser, sub = training_cli.new_parser()
    p = sub.add_parser(
        "serve",
        help="serve planning over HTTP (WORLDPLAN_MODEL_DIR, else the bundled pointmaze-umaze)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    return training_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
