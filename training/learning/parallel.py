"""Data-parallel training over the devices JAX sees.

A one-axis mesh ("data") over the devices; parameters, optimiser states and the dataset
are replicated on every device, and the rows each update samples are split over the
axis. XLA's partitioner then runs each device's share of the batch and adds the gradient
all-reduce: the same program as on one device, so the results are the same up to the
order of float additions.

Several hosts: `jax.distributed.initialize` first (train's --coordinator), then the mesh
spans every process's devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from training.config import Config, ConfigError

AXIS = "data"


def initialize_hosts(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-host run; every host then sees every host's devices."""
    jax.distributed.initialize(coordinator, num_processes, process_id)


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A mesh over the first `n_devices` devices (all of them by default)."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"--devices {n}: JAX sees {len(devices)} device(s) here")
    return Mesh(np.asarray(devices[:n]), (AXIS,))


def check_batches(config: Config, n_devices: int) -> None:
    """Every batch must split evenly over the devices."""
    sizes = {
        "train.batch_size": config.train.batch_size,
        "successor.batch_size": config.successor.batch_size,
    }
    for name, size in sizes.items():
        if size % n_devices:
            raise ConfigError(f"{name} {size} does not split over {n_devices} devices")


def replicated(tree, mesh: Mesh):
    """Every leaf on every device of the mesh (from host data, on every host)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def split_rows(rows: jax.Array) -> jax.Array:
    """A batch's row indices split over the data axis of the mesh in use, if any: what is
    gathered with them is then split too."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return rows
    return jax.lax.with_sharding_constraint(rows, PartitionSpec(AXIS))
