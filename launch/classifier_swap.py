"""Zero-shot accuracy of a trained predictor under each classifier, with no further training.

The prototype and ridge classifiers share one parameter tree (a single temperature), so any
predictor can be evaluated with either. The ridge strength is chosen on meta-val tasks (the
tasks `baselines.lr_tuning_tasks` uses: never the unseen classes or the held-out dataset); the
unseen tasks are then scored once per classifier.

  python launch/classifier_swap.py --checkpoint=checkpoints/intra_gtsrb_resnet8 \
      --output=results/classifier_swap/intra_gtsrb_resnet8

Writes ``swap.json`` and ``swap.md`` (with the seed, machine, command and wall time).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints
from pudnet_jax.evaluate import TaskEvaluator, format_mean_ci, mean_and_ci95
from pudnet_jax.train import machine_description, make_test_tasks

flags.DEFINE_string("checkpoint", None, "Export dir or training workdir.", required=True)
flags.DEFINE_string("output", None, "Output directory.", required=True)
flags.DEFINE_list("ridge_lambdas", ["1e-4", "1e-3", "1e-2", "1e-1"], "Ridge strengths to select from.")
flags.DEFINE_integer("num_val_tasks", 10, "Meta-val tasks for choosing the ridge strength.")
FLAGS = flags.FLAGS


def _score(config, hyper_params, tasks, classifier, ridge_lambda=None):
    config = config.copy_and_resolve_references()
    config.hyper.classifier = classifier
    if ridge_lambda is not None:
        config.hyper.ridge_lambda = float(ridge_lambda)
    return TaskEvaluator(config).evaluate(hyper_params, tasks)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.perf_counter()
    config = checkpoints.read_config(FLAGS.checkpoint)
    hyper_params, info = checkpoints.restore_hyper_params(FLAGS.checkpoint, config)
    val_tasks = baselines.lr_tuning_tasks(config, FLAGS.num_val_tasks)
    test_tasks = make_test_tasks(config)

    ridge_val = {lam: _score(config, hyper_params, val_tasks, "ridge", lam)["predicted"]
                 for lam in FLAGS.ridge_lambdas}
    sweep = {lam: stats["mean"] for lam, stats in ridge_val.items()}
    best_lambda = max(sweep, key=sweep.get)
    rows = {"trained_with": config.hyper.classifier}
    prototype_val = _score(config, hyper_params, val_tasks, "prototype")["predicted"]
    # The ridge's meta-val score at the chosen strength is the sweep's.
    for name, lam, val in (("prototype", None, prototype_val),
                           ("ridge", best_lambda, ridge_val[best_lambda])):
        test = _score(config, hyper_params, test_tasks, name, lam)
        rows[name] = {"ridge_lambda": lam, "meta_val": val, "unseen": test["predicted"],
                      "per_task_unseen": test["per_task_predicted"]}
    diff = [r - p for r, p in zip(rows["ridge"]["per_task_unseen"], rows["prototype"]["per_task_unseen"])]
    result = {
        "checkpoint": os.path.abspath(FLAGS.checkpoint), "checkpoint_info": info,
        "command": "python launch/classifier_swap.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "seed": int(config.seed), "eval_task_seed": int(config.data.eval_task_seed),
        "machine": machine_description(), "ridge_lambda_sweep_meta_val": sweep,
        "classifiers": rows, "ridge_minus_prototype_unseen": mean_and_ci95(diff),
        "num_val_tasks": len(val_tasks), "num_unseen_tasks": len(test_tasks),
        "wall_seconds": time.perf_counter() - start,
    }
    os.makedirs(FLAGS.output, exist_ok=True)
    with open(os.path.join(FLAGS.output, "swap.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    lines = [f"Checkpoint `{FLAGS.checkpoint}` (meta-trained with the {rows['trained_with']} classifier), "
             f"evaluated zero-shot with each classifier.", "",
             f"Ridge strength chosen on {len(val_tasks)} meta-val tasks: "
             + ", ".join(f"{k}: {100 * v:.2f}%" for k, v in sweep.items()) + f" -> {best_lambda}.", "",
             "| classifier | meta-val % | unseen % (mean ± 95% CI over tasks) |", "| --- | --- | --- |"]
    for name in ("prototype", "ridge"):
        lines.append(f"| {name} | {format_mean_ci(rows[name]['meta_val'])} | {format_mean_ci(rows[name]['unseen'])} |")
    lines += ["", f"Ridge minus prototype, paired over {len(test_tasks)} unseen tasks: "
              f"{format_mean_ci(result['ridge_minus_prototype_unseen'])} points.", "",
              f"Command: `{result['command']}`; seed {result['seed']}; {result['machine']}; "
              f"wall time {result['wall_seconds']:.0f} s."]
    with open(os.path.join(FLAGS.output, "swap.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
