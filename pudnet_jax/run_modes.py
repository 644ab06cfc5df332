"""The non-training modes of ``main``: evaluate a workdir, predict for a dataset, export."""

from __future__ import annotations

import json
import os
import time

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from pudnet_jax import checkpoints, data
from pudnet_jax.evaluate import TaskEvaluator


def evaluate_workdir(config, workdir: str) -> dict:
    """Runs the fixed protocol on the workdir's best (else latest) params -> ``results.json``."""
    from pudnet_jax.train import final_evaluation

    # Check, then restore: a config for another hypernetwork is refused naming its fields before
    # any params are read, and a missing workdir raises FileNotFoundError instead of being created.
    checkpoints.check_config_matches_checkpoint(config, workdir)
    params, info = checkpoints.restore_hyper_params(workdir, config)
    # Read-only: the run may still be going, mid-way through writing a checkpoint.
    ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        # info names the checkpoint restored (a run stopped early has no best/, and its latest
        # step is not the schedule's last): results.json must record that one.
        return final_evaluation(config, workdir, params, TaskEvaluator(config), ckpt, last_info=info)
    finally:
        ckpt.close()


def save_variables(variables, output: str) -> None:
    """Writes predicted variables as an Orbax checkpoint and as Flax msgpack.

    Load them back with::

        import orbax.checkpoint as ocp, flax.serialization
        variables = ocp.StandardCheckpointer().restore(os.path.abspath(f"{output}/orbax"))
        variables = flax.serialization.msgpack_restore(open(f"{output}/variables.msgpack", "rb").read())
    """
    os.makedirs(output, exist_ok=True)
    host = jax.device_get(variables)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.path.join(output, "orbax")), host, force=True)
        checkpointer.wait_until_finished()
    with open(os.path.join(output, "variables.msgpack"), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(host))


def predict_dataset(path: str, dataset: str, shots: int, output: str, data_dir: str | None = None) -> dict:
    """Predicts variables for ``dataset`` (``shots`` train images per class, fixed seed 0)."""
    if int(shots) < 1:  # a negative count would slice off the last images of every class instead
        raise ValueError(f"shots (images per class given to predict) must be at least 1; got {shots}.")
    from pudnet_jax.predict import load_predictor

    predictor = load_predictor(path)
    raw = data.load_split(dataset, "train", data_dir=data_dir)
    rng = np.random.default_rng(0)
    index = np.concatenate([rng.permutation(np.flatnonzero(raw.labels == c))[:shots]
                            for c in np.unique(raw.labels)])
    labels = np.unique(raw.labels, return_inverse=True)[1][index].astype(np.int32)
    start = time.perf_counter()
    variables = jax.block_until_ready(predictor.predict({"image": raw.images[index], "label": labels}))
    seconds = time.perf_counter() - start
    save_variables(variables, output)
    info = {"dataset": dataset, "shots": shots, "num_images": int(len(index)),
            "num_classes": int(labels.max() + 1), "predict_seconds_incl_compile": seconds,
            "target": predictor.config.model.target, "source": os.path.abspath(path)}
    with open(os.path.join(output, "info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def export_workdir(config, workdir: str, output: str) -> None:
    """Params-only export of the workdir's best (else latest) hypernetwork (``config``'s
    hypernetwork must be the workdir's: the export's config.json is ``config``)."""
    checkpoints.check_config_matches_checkpoint(config, workdir)
    params, info = checkpoints.restore_hyper_params(workdir, config)
    checkpoints.export_predictor(params, config, output, {**info, "workdir": os.path.abspath(workdir)})
