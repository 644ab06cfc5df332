"""Analysis: how much does a predictor's unseen-task score move with the sample predict is given?

The protocol scores a predictor on fixed unseen tasks, each with one fixed predict sample (for
inter: ``data.predict_shots`` train images per class of the held-out dataset, drawn with
``data.eval_task_seed``). This script repeats that evaluation with other draws (evaluation task
seeds ``seed, seed + 1, ...``), the predictor unchanged, and reports the spread: the part of a
single unseen-task number (e.g. CIFAR-10's one task) that is the luck of the sample, not the
predictor. Nothing is selected on it.

  python launch/predict_sample_spread.py --checkpoint=checkpoints/inter_resnet8 --num_seeds=5 \
      --output=results/predict_sample_spread/inter_resnet8

``--variant=data_layers_residual_scale=0`` scores the predictor with ``hyper`` fields changed at
inference (the fields ``launch/compare_predictors.py --variants`` allows; params unchanged), e.g.
a leave-one-source-out run as the recipe is used rather than as it was meta-trained.

Writes ``spread.json`` and ``spread.md`` (machine, command and wall time included).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.compare_predictors import apply_overrides, parse_variants
from pudnet_jax import checkpoints, train
from pudnet_jax.evaluate import TaskEvaluator, format_mean_ci, mean_and_ci95
from pudnet_jax.metrics import machine_description, machine_line, write_report


def spread(checkpoint: str, seeds: list[int], predict_shots: int | None = None,
           overrides: dict | None = None) -> dict:
    """The checkpoint's mean unseen-task accuracy with the evaluation tasks drawn at each of
    ``seeds`` (``data.eval_task_seed``); ``predict_shots`` overrides the per-class sample and
    ``overrides`` (``{hyper field: value}``, see ``compare_predictors.VARIANT_FIELDS``) the
    inference-time settings of the hypernetwork."""
    start = time.perf_counter()
    config = checkpoints.read_config(checkpoint)
    params, info = checkpoints.restore_hyper_params(checkpoint, config)
    if overrides:
        config = apply_overrides(config, overrides)  # refuses fields that change the params
    if predict_shots is not None:
        config.data.predict_shots = int(predict_shots)
    evaluator = TaskEvaluator(config)
    rows = []
    for seed in seeds:
        drawn = config.copy_and_resolve_references()  # the evaluator's config stays as read
        drawn.data.eval_task_seed = int(seed)
        tasks = train.make_test_tasks(drawn)
        result = evaluator.evaluate(params, tasks)
        rows.append({"eval_task_seed": int(seed), "tasks": [t.name for t in tasks],
                     "predicted": result["predicted"]["mean"],
                     "predict_seconds_median": result["predict_seconds_median"]})
        print(f"eval_task_seed {seed}: {100 * rows[-1]['predicted']:.2f}%", flush=True)
    scores = [r["predicted"] for r in rows]
    return {"checkpoint": checkpoint, "info": info, "setting": config.data.setting,
            "held_out": config.data.held_out, "predict_shots": int(config.data.predict_shots),
            "overrides": dict(overrides or {}),
            "rows": rows, "over_seeds": mean_and_ci95(scores),
            "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan"),
            "min": min(scores), "max": max(scores),
            "machine": machine_description(), "wall_seconds": time.perf_counter() - start}


def markdown(result: dict, command: str = "") -> str:
    m = result["machine"]
    what = (f"the held-out {result['held_out']}" if result["setting"] == "inter"
            else "the unseen-class tasks")
    lines = [f"# `{result['checkpoint']}` on {what}, predict samples drawn at "
             f"{len(result['rows'])} evaluation task seeds ({result['predict_shots']} images per class)"
             + "".join(f", hyper.{k}={v}" for k, v in result.get("overrides", {}).items()), "",
             f"- Machine: {machine_line(m)}; wall time {result['wall_seconds']:.1f} s"]
    if command:
        lines.append(f"- Command: `{command}`")
    lines += ["", "| eval_task_seed | predicted % | predict s (median) |", "| --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['eval_task_seed']} | {100 * r['predicted']:.2f} | {r['predict_seconds_median']:.3f} |")
    lines.append(f"\nOver the seeds: {format_mean_ci(result['over_seeds'])}% (95% interval of the mean), "
                 f"standard deviation {100 * result['std']:.2f} points, range "
                 f"{100 * result['min']:.2f}-{100 * result['max']:.2f}%.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an export or a training workdir")
    parser.add_argument("--num_seeds", type=int, default=5)
    parser.add_argument("--first_seed", type=int, default=0, help="0 is the protocol's own draw")
    parser.add_argument("--predict_shots", type=int, default=None)
    parser.add_argument("--variant", default=None,
                        help="hyper overrides at inference, e.g. data_layers_residual_scale=0 (comma-separated)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.num_seeds < 2:
        parser.error("--num_seeds must be at least 2 (a spread needs two draws).")
    variant = parse_variants(args.variant)
    if variant is not None and len(variant) != 1:
        parser.error("--variant takes one set of overrides (no ';').")
    result = spread(args.checkpoint, list(range(args.first_seed, args.first_seed + args.num_seeds)),
                    args.predict_shots, variant[0] if variant else None)
    command = "python launch/predict_sample_spread.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    write_report(args.output, "spread", result, markdown(result, command))


if __name__ == "__main__":
    main()
