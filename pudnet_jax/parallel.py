"""Data parallelism with one device mesh and ``jax.jit`` shardings.

We use a ``jax.sharding.Mesh`` with one axis ``'data'`` instead of ``jax.pmap``: pmap is in
maintenance mode in current JAX, while jit with ``NamedSharding`` is the supported path, compiles
one program for all devices (and all hosts), and lets XLA insert the gradient all-reduce itself.
The task axis of a batch is split over ``'data'``; hypernetwork params and optimiser state are
replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis ``'data'``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``'data'``, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(tasks_per_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if tasks_per_batch % n:
        raise ValueError(f"data.tasks_per_batch={tasks_per_batch} must be a multiple of the "
                         f"{n} devices of the mesh (each device takes an equal share of tasks).")


def shard_batch(batch, mesh: Mesh):
    """Host numpy batch (this process's share of tasks) -> global arrays sharded over ``'data'``.

    With one process the share is the whole batch; with several (``jax.distributed``) each process
    passes the tasks it sampled for its own devices.
    """
    sharding = data_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
