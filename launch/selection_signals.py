"""Analysis: which validation signal tracks the held-out dataset across a run's checkpoints?

An inter predictor can be selected (its best step, a recipe) on two signals:

- **source meta-val**: meta-val tasks of a source dataset (``baselines.lr_tuning_tasks``: GTSRB
  classes, which an inter run meta-trains on, so this measures fit to the sources);
- **leave-one-source-out (LOSO)**: whole-dataset tasks of the source the run left out of
  meta-training (``data.validation_dataset``; the run's own Validator tasks), a dataset it
  never saw, scored as the held-out dataset is.

This script scores every saved step of one LOSO training workdir (``train.keep_checkpoints``
large enough to keep them) on both signals *and* on the held-out dataset's evaluation task, and
reports how well each signal ranks the steps by held-out accuracy (Spearman's rank correlation)
and what held-out accuracy the step each signal would pick gets. The held-out scores are for
this analysis only: nothing is ever selected on them (RESULTS.md section 1, session 22).

  python launch/selection_signals.py --workdir=runs/inter_loso_fmnist_scale2 --num_val_tasks=20 \
      --output=results/selection_signals/inter_loso_fmnist_scale2

Writes ``signals.json`` and ``signals.md`` (machine, seed, command and wall time included).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np
import scipy.stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints, train
from pudnet_jax.evaluate import TaskEvaluator
from pudnet_jax.metrics import machine_description, machine_line, write_report

SIGNALS = ("source_meta_val", "loso")


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (average ranks for ties; NaN if
    either is constant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size < 3:
        raise ValueError(f"need two sequences of the same length >= 3; got {a.shape} and {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(a, b).statistic)


def summarise(rows: list[dict]) -> dict:
    """For each signal: its rank correlation with the held-out accuracy across steps, the step it
    selects (highest score; the earliest on ties, as the Validator keeps the first best) and that
    step's held-out accuracy, beside the best held-out accuracy any step reaches (for reference)."""
    held_out = [r["held_out"] for r in rows]
    out = {"best_held_out": max(held_out),
           "best_held_out_step": rows[int(np.argmax(held_out))]["step"]}
    for signal in SIGNALS:
        scores = [r[signal] for r in rows]
        pick = int(np.argmax(scores))
        out[signal] = {"spearman_with_held_out": spearman(scores, held_out),
                       "selected_step": rows[pick]["step"],
                       "held_out_at_selected": held_out[pick]}
    return out


def signal_tasks(config, num_val_tasks: int) -> dict:
    """The tasks of each signal for a LOSO run's ``config``: ``num_val_tasks`` source meta-val
    tasks, the run's own LOSO validation tasks, and the held-out dataset's evaluation task."""
    left_out = train.validation_dataset(config)
    if not left_out:
        raise ValueError("this run was not meta-trained with data.validation_dataset (leave-one-"
                         "source-out); there is no LOSO signal to compare.")
    return {"source_meta_val": baselines.lr_tuning_tasks(config, num_val_tasks),
            "loso": train.source_dataset_tasks(config, left_out, max(1, config.data.num_val_tasks),
                                               first_seed=config.data.eval_task_seed + 1),
            "held_out": train.make_test_tasks(config)}


def score_steps(workdir: str, config, steps: list[int], tasks: dict) -> list[dict]:
    """Per step of ``workdir``: the mean predicted accuracy on each of ``tasks``' task lists."""
    if len(steps) < 3:
        raise ValueError(f"need at least 3 saved steps to rank; got {steps} in {workdir}/checkpoints "
                         "(meta-train with a larger train.keep_checkpoints).")
    evaluator = TaskEvaluator(config)
    rows = []
    for step in steps:
        params, _ = checkpoints.restore_hyper_params(workdir, config, step=step)
        row = {"step": int(step)}
        for name, task_list in tasks.items():
            row[name] = evaluator.evaluate(params, task_list)["predicted"]["mean"]
        rows.append(row)
        print(f"step {step}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in row.items() if k != "step"),
              flush=True)
    return rows


def run(workdir: str, steps: list[int] | None, num_val_tasks: int) -> dict:
    """Scores every saved step (or ``steps``) of a LOSO ``workdir`` on the three task sets."""
    start = time.perf_counter()
    config = checkpoints.read_config(workdir)
    tasks = signal_tasks(config, num_val_tasks)
    rows = score_steps(workdir, config, steps or checkpoints.saved_steps(workdir), tasks)
    return {"workdir": workdir, "left_out": config.data.validation_dataset,
            "held_out_dataset": config.data.held_out,
            "num_tasks": {k: len(v) for k, v in tasks.items()}, "rows": rows,
            "summary": summarise(rows), "predict_shots": config.data.predict_shots,
            "eval_task_seed": config.data.eval_task_seed,
            "machine": machine_description(), "wall_seconds": time.perf_counter() - start}


def markdown(result: dict, command: str = "") -> str:
    m, n, s = result["machine"], result["num_tasks"], result["summary"]
    lines = [f"# Selection signals across the steps of `{result['workdir']}`", "",
             f"- Source meta-val: {n['source_meta_val']} meta-val tasks; LOSO: {n['loso']} whole-dataset "
             f"tasks of {result['left_out']} (left out of meta-training); held-out: "
             f"{result['held_out_dataset']} ({n['held_out']} task, analysis only, never selected on); "
             f"{result['predict_shots']} images per class given to predict",
             f"- Machine: {machine_line(m)}; wall time {result['wall_seconds']:.1f} s; task seed "
             f"data.eval_task_seed = {result['eval_task_seed']} (+1 for the validation tasks)"]
    if command:
        lines.append(f"- Command: `{command}`")
    lines += ["", "| step | source meta-val % | LOSO % | held-out % |", "| --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | {100 * r['source_meta_val']:.2f} | {100 * r['loso']:.2f} | "
                     f"{100 * r['held_out']:.2f} |")
    lines += ["", "| signal | Spearman with held-out | step it selects | held-out there % |",
              "| --- | --- | --- | --- |"]
    for signal in SIGNALS:
        t = s[signal]
        lines.append(f"| {signal} | {t['spearman_with_held_out']:+.2f} | {t['selected_step']} | "
                     f"{100 * t['held_out_at_selected']:.2f} |")
    lines.append(f"\nBest held-out accuracy of any step: {100 * s['best_held_out']:.2f}% "
                 f"(step {s['best_held_out_step']}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a LOSO training workdir")
    parser.add_argument("--steps", default="", help="comma-separated steps (default: every saved one)")
    parser.add_argument("--num_val_tasks", type=int, default=20, help="source meta-val tasks")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    result = run(args.workdir, steps, args.num_val_tasks)
    command = "python launch/selection_signals.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    write_report(args.output, "signals", result, markdown(result, command))


if __name__ == "__main__":
    main()
