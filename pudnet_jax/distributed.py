"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` from flags or the cluster.

JAX runs one Python process per host (TPU VM worker, SLURM task, ...); every process executes the
same program, and ``jax.devices()`` then lists the devices of all processes, so the one ``'data'``
mesh of ``parallel.make_mesh`` spans the whole cluster. This module decides whether and how to
call ``jax.distributed.initialize`` and must run before anything touches devices (the first
``jax.devices()``, ``jax.jit`` call or array creation fixes the backend for the process).

When it initialises (``mode='auto'``):

- explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` (flags of ``main``);
- a SLURM job step with more than one task (``srun``): JAX reads ``SLURM_*`` itself;
- an Open MPI launch with more than one rank (``mpirun``): JAX reads ``OMPI_*`` itself;
- ``JAX_COORDINATOR_ADDRESS`` set in the environment.

``mode='on'`` always calls ``jax.distributed.initialize()`` (Cloud TPU pod slices: JAX finds the
workers from the TPU metadata; ``launch/tpu_vm.sh`` passes it), ``mode='off'`` never does.
With one GPU per process under SLURM, JAX picks the GPU ``SLURM_LOCALID``; with one process per
node, export ``JAX_LOCAL_DEVICE_IDS=0,1,...`` so each process gets all of its node's GPUs.

On CPU, cross-process collectives use Gloo over TCP (``jax_cpu_collectives_implementation``),
which is what the two-process test on localhost runs.
"""

from __future__ import annotations

import os

import jax
import numpy as np

MODES = ("auto", "on", "off")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        return None


def cluster_environment() -> str | None:
    """Name of the multi-process launcher this process runs under, if any (no network calls)."""
    if "SLURM_STEP_NODELIST" in os.environ and "SLURM_PROCID" in os.environ and \
            (_int_env("SLURM_STEP_NUM_TASKS") or _int_env("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    return None


def should_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, mode: str = "auto") -> bool:
    """Whether ``initialize`` will call ``jax.distributed.initialize`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}; got {mode!r}")
    if mode == "off":
        return False
    if mode == "on":
        return True
    if num_processes is not None and num_processes <= 1 and not coordinator_address:
        return False
    explicit = coordinator_address or num_processes is not None or process_id is not None
    return bool(explicit) or cluster_environment() is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto",
               initialization_timeout: int = 300) -> bool:
    """Initialises ``jax.distributed`` when launched multi-process; returns whether it did.

    Args left ``None`` are filled in by JAX from the cluster environment (TPU metadata, SLURM,
    Open MPI, ``JAX_COORDINATOR_ADDRESS``). Given explicitly (e.g. processes started by hand or
    by a test on one machine), all three are needed: process 0 listens on
    ``coordinator_address`` (``host:port``), the others connect to it.
    """
    if not should_initialize(coordinator_address, num_processes, process_id, mode):
        return False
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and cluster_environment() is None and \
            any(v is None for v in explicit):
        raise ValueError("Without a cluster launcher, pass all of --coordinator_address, "
                         "--num_processes and --process_id (got "
                         f"{coordinator_address!r}, {num_processes!r}, {process_id!r}).")
    if jax.config.jax_cpu_collectives_implementation is None:  # older JAX: no CPU collectives
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=initialization_timeout)
    return True


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics, plots and results (checkpoints: all)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a collective: all processes must call).

    Used for decisions that change the control flow, such as stopping on SIGTERM: if only the
    signalled process left the loop, the others would wait forever in the next step's all-reduce.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def process_task_range(tasks_per_batch: int, devices=None) -> tuple[int, int]:
    """``(offset, count)``: the tasks of a batch this process feeds, for the ``'data'`` mesh.

    The mesh (``parallel.make_mesh``) lays ``devices`` (default ``jax.devices()``) along the
    task axis, ``tasks_per_batch / len(devices)`` tasks each, and
    ``jax.make_array_from_process_local_data`` maps a process's local rows onto the positions of
    its own devices. Those positions are one contiguous block (devices are listed process by
    process); this returns where it starts and how many tasks it holds.
    """
    if jax.process_count() == 1:
        return 0, tasks_per_batch
    devices = jax.devices() if devices is None else list(devices)
    if tasks_per_batch % len(devices):
        raise ValueError(f"tasks_per_batch={tasks_per_batch} must be a multiple of the "
                         f"{len(devices)} devices.")
    per_device = tasks_per_batch // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if not mine or mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError(f"Process {jax.process_index()}'s devices are not one contiguous block "
                         f"of the mesh (positions {mine}); per-process task slices need that.")
    return mine[0] * per_device, len(mine) * per_device
