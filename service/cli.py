"""The `worldplan` command: one parser, to which each package adds its commands (the
`worldplan.commands` entry points of pyproject.toml): the training ones (training/cli.py)
and the service's, here: `serve` (the server in service/) and the programs that use a
server from outside it (service/clients/)."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import httpx

from service.clients.client import ServiceError

# The service's commands' expected failures: one line and exit 2, not a traceback.
ERRORS = (ServiceError, httpx.HTTPError)


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from service.app import create_app
    from service.server import serve
    from service.settings import Settings

    # The service's own lines (restoring, compiling, ready) beside uvicorn's.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log = logging.getLogger("worldplan")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # printed once, here
    settings = Settings()
    serve(create_app(settings), args.host, args.port, settings.drain_s)


def cmd_openapi(args: argparse.Namespace) -> None:
    from service.app import create_app
    from service.openapi import document

    print(document(create_app()), end="")


def cmd_drive(args: argparse.Namespace) -> None:
    from service.clients.drive import episode_line, run_drive, summarise

    results = run_drive(
        args.url, args.env, args.episodes, args.seed, args.start_cell, args.goal_cell,
        args.planner, args.max_steps, args.api_key, args.task_id, args.transport,
    )  # fmt: skip
    for i, result in enumerate(results):
        print(episode_line(i, result))
    print(json.dumps(summarise(results), indent=2))


def cmd_loadtest(args: argparse.Namespace) -> None:
    import asyncio

    from service.clients.loadtest import run_loadtest, write_report
    from training.analysis.provenance import provenance, write_result

    if args.mix:
        from service.clients.soak import run_soak

        report = asyncio.run(
            run_soak(
                args.url, args.duration, args.api_key, args.good, args.bad, args.abandon,
                args.settle, args.max_body_bytes,
            )
        )  # fmt: skip
        origin = provenance(url=args.url, duration_s=args.duration, good=args.good,
                            bad=args.bad, abandon=args.abandon, settle_s=args.settle)  # fmt: skip
        path = write_result(Path(args.out) / "soak.json", report, origin)
        print(json.dumps(report, indent=2))
        print(f"wrote {path}")
        return

    report = asyncio.run(
        run_loadtest(
            args.url, args.sessions, args.duration, args.api_key, args.planner, args.transport
        )  # fmt: skip
    )
    json_path, png_path = write_report(report, args.out)
    shown = {k: v for k, v in report.items() if k != "latencies_ms"}
    print(json.dumps(shown, indent=2))
    print(f"wrote {json_path} and {png_path}")


def cmd_race(args: argparse.Namespace) -> None:
    import asyncio

    from service.clients.race import run_race
    from training.analysis.provenance import provenance, write_result

    report = asyncio.run(run_race(args.url_a, args.url_b, args.sessions, args.steps, args.api_key))
    print(json.dumps(report, indent=2))
    if args.out:
        origin = provenance(url_a=args.url_a, url_b=args.url_b, sessions=args.sessions,
                            steps=args.steps)  # fmt: skip
        print(f"wrote {write_result(Path(args.out) / 'race.json', report, origin)}")


def cmd_bench(args: argparse.Namespace) -> None:
    from service.benchmarks.bench import run_bench, write_bench

    sessions = [int(n) for n in args.sessions.split(",")]
    report = run_bench(args.model_dir, sessions, args.duration, args.repeats)
    json_path, png_path = write_bench(report, args.out)
    print(json.dumps(report, indent=2))
    print(f"wrote {json_path} and {png_path}")


def cmd_bench_start(args: argparse.Namespace) -> None:
    from service.benchmarks.startup import run_start_bench

    report = run_start_bench(args.model_dir, args.out)
    print(json.dumps(report, indent=2))
    print(f"wrote {Path(args.out) / 'start.json'} and the two servers' logs")


def cmd_bench_memory(args: argparse.Namespace) -> None:
    from service.benchmarks.memory import run_memory_bench, write_memory

    report = run_memory_bench(args.model_dir, args.sessions, args.redis_url)
    path = write_memory(report, args.out)
    print(json.dumps(report, indent=2))
    print(f"wrote {path}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the service's commands to the `worldplan` parser's subcommands."""
    p = sub.add_parser(
        "serve",
        help="serve planning over HTTP (WORLDPLAN_MODEL_DIR, else the bundled pointmaze-umaze)",
        description="Every other setting is a WORLDPLAN_* environment variable "
        "(service/settings.py; docs/api.md lists them): WORLDPLAN_MODEL_DIR, WORLDPLAN_API_KEY, "
        "WORLDPLAN_BATCH_SIZES, WORLDPLAN_SESSION_STORE, WORLDPLAN_REDIS_URL, ...",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "openapi", help="print the API's OpenAPI document (the one in openapi/openapi.json)"
    )
    p.set_defaults(func=cmd_openapi)

    p = sub.add_parser("drive", help="run a gymnasium environment through the service")
    p.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--env",
        help="a packaged name or any registered gymnasium id (default: the environment the "
        "served model was trained in, /model's env_id)",
    )
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--start-cell", type=int, nargs=2, metavar=("ROW", "COL"))
    p.add_argument("--goal-cell", type=int, nargs=2, metavar=("ROW", "COL"))
    p.add_argument("--task-id", type=int, help="OGBench's task of this number (its mazes only)")
    p.add_argument(
        "--transport", choices=("http", "stream"), default="http",
        help="one /act a step, or openpi-client on the policy stream (a robot's way)",
    )  # fmt: skip
    p.add_argument("--planner", help="override the session's planner")
    p.add_argument("--max-steps", type=int, help="episode length (default: the env's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=cmd_drive)

    p = sub.add_parser("loadtest", help="many sessions stepping at once, for a while")
    p.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--planner", help="override every session's planner")
    p.add_argument(
        "--transport", choices=("http", "stream"), default="http",
        help="each session over HTTP /act, or over the policy stream (a WebSocket each)",
    )  # fmt: skip
    p.add_argument("--out", default="loadtest", help="directory for loadtest.json and .png")
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--mix", action="store_true",
        help="soak: good, bad, retried and abandoned sessions (writes soak.json)",
    )  # fmt: skip
    p.add_argument("--good", type=int, default=4, help="--mix: good clients")
    p.add_argument("--bad", type=int, default=2, help="--mix: clients sending bad requests")
    p.add_argument("--abandon", type=int, default=2, help="--mix: clients that vanish")
    p.add_argument(
        "--settle", type=float, default=120.0,
        help="--mix: longest wait for abandoned sessions to expire, seconds",
    )  # fmt: skip
    p.add_argument(
        "--max-body-bytes", type=int, default=8 * 1024 * 1024,
        help="--mix: the server's WORLDPLAN_MAX_BODY_BYTES (an oversize request exceeds it)",
    )  # fmt: skip
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser(
        "race", help="two replicas answering the same steps of the same sessions at once"
    )
    p.add_argument("url_a", help="one replica, e.g. http://127.0.0.1:8001")
    p.add_argument("url_b", help="another replica sharing its session store")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--steps", type=int, default=100, help="steps per session")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", help="directory for race.json (default: print only)")
    p.set_defaults(func=cmd_race)

    p = sub.add_parser(
        "bench",
        help="in-process, HTTP and stream latency, throughput with and without batching",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--sessions", default="1,8,32,128", help="comma list of session counts")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load step")
    p.add_argument("--repeats", type=int, default=50, help="in-process decisions per planner")
    p.add_argument("--out", default="bench")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "bench-memory", help="memory per session in each store, with and without a Δφ"
    )
    p.add_argument("--model-dir", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--redis-url", default=None, help="also measure this Redis (its used_memory)")
    p.add_argument("--out", default="bench")
    p.set_defaults(func=cmd_bench_memory)

    p = sub.add_parser(
        "bench-start", help="seconds to ready of `worldplan serve`, cold and warm compilation cache"
    )
    p.add_argument("--model-dir", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--out", default="bench-start")
    p.set_defaults(func=cmd_bench_start)


def command_modules() -> list[ModuleType]:
    """The modules that add commands to `worldplan`, as the installed package lists them."""
    return [point.load() for point in entry_points(group="worldplan.commands")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldplan", description="World models trained offline, planning at decision time."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses and runs a command; expected failures print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except tuple(err for module in command_modules() for err in module.ERRORS) as err:
        print(f"worldplan: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
