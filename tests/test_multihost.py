"""Multi-process meta-training: two JAX processes on localhost train exactly like one.

The main test starts two processes of ``pudnet_jax.main`` (CPU, 2 fake devices each, Gloo
collectives over 127.0.0.1, ``--coordinator_address/--num_processes/--process_id``) and, at the
same time, one in-process run on this process's 4 fake devices (tests/conftest.py). Both
meta-train the same tiny config for two steps; the parameters restored from the two workdirs'
checkpoints must agree. That holds only if the global batch of tasks does not depend on the
process layout, the gradients are reduced across processes, and the multi-process Orbax save
is complete. About 80 s of CPU in all (three compilations of the train step), 50 s when the
persistent compilation cache of tests/conftest.py already holds them.
"""

import json
import os
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from pudnet_jax import checkpoints, data, distributed
from pudnet_jax.data import preprocess

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import _multihost_worker as worker  # noqa: E402

# Meta-training steps of both runs: a warm-up step at learning rate 0 (Adam's moments see the
# first batch) and one update. train.num_steps is one more, so no final evaluation runs.
STEPS = 2
_HAVE_OMNIGLOT = os.path.isfile(os.path.join(data.default_data_dir(), "omniglot.npz"))

# ------------------------------------------------------------------- start-up decisions


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_single_process_does_not_initialize(clean_env):
    assert distributed.cluster_environment() is None
    assert not distributed.should_initialize()
    assert not distributed.should_initialize(num_processes=1)
    assert not distributed.initialize()  # returns without touching jax.distributed
    assert not distributed.should_initialize(mode="off")
    assert distributed.should_initialize(mode="on")
    with pytest.raises(ValueError, match="mode"):
        distributed.should_initialize(mode="yes")


def test_flags_or_cluster_environment_initialize(clean_env):
    assert distributed.should_initialize("10.0.0.1:1234", 2, 0)
    with pytest.raises(ValueError, match="pass all of"):
        distributed.initialize("10.0.0.1:1234", None, None)
    # An sbatch script itself (no srun step) is not multi-process; an srun step of 2 tasks is.
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_PROCID", "0")
    assert distributed.cluster_environment() is None
    clean_env.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert distributed.cluster_environment() == "slurm" and distributed.should_initialize()
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert distributed.cluster_environment() is None
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.cluster_environment() == "ompi"


class _FakeDevice:
    def __init__(self, process_index):
        self.process_index = process_index


def test_process_task_range_follows_the_mesh(monkeypatch):
    assert distributed.process_task_range(6) == (0, 6)  # one process: everything, any count
    devices = [_FakeDevice(p) for p in (0, 0, 1, 1, 2, 2)]
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    for pid, expected in ((0, (0, 4)), (1, (4, 4)), (2, (8, 4))):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        assert distributed.process_task_range(12, devices) == expected
    with pytest.raises(ValueError, match="multiple"):
        distributed.process_task_range(10, devices)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(ValueError, match="contiguous"):
        distributed.process_task_range(6, [_FakeDevice(p) for p in (0, 1, 0)])


def _fake_pool(num_classes=6, per_class=8):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(num_classes * per_class, 8, 8, 3)).astype(np.float32)
    labels = np.repeat(np.arange(num_classes), per_class)
    prepared = preprocess.PreparedDataset(
        name="fake", split="train", images=images, labels=labels,
        class_names=tuple(map(str, range(num_classes))), extras={},
        mean=np.zeros(3, np.float32), std=np.ones(3, np.float32))
    return data.ClassPool(prepared, tuple(range(num_classes)))


def test_process_slices_concatenate_to_the_global_batch():
    pool = _fake_pool()
    kwargs = dict(way=3, shots=2, queries=2, seed=7, augment=True)
    whole = data.TaskSampler([pool], tasks_per_batch=4, **kwargs).batch(5)
    parts = [data.TaskSampler([pool], tasks_per_batch=2, task_offset=o, **kwargs).batch(5)
             for o in (0, 2)]
    chex.assert_trees_all_equal(whole, jax.tree.map(lambda *x: np.concatenate(x), *parts))


# ------------------------------------------------------------- two processes vs one


def _assert_same_training(params, reference, learning_rate):
    """``params`` == ``reference`` up to float noise after one Adam update.

    Runs that all-reduce the same gradients in another order agree to ~1e-8 almost everywhere.
    The exceptions are elements whose gradient is float noise (exactly 0 in exact arithmetic,
    e.g. a conv bias right before a per-channel normalisation): Adam divides the noise by its own
    size and moves them by a run-dependent fraction of the learning rate. There are a handful;
    we allow 0.1% of the elements. A wrong task layout or a missing all-reduce changes the
    gradient, hence nearly every element. (With more updates the noise elements change the
    next gradients a little and Adam spreads the difference: compare after one.)
    """
    flat = [np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
            for t in (jax.device_get(params), jax.device_get(reference))]
    diff = np.abs(flat[0] - flat[1])
    off = diff > 1e-6 + 1e-5 * np.abs(flat[1])
    assert off.mean() < 1e-3, f"{off.sum()} of {off.size} parameters differ (max {diff.max():.3g})"
    assert diff.max() <= 2 * learning_rate, diff.max()


def _compilation_cache_env() -> dict:
    """The session's persistent compilation cache (tests/conftest.py), for subprocesses: reruns
    read their compiled programs from disk."""
    cache = jax.config.jax_compilation_cache_dir
    return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"} if cache else {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    from pudnet_jax.train import train_and_evaluate

    assert jax.device_count() == 4 and jax.process_count() == 1
    cache_dir = str(tmp_path / "cache")
    multi_dir, single_dir = tmp_path / "two_processes", tmp_path / "one_process"
    port = _free_port()
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "PUDNET_STOP_AFTER": str(STEPS),
           **_compilation_cache_env()}
    workers = []
    for pid in range(2):
        log = open(tmp_path / f"process{pid}.log", "w")
        cmd = [sys.executable, os.path.join(TESTS, "_multihost_worker.py"),
               f"--workdir={multi_dir}", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={pid}", *worker.config_flags(cache_dir)]
        workers.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=worker.ROOT), log))
    try:
        # Meanwhile, the reference: one process, 4 devices, same config, same steps.
        config = worker.tiny_config(cache_dir)
        single = train_and_evaluate(config, str(single_dir), stop_after=STEPS)
        deadline = time.monotonic() + 420
        for proc, _ in workers:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc, log in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = [(tmp_path / f"process{pid}.log").read_text() for pid in range(2)]
    for pid, (proc, _) in enumerate(workers):
        assert proc.returncode == 0, f"process {pid} failed:\n{logs[pid][-3000:]}"
    assert "Done: train" in logs[0] and "Done: train" not in logs[1]  # process 0 prints

    assert single["stopped_at"] == STEPS
    params_1, info_1 = checkpoints.restore_hyper_params(str(single_dir), config)
    params_2, info_2 = checkpoints.restore_hyper_params(str(multi_dir), config)
    assert info_1 == info_2 == {"step": STEPS, "source": "latest"}
    _assert_same_training(params_2, params_1, config.train.learning_rate)

    # Only process 0 wrote metrics (one line per step, not two) and the config.
    lines = [json.loads(x) for x in open(multi_dir / "metrics.jsonl")]
    reference = [json.loads(x) for x in open(single_dir / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "accuracy", "learning_rate"):  # same tasks, same gradients
        np.testing.assert_allclose([r[key] for r in lines], [r[key] for r in reference],
                                   rtol=1e-5, err_msg=key)
    assert [r["learning_rate"] > 0 for r in reference] == [False, True]  # warm-up, then one update
    assert json.load(open(multi_dir / "config.json")) == json.load(open(single_dir / "config.json"))
