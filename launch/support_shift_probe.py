"""Probe: does re-solving the ridge classifier on shifted copies of the predict sample help?

A predict-time lever that needs no retraining: the predicted backbone is kept (its BatchNorm
statistics from the plain sample), and the Dense layer is solved again by ridge regression on the
backbone's own features of the sample plus copies of it shifted by a pixel or two (edge
padding). It is scored on meta-val tasks only (the unseen ones decide nothing here), paired
against the plain solve, which reproduces predict's own Dense layer.

  python launch/support_shift_probe.py --checkpoint=checkpoints/intra_omniglot_resnet8 \
      --num_val_tasks=30 --output=results/support_shift_probe/intra_omniglot_resnet8

Writes ``probe.json`` and ``probe.md``. Ridge predictors only.
"""

from __future__ import annotations

import os
import sys
import time

import functools

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints
from pudnet_jax.evaluate import TaskEvaluator, accuracy, format_mean_ci, mean_and_ci95
from pudnet_jax.hypernet.pudnet import RIDGE_LOGIT_SCALE
from pudnet_jax.hypernet.ridge import ridge_classifier
from pudnet_jax.metrics import write_report
from pudnet_jax.models import get_target
from pudnet_jax.metrics import machine_description

SHIFT_SETS = {
    "plain (predict's own solve)": (),
    "+ 4 shifts by 1 px": ((1, 0), (-1, 0), (0, 1), (0, -1)),
    "+ 4 shifts by 2 px": ((2, 0), (-2, 0), (0, 2), (0, -2)),
    "+ 8 shifts by 1 px (with diagonals)": ((1, 0), (-1, 0), (0, 1), (0, -1),
                                            (1, 1), (-1, -1), (1, -1), (-1, 1)),
}


@functools.lru_cache(maxsize=8)
def _features_fn(target_name: str, num_classes: int):
    target = get_target(target_name, num_classes)
    return jax.jit(lambda v, x: target.apply(v, x, train=False, features_only=True))


def shifted(images: np.ndarray, dy: int, dx: int, pad: int = 2) -> np.ndarray:
    """``images`` [N,H,W,C] moved by (dy, dx) pixels, the border filled with edge values."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    return padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def run_probe(checkpoint: str, num_val_tasks: int) -> dict:
    """Meta-val accuracy of each shift set (``SHIFT_SETS``) and its paired gain over the plain solve."""
    config = checkpoints.read_config(checkpoint)
    if config.hyper.classifier != "ridge":
        raise ValueError(f"{checkpoint}: a ridge predictor is needed; its classifier is "
                         f"{config.hyper.classifier!r}.")
    hyper_params, info = checkpoints.restore_hyper_params(checkpoint, config)
    tau = float(jnp.exp(hyper_params["params"]["log_temperature"])) * RIDGE_LOGIT_SCALE
    evaluator = TaskEvaluator(config)
    tasks = baselines.lr_tuning_tasks(config, num_val_tasks)
    scores = {name: [] for name in SHIFT_SETS}
    own = []  # predict's own variables: the plain row must reproduce them
    for task in tasks:
        variables, _ = evaluator.predict(hyper_params, task)
        own.append(accuracy(config.model.target, variables, task.test_images, task.test_labels))
        features = _features_fn(config.model.target, task.num_classes)
        x, y = task.predict_images, task.predict_labels
        for name, shifts in SHIFT_SETS.items():
            xs = np.concatenate([x] + [shifted(x, dy, dx) for dy, dx in shifts])
            ys = np.tile(y, 1 + len(shifts))
            kernel, bias = ridge_classifier(features(variables, xs), jnp.asarray(ys),
                                            jnp.ones(len(ys), bool), task.num_classes,
                                            config.hyper.ridge_lambda)
            params = dict(variables["params"], Dense_0={"kernel": tau * kernel, "bias": tau * bias})
            scores[name].append(accuracy(config.model.target, {**variables, "params": params},
                                         task.test_images, task.test_labels))
    plain = np.array(scores["plain (predict's own solve)"])
    return {"checkpoint": os.path.abspath(checkpoint), "info": info, "val_tasks": [t.name for t in tasks],
            "ridge_lambda": float(config.hyper.ridge_lambda),
            "plain_minus_predict_max_abs": float(np.max(np.abs(plain - np.array(own)))),
            "rows": {name: {"meta_val": mean_and_ci95(s), "per_task": s,
                            "minus_plain": mean_and_ci95(np.array(s) - plain)}
                     for name, s in scores.items()},
            "machine": machine_description(), "seed": int(config.seed)}


def markdown(r: dict, command: str, seconds: float) -> str:
    lines = [f"Checkpoint `{r['checkpoint']}`; ridge strength {r['ridge_lambda']:g}; "
             f"{len(r['val_tasks'])} meta-val tasks.", "",
             "| classifier solved on | meta-val % | minus plain, pts (paired) |", "| --- | --- | --- |"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {format_mean_ci(row['meta_val'])} | {format_mean_ci(row['minus_plain'])} |")
    lines += ["", "Plain row vs predict's own variables, largest per-task difference: "
              f"{100 * r['plain_minus_predict_max_abs']:.2f} pts.",
              "", f"Command: `{command}`; seed {r['seed']}; {r['machine']}; wall time {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    start = time.perf_counter()
    r = run_probe(f.checkpoint, f.num_val_tasks)
    command = "python launch/support_shift_probe.py " + " ".join(sys.argv[1:])
    write_report(f.output, "probe", r, markdown(r, command, time.perf_counter() - start))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint", None, "Export or workdir of a ridge predictor.", required=True)
    flags.DEFINE_string("output", None, "Output directory.", required=True)
    flags.DEFINE_integer("num_val_tasks", 30, "Meta-val tasks to score on.")
    app.run(main)
