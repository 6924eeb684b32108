"""Minari datasets: collected locally with the behaviour policies, loaded as training sequences."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import minari
import numpy as np
from minari.dataset.minari_dataset import parse_dataset_id
from tqdm import tqdm

from training.data.envs import (
    RARE_GOAL_PROB,
    get_env_spec,
    make_behaviour_policy,
    make_env,
    packaged_name,
    rare_cells,
)
from training.errors import UsageError

NAMESPACE = "worldplan"
SIDECAR = "worldplan.json"
_METADATA = "metadata.json"


# ----- collection -----


def collect(
    env_name: str,
    episodes: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    skew: float = 0.0,
    noise: float | None = None,
    waypoint_jitter: float = 0.0,
    rare_goal_prob: float = RARE_GOAL_PROB,
    swing_up: float = 0.0,
    max_episode_steps: int | None = None,
    progress: bool = True,
    env_kwargs: dict[str, Any] | None = None,
    dataset_id: str | None = None,
) -> Path:
    """Roll out the behaviour policy for `episodes` episodes into a Minari dataset at out_dir.

    The same arguments always produce the same data. out_dir ends up holding Minari's `data/`
    folder and a `worldplan.json` sidecar describing how the data was made.
    """
    spec = get_env_spec(env_name)
    if episodes < 1:
        raise UsageError(f"episodes must be at least 1, got {episodes}")
    out_dir = Path(out_dir).expanduser().resolve()
    ensure_free(out_dir)
    steps = max_episode_steps or spec.default_episode_steps
    dataset_id = dataset_id or f"{NAMESPACE}/{env_name}-v0"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staging beside out_dir keeps the final move a rename on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with _minari_root(staging):
            env = make_env(env_name, steps, **(env_kwargs or {}))
            collector = minari.DataCollector(
                env, record_infos=False, data_format="hdf5", jpeg_encoding=False
            )
            try:
                rng = np.random.default_rng(seed)
                policy = make_behaviour_policy(
                    env_name, env, rng, skew, noise, waypoint_jitter, rare_goal_prob, swing_up
                )
                noise = getattr(policy, "noise", None)  # as the policy resolved it
                seeds = episode_seeds(seed, episodes)
                for episode_seed in tqdm(
                    seeds, desc=f"collect {env_name}", unit="ep", disable=not progress
                ):
                    _run_episode(collector, policy, episode_seed)
                with warnings.catch_warnings():
                    # Minari nags about optional metadata (author email, permalink, ...).
                    warnings.simplefilter("ignore", UserWarning)
                    collector.create_dataset(
                        dataset_id,
                        algorithm_name=f"worldplan behaviour policy for {env_name}",
                        author="worldplan",
                        description=f"{episodes} episodes of {env_name}, seed {seed}, skew {skew}, "
                        f"action noise {noise}, waypoint jitter {waypoint_jitter}, "
                        f"rare goal probability {rare_goal_prob}, swing-up fraction {swing_up}",
                    )
                sidecar = {
                    "env": env_name,
                    "seed": seed,
                    "skew": skew,
                    "noise": noise,
                    "waypoint_jitter": waypoint_jitter,
                    "rare_goal_prob": rare_goal_prob,
                    "swing_up": swing_up,
                    "episodes": episodes,
                    "max_episode_steps": steps,
                    "env_kwargs": env_kwargs or {},
                    **_maze_info(env, skew),
                }
            finally:
                collector.close()
        built = staging / dataset_id
        (built / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # ensure_free allowed only an empty directory
        built.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _maze_info(env: Any, skew: float) -> dict[str, Any]:
    """The rare cells of maze environments, so held-out goals can be chosen among them."""
    maze = getattr(env.unwrapped, "maze", None)
    if maze is None:
        return {}
    return {"rare_cells": [list(cell) for cell in rare_cells(maze.maze_map, skew)]}


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """Independent, reproducible reset seeds, one per episode."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(episodes)]


def _run_episode(env: Any, policy: Any, seed: int) -> None:
    obs, info = env.reset(seed=seed, options=policy.reset_options())
    policy.reset(obs, info)
    while True:
        obs, _, terminated, truncated, _ = env.step(policy.act(obs))
        if terminated or truncated:
            return


def files_digest(path: str | Path) -> str | None:
    """SHA-256 over a file's bytes, or over a folder's files (relative names and bytes, in
    sorted order); None where nothing is there (a dataset named by its Minari id)."""
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((str(p.relative_to(path)), p) for p in path.rglob("*") if p.is_file())
    else:
        return None
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A new folder beside `out_dir` to write into: renamed to `out_dir` (absent or empty)
    when the block ends, so that what it holds appears all at once; removed if it fails."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp's 0o700 is for the staging only
        if out_dir.exists():
            out_dir.rmdir()  # ensure_free allowed only an empty directory
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_free(out_dir: Path) -> None:
    """Refuses an out_dir that exists and is not an empty folder."""
    if _data_dir(out_dir) is not None:
        raise FileExistsError(
            f"{out_dir} already holds a Minari dataset; delete it or collect into another directory"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")


@contextlib.contextmanager
def _minari_root(path: Path) -> Iterator[None]:
    """Point Minari's dataset root (read from the environment) at path for a while."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


# ----- opening -----


def _data_dir(path: Path) -> Path | None:
    """Minari's data folder for a dataset directory or for the data folder itself."""
    for candidate in (path / "data", path):
        if (candidate / _METADATA).is_file():
            return candidate
    return None


def open_dataset(path_or_id: str | Path) -> minari.MinariDataset:
    """A Minari dataset from a directory, or from the id of a dataset in Minari's local store.

    Never downloads anything.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        data_dir = _data_dir(path)
        if data_dir is None:
            raise FileNotFoundError(f"{path} exists but holds no Minari dataset (no {_METADATA})")
        return minari.MinariDataset(data_dir)
    if isinstance(path_or_id, str) and _is_dataset_id(path_or_id):
        try:
            return minari.load_dataset(path_or_id, download=False)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(
        f"no Minari dataset at {path_or_id!r}: it is neither a dataset directory nor the id of a "
        "dataset in the local Minari store (datasets are never downloaded here)"
    )


def _is_dataset_id(text: str) -> bool:
    try:
        parse_dataset_id(text)
    except (ValueError, TypeError):  # TypeError: ids without a -vN version
        return False
    return True


def dataset_info(dataset: minari.MinariDataset) -> dict[str, Any] | None:
    """The worldplan sidecar of a dataset, or None for datasets made elsewhere."""
    data_dir = Path(dataset.storage.data_path)
    for candidate in (data_dir.parent / SIDECAR, data_dir / SIDECAR):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def dataset_env_name(dataset: minari.MinariDataset) -> str | None:
    """The environment a dataset was recorded in, as `get_env_spec` names it: from the
    sidecar when it names one; else the packaged environment of its recorded gymnasium id;
    else that id itself. None when the dataset records none."""
    info = dataset_info(dataset) or {}
    if info.get("env"):
        return info["env"]
    env_spec = dataset.env_spec
    if env_spec is None:
        return None
    return packaged_name(env_spec.id) or env_spec.id


# ----- training sequences -----


@dataclass
class Sequences:
    observations: np.ndarray  # [N, L+1, *obs_shape]: float32 vectors or uint8 pixels
    actions: np.ndarray  # [N, L, act_dim] float32
    rewards: np.ndarray  # [N, L] float32
    dones: np.ndarray  # [N, L] float32, 1.0 where the episode terminated (not truncated)
    mask: np.ndarray  # [N, L] float32, 1.0 for real steps, 0.0 for padding
    episode: np.ndarray  # [N] int64: the window's episode; an episode's windows are consecutive

    def __len__(self) -> int:
        return len(self.rewards)


def load_sequences(
    path_or_id: str | Path | minari.MinariDataset, seq_len: int, obs_key: str | None = "auto"
) -> Sequences:
    """Every episode cut into consecutive windows of seq_len transitions.

    Window k holds transitions k*L .. k*L+L-1 and observations k*L .. k*L+L; an episode's last
    window is zero-padded (mask 0). obs_key picks the array out of dict observations; "auto"
    takes "observation" when the observations are a dict.
    """
    if seq_len < 1:
        raise UsageError(f"seq_len must be at least 1, got {seq_len}")
    if isinstance(path_or_id, minari.MinariDataset):
        dataset = path_or_id
    else:
        dataset = open_dataset(path_or_id)
    windows = [
        episode_windows(
            episode_observations(ep.observations, obs_key),
            np.asarray(ep.actions),
            np.asarray(ep.rewards),
            np.asarray(ep.terminations),
            seq_len,
            episode=index,
        )
        for index, ep in enumerate(dataset.iterate_episodes())
    ]
    windows = [w for w in windows if len(w)]
    if not windows:
        raise UsageError(f"dataset {path_or_id!r} holds no steps")
    return Sequences(
        *(np.concatenate([getattr(w, f) for w in windows]) for f in Sequences.__dataclass_fields__)
    )


def episode_observations(observations: Any, obs_key: str | None = "auto") -> np.ndarray:
    """The observation array of one episode: uint8 pixels stay uint8, anything else float32."""
    if isinstance(observations, dict):
        key = "observation" if obs_key == "auto" else obs_key
        if key is None or key not in observations:
            raise UsageError(
                f"dict observations with keys {sorted(observations)} need an obs_key naming one"
            )
        observations = observations[key]
    elif obs_key not in ("auto", None):
        raise UsageError(f"obs_key {obs_key!r} given but the observations are not a dict")
    observations = np.asarray(observations)
    if observations.dtype == np.uint8:
        return observations
    return observations.astype(np.float32)


def episode_windows(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminations: np.ndarray,
    seq_len: int,
    episode: int = 0,
) -> Sequences:
    """One episode (T transitions, T+1 observations) as ceil(T / seq_len) padded windows."""
    steps = len(rewards)
    if len(observations) != steps + 1:
        raise ValueError(f"expected {steps + 1} observations for {steps} steps")
    count = -(-steps // seq_len)
    padded = count * seq_len
    actions = actions.reshape(steps, -1).astype(np.float32)

    def pad(values: np.ndarray, length: int) -> np.ndarray:
        out = np.zeros((length, *values.shape[1:]), dtype=values.dtype)
        out[: len(values)] = values
        return out

    obs = pad(observations, padded + 1)
    # Window k's observations overlap window k+1's first one, so gather with a stride.
    obs_index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return Sequences(
        observations=obs[obs_index],
        actions=pad(actions, padded).reshape(count, seq_len, -1),
        rewards=pad(rewards.astype(np.float32), padded).reshape(count, seq_len),
        dones=pad(terminations.astype(np.float32), padded).reshape(count, seq_len),
        mask=pad(np.ones(steps, np.float32), padded).reshape(count, seq_len),
        episode=np.full(count, episode, np.int64),
    )
