"""Reliability: bad input, faults and determinism, with nothing lost (docs/troubleshooting.md).

- Bad input at every public entry point (``make_predict_fn``, ``Predictor`` / ``load_predictor``,
  the CLI, the data loaders) raises ``ValueError`` / ``FileNotFoundError`` (or subclasses) whose
  message names the problem: never an XLA shape error, never NaN parameters.
- Faults: a meta-training process killed (SIGKILL) at a random step and restarted ends with
  bitwise the same state as an uninterrupted run; SIGTERM checkpoints before exiting; a checkpoint
  write interrupted midway leaves the previous one restorable; a non-finite loss stops the run
  with the step number and keeps the last good checkpoint.
- Determinism: predicted variables and the fixed evaluation task lists are bitwise identical
  across processes.
- Memory: the chunked predict path (bounded memory) agrees with the plain one.

Training runs are tiny (resnet8 target, narrow hypernetwork, one 5-way task per step on a fake
Omniglot written to a temporary directory) and run in child processes
(``tests/_train_subprocess.py``) so that they can be killed; they share the session's persistent
compilation cache, so only the first compiles.
"""

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import _train_subprocess as child
from pudnet_jax import checkpoints, data, train, train_step
from pudnet_jax.predict import init_hyper_params, load_predictor, make_predict_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO, "tests", "_train_subprocess.py")
STEPS = 10  # length of the reference run
slow = pytest.mark.skipif(os.environ.get("PUDNET_SLOW_TESTS") != "1",
                          reason="slow (minutes of CPU); run with PUDNET_SLOW_TESTS=1")


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """(data_dir holding a small omniglot.npz, cache_dir) for this module."""
    root = tmp_path_factory.mktemp("fake_data")
    child.write_fake_omniglot(str(root))
    cache = tmp_path_factory.mktemp("stats_cache")
    return str(root), str(cache)


@pytest.fixture(scope="module")
def config(fake_data):
    return child.tiny_train_config(*fake_data, tasks_per_batch=4)  # 4 fake devices in-process


@pytest.fixture(scope="module")
def hyper_params(config):
    return init_hyper_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def export(tmp_path_factory, config, hyper_params):
    """A params-only export of an (untrained) tiny predictor."""
    path = str(tmp_path_factory.mktemp("export"))
    checkpoints.export_predictor(hyper_params, config, path, {"step": 0})
    return path


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(workdir, fake_data, stop_after=STEPS, fault=()):
    return subprocess.Popen(
        [sys.executable, HELPER, "train", str(workdir), *fake_data, str(stop_after), *map(str, fault)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)


def _run(workdir, fake_data, stop_after=STEPS, fault=(), timeout=300):
    proc = _start(workdir, fake_data, stop_after, fault)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _steps_logged(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _wait_for_step(proc, workdir, step, timeout=300):
    start = time.monotonic()
    while _steps_logged(workdir) < step:
        assert proc.poll() is None, f"child exited early:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() - start < timeout, "child made no progress"
        time.sleep(0.02)


def _restore_latest(workdir, config):
    """(step, train state as NumPy) of the latest checkpoint, read-only."""
    manager = checkpoints._manager(os.path.join(workdir, "checkpoints"), 1, read_only=True)
    step = manager.latest_step()
    abstract = checkpoints._strict_abstract(
        jax.eval_shape(lambda: train_step.create_train_state(config, jax.random.key(0))))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    manager.close()
    return step, jax.device_get(restored.state)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _batch(n=20, k=5, size=32, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % k).astype(np.int32)
    images = rng.normal(size=(n, size, size, channels)).astype(np.float32)
    return {"image": images, "label": labels, "mask": np.ones(n, bool)}


def _raw_batch(n=20, k=5, size=28, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
            "label": (np.arange(n) % k).astype(np.int32)}


# ------------------------------------------------------------- bad input: make_predict_fn

def _with(batch, **changes):
    return {**batch, **changes}


_B = _batch()
PREDICT_FN_CASES = {
    "not a dict": (_B["image"], "Dataset batch must be"),
    "no labels": ({"image": _B["image"]}, "Dataset batch must be"),
    "rank 3 images": (_with(_B, image=_B["image"][..., 0]), "rank 4"),
    "2 channels": (_with(_B, image=_B["image"][..., :2]), "shape [N, 32, 32, 3]"),
    "4 channels": (_with(_B, image=np.concatenate([_B["image"], _B["image"][..., :1]], -1)),
                   "shape [N, 32, 32, 3]"),
    "wrong size": (_with(_B, image=_B["image"][:, :28, :28]), "shape [N, 32, 32, 3]"),
    "integer images": (_with(_B, image=_B["image"].astype(np.int32)), "dtype must be uint8 or floating"),
    "raw uint8 images": (_with(_B, image=np.zeros(_B["image"].shape, np.uint8)),
                         "'image' must be float (preprocessed and standardised target input)"),
    "NaN pixel": (_with(_B, image=np.where(np.arange(20)[:, None, None, None] == 3, np.nan, _B["image"])),
                  "NaN or infinite"),
    "inf pixel": (_with(_B, image=np.full_like(_B["image"], np.inf)), "NaN or infinite"),
    "float labels": (_with(_B, label=_B["label"].astype(np.float32)), "integer array"),
    "negative label": (_with(_B, label=_B["label"] - 1), "negative"),
    "label out of range": (_with(_B, label=_B["label"] + 1), "built for 5 classes"),
    "more classes than configured": (_with(_B, label=(np.arange(20) % 7).astype(np.int32)),
                                     "built for 5 classes"),
    "labels with a gap": (_with(_B, label=np.where(_B["label"] == 1, 2, _B["label"]).astype(np.int32)),
                          "have no example"),
    "label shape": (_with(_B, label=_B["label"][:10]), "'label' must have shape [N]"),
    "empty batch": ({"image": _B["image"][:0], "label": _B["label"][:0]}, "empty"),
    "fully masked": (_with(_B, mask=np.zeros(20, bool)), "masked out"),
    "mask not bool": (_with(_B, mask=np.ones(20, np.int32)), "'mask' must be boolean"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_FN_CASES))
def test_predict_fn_rejects_bad_batches(config, hyper_params, case):
    batch, message = PREDICT_FN_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        make_predict_fn(config)(hyper_params, batch)


def test_jitted_predict_rejects_bad_shapes_while_tracing(config, hyper_params):
    """Under jit the static checks (shapes, dtypes) still run, at trace time: no XLA error."""
    predict = jax.jit(make_predict_fn(config))
    for case in ("rank 3 images", "4 channels", "float labels", "empty batch", "mask not bool"):
        batch, message = PREDICT_FN_CASES[case]
        with pytest.raises(ValueError, match=re.escape(message)):
            predict(hyper_params, batch)


def test_valid_batch_with_padding_gives_finite_variables(config, hyper_params):
    batch = _with(_B, mask=np.arange(20) < 15)
    predict = jax.jit(make_predict_fn(config))
    variables = predict(hyper_params, batch)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    # Padding may hold anything, NaN and inf included (masked rows are not value-checked):
    # the prediction is that of the same batch with finite padding.
    poisoned = _with(batch, image=np.where((np.arange(20) >= 15)[:, None, None, None],
                                           np.nan, batch["image"]).astype(np.float32))
    poisoned["image"][19] = np.inf
    chex.assert_trees_all_close(predict(hyper_params, poisoned), variables, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- bad input: Predictor

_R = _raw_batch()
PREDICTOR_CASES = {
    "rank 3 images": (_with(_R, image=_R["image"][..., 0]), "rank 4"),
    "2 channels": (_with(_R, image=np.repeat(_R["image"], 2, -1)), "2 channels; expected 1"),
    "4 channels": (_with(_R, image=np.repeat(_R["image"], 4, -1)), "4 channels; expected 1"),
    "NaN pixel": (_with(_R, image=np.where(np.arange(20)[:, None, None, None] == 0, np.nan,
                                           _R["image"] / 255.0)), "NaN or infinite"),
    "float images in 0..255": (_with(_R, image=_R["image"].astype(np.float32)), "in [0, 1]"),
    "float labels": (_with(_R, label=_R["label"] + 0.0), "integer array"),
    "negative label": (_with(_R, label=_R["label"] - 3), "negative"),
    "labels with a gap": (_with(_R, label=_R["label"] * 2), "have no example"),
    "empty batch": ({"image": _R["image"][:0], "label": _R["label"][:0]}, "empty"),
    "0x0 images": (_with(_R, image=np.zeros((20, 0, 0, 1), np.uint8)), "at least 1x1 pixels"),
    "fully masked": (_with(_R, mask=np.zeros(20, bool)), "masked out"),
    "images as strings": (_with(_R, image=np.full((20, 28, 28, 1), "x")), "dtype must be uint8"),
    "images as lists of ints": (_with(_R, image=_R["image"].tolist()), "dtype must be uint8 or floating; got int64"),
}


@pytest.mark.parametrize("case", sorted(PREDICTOR_CASES))
def test_predictor_rejects_bad_batches(export, case):
    predictor = load_predictor(export)
    batch, message = PREDICTOR_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        predictor.predict(batch)


def test_predictor_accepts_lists_any_size_and_more_classes_than_configured(export, config):
    """Raw grayscale 28x28 images given as nested lists of floats, 7 classes (more than
    config.model.num_classes: the Predictor builds its head per dataset, there is no maximum)."""
    predictor = load_predictor(export)
    batch = _raw_batch(n=21, k=7)
    assert 7 > config.model.num_classes
    images = (batch["image"] / 255.0).tolist()  # floats in [0, 1]
    variables = predictor.predict({"image": images, "label": batch["label"].tolist()})
    assert variables["params"]["Dense_0"]["bias"].shape == (7,)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    # The numbers: the pixels standardised by the valid rows' per-channel statistics, then the
    # pure predict; apply standardises new images the same way, in chunks of batch_size.
    from pudnet_jax.models import get_target
    from pudnet_jax.predict import preprocess_images

    valid = np.arange(21) < 18  # three rows of padding hold anything, NaN included
    junk = np.array(images) * 0.0 + 1.0
    junk[:18] = np.array(images)[:18]
    junk[19] = np.nan
    variables = predictor.predict({"image": junk, "label": batch["label"], "mask": valid})
    x = preprocess_images(np.nan_to_num(junk), config.model.image_size, config.model.channels)
    mean, std = x[valid].mean(axis=(0, 1, 2)), x[valid].std(axis=(0, 1, 2)) + 1e-3
    want = make_predict_fn(config, 7)(predictor.hyper_params, {"image": (x - mean) / std,
                                                               "label": batch["label"], "mask": valid})
    chex.assert_trees_all_close({k: variables[k] for k in want}, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variables["preprocess"]["mean"], mean, rtol=1e-6)
    logits = predictor.apply(variables, np.array(images)[:18], batch_size=7)
    want_logits = get_target(config.model.target, 7).apply(want, (x[:18] - mean) / std, train=False)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        predictor.apply(variables, np.zeros((2, 28, 28, 4), np.uint8))
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.apply(variables, np.full((2, 28, 28, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="no images"):
        predictor.apply(variables, np.zeros((0, 28, 28, 1), np.uint8))
    bare = {k: v for k, v in variables.items() if k != "preprocess"}
    with pytest.raises(ValueError, match="variables returned by Predictor.predict"):
        predictor.apply(bare, np.zeros((2, 28, 28, 1), np.uint8))
    # Variables of another target (here: a first conv of twice the width) are named, not
    # passed to Flax to fail deep inside.
    widened = jax.tree.map(lambda x: x, variables)
    kernel = widened["params"]["conv_init"]["kernel"]
    widened["params"]["conv_init"]["kernel"] = np.concatenate([kernel, kernel], axis=-1)
    with pytest.raises(ValueError, match=re.escape("do not fit this predictor's resnet8")):
        predictor.apply(widened, np.zeros((2, 28, 28, 1), np.uint8))


# ------------------------------------------------------- bad input: checkpoints and configs

def test_load_predictor_missing_or_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_predictor(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No config.json"):
        load_predictor(tmp_path)
    (tmp_path / "config.json").write_text(child.tiny_train_config("", "").to_json())
    with pytest.raises(FileNotFoundError, match="No hypernetwork checkpoint"):
        load_predictor(tmp_path)


# A refused restore leaves Orbax's other pending array reads un-awaited; Python reports them.
_ORBAX_ABANDONED_READS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_ABANDONED_READS
@pytest.mark.parametrize("field, value", [("hidden_dim", 48), ("code_rank", 4), ("recurrent", False)])
def test_export_of_another_architecture_is_refused(export, tmp_path, field, value):
    """Orbax would silently pad or truncate arrays of another shape (restored as NumPy): the
    restore must refuse them instead of loading garbage parameters."""
    other = tmp_path / "export"
    shutil.copytree(export, other)
    saved = json.load(open(os.path.join(export, "config.json")))
    saved["hyper"][field] = value
    (other / "config.json").write_text(json.dumps(saved))
    with pytest.raises(checkpoints.ArchitectureMismatchError, match="under its config"):
        load_predictor(other)


@pytest.mark.parametrize("field, value", [("target", "resnet18"), ("image_size", 64)])
def test_export_edited_to_another_target_or_input_is_refused(export, tmp_path, field, value):
    """The hypernetwork's parameter shapes do not depend on the target's depth or input size,
    so a config.json edited to resnet18 used to load and predict a network the hypernetwork
    never saw; the export records what it was meta-trained for and refuses the edit."""
    assert json.load(open(os.path.join(export, "info.json")))["meta_trained_for"]["target"] == "resnet8"
    other = tmp_path / "export"
    shutil.copytree(export, other)
    saved = json.load(open(os.path.join(export, "config.json")))
    saved["model"][field] = value
    (other / "config.json").write_text(json.dumps(saved))
    with pytest.raises(checkpoints.ArchitectureMismatchError, match=f"model.{field}: meta-trained for"):
        load_predictor(other)


def test_unknown_config_argument():
    from configs import intra

    with pytest.raises(ValueError, match="Unknown config argument 'bogus=1'"):
        intra.get_config("bogus=1")
    with pytest.raises(ValueError, match="Unknown intra dataset 'mnist'"):
        intra.get_config("mnist")


# ------------------------------------------------------------------ bad input: data loaders

def test_data_loaders_missing_truncated_or_short_npz(tmp_path, fake_data, config):
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    cfg = config.copy_and_resolve_references()
    cfg.cache_dir = str(tmp_path / "cache")

    cfg.data_dir = str(empty)
    with pytest.raises(data.DatasetNotFoundError, match=f"(?s)'omniglot' not found.*{empty}"):
        train.make_sampler(cfg)

    blob = open(os.path.join(fake_data[0], "omniglot.npz"), "rb").read()
    (broken / "omniglot.npz").write_bytes(blob[:len(blob) // 2])
    cfg.data_dir = str(broken)
    with pytest.raises(ValueError, match="omniglot.npz: not a readable .npz file"):
        train.make_sampler(cfg)
    with pytest.raises(ValueError, match="not a readable .npz file"):
        train.make_test_tasks(cfg)

    arrays = dict(np.load(os.path.join(fake_data[0], "omniglot.npz")))
    np.savez(broken / "omniglot.npz", **{k: v for k, v in arrays.items() if k != "y_train"})
    with pytest.raises(ValueError, match=r"missing keys \['y_train'\]"):
        train.make_sampler(cfg)
    np.savez(broken / "omniglot.npz", **{**arrays, "y_train": arrays["y_train"] + 100})
    with pytest.raises(ValueError, match=r"y_train outside \[0, 32\)"):
        train.make_sampler(cfg)

    # 20 drawings per class, but a task needs shots + queries = 25 of each class.
    cfg.data_dir = fake_data[0]
    cfg.data.shots, cfg.data.queries = 15, 10
    with pytest.raises(ValueError, match="fewer than shots \\+ queries = 25 images"):
        train.make_sampler(cfg)
    # data.train_shots asks for 15 in meta-training: capped at the 10 that the queries leave.
    cfg.data.shots, cfg.data.train_shots = 5, 15
    sampler = train.make_sampler(cfg)
    assert sampler.pool_shots == [10] and sampler.batch(0)["support"]["mask"][0].sum() == 10 * cfg.data.way


def test_batch_format_helpers_reject_bad_labels():
    images = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="negative"):
        data.as_dataset_batch(images, np.array([0, 1, -1, 0]))
    with pytest.raises(ValueError, match="max_way=2 is smaller than the 3 classes"):
        data.as_dataset_batch(images, np.array([0, 1, 2, 0]), max_way=2)
    with pytest.raises(ValueError, match=r"images \[N,H,W,C\]"):
        data.as_dataset_batch(images[..., 0], np.array([0, 1, 2, 0]))


# ------------------------------------------------------------------------------------ CLI

def _cli(*args, env=None, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "pudnet_jax.main", *args], capture_output=True,
                          text=True, cwd=REPO, env={**_env(), **(env or {})}, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_unknown_config_field(tmp_path):
    rc, out = _cli("--config=configs/intra.py", "--config.train.bogus=1", f"--workdir={tmp_path}/w")
    assert rc != 0 and "bogus" in out
    assert not os.path.exists(tmp_path / "w")


def test_cli_evaluate_missing_workdir(tmp_path):
    missing = tmp_path / "missing"
    rc, out = _cli("--mode=evaluate", f"--workdir={missing}")
    assert rc != 0 and "FileNotFoundError" in out and "does not exist" in out, out[-2000:]
    rc, out = _cli("--mode=evaluate", "--config=configs/intra.py:quick", f"--workdir={missing}")
    assert rc != 0 and "No hypernetwork checkpoint" in out, out[-2000:]
    assert not missing.exists()  # evaluating must not create an empty workdir


def test_cli_predict_without_the_dataset(export, tmp_path):
    rc, out = _cli("--mode=predict", f"--workdir={export}", "--dataset=cifar10",
                   f"--output={tmp_path}/out", env={"PUDNET_DATA_DIR": str(tmp_path),
                                                    "PUDNET_TFDS_DOWNLOAD": "0"})
    assert rc != 0 and "DatasetNotFoundError" in out and "Dataset 'cifar10' not found" in out, out[-2000:]
    # --config.data_dir is where predict looks (it was ignored in favour of the environment).
    rc, out = _cli("--mode=predict", f"--workdir={export}", "--dataset=cifar10",
                   "--config=configs/inter.py", f"--config.data_dir={tmp_path}/elsewhere",
                   f"--output={tmp_path}/out", env={"PUDNET_DATA_DIR": str(tmp_path),
                                                    "PUDNET_TFDS_DOWNLOAD": "0"})
    assert rc != 0 and f"looked for: {tmp_path}/elsewhere/cifar10.npz" in out, out[-2000:]


# ---------------------------------------------------------------------------------- faults

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fake_data):
    """An uninterrupted run of STEPS steps."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    rc, out = _run(workdir, fake_data)
    assert rc == 0, out[-3000:]
    return workdir


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, fake_data, config,
                                                                   reference_run):
    workdir = str(tmp_path / "killed")
    kill_at = random.Random().randint(2, STEPS - 4)
    proc = _start(workdir, fake_data)
    _wait_for_step(proc, workdir, kill_at)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    killed_step, _ = _restore_latest(workdir, config)
    assert kill_at - 1 <= killed_step < STEPS, (kill_at, killed_step)

    rc, out = _run(workdir, fake_data)
    assert rc == 0 and f"Resumed from step {killed_step}" in out, out[-3000:]
    step, state = _restore_latest(workdir, config)
    ref_step, ref_state = _restore_latest(reference_run, config)
    assert step == ref_step == STEPS
    _assert_bitwise_equal(state, ref_state)
    assert _losses(workdir) == _losses(reference_run), f"killed at step {kill_at}"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, fake_data, config):
    workdir = str(tmp_path / "terminated")
    proc = _start(workdir, fake_data)
    _wait_for_step(proc, workdir, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])["stopped_at"]
    assert f"SIGTERM: checkpoint saved at step {stopped}" in out
    assert 3 <= stopped < STEPS
    step, state = _restore_latest(workdir, config)
    assert step == stopped == int(state.step)
    assert max(_losses(workdir)) == stopped


def test_checkpoint_write_interrupted_midway_keeps_the_previous_one(tmp_path, fake_data, config,
                                                                    reference_run):
    workdir = str(tmp_path / "torn")
    rc, out = _run(workdir, fake_data, fault=("die_in_save", 4))
    assert rc == 17 and "dying while saving step 4" in out, out[-3000:]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    torn = glob.glob(os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp*"))
    assert torn and not os.path.exists(os.path.join(ckpt_dir, "4")), os.listdir(ckpt_dir)
    # Make the debris worse than a clean stop before the rename: truncate every file in it.
    for root, _, files in os.walk(torn[0]):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)

    step, state = _restore_latest(workdir, config)
    assert step == 3 == int(state.step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    # Evaluating the workdir (as if its run were still writing step 4) reads the last complete
    # checkpoint and leaves the writer's temporary directory alone.
    from pudnet_jax.run_modes import evaluate_workdir

    assert evaluate_workdir(config, workdir)["hyper_params_from"]["step"] == 3
    assert glob.glob(os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp*")) == torn
    rc, out = _run(workdir, fake_data)
    assert rc == 0 and "Resumed from step 3" in out, out[-3000:]
    assert not glob.glob(os.path.join(ckpt_dir, "*orbax-checkpoint-tmp*"))
    _assert_bitwise_equal(_restore_latest(workdir, config)[1], _restore_latest(reference_run, config)[1])


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, fake_data,
                                                                                config):
    workdir = str(tmp_path / "nan")
    rc, out = _run(workdir, fake_data, fault=("nan_at", 3))
    assert rc != 0, out[-3000:]
    assert "FloatingPointError: Non-finite loss or gradient at step 3" in out, out[-3000:]
    step, state = _restore_latest(workdir, config)
    assert step == 2 == int(state.step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves((state.params, state.opt_state)))


def test_metrics_log_with_a_torn_last_line_resumes(tmp_path, capsys):
    """A kill in the middle of a metrics write leaves a partial last line: reading the log and
    resuming the run both skip it (and say so) instead of failing on the JSON."""
    from pudnet_jax.metrics import MetricsWriter, read_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    assert "metrics.jsonl:5: skipping a torn metrics line" in capsys.readouterr().out
    writer = MetricsWriter(str(tmp_path), resume_step=3)  # resumed from the step-3 checkpoint
    writer.write(4, {"loss": 0.5})
    writer.close()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss"] == 0.5
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # the rewrite left no temp file


@_ORBAX_ABANDONED_READS
def test_restart_with_another_architecture_is_refused(tmp_path, reference_run, config):
    other = config.copy_and_resolve_references()
    other.hyper.hidden_dim = 48
    with pytest.raises(checkpoints.ArchitectureMismatchError, match="hyper.hidden_dim: checkpoint 32 vs config 48"):
        train.train_and_evaluate(other, reference_run)
    other_target = config.copy_and_resolve_references()
    other_target.model.target = "resnet18"
    with pytest.raises(checkpoints.ArchitectureMismatchError,
                       match="model.target: checkpoint 'resnet8' vs config 'resnet18'"):
        train.train_and_evaluate(other_target, reference_run)
    # Restoring the workdir's params under the other config fails the same way (strict shapes).
    with pytest.raises(checkpoints.ArchitectureMismatchError, match="not compatible with the stored shape"):
        checkpoints.restore_hyper_params(reference_run, other)
    # Under its own config the workdir loads.
    assert load_predictor(reference_run).config.hyper.hidden_dim == 32


# ---------------------------------------------------------------------------- determinism

def test_predictions_and_task_lists_are_identical_across_processes(tmp_path, fake_data):
    outputs = []
    for seed in ("1", "2"):  # different string hashing in each process
        out_dir = tmp_path / f"probe{seed}"
        out_dir.mkdir()
        proc = subprocess.run([sys.executable, HELPER, "probe", str(out_dir), *fake_data],
                              capture_output=True, text=True, cwd=REPO, timeout=300,
                              env={**_env(), "PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(out_dir)
    a, b = (dict(np.load(d / "predicted.npz")) for d in outputs)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    tasks_a, tasks_b = (json.loads((d / "tasks.json").read_text()) for d in outputs)
    assert tasks_a == tasks_b
    if "omniglot" in tasks_a:
        assert tasks_a["omniglot"]["num_tasks"] == 100 and tasks_a["gtsrb"]["num_tasks"] == 20


# --------------------------------------------------------------------------------- memory

def test_chunked_predict_matches_plain_predict(config, hyper_params, chunked_apply_calls):
    """chunk_size bounds memory by the chunk (encoder and BatchNorm pass run chunk by chunk);
    the result equals the plain path up to float summation order, padding rows included; a
    batch no larger than the chunk takes the plain path. (With hyper.data_layers:
    test_data_layers.test_chunked_predict_builds_the_same_data_layers.)"""
    calls = chunked_apply_calls
    batch = _with(_batch(n=21), mask=np.arange(21) < 19)
    plain = jax.jit(make_predict_fn(config))(hyper_params, batch)
    chunked = jax.jit(make_predict_fn(config, chunk_size=8))(hyper_params, batch)
    assert calls == [8]
    chex.assert_trees_all_close(chunked, plain, rtol=1e-4, atol=1e-5)
    jax.jit(make_predict_fn(config, chunk_size=21))(hyper_params, batch)
    assert calls == [8]
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        make_predict_fn(config, chunk_size=0)


@slow
def test_resnet18_predict_on_5000_images_has_bounded_memory(tmp_path):
    """ResNet-18 target, default hypernetwork, 5,000 images of 32x32: XLA's temporary buffers
    (the activations) for the plain path and for chunk_size=500, compiled in a child process."""
    script = (
        "import json, sys, jax, numpy as np\n"
        "from configs.common import base_config\n"
        "from pudnet_jax.predict import init_hyper_params, make_predict_fn\n"
        "c = base_config(); c.model.target = 'resnet18'\n"
        "hp = init_hyper_params(c, jax.random.key(0), 10)\n"
        "b = {'image': np.zeros((5000, 32, 32, 3), np.float32), 'label': np.arange(5000, dtype=np.int32) % 10}\n"
        "out = {}\n"
        "for chunk in (None, 500):\n"
        "    compiled = jax.jit(make_predict_fn(c, 10, chunk_size=chunk)).lower(hp, b).compile()\n"
        "    out[str(chunk)] = compiled.memory_analysis().temp_size_in_bytes / 2**30\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    temp = json.loads(proc.stdout.strip().splitlines()[-1])
    assert temp["None"] > 4.0  # plain: ~6.3 GiB of activations (peak RSS measured 8.5 GiB)
    assert temp["500"] < 1.0  # chunked: ~0.56 GiB


def test_train_states_from_before_the_source_head_resume_and_a_changed_setting_is_refused(tmp_path):
    """A checkpoint written before ``TrainState.source_head`` existed restores with no head;
    resuming with the source loss switched on (or off) against the workdir's checkpoints is a
    clear error, not an Orbax tree mismatch."""
    arr = lambda *shape: np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    legacy = {"step": np.int32(7), "params": {"params": {"w": arr(2, 3)}}, "opt_state": {"mu": arr(3)}}
    ckpt = checkpoints.RunCheckpoints(str(tmp_path / "old"))
    ckpt.save(7, legacy, {"best_val_accuracy": 0.5})
    ckpt.close()
    abstract = jax.eval_shape(lambda: train_step.TrainState(
        step=jax.numpy.int32(0), params={"params": {"w": arr(2, 3)}}, opt_state={"mu": arr(3)}))
    ckpt = checkpoints.RunCheckpoints(str(tmp_path / "old"))
    state, meta = ckpt.restore(checkpoints._strict_abstract(abstract))
    assert isinstance(state, train_step.TrainState) and state.source_head is None
    assert int(state.step) == 7 and meta["best_val_accuracy"] == 0.5
    np.testing.assert_array_equal(state.params["params"]["w"], arr(2, 3))
    with_head = abstract.replace(source_head={"kernel": jax.ShapeDtypeStruct((3, 4), np.float32)},
                                 source_head_opt_state={})
    with pytest.raises(ValueError, match="written without a source head"):
        ckpt.restore(checkpoints._strict_abstract(with_head))
    ckpt.close()

    new = checkpoints.RunCheckpoints(str(tmp_path / "new"))
    new.save(1, train_step.TrainState(step=np.int32(1), params=legacy["params"], opt_state=legacy["opt_state"],
                                 source_head={"kernel": arr(3, 4)}, source_head_opt_state={}), {})
    restored, _ = new.restore(checkpoints._strict_abstract(with_head))
    np.testing.assert_array_equal(restored.source_head["kernel"], arr(3, 4))
    with pytest.raises(ValueError, match="written with a source head"):
        new.restore(checkpoints._strict_abstract(abstract))
    new.close()


def test_a_resume_keeps_the_best_params_its_restored_state_refers_to(tmp_path):
    """Killed after a new best (step 500) but before the next train state (the last is 400): the
    resume drops best 500 (ahead of the state) and must still hold best 300, which the restored
    metadata names; once a later state records a newer best, the older one is deleted."""
    params = lambda v: {"params": {"w": np.full((2, 3), v, np.float32)}}
    state = lambda step: train_step.TrainState(step=np.int32(step), params=params(step), opt_state={})
    run = checkpoints.RunCheckpoints(str(tmp_path))
    run.save_best(300, params(300), {"best_val_accuracy": 0.7, "best_step": 300})
    run.save(400, state(400), {"best_val_accuracy": 0.7, "best_step": 300})
    run.save_best(500, params(500), {"best_val_accuracy": 0.8, "best_step": 500})
    run.close()  # killed here, before the state of step 500 or later was saved

    resumed = checkpoints.RunCheckpoints(str(tmp_path))
    abstract = jax.eval_shape(lambda: state(0))
    _, meta = resumed.restore(checkpoints._strict_abstract(abstract))
    resumed.discard_best_after(400)
    assert resumed.best.all_steps() == [meta["best_step"]] == [300]
    kept = resumed.best.restore(300, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params(0)), meta=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(kept.params["params"]["w"], params(300)["params"]["w"])
    resumed.save_best(500, params(500), {"best_val_accuracy": 0.8, "best_step": 500})  # re-validated
    assert sorted(resumed.best.all_steps()) == [300, 500]  # 300 stays until a state records 500
    resumed.save(600, state(600), {"best_val_accuracy": 0.8, "best_step": 500})
    assert resumed.best.all_steps() == [500]
    resumed.close()


def test_step_counts_and_shot_counts_below_one_are_refused_up_front(config, tmp_path):
    """log_every / checkpoint_every of 0 used to fail with ZeroDivisionError after the first step;
    a negative --shots of the predict mode sliced off images instead of taking that many."""
    from pudnet_jax.run_modes import predict_dataset

    for field in ("log_every", "checkpoint_every"):
        bad = config.copy_and_resolve_references()
        bad.train[field] = 0
        with pytest.raises(ValueError, match=f"train.{field} must be at least 1"):
            train.train_and_evaluate(bad, str(tmp_path / field))
        assert not os.path.exists(tmp_path / field)
    with pytest.raises(ValueError, match="shots .* must be at least 1; got -1"):
        predict_dataset(str(tmp_path / "nothing"), "cifar10", -1, str(tmp_path / "out"))


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "num_steps", -1, "train.num_steps and train.eval_every must be >= 0"),
    ("train", "learning_rate", -1e-3, "train.learning_rate must be positive"),
    ("data", "num_eval_tasks", 0, "data.num_eval_tasks must be a positive integer"),
    ("hyper", "code_rank", 0, "hyper.code_rank must be a positive integer"),
    ("hyper", "encoder_widths", (8, 0), "hyper.encoder_widths must be a positive integer"),
    ("model", "image_size", 0, "model.image_size must be a positive integer"),
])
def test_settings_that_would_fail_late_or_run_wrong_are_refused_up_front(config, tmp_path, section,
                                                                         field, value, message):
    """A negative step count used to 'train' nothing and write results; no evaluation tasks, a
    zero code rank and an image size of 0 failed only at the first checkpoint, the final
    evaluation or deep in XLA (an image size below 1, as a hand-edited config.json can hold).
    Each is refused before the workdir is made."""
    bad = config.copy_and_resolve_references()
    bad[section][field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        train.train_and_evaluate(bad, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_predict_arguments_that_count_must_be_positive_integers(config, hyper_params, export):
    for chunk_size in (8.0, "8", True, 0):
        with pytest.raises(ValueError, match="chunk_size must be a positive number of images"):
            make_predict_fn(config, chunk_size=chunk_size)
    for num_classes in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            make_predict_fn(config, num_classes)
    predictor = load_predictor(export)
    variables = predictor.predict(_raw_batch(n=10, k=5))
    for batch_size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            predictor.apply(variables, _raw_batch(n=3)["image"], batch_size=batch_size)


@_ORBAX_ABANDONED_READS
def test_damaged_exports_are_named_as_damaged(export, tmp_path):
    """A config.json that is not JSON or lacks its sections, and a truncated or missing array
    file, are reported as a damaged checkpoint at its path (not as a bare JSONDecodeError, a
    TensorStore dump or an architecture mismatch)."""
    damaged = tmp_path / "export"
    shutil.copytree(export, damaged)
    good_config = (damaged / "config.json").read_text()
    (damaged / "config.json").write_text(good_config + "}garbage")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_predictor(damaged)
    (damaged / "config.json").write_text(json.dumps({"model": {}, "hyper": {}}))
    with pytest.raises(ValueError, match=re.escape("lacks the config section(s) ['data', 'train']")):
        load_predictor(damaged)
    (damaged / "config.json").write_text(good_config)
    arrays = [p for p in glob.glob(str(damaged / "hyper_params" / "**" / "d" / "*"), recursive=True)
              if os.path.isfile(p)]
    largest = max(arrays, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    with pytest.raises(checkpoints.CorruptCheckpointError, match="could not be read"):
        load_predictor(damaged)
