"""Where a result came from. Every results JSON is written by `write_result`, which adds a
`provenance` record: the command line, the commit and whether the tree was dirty, the
machine's cores, the bundle's `model_version` (the name the service answers with), the
dataset's settings and digest, and the settings the writer names (seeds, planners,
limits). A figure quoted in docs/results.md can then be traced to the code, the model
and the data that made it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from training.data.datasets import files_digest
from training.learning import checkpoint
from training.learning.checkpoint import Bundle

# The checkout the running code comes from (an editable install): its commit is the code's.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def git_state(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """The commit checked out at `root` and whether tracked files differ from it; both None
    where `root` is not the top of a git checkout (an installed wheel, an image)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # Only the project's own checkout: an installed copy inside another repository is not it.
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return {"commit": None, "dirty": None}
    commit = git("rev-parse", "HEAD")  # None in a repository with no commit yet
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit and commit.strip(),
        "dirty": None if status is None else bool(status.strip()),
    }


def bundle_provenance(bundle: Bundle) -> dict[str, Any]:
    """The model and the data it was trained on."""
    data = bundle.metadata.get("dataset")
    return {
        "model_version": checkpoint.model_version(bundle),
        "dataset": {
            "path": data,
            "settings": bundle.metadata.get("dataset_info"),
            "sha256": files_digest(data) if data else None,
        },
    }


def provenance(
    bundle: Bundle | None = None, model_version: str | None = None, **settings: Any
) -> dict[str, Any]:
    """The record every result carries: `settings` are the writer's own (seeds, planners,
    episode limits), by name. A bundle adds its model and data; a program that meets the
    model only through a server gives the `model_version` the server answered with."""
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **git_state(),
        "machine": {
            "cores": os.cpu_count(),
            # the cores this process may run on (taskset); not every system can say
            "cores_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        **({"model_version": model_version} if model_version else {}),
        **(bundle_provenance(bundle) if bundle is not None else {}),
        "settings": settings,
    }


def write_result(path: str | Path, record: dict[str, Any], origin: dict[str, Any]) -> Path:
    """`record` with its provenance (`origin`, from `provenance`) as JSON at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "provenance": origin}, indent=1))
    return path
