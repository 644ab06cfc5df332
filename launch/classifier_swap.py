"""Zero-shot accuracy of a trained predictor under evaluation-time settings, with no training.

Three settings change what ``predict`` returns without touching the hypernetwork's weights:
the classifier (prototype or ridge: they share one parameter tree, a single temperature), the
ridge strength, and the size of the per-class sample ``predict`` reads (``data.predict_shots``;
the protocol lets predict see a fixed-size sample of the support, the config says how many).
All three are chosen on meta-val tasks (the tasks ``baselines.lr_tuning_tasks`` uses: never the
unseen classes or the held-out dataset); the unseen tasks are then scored once per classifier at
the chosen setting, and once as the checkpoint was trained and shipped ("as trained").

  python launch/classifier_swap.py --checkpoint=checkpoints/intra_gtsrb_resnet8 \
      --output=results/classifier_swap/intra_gtsrb_resnet8 --predict_shots=100,300

Writes ``swap.json`` and ``swap.md`` (with the seed, machine, command and wall time).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints
from pudnet_jax.evaluate import TaskEvaluator, format_mean_ci, mean_and_ci95
from pudnet_jax.metrics import write_report
from pudnet_jax.train import machine_description, make_test_tasks


def _variant(config, classifier=None, ridge_lambda=None, predict_shots=None):
    config = config.copy_and_resolve_references()
    if classifier is not None:
        config.hyper.classifier = classifier
    if ridge_lambda is not None:
        config.hyper.ridge_lambda = float(ridge_lambda)
    if predict_shots is not None:
        config.data.predict_shots = int(predict_shots)
    return config


def run_swap(checkpoint: str, *, shots_grid=(), ridge_lambdas=(1e-4, 1e-3, 1e-2, 1e-1),
             num_val_tasks: int = 10, command: str = "") -> dict:
    """Chooses the settings on meta-val, scores the unseen tasks; returns the results dict.

    ``shots_grid`` empty: only the checkpoint's own ``data.predict_shots``.
    """
    start = time.perf_counter()
    config = checkpoints.read_config(checkpoint)
    hyper_params, info = checkpoints.restore_hyper_params(checkpoint, config)
    shots_grid = [int(s) for s in shots_grid] or [int(config.data.predict_shots)]
    # Tasks differ only in their predict sample (same classes, same test images) across shots.
    val_tasks = {s: baselines.lr_tuning_tasks(_variant(config, predict_shots=s), num_val_tasks)
                 for s in shots_grid}
    test_tasks = {s: make_test_tasks(_variant(config, predict_shots=s)) for s in shots_grid}

    def score(tasks, **variant):
        return TaskEvaluator(_variant(config, **variant)).evaluate(hyper_params, tasks)

    ridge_val = {(s, lam): score(val_tasks[s], classifier="ridge", ridge_lambda=lam,
                                 predict_shots=s)["predicted"]
                 for s in shots_grid for lam in ridge_lambdas}
    # Ties go to the first entry: the smaller sample, then the order of ridge_lambdas.
    best_shots, best_lambda = max(ridge_val, key=lambda k: ridge_val[k]["mean"])
    prototype_val = {s: score(val_tasks[s], classifier="prototype", predict_shots=s)["predicted"]
                     for s in shots_grid}
    proto_shots = max(prototype_val, key=lambda s: prototype_val[s]["mean"])
    rows = {"trained_with": config.hyper.classifier}
    chosen = (("prototype", None, proto_shots, prototype_val[proto_shots]),
              ("ridge", float(best_lambda), best_shots, ridge_val[(best_shots, best_lambda)]))
    for name, lam, shots, val in chosen:
        test = score(test_tasks[shots], classifier=name, ridge_lambda=lam, predict_shots=shots)
        rows[name] = {"ridge_lambda": lam, "predict_shots": shots, "meta_val": val,
                      "unseen": test["predicted"], "per_task_unseen": test["per_task_predicted"],
                      "predict_seconds_median": test["predict_seconds_median"]}
    own_shots = int(config.data.predict_shots)
    own_tasks = test_tasks[own_shots] if own_shots in test_tasks else make_test_tasks(config)
    as_trained = TaskEvaluator(config).evaluate(hyper_params, own_tasks)
    rows["as_trained"] = {"classifier": config.hyper.classifier,
                          "ridge_lambda": float(config.hyper.ridge_lambda),
                          "predict_shots": own_shots, "unseen": as_trained["predicted"],
                          "per_task_unseen": as_trained["per_task_predicted"],
                          "predict_seconds_median": as_trained["predict_seconds_median"]}

    def paired(a, b):
        return mean_and_ci95([x - y for x, y in zip(rows[a]["per_task_unseen"], rows[b]["per_task_unseen"])])

    return {
        "checkpoint": os.path.abspath(checkpoint), "checkpoint_info": info, "command": command,
        "seed": int(config.seed), "eval_task_seed": int(config.data.eval_task_seed),
        "machine": machine_description(),
        "ridge_sweep_meta_val": {f"shots={s},lambda={lam}": v["mean"] for (s, lam), v in ridge_val.items()},
        "prototype_sweep_meta_val": {f"shots={s}": v["mean"] for s, v in prototype_val.items()},
        "classifiers": rows, "ridge_minus_prototype_unseen": paired("ridge", "prototype"),
        "ridge_minus_as_trained_unseen": paired("ridge", "as_trained"),
        "num_val_tasks": num_val_tasks, "val_tasks": [t.name for t in val_tasks[shots_grid[0]]],
        "num_unseen_tasks": len(own_tasks),
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    command = "python launch/classifier_swap.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_swap(FLAGS.checkpoint, shots_grid=FLAGS.predict_shots,
                      ridge_lambdas=[float(x) for x in FLAGS.ridge_lambdas],
                      num_val_tasks=FLAGS.num_val_tasks, command=command)
    write_report(FLAGS.output, "swap", result, markdown(result))


def markdown(r: dict) -> str:
    """The results of ``run_swap`` as a Markdown table with the command, machine and wall time."""
    rows = r["classifiers"]
    lines = [f"Checkpoint `{r['checkpoint']}` (meta-trained with the {rows['trained_with']} classifier), "
             "evaluated zero-shot with each classifier.", "",
             f"Chosen on {r['num_val_tasks']} meta-val tasks. Ridge (predict sample per class, strength): "
             + ", ".join(f"{k}: {100 * v:.2f}%" for k, v in r["ridge_sweep_meta_val"].items())
             + ". Prototype: " + ", ".join(f"{k}: {100 * v:.2f}%" for k, v in r["prototype_sweep_meta_val"].items())
             + ".", "",
             "| setting | predict sample per class | ridge strength | meta-val % | unseen % (mean ± 95% CI over tasks) | predict s (median) |",
             "| --- | --- | --- | --- | --- | --- |"]
    t = rows["as_trained"]
    lines.append(f"| as trained ({t['classifier']}) | {t['predict_shots']} | {t['ridge_lambda'] if t['classifier'] == 'ridge' else '-'} "
                 f"| - | {format_mean_ci(t['unseen'])} | {t['predict_seconds_median']:.3f} |")
    for name in ("prototype", "ridge"):
        row = rows[name]
        lines.append(f"| {name} (chosen) | {row['predict_shots']} | {row['ridge_lambda'] or '-'} | "
                     f"{format_mean_ci(row['meta_val'])} | {format_mean_ci(row['unseen'])} | "
                     f"{row['predict_seconds_median']:.3f} |")
    lines += ["", f"Paired over {r['num_unseen_tasks']} unseen tasks: ridge minus prototype "
              f"{format_mean_ci(r['ridge_minus_prototype_unseen'])} points; ridge (chosen) minus as trained "
              f"{format_mean_ci(r['ridge_minus_as_trained_unseen'])} points.", "",
              f"Command: `{r['command']}`; seed {r['seed']}; {r['machine']}; "
              f"wall time {r['wall_seconds']:.0f} s."]
    return "\n".join(lines)


def _define_flags():
    # Defined when run as a script only, so tests can import run_swap beside other entry points.
    flags.DEFINE_string("checkpoint", None, "Export dir or training workdir.", required=True)
    flags.DEFINE_string("output", None, "Output directory.", required=True)
    flags.DEFINE_list("ridge_lambdas", ["1e-4", "1e-3", "1e-2", "1e-1"], "Ridge strengths to select from.")
    flags.DEFINE_list("predict_shots", [], "Per-class predict sample sizes to select from "
                      "(default: only the checkpoint's data.predict_shots).")
    flags.DEFINE_integer("num_val_tasks", 10, "Meta-val tasks for choosing the ridge strength.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
