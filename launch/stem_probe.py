"""Probe: what do layers computed from the dataset's own patches give, before any meta-training?

Five backbones, each read out exactly as predict reads out its own (BatchNorm statistics from the
predict sample, then the checkpoint's classifier solved on it: ``baselines.solved_readout``):

- the checkpoint's predicted backbone (this reproduces predict);
- the same with its first conv's first ``2 m`` filters replaced by the sample's top ``m``
  principal patch directions and their negatives (``hypernet.stem.pca_stem_kernel``), the later
  layers unchanged (they were predicted for the head's stem);
- a randomly initialised target (``evaluate.random_init_seed``'s draw for each task);
- the same random target with the PCA stem;
- the PCA network: the same random target with *every* conv from the principal directions of its
  own input's patches (``pudnet_jax.pca_backbone``): a closed-form, data-derived backbone with
  no meta-training at all;
- the random target's kernels taken as the head's and rebuilt on the sample by each
  ``hyper.data_layers`` mode (``baselines.with_data_layers``): ``whitened`` (random filters on
  whitened patches) and ``pca_residual`` (principal directions plus a quarter of the random
  kernel), the references a predictor meta-trained with that mode starts from.

Scored on meta-val tasks (the tasks that tune everything else, ``baselines.lr_tuning_tasks``) and on
the checkpoint's unseen tasks (for inter: the held-out dataset, predicted whole).

  python launch/stem_probe.py --checkpoint=checkpoints/inter_resnet8 --num_val_tasks=20 \
      --output=results/stem_probe/inter_resnet8

Writes ``probe.json`` and ``probe.md`` (with the seed, machine, command and wall time).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints
from pudnet_jax.evaluate import (TaskEvaluator, accuracy, format_mean_ci, init_target,
                                 mean_and_ci95, random_init_seed)
from pudnet_jax.metrics import write_report
from pudnet_jax.pca_backbone import pca_backbone
from pudnet_jax.metrics import machine_description
from pudnet_jax.train import make_test_tasks

ROWS = ("predicted", "predicted, PCA stem", "random init", "random init, PCA stem",
        "PCA network (every conv; no meta-training)",
        "random init, data layers 'whitened'", "random init, data layers 'pca_residual'")


def score_tasks(config, hyper_params, tasks, num_components: int) -> dict:
    """Per-task accuracy of each backbone in ``ROWS``, read out as predict does."""
    evaluator = TaskEvaluator(config)
    target, classifier = config.model.target, config.hyper.classifier
    lam = float(config.hyper.ridge_lambda)
    scores = {name: [] for name in ROWS}
    for i, task in enumerate(tasks):
        batch = task.dataset_batch()
        predicted, _ = evaluator.predict(hyper_params, task)
        random = init_target(target, task.num_classes, task.test_images.shape[1:],
                             random_init_seed(config, i))
        backbones = (predicted, baselines.with_pca_stem(target, predicted, batch, num_components),
                     random, baselines.with_pca_stem(target, random, batch, num_components),
                     pca_backbone(target, random, batch["image"], batch["mask"]),
                     baselines.with_data_layers(target, random, batch, "whitened"),
                     baselines.with_data_layers(target, random, batch, "pca_residual"))
        for name, backbone in zip(ROWS, backbones):
            variables = baselines.solved_readout(target, backbone, batch, classifier, lam)
            scores[name].append(accuracy(target, variables, task.test_images, task.test_labels))
    return scores


def run_probe(checkpoint: str, num_val_tasks: int, num_components: int, command: str = "",
              predict_shots: int | None = None) -> dict:
    """Scores ``ROWS`` on meta-val and unseen tasks; ``predict_shots`` overrides the checkpoint's
    per-class predict sample (e.g. 1000: CIFAR-10's whole support)."""
    start = time.perf_counter()
    config = checkpoints.read_config(checkpoint)
    if predict_shots is not None:
        config.data.predict_shots = int(predict_shots)
    if config.hyper.classifier not in ("ridge", "prototype"):
        raise ValueError(f"The probe reads backbones out with a solved classifier; {checkpoint} "
                         f"uses {config.hyper.classifier!r}.")
    hyper_params, info = checkpoints.restore_hyper_params(checkpoint, config)
    out = {"checkpoint": os.path.abspath(checkpoint), "checkpoint_info": info, "command": command,
           "seed": int(config.seed), "stem_pca_components": num_components,
           "predict_shots": int(config.data.predict_shots),
           "classifier": config.hyper.classifier, "ridge_lambda": float(config.hyper.ridge_lambda),
           "machine": machine_description(), "splits": {}}
    for split, tasks in (("meta_val", baselines.lr_tuning_tasks(config, num_val_tasks)),
                         ("unseen", make_test_tasks(config))):
        scores = score_tasks(config, hyper_params, tasks, num_components)
        out["splits"][split] = {
            "tasks": [t.name for t in tasks],
            "rows": {name: {"accuracy": mean_and_ci95(v), "per_task": v,
                            "minus_random_init": mean_and_ci95(np.subtract(v, scores["random init"]))}
                     for name, v in scores.items()}}
    out["wall_seconds"] = time.perf_counter() - start
    return out


def markdown(r: dict) -> str:
    """The results of ``run_probe`` as a Markdown table with the command, machine and wall time."""
    splits = r["splits"]
    lines = [f"Checkpoint `{r['checkpoint']}`; every backbone read out as predict does ({r['classifier']}, "
             f"strength {r['ridge_lambda']:g}); PCA stem: {r['stem_pca_components']} principal patch "
             "directions and their negatives as the first conv's first filters; predict sample: "
             f"{r.get('predict_shots', '?')} images per class.", "",
             "| backbone | " + " | ".join(f"{s} % ({len(splits[s]['tasks'])} tasks)" for s in splits)
             + " | " + " | ".join(f"{s}: minus random init, pts" for s in splits) + " |",
             "| --- |" + " --- |" * (2 * len(splits))]
    for name in (n for n in ROWS if all(n in splits[s]["rows"] for s in splits)):
        cells = [format_mean_ci(splits[s]["rows"][name]["accuracy"]) for s in splits]
        cells += [format_mean_ci(splits[s]["rows"][name]["minus_random_init"]) for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{r['command']}`; seed {r['seed']}; {r['machine']}; "
              f"wall time {r['wall_seconds']:.0f} s."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export dir or training workdir")
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_val_tasks", type=int, default=20)
    parser.add_argument("--predict_shots", type=int, default=None,
                        help="images per class given to predict (default: the checkpoint's)")
    parser.add_argument("--stem_pca_components", type=int, default=8)
    args = parser.parse_args()
    command = "python launch/stem_probe.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_probe(args.checkpoint, args.num_val_tasks, args.stem_pca_components, command,
                       args.predict_shots)
    write_report(args.output, "probe", result, markdown(result))


if __name__ == "__main__":
    main()
