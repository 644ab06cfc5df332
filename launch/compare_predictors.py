"""Model selection between predictors on meta-val tasks only, paired.

Which of two exported predictors (e.g. a stage and the stage it warm-started from) should ship?
A training run selects its own best step on its meta-val tasks, but those tasks use the
meta-training shots (GTSRB: 10 images per class), while evaluation gives predict
``data.predict_shots`` (GTSRB: 100). This script scores every predictor on the *same* meta-val
tasks built with the evaluation protocol's predict sample (``baselines.lr_tuning_tasks``, the
tasks the benchmark tunes learning rates on; never the unseen classes or the held-out dataset),
and reports each one's accuracy and its paired difference to the first.

  python launch/compare_predictors.py --checkpoints=OLD,NEW --num_val_tasks=30 \
      --output=results/compare_predictors/intra_gtsrb_resnet8

Writes ``compare.json`` and ``compare.md`` (machine, seed, wall time included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints
from pudnet_jax.evaluate import TaskEvaluator, format_mean_ci, mean_and_ci95
from pudnet_jax.train import machine_description


def compare(paths: list[str], num_val_tasks: int) -> dict:
    """Per-task meta-val accuracy of each predictor in ``paths`` on the first one's meta-val tasks."""
    if len(paths) < 2:
        raise ValueError(f"need at least two predictors to compare, got {paths}")
    start = time.perf_counter()
    configs = [checkpoints.read_config(path) for path in paths]
    reference = configs[0]
    # Checked before any evaluation: a mismatch should not surface minutes into the run.
    for path, config in zip(paths[1:], configs[1:]):
        for field in ("setting", "dataset", "held_out", "split_seed"):
            if config.data[field] != reference.data[field]:
                raise ValueError(f"{path}: data.{field}={config.data[field]!r} differs from "
                                 f"{paths[0]}'s {reference.data[field]!r}; their meta-val tasks differ.")
    tasks = baselines.lr_tuning_tasks(reference, num_val_tasks)
    rows = []
    for path, config in zip(paths, configs):
        params, info = checkpoints.restore_hyper_params(path, config)
        result = TaskEvaluator(config).evaluate(params, tasks)
        rows.append({"checkpoint": path, "info_step": info.get("step"),
                     "per_task": result["per_task_predicted"], "predicted": result["predicted"]})
    base = np.array(rows[0]["per_task"])
    for row in rows:
        row["minus_first"] = mean_and_ci95(list(np.array(row["per_task"]) - base))
    return {"rows": rows, "num_val_tasks": len(tasks), "val_tasks": [t.name for t in tasks],
            "predict_shots": reference.data.predict_shots, "eval_task_seed": reference.data.eval_task_seed,
            "machine": machine_description(), "wall_seconds": time.perf_counter() - start}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Predictors compared on {result['num_val_tasks']} meta-val tasks "
             f"({result['predict_shots']} images per class given to predict)", "",
             f"- Machine: {m['cpu']} ({m['cpu_count']} CPUs), JAX {m['jax_version']} "
             f"backend `{m['jax_backend']}`; wall time {result['wall_seconds']:.1f} s; "
             f"task seed data.eval_task_seed + 1 = {result['eval_task_seed'] + 1}", "",
             "| predictor | meta-val accuracy % | minus the first (paired) |", "| --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| `{row['checkpoint']}` | {format_mean_ci(row['predicted'])} | "
                     f"{format_mean_ci(row['minus_first'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", required=True, help="comma-separated exports or workdirs")
    parser.add_argument("--num_val_tasks", type=int, default=30)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    result = compare(args.checkpoints.split(","), args.num_val_tasks)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "compare.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.output, "compare.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
