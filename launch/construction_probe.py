"""Closed-form constructions of the target, no meta-training: which one should predict build on?

Every conv of a random resnet8 is built from its own input on the predict batch
(``pudnet_jax.pca_backbone``): its principal patch directions (``pca``, the PCA network), or its
discriminant patch directions (``discriminant``: what separates the batch's classes,
``hypernet.discriminant``); then read out as predict does (BatchNorm statistics, ridge
classifier). No hypernetwork parameters are involved, so every dataset is unseen to these
networks, and the choice between constructions is made on the inter predictor's *sources*:

- ``meta_val``: the benchmark's meta-val tasks (``baselines.lr_tuning_tasks``: GTSRB meta-val
  classes, 10-way, the configured predict sample);
- ``source``: whole-dataset tasks of a source (``--source_dataset``, default Fashion-MNIST), task
  seeds 1, 2, ...;

and, reported beside it, never used to choose, the held-out dataset over ``--unseen_samples``
draws of the predict sample (evaluation task seeds ``data.eval_task_seed + i``).

  python launch/construction_probe.py --checkpoint=checkpoints/inter_resnet8 \
      --num_val_tasks=20 --num_source_tasks=3 --unseen_samples=5 \
      --output=results/construction_probe/inter_resnet8

``--checkpoint`` supplies only the config (data protocol, predict sample, ridge strength, patch
stride); ``--predict_shots`` overrides its predict sample (images per class). Writes ``probe.json`` and ``probe.md`` (seed, machine, command and wall time included).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints, train
from pudnet_jax.evaluate import accuracy, format_mean_ci, init_target, mean_and_ci95, random_init_seed
from pudnet_jax.metrics import machine_description, machine_line, write_report
from pudnet_jax.hypernet.discriminant import DISCRIMINANT_EPS  # probes written before the field
from pudnet_jax.pca_backbone import CONSTRUCTIONS, pca_backbone


def score(config, tasks, constructions) -> dict:
    """Per-task test accuracy of each closed-form construction, read out as predict does."""
    scores = {name: [] for name in constructions}
    target, stride = config.model.target, int(config.hyper.data_layers_patch_stride)
    eps = float(config.hyper.data_layers_discriminant_eps)
    for i, task in enumerate(tasks):
        batch = task.dataset_batch()
        random = init_target(target, task.num_classes, task.test_images.shape[1:], random_init_seed(config, i))
        for name in constructions:
            backbone = pca_backbone(target, random, batch["image"], batch["mask"], batch["label"], name, stride, eps)
            variables = baselines.solved_readout(target, backbone, batch, "ridge", config.hyper.ridge_lambda)
            scores[name].append(accuracy(target, variables, task.test_images, task.test_labels))
    return scores


def unseen_samples(config, num_samples: int) -> list:
    """The held-out dataset's evaluation task under ``num_samples`` draws of the predict sample."""
    tasks = []
    for i in range(num_samples):
        drawn = config.copy_and_resolve_references()
        drawn.data.eval_task_seed = config.data.eval_task_seed + i
        tasks += train.make_test_tasks(drawn)
    return tasks


def run_probe(checkpoint: str, num_val_tasks: int, source_dataset: str, num_source_tasks: int,
              num_unseen_samples: int, constructions=CONSTRUCTIONS, command: str = "",
              predict_shots: int | None = None, discriminant_eps: float | None = None) -> dict:
    """Scores each construction on meta-val, source and (reported only) held-out tasks;
    ``predict_shots`` overrides the checkpoint's predict sample (images per class) and
    ``discriminant_eps`` its ``hyper.data_layers_discriminant_eps``."""
    start = time.perf_counter()
    config = checkpoints.read_config(checkpoint)
    if predict_shots is not None:
        config.data.predict_shots = int(predict_shots)
    if discriminant_eps is not None:
        config.hyper.data_layers_discriminant_eps = float(discriminant_eps)
    if config.data.setting != "inter":
        raise ValueError(f"The construction probe chooses on an inter predictor's sources; {checkpoint} "
                         f"is {config.data.setting!r}.")
    splits = {"meta_val": baselines.lr_tuning_tasks(config, num_val_tasks),
              "source": train.source_dataset_tasks(config, source_dataset, num_source_tasks, first_seed=1),
              "unseen": unseen_samples(config, num_unseen_samples)}
    out = {"checkpoint": os.path.abspath(checkpoint), "command": command, "seed": int(config.seed),
           "source_dataset": source_dataset, "held_out": config.data.held_out,
           "predict_shots": int(config.data.predict_shots), "ridge_lambda": float(config.hyper.ridge_lambda),
           "patch_stride": int(config.hyper.data_layers_patch_stride),
           "discriminant_eps": float(config.hyper.data_layers_discriminant_eps),
           "machine": machine_description(), "splits": {}}
    for split, tasks in splits.items():
        scores = score(config, tasks, constructions)
        reference = scores[constructions[0]]
        out["splits"][split] = {
            "tasks": [t.name for t in tasks],
            "rows": {name: {"accuracy": mean_and_ci95(v), "per_task": v,
                            f"minus_{constructions[0]}": mean_and_ci95(np.subtract(v, reference))}
                     for name, v in scores.items()}}
    out["wall_seconds"] = time.perf_counter() - start
    return out


def markdown(r: dict) -> str:
    """``run_probe``'s result as a Markdown table with the command, machine and wall time."""
    splits = r["splits"]
    names = list(next(iter(splits.values()))["rows"])
    labels = {"meta_val": "meta-val (GTSRB classes)", "source": f"source {r['source_dataset']}",
              "unseen": f"held-out {r['held_out']} (reported, not chosen on)"}
    lines = [f"Closed-form resnet8 constructions, read out as predict does (ridge, strength "
             f"{r['ridge_lambda']:g}); predict sample {r['predict_shots']} images per class; patch "
             f"statistics every {r['patch_stride']}th position; discriminant whitening regulariser "
             f"{r.get('discriminant_eps', DISCRIMINANT_EPS):g}. Paired differences are to `{names[0]}`.", "",
             "| construction | " + " | ".join(f"{labels[s]} % ({len(splits[s]['tasks'])} tasks)" for s in splits)
             + " | " + " | ".join(f"{labels[s]}: minus {names[0]}, pts" for s in splits) + " |",
             "| --- |" + " --- |" * (2 * len(splits))]
    for name in names:
        cells = [format_mean_ci(splits[s]["rows"][name]["accuracy"]) for s in splits]
        cells += [format_mean_ci(splits[s]["rows"][name][f"minus_{names[0]}"]) for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{r['command']}`; seed {r['seed']}; {machine_line(r['machine'])}; "
              f"wall time {r['wall_seconds']:.0f} s."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an inter export or workdir (its config only)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_val_tasks", type=int, default=20)
    parser.add_argument("--source_dataset", default="fashion_mnist")
    parser.add_argument("--num_source_tasks", type=int, default=3)
    parser.add_argument("--unseen_samples", type=int, default=5)
    parser.add_argument("--predict_shots", type=int, default=None,
                        help="images per class given to predict (default: the checkpoint's)")
    parser.add_argument("--discriminant_eps", type=float, default=None,
                        help="the discriminant construction's whitening regulariser "
                             "(default: the checkpoint's hyper.data_layers_discriminant_eps)")
    args = parser.parse_args()
    command = "python launch/construction_probe.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_probe(args.checkpoint, args.num_val_tasks, args.source_dataset, args.num_source_tasks,
                       args.unseen_samples, command=command, predict_shots=args.predict_shots,
                       discriminant_eps=args.discriminant_eps)
    write_report(args.output, "probe", result, markdown(result))


if __name__ == "__main__":
    main()
