"""Child process of tests/test_reliability.py: a tiny meta-training run, or a determinism probe.

    python tests/_train_subprocess.py train WORKDIR DATA_DIR CACHE_DIR STOP_AFTER [FAULT STEP]
    python tests/_train_subprocess.py probe OUT_DIR DATA_DIR CACHE_DIR

``train`` meta-trains the tiny config of ``tiny_train_config`` (resuming from WORKDIR, like
``main.py``), checkpointing every step, and stops after step STOP_AFTER (``train_and_evaluate``'s
``stop_after``: the final evaluation is not the subject here). Optional faults at step k:

- ``die_in_save k``: the process kills itself (``os._exit(17)``) while Orbax writes the checkpoint
  of step k, after the data is written and before the temporary directory is renamed;
- ``nan_at k``: the support images of step k's tasks are NaN (the jitted step does not
  value-check its input, so the loss becomes NaN).

``probe`` writes what must be identical in every process: the predicted variables for a fixed
dataset batch (``predicted.npz``) and the manifests of the fixed evaluation tasks (``tasks.json``).
"""

import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Fake Omniglot: 8 background alphabets x 3 characters (5 alphabets go to meta-val, 9 classes are
# left for meta-training) and 2 evaluation alphabets x 4 characters (the unseen classes).
_BACKGROUND, _EVALUATION, _DRAWINGS = (8, 3), (2, 4), 20


def write_fake_omniglot(directory: str, seed: int = 0) -> str:
    """Writes a small ``omniglot.npz`` in the shared/data format; returns its path."""
    rng = np.random.default_rng(seed)
    names, splits = [], {}
    for split, (alphabets, characters) in (("train", _BACKGROUND), ("test", _EVALUATION)):
        images, labels, drawings = [], [], []
        for a in range(alphabets):
            for ch in range(characters):
                label = len(names)
                names.append(f"{split.title()}Alphabet{a}/character{ch + 1:02d}")
                template = rng.random((28, 28, 1)) < 0.2  # a class's "character"
                for d in range(_DRAWINGS):
                    noisy = template ^ (rng.random((28, 28, 1)) < 0.05)
                    images.append(noisy.astype(np.uint8) * 255)
                    labels.append(label)
                    drawings.append(d + 1)
        splits[split] = (np.stack(images), np.array(labels, np.int16), np.array(drawings))
    path = os.path.join(directory, "omniglot.npz")
    np.savez(path, class_names=np.array(names),
             **{f"{k}_{split}": v for split, arrays in splits.items()
                for k, v in zip(("x", "y", "drawing"), arrays)})
    return path


def tiny_train_config(data_dir: str, cache_dir: str, tasks_per_batch: int = 1):
    """resnet8 target, a narrow hypernetwork, 5-way 2-shot tasks on the fake Omniglot; 100 steps
    (runs stop earlier with ``stop_after``), a checkpoint every step."""
    from configs.common import base_config

    c = base_config()
    c.data_dir, c.cache_dir = data_dir, cache_dir
    c.model.num_classes = 5
    c.hyper.encoder_widths = (8, 16)
    c.hyper.feature_dim = c.hyper.sketch_dim = c.hyper.hidden_dim = 32
    c.hyper.code_rank = 8
    c.data.way, c.data.shots, c.data.queries = 5, 2, 2
    c.data.tasks_per_batch = tasks_per_batch
    c.data.num_val_tasks, c.data.num_eval_tasks, c.data.predict_shots = 1, 1, 5
    c.train.num_steps = 100
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 2
    c.train.progress_bar = False
    return c


def _enable_compilation_cache():
    # The test session's persistent cache (tests/conftest.py), when there is one: later processes
    # read the compiled programs from disk instead of compiling them again (min time 0: the many
    # small eager-op compiles of parameter init count too).
    import jax

    cache = os.environ.get("PUDNET_TEST_COMPILATION_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _die_in_save(step: int) -> None:
    """Kills the process while Orbax finalises the checkpoint of ``step`` (before the rename)."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            print(f"dying while saving step {step}", flush=True)
            os._exit(17)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _nan_at(step: int) -> None:
    """Makes the sampler's batch for ``step`` carry NaN support images."""
    from pudnet_jax import train

    make_sampler = train.make_sampler

    def patched(config, *args, **kwargs):
        sampler = make_sampler(config, *args, **kwargs)
        batch = sampler.batch

        def poisoned(s, *a, **kw):
            out = batch(s, *a, **kw)
            if s + 1 == step:  # batch s is consumed by step s + 1
                out["support"]["image"][:] = np.nan
            return out

        sampler.batch = poisoned
        return sampler

    train.make_sampler = patched


def train(workdir, data_dir, cache_dir, stop_after, fault=None, fault_step="0"):
    _enable_compilation_cache()
    if fault == "die_in_save":
        _die_in_save(int(fault_step))
    elif fault == "nan_at":
        _nan_at(int(fault_step))
    from pudnet_jax.train import train_and_evaluate

    result = train_and_evaluate(tiny_train_config(data_dir, cache_dir), workdir, stop_after=int(stop_after))
    print("RESULT", json.dumps({"stopped_at": result.get("stopped_at")}), flush=True)


def probe(out_dir, data_dir, cache_dir):
    _enable_compilation_cache()
    import jax

    from pudnet_jax import data
    from pudnet_jax.predict import init_hyper_params, make_predict_fn

    config = tiny_train_config(data_dir, cache_dir)
    hyper_params = init_hyper_params(config, jax.random.key(config.seed))
    rng = np.random.default_rng(123)
    labels = np.arange(23) % 5
    batch = {"image": rng.normal(size=(23, 32, 32, 3)).astype(np.float32) + labels[:, None, None, None],
             "label": labels.astype(np.int32), "mask": np.arange(23) < 21}
    variables = jax.jit(make_predict_fn(config))(hyper_params, batch)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    np.savez(os.path.join(out_dir, "predicted.npz"), **flat)

    # The protocol's task lists: on the real datasets when present, else on the fake Omniglot.
    real = data.default_data_dir()
    manifests = {}
    if all(os.path.isfile(os.path.join(real, f"{n}.npz")) for n in ("omniglot", "gtsrb")):
        kwargs = {"data_dir": real, "cache_dir": cache_dir}
        manifests["omniglot"] = data.task_manifest(data.make_eval_tasks("intra", "omniglot", **kwargs))
        manifests["gtsrb"] = data.task_manifest(data.make_eval_tasks("intra", "gtsrb", **kwargs))
    manifests["fake_omniglot"] = data.task_manifest(data.make_eval_tasks(
        "intra", "omniglot", num_tasks=3, way=5, predict_shots=5, data_dir=data_dir, cache_dir=cache_dir))
    with open(os.path.join(out_dir, "tasks.json"), "w") as f:
        json.dump(manifests, f)


if __name__ == "__main__":
    {"train": train, "probe": probe}[sys.argv[1]](*sys.argv[2:])
