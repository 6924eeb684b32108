"""The model bundle <-> an Orbax CheckpointManager directory.

Each saved step holds three items:
- `params`: the parameters of every model plus the arrays that go with them
  (observation normalisation), everything needed to act;
- `opt_state`: the optimiser states, needed only to resume training;
- `metadata`: JSON with the config, the environment and its spaces, sizes, versions,
  the step and a summary of the run.
Restoring a bundle needs nothing but the directory: the metadata says how to rebuild the
models, whose abstract parameters then guide the restore onto the local device.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from training.config import Config, parse_config
from training.models.networks import Networks, Spaces

ITEMS = ("params", "opt_state", "metadata")


def open_manager(run_dir: str | Path, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(run_dir).absolute(), options=options, item_names=ITEMS)


def library_versions() -> dict[str, str]:
    names = ("worldplan", "jax", "flax", "optax", "orbax-checkpoint", "gymnasium", "minari")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def save(
    manager: ocp.CheckpointManager, step: int, params: dict, opt_state, metadata: dict
) -> None:
    """Saves a step; `opt_state` None leaves it out (a serving bundle)."""
    items = {
        "params": ocp.args.StandardSave(params),
        "metadata": ocp.args.JsonSave({**metadata, "step": step}),
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def latest_step(run_dir: str | Path) -> int | None:
    if not Path(run_dir).exists():
        return None
    with open_manager(run_dir) as manager:
        return manager.latest_step()


def restore_item(manager: ocp.CheckpointManager, step: int, name: str, target=None):
    """One item of a saved step; `target` (a pytree of arrays or ShapeDtypeStructs) sets
    structure, dtypes and placement."""
    arg = ocp.args.JsonRestore() if name == "metadata" else ocp.args.StandardRestore(target)
    return manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]


@dataclass(frozen=True)
class Bundle:
    """A restored model: its parameters, the models they belong to, and the metadata."""

    params: dict
    metadata: dict
    config: Config
    model: Networks
    step: int

    @property
    def env_id(self) -> str:
        return self.metadata["env"]


def abstract_params(model: Networks) -> dict:
    """Shapes and dtypes of a bundle's `params` item, placed on the default device."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def restore_bundle(run_dir: str | Path, step: int | None = None) -> Bundle:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no model bundle at {run_dir}")
    with open_manager(run_dir) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{run_dir} holds no saved step")
        metadata = restore_item(manager, step, "metadata")
        config = parse_config(metadata["config"], f"{run_dir} metadata")
        spaces = Spaces.from_json(metadata["spaces"])
        model = Networks.build(config, spaces)
        params = restore_item(manager, step, "params", abstract_params(model))
    return Bundle(params=params, metadata=metadata, config=config, model=model, step=step)


def params_digest(params: dict) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes: equal digests, identical params."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def model_version(bundle: Bundle) -> str:
    """`env@step:digest`: the name the service answers with and every result records."""
    return f"{bundle.env_id}@{bundle.step}:{params_digest(bundle.params)[:12]}"


def export_bundle(run_dir: str | Path, out_dir: str | Path, beside: tuple[str, ...] = ()) -> Path:
    """The latest step of a run as a serving bundle: params and metadata, no optimiser
    state (which only resuming needs), about a third of the size; and the files named in
    `beside` that the run holds next to its steps (a subgoal graph)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    bundle = restore_bundle(run_dir)
    with open_manager(out_dir, max_to_keep=1) as manager:
        save(manager, bundle.step, bundle.params, None, bundle.metadata)
        manager.wait_until_finished()
    for name in beside:
        if (Path(run_dir) / name).exists():
            shutil.copy(Path(run_dir) / name, out_dir / name)
    return out_dir
