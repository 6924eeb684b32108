"""OGBench's npz layout, as its data scripts write it: NAME.npz (the training episodes),
NAME-val.npz (the validation episodes that follow them) and, beside them, NAME.json with
every setting of the collection. Both recipes (ogbench_recipe, ogbench_manip) write here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.data.datasets import ensure_free, staged


def concatenate(parts: list[dict[str, np.ndarray]], like: dict[str, np.ndarray]) -> dict:
    """The episodes' rows as one array per key, in `like`'s key order (empty arrays of the
    right shape for no episodes)."""
    if not parts:
        return {k: np.zeros((0, *v.shape[1:]), v.dtype) for k, v in like.items()}
    return {k: np.concatenate([p[k] for p in parts]) for k in like}


def write_split(
    out_dir: str | Path,
    name: str,
    episodes: list[dict[str, np.ndarray]],
    train_episodes: int,
    settings: dict[str, Any],
) -> Path:
    """The first `train_episodes` episodes as NAME.npz, the rest as NAME-val.npz, and the
    settings (with the rows of each and the files' names added) as NAME.json, in out_dir
    (absent or empty); the files appear only once all of them are written. Returns the
    training file."""
    out_dir = Path(out_dir).expanduser().resolve()
    ensure_free(out_dir)
    train, val = episodes[:train_episodes], episodes[train_episodes:]
    with staged(out_dir) as staging:
        for file_name, chunk in ((f"{name}.npz", train), (f"{name}-val.npz", val)):
            np.savez_compressed(staging / file_name, **concatenate(chunk, episodes[0]))
        settings = {
            **settings,
            "train_rows": sum(len(e["terminals"]) for e in train),
            "val_rows": sum(len(e["terminals"]) for e in val),
            "files": {"train": f"{name}.npz", "val": f"{name}-val.npz"},
        }
        (staging / f"{name}.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir / f"{name}.npz"
