"""The whole evaluation protocol (docs/protocol.md) in one process, on one machine.

    python -m pudnet_jax.benchmark --checkpoint=runs/intra_omniglot --output=results/bench_omniglot
    python -m pudnet_jax.benchmark --config=configs/intra.py:gtsrb --checkpoint=runs/intra_gtsrb --output=DIR
    python -m pudnet_jax.benchmark --checkpoint=EXPORT --output=/tmp/b --num_tasks=5 --scratch_epochs=3

``--checkpoint`` is an export or a training workdir; without ``--config`` its own config.json is
used (with it, the hypernetwork fields must equal that config.json's, or the run is refused).
Writes ``DIR/benchmark.json`` (everything, including the class split and the task manifest),
``DIR/benchmark.md`` (the table) and two plots: ``accuracy_vs_time.png`` (Adam from scratch and
fine-tuning against cumulative training time, the prediction marked at its wall time) and
``per_task_scatter.png`` (predicted vs best from-scratch accuracy per task).

Predicted / random init / nearest prototype run on all fixed unseen tasks; the training
baselines (slow) on the first ``config.eval.num_baseline_tasks``. Speedup = from-scratch time to
first reach the predicted accuracy / predict time, on the mean curves of those same tasks (epoch
granularity, no interpolation; ">" when never reached within the epoch budget).

``--seed`` is the evaluation's seed (from-scratch initialisation and batch order, random-init
draws, the LR sweeps), 0 unless given: the predictor's own meta-training seed (its
``config.seed``) plays no part, so every predictor is measured against the same from-scratch
runs. ``--scratch_seeds=k`` trains from scratch ``k`` times per baseline task (seeds ``seed + i
+ 1000 j``) and averages the curves: the inter setting has a single task, so without it the
from-scratch bar is one run, and one run of one epoch moves by points from seed to seed.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import time

import jax
import numpy as np

from pudnet_jax import baselines, checkpoints, data, metrics
from pudnet_jax.evaluate import (TaskEvaluator, accuracy, format_mean_ci, init_target,
                                 mean_and_ci95, random_init_seed)
from pudnet_jax.metrics import machine_description
from pudnet_jax.train import make_test_tasks


def time_to_reach(epoch_accuracy, epoch_seconds, target: float) -> float | None:
    """Cumulative seconds at the first epoch whose accuracy >= ``target``; None if never."""
    for acc, seconds in zip(epoch_accuracy, epoch_seconds):
        if acc >= target:
            return float(seconds)
    return None


def speedup(epoch_accuracy, epoch_seconds, target: float, predict_seconds: float) -> dict:
    """Speedup of predicting over training from scratch (see the module docstring).

    Returns ``reached``, ``scratch_seconds`` (time to reach, or the whole budget if not reached),
    ``ratio`` (a lower bound when not reached) and ``text`` ("12.3x" or ">12.3x").
    """
    reached = time_to_reach(epoch_accuracy, epoch_seconds, target)
    seconds = reached if reached is not None else float(epoch_seconds[-1])
    ratio = seconds / predict_seconds
    return {"reached": reached is not None, "scratch_seconds": seconds, "ratio": ratio,
            "target_accuracy": float(target), "predict_seconds": float(predict_seconds),
            "text": ("" if reached is not None else ">") + f"{ratio:.3g}x"}


def time_predict(evaluator: TaskEvaluator, hyper_params, task, repeats: int):
    """Median wall time of the compiled predict, from reading the task's batch (host gather,
    host->device) to the variables being ready, BatchNorm pass included.

    Returns ``(variables, median seconds, first-call seconds)``; the first call compiles (once
    per batch shape) and is not part of the median.
    """
    predict = evaluator.predict_fn(task.num_classes)
    start = time.perf_counter()
    variables = jax.block_until_ready(predict(hyper_params, task.dataset_batch()))
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        variables = jax.block_until_ready(predict(hyper_params, task.dataset_batch()))
        times.append(time.perf_counter() - start)
    return variables, float(np.median(times)), first


def predict_sample_frontier(config, evaluator: TaskEvaluator, hyper_params, sizes, n_base: int,
                            scratch_stats: dict, predict_repeats: int, num_val_tasks: int) -> list:
    """Predicted accuracy, predict time and speedup for other sizes of the predict sample.

    The speed/accuracy trade-off of the dataset sketch: each size in ``sizes`` (images per class
    given to predict) rebuilds the same fixed tasks (same classes, support and test images; only
    the predict sample is redrawn) and is scored on all of them, timed like the main row, and
    compared with the *same* from-scratch curve (the support does not depend on the sample).
    Meta-val accuracy at each size is reported beside it, so an operating point can be chosen
    without the unseen tasks, and so is the random backbone read out from the same sample (the
    main row's draws), since a larger sample also lifts a random backbone's solved classifier.
    Must run after the training baselines, in the same process.
    """
    rows = []
    for size in sizes:
        sized = copy.deepcopy(config)
        with sized.unlocked():
            sized.data.predict_shots = int(size)
        accs, seconds, random_solved = [], [], []
        for i, task in enumerate(make_test_tasks(sized)):
            variables, median, _ = time_predict(evaluator, hyper_params, task, predict_repeats)
            accs.append(accuracy(config.model.target, variables, task.test_images, task.test_labels))
            seconds.append(median)
            random_solved.append(baselines.random_backbone_accuracy(sized, task,
                                                                    random_init_seed(config, i)))
        meta_val = evaluator.evaluate(hyper_params, baselines.lr_tuning_tasks(sized, num_val_tasks))
        base_acc, base_s = float(np.mean(accs[:n_base])), float(np.mean(seconds[:n_base]))
        rows.append({"predict_shots": int(size), "predicted": mean_and_ci95(accs),
                     "random_init_solved": (None if None in random_solved
                                            else mean_and_ci95(random_solved)),
                     "meta_val_predicted": meta_val["predicted"]["mean"],
                     "predict_seconds_median": float(np.median(seconds)),
                     "baseline_tasks_predicted": base_acc,
                     "speedup": speedup(scratch_stats["epoch_accuracy_mean"],
                                        scratch_stats["epoch_seconds_mean"], base_acc, base_s)})
    return rows


def _curve_stats(runs, refit: bool = False) -> dict:
    """Mean curves over tasks; ``refit``: of the re-solved classifier, its own time included."""
    if refit:
        acc = np.array([r["epoch_accuracy_refit"] for r in runs])
        sec = np.array([np.add(r["epoch_seconds_cumulative"], r["epoch_refit_seconds"]) for r in runs])
    else:
        acc = np.array([r["epoch_accuracy"] for r in runs])
        sec = np.array([r["epoch_seconds_cumulative"] for r in runs])
    return {"epoch_accuracy_mean": acc.mean(0).tolist(),
            "epoch_accuracy_ci95": [mean_and_ci95(a)["ci95"] for a in acc.T],
            "epoch_seconds_mean": sec.mean(0).tolist()}


# Seed offset between the repeated from-scratch runs of one task (``scratch_seeds``): far from
# the per-task offsets ``seed + i``, so no two runs share a seed.
SCRATCH_SEED_STRIDE = 1000


def run_benchmark(config, checkpoint: str, output: str, *, num_baseline_tasks=None,
                  scratch_lr=None, finetune_lrs=None, lr_tune_tasks: int = 3, lr_tune_epochs=None,
                  predict_repeats: int = 3, command: str | None = None,
                  config_arg: str | None = None, frontier_shots=(), frontier_val_tasks: int = 10,
                  scratch_seeds: int = 1) -> dict:
    """Runs the protocol for ``config`` (``config.eval`` sizes the baselines) -> results dict.

    ``scratch_lr`` fixes the from-scratch LR (else tuned over ``config.eval.scratch_lrs``);
    ``finetune_lrs`` tunes the fine-tuning LR (else ``config.eval.finetune_lr``). Both sweeps run
    on ``lr_tune_tasks`` meta-val tasks (``baselines.lr_tuning_tasks``), never the unseen ones.
    A predictor with the ridge classifier also gets fine-tuning with the classifier re-solved
    after each epoch (``baselines.refit_classifier``, its LR tuned by the same sweep).
    ``frontier_shots``: other predict-sample sizes to score and time against the same
    from-scratch curve (``predict_sample_frontier``; meta-val on ``frontier_val_tasks`` tasks).
    ``scratch_seeds``: from-scratch runs per baseline task (seeds ``config.seed + i +
    SCRATCH_SEED_STRIDE * j``); the curves, the speedup and the CI are over all of them.
    """
    # Explicit None checks: 0 is a value (and a wrong one), not "use the config's default".
    e, d = config.eval, config.data
    num_baseline_tasks = e.num_baseline_tasks if num_baseline_tasks is None else num_baseline_tasks
    lr_tune_epochs = e.scratch_epochs if lr_tune_epochs is None else lr_tune_epochs
    for name, value in (("num_baseline_tasks", num_baseline_tasks), ("lr_tune_epochs", lr_tune_epochs),
                        ("lr_tune_tasks", lr_tune_tasks), ("predict_repeats", predict_repeats),
                        ("scratch_seeds", scratch_seeds)):
        if int(value) < 1:
            raise ValueError(f"run_benchmark: {name} must be at least 1, got {value}.")
    wall_start = time.perf_counter()
    load_start = list(os.getloadavg())
    checkpoints.check_config_matches_checkpoint(config, checkpoint)  # before any output is written
    hyper_params, info = checkpoints.restore_hyper_params(checkpoint, config)
    tasks = make_test_tasks(config)  # refuses bad task settings before any output is written
    os.makedirs(output, exist_ok=True)
    n_base = min(len(tasks), int(num_baseline_tasks))
    evaluator = TaskEvaluator(config)
    target_name = config.model.target

    per_task = []
    for i, task in enumerate(tasks):
        variables, seconds, first = time_predict(evaluator, hyper_params, task, predict_repeats)
        test_x, test_y = task.test_images, task.test_labels
        # The same draws as train.final_evaluation's random init (evaluate.random_init_seed).
        random_vars = init_target(target_name, task.num_classes, test_x.shape[1:],
                                  random_init_seed(config, i))
        per_task.append({
            "name": task.name, "predicted": accuracy(target_name, variables, test_x, test_y),
            "random_init": accuracy(target_name, random_vars, test_x, test_y),
            # The same draw read out like a prediction: the zero-shot bar for the backbone.
            "random_init_solved": baselines.random_backbone_accuracy(config, task,
                                                                     random_init_seed(config, i)),
            "nearest_prototype": baselines.nearest_prototype_accuracy(config, hyper_params, task),
            "predict_seconds": seconds, "predict_first_call_seconds": first})

    tune_tasks = (baselines.lr_tuning_tasks(config, lr_tune_tasks)
                  if scratch_lr is None or finetune_lrs else [])
    if scratch_lr is None:
        tuning = baselines.tune_learning_rate(
            target_name, tune_tasks, list(e.scratch_lrs), epochs=int(lr_tune_epochs),
            batch_size=e.batch_size, seed=config.seed)
        scratch_lr = tuning["best_lr"]
    else:
        tuning = {"best_lr": float(scratch_lr), "note": "given on the command line, not tuned"}
    refit_lambda = float(config.hyper.ridge_lambda) if config.hyper.classifier == "ridge" else None
    finetune_lr = refit_lr = float(e.finetune_lr)
    ft_tuning = {"best_lr": finetune_lr, "note": "config.eval.finetune_lr, not tuned"}
    if finetune_lrs:
        ft_tuning = baselines.tune_learning_rate(
            target_name, tune_tasks, list(finetune_lrs), epochs=int(e.finetune_epochs),
            batch_size=e.batch_size, seed=config.seed, refit_ridge_lambda=refit_lambda,
            init_fn=lambda task: evaluator.predict(hyper_params, task)[0])
        finetune_lr = ft_tuning["best_lr"]
        refit_lr = ft_tuning.get("best_lr_refit", finetune_lr)

    scratch_runs, finetune_runs, refit_runs, base_rows = [], [], [], []
    for i, task in enumerate(tasks[:n_base]):
        args = (target_name, task.num_classes, task.support_images, task.support_labels,
                task.test_images, task.test_labels)
        seed_runs = [baselines.train_from_scratch(*args, lr=scratch_lr, epochs=e.scratch_epochs,
                                                  batch_size=e.batch_size,
                                                  seed=config.seed + i + SCRATCH_SEED_STRIDE * j)
                     for j in range(int(scratch_seeds))]
        scratch = seed_runs[0]
        # Time predict again right after the training run: on a shared machine the load drifts
        # over a long benchmark, and the speedup should compare times taken under the same load.
        # The speedup uses the mean of this and the first timing (before all baselines).
        predicted_vars, after, _ = time_predict(evaluator, hyper_params, task, predict_repeats)
        per_task[i]["predict_seconds_after_scratch"] = after
        # The re-solved variant reads the same run when the sweep chose the same LR for both
        # (re-solving does not change the trajectory); otherwise it gets a run of its own.
        shared = refit_lambda is not None and refit_lr == finetune_lr
        finetune = baselines.train_from_scratch(*args, lr=finetune_lr, epochs=e.finetune_epochs,
                                                batch_size=e.batch_size, seed=config.seed + i,
                                                init_variables=predicted_vars,
                                                refit_ridge_lambda=refit_lambda if shared else None)
        refit = finetune if shared or refit_lambda is None else (
            baselines.train_from_scratch(*args, lr=refit_lr, epochs=e.finetune_epochs,
                                         batch_size=e.batch_size, seed=config.seed + i,
                                         init_variables=predicted_vars, refit_ridge_lambda=refit_lambda))
        for run in (*seed_runs, finetune, refit):
            run.pop("variables", None)
        scratch_runs.extend(seed_runs)
        finetune_runs.append(finetune)
        refit_runs.append(refit)
        target = per_task[i]["predicted"]
        task_curve = _curve_stats(seed_runs)  # this task's mean over its seeds
        base_rows.append({"name": task.name, "scratch": scratch, "finetune": finetune,
                          **({"scratch_other_seeds": seed_runs[1:]} if len(seed_runs) > 1 else {}),
                          **({"finetune_refit": refit} if refit is not finetune else {}),
                          "scratch_seconds_to_reach_predicted": time_to_reach(
                              task_curve["epoch_accuracy_mean"], task_curve["epoch_seconds_mean"], target)})

    base_predicted = [r["predicted"] for r in per_task[:n_base]]
    base_predict_s = float(np.mean([(r["predict_seconds"] + r["predict_seconds_after_scratch"]) / 2
                                    for r in per_task[:n_base]]))
    scratch_stats, finetune_stats = _curve_stats(scratch_runs), _curve_stats(finetune_runs)
    frontier = predict_sample_frontier(config, evaluator, hyper_params, frontier_shots, n_base,
                                       scratch_stats, predict_repeats, frontier_val_tasks)
    results = {
        "setting": d.setting, "dataset": d.dataset if d.setting == "intra" else d.held_out,
        "target": target_name, "checkpoint": {"path": os.path.abspath(checkpoint), "info": info},
        "command": command or " ".join(sys.argv), "config_arg": config_arg, "seed": int(config.seed),
        "machine": machine_description(),
        # 1/5/15-min load averages before and after: on a shared machine, context for the times.
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "protocol": {"num_tasks": len(tasks), "num_baseline_tasks": n_base,
                     "scratch_epochs": int(e.scratch_epochs), "scratch_seeds": int(scratch_seeds),
                     "finetune_epochs": int(e.finetune_epochs),
                     "finetune_lr": finetune_lr, "batch_size": int(e.batch_size),
                     "finetune_refit_lr": refit_lr if refit_lambda is not None else None,
                     "refit_ridge_lambda": refit_lambda,
                     "last_batch": baselines.PADDING, "predict_repeats": predict_repeats,
                     "predict_shots": int(d.predict_shots)},
        **{key: mean_and_ci95([row[key] for row in per_task])
           for key in ("predicted", "random_init", "nearest_prototype")},
        **({"random_init_solved": mean_and_ci95([row["random_init_solved"] for row in per_task]),
            "predicted_minus_random_init_solved": mean_and_ci95(
                [row["predicted"] - row["random_init_solved"] for row in per_task])}
           if config.hyper.classifier != "generated" else {}),
        "chance": float(np.mean([1.0 / t.num_classes for t in tasks])),
        "predict_seconds_median": float(np.median([r["predict_seconds"] for r in per_task])),
        "lr_tuning": tuning, "finetune_lr_tuning": ft_tuning,
        "baseline_tasks": {"names": [t.name for t in tasks[:n_base]],
                           "predicted": mean_and_ci95(base_predicted),
                           "predict_seconds_mean": base_predict_s,
                           "scratch": scratch_stats, "finetune": finetune_stats,
                           **({"finetune_refit": _curve_stats(refit_runs, refit=True)}
                              if refit_lambda is not None else {})},
        "speedup": speedup(scratch_stats["epoch_accuracy_mean"], scratch_stats["epoch_seconds_mean"],
                           float(np.mean(base_predicted)), base_predict_s),
        "predict_sample_frontier": frontier,
        "per_task": per_task, "per_baseline_task": base_rows,
        "class_split": (data.class_split(d.dataset, d.split_seed, config.data_dir or None).to_dict()
                        if d.setting == "intra" else data.inter_split(d.held_out).to_dict()),
        "task_manifest": data.task_manifest(tasks), "config": config.to_dict(),
    }
    results["speedup"]["per_task_reached"] = sum(
        r["scratch_seconds_to_reach_predicted"] is not None for r in base_rows)
    results["total_wall_seconds"] = time.perf_counter() - wall_start
    with open(os.path.join(output, "benchmark.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(output, "benchmark.md"), "w") as f:
        f.write(markdown_report(results))
    plot_results(results, output)
    return results


def _lr_note(t: dict) -> str:
    if "lrs" not in t:
        return f"{t['best_lr']:g} ({t['note']})"
    sweep = ", ".join(f"{lr:g}: {100 * a:.1f}%" for lr, a in zip(t["lrs"], t["mean_final_accuracy"]))
    note = (f"{t['best_lr']:g} tuned on {len(t['tasks'])} meta-val tasks, {t['epochs']} epochs "
            f"(final accuracy {sweep})")
    if "best_lr_refit" in t:
        refit = ", ".join(f"{lr:g}: {100 * a:.1f}%" for lr, a in zip(t["lrs"], t["mean_final_accuracy_refit"]))
        note += f"; with the classifier re-solved {t['best_lr_refit']:g} ({refit})"
    return note


def _scratch_runs(row: dict) -> list:
    """A baseline task's from-scratch runs, one per seed (``scratch_seeds``)."""
    return [row["scratch"], *row.get("scratch_other_seeds", [])]


def _seed_note(r: dict) -> str:
    """Each from-scratch run's epoch-1 accuracy, per baseline task: how far one seed moves the bar."""
    notes = []
    for row in r["per_baseline_task"]:
        notes.append("/".join(f"{100 * run['epoch_accuracy'][1]:.2f}" for run in _scratch_runs(row)))
    return "epoch 1 per seed: " + "; ".join(notes) + "%"


def _task_note(r: dict) -> str:
    if r["setting"] == "inter":
        return (f": the whole held-out {r['dataset']} (from scratch trains on its train split, "
                "all methods are scored on its test split)")
    return f" of unseen {r['dataset']} classes"


def markdown_report(r: dict) -> str:
    p, b, m = r["protocol"], r["baseline_tasks"], r["machine"]
    n, nb = p["num_tasks"], p["num_baseline_tasks"]
    rows = [("predicted (zero-shot)", n, format_mean_ci(r["predicted"]), f"{r['predict_seconds_median']:.4f} (predict, median)"),
            ("random init", n, format_mean_ci(r["random_init"]), "-"),
            *([(f"random init, BatchNorm statistics and {r['config']['hyper']['classifier']} classifier "
                "from the predict sample (as predict)", n, format_mean_ci(r["random_init_solved"]),
                "-")] if "random_init_solved" in r else []),
            ("nearest prototype on the encoder", n, format_mean_ci(r["nearest_prototype"]), "-"),
            ("predicted (zero-shot), baseline tasks", nb, format_mean_ci(b["predicted"]),
             f"{b['predict_seconds_mean']:.4f} (predict, mean of before / after the baselines)")]
    s = b["scratch"]
    k = p.get("scratch_seeds", 1)
    last = len(s["epoch_accuracy_mean"]) - 1
    shown = sorted({e for e in (1, 2, 5, 10, 20, 50, 100, last) if 1 <= e <= last})
    for ep in shown:
        rows.append((f"Adam from scratch, epoch {ep} (lr {r['lr_tuning']['best_lr']:g})",
                     nb if k == 1 else f"{nb} x {k} seeds",
                     format_mean_ci({"mean": s["epoch_accuracy_mean"][ep], "ci95": s["epoch_accuracy_ci95"][ep]}),
                     f"{s['epoch_seconds_mean'][ep]:.3f}"))
    f = b["finetune"]
    last_ft = len(f["epoch_accuracy_mean"]) - 1
    for ep in sorted({e for e in (1, last_ft) if 1 <= e <= last_ft}):
        rows.append((f"predicted + Adam fine-tuning, epoch {ep}", nb,
                     format_mean_ci({"mean": f["epoch_accuracy_mean"][ep], "ci95": f["epoch_accuracy_ci95"][ep]}),
                     f"{b['predict_seconds_mean'] + f['epoch_seconds_mean'][ep]:.3f} (predict + fine-tune)"))
    if "finetune_refit" in b:
        f = b["finetune_refit"]
        for ep in sorted({e for e in (1, last_ft) if 1 <= e <= last_ft}):
            rows.append((f"predicted + Adam fine-tuning, classifier re-solved, epoch {ep} (lr {p['finetune_refit_lr']:g})", nb,
                         format_mean_ci({"mean": f["epoch_accuracy_mean"][ep], "ci95": f["epoch_accuracy_ci95"][ep]}),
                         f"{b['predict_seconds_mean'] + f['epoch_seconds_mean'][ep]:.3f} (predict + fine-tune + re-solve)"))
    sp = r["speedup"]
    lines = [
        f"# Benchmark: {r['setting']} / {r['dataset']} / target {r['target']}", "",
        f"- Checkpoint: `{r['checkpoint']['path']}` ({r['checkpoint']['info']})",
        f"- Machine: {metrics.machine_line(m)}, devices {m['devices']}",
        f"- Seed: {r['seed']}; config: `{r['config_arg'] or 'given programmatically'}` (full config in benchmark.json)",
        f"- Command: `{r['command']}`",
        f"- Total wall time: {r['total_wall_seconds']:.1f} s; load average (1 min) "
        f"{r['load_average']['start'][0]:.1f} at the start, {r['load_average']['end'][0]:.1f} at the end "
        f"({m['cpu_count']} CPUs: above that, other processes shared the machine)",
        f"- Tasks: {n} fixed unseen task(s){_task_note(r)} ({p['predict_shots']} images/class given to predict; "
        f"class split and task manifest in benchmark.json: `class_split`, `task_manifest`). "
        f"**Training baselines ran on the first {nb} tasks only.**",
        f"- From scratch: Adam, lr {_lr_note(r['lr_tuning'])}, batch {p['batch_size']}, "
        f"{p['scratch_epochs']} epochs on the full support"
        + (f", {k} seeds per task (mean curve; {_seed_note(r)})" if k > 1 else "")
        + f"; fine-tuning: lr {_lr_note(r['finetune_lr_tuning'])}. "
        f"Last partial batch: {p['last_batch']}. Times exclude compilation and test evaluation.", "",
        "| method | tasks | accuracy % (mean ± 95% CI) | wall time s (mean per task) |",
        "| --- | --- | --- | --- |",
        *[f"| {a} | {t} | {acc} | {w} |" for a, t, acc, w in rows], "",
        f"Chance: {100 * r['chance']:.2f}%.", "",
        *([f"Predicted minus random init read out as predict (same BatchNorm pass and classifier "
           f"solve), paired over {n} task(s): {format_mean_ci(r['predicted_minus_random_init_solved'])} "
           "points: what the predicted backbone adds over a random one.", ""]
          if "predicted_minus_random_init_solved" in r else []),
        f"**Speedup** (mean over the {nb} baseline tasks): {sp['text']} — from scratch "
        f"{'reaches' if sp['reached'] else 'does not reach'} the predicted accuracy "
        f"{100 * sp['target_accuracy']:.2f}% {'after' if sp['reached'] else 'within'} "
        f"{sp['scratch_seconds']:.3f} s; predict takes {sp['predict_seconds']:.4f} s. Per task, from "
        f"scratch reaches that task's predicted accuracy on {sp['per_task_reached']} of {nb} tasks "
        f"within {p['scratch_epochs']} epochs.", "", *_frontier_lines(r)]
    return "\n".join(lines)


def _frontier_lines(r: dict) -> list[str]:
    if not r.get("predict_sample_frontier"):
        return []
    nb = r["protocol"]["num_baseline_tasks"]
    lines = ["**Predict sample size** (images per class given to predict; the same tasks and the "
             "same from-scratch curve, timed after the baselines; meta-val for choosing a size "
             "without the unseen tasks):", "",
             f"| images per class | meta-val % | unseen % (all tasks) | random init read out "
             f"alike % | predict s (median) | speedup ({nb} baseline tasks) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in r["predict_sample_frontier"]:
        solved = row.get("random_init_solved")
        lines.append(f"| {row['predict_shots']} | {100 * row['meta_val_predicted']:.2f} | "
                     f"{format_mean_ci(row['predicted'])} | "
                     f"{format_mean_ci(solved) if solved else '-'} | "
                     f"{row['predict_seconds_median']:.4f} | "
                     f"{row['speedup']['text']} (to {100 * row['baseline_tasks_predicted']:.2f}%) |")
    return lines + [""]


def plot_results(r: dict, output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = r["baseline_tasks"]
    s, f, tp = b["scratch"], b["finetune"], b["predict_seconds_mean"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in r["per_baseline_task"]:  # epoch 0 (0 s) cannot sit on a log axis
        for run in _scratch_runs(row):
            ax.plot(run["epoch_seconds_cumulative"][1:], run["epoch_accuracy"][1:], color="0.8", lw=0.7)
    ax.plot(s["epoch_seconds_mean"][1:], s["epoch_accuracy_mean"][1:], "o-", label="Adam from scratch (mean)")
    ax.plot([tp + t for t in f["epoch_seconds_mean"]], f["epoch_accuracy_mean"], "s-",
            label="predicted + fine-tuning (mean)")
    if "finetune_refit" in b:
        fr = b["finetune_refit"]
        ax.plot([tp + t for t in fr["epoch_seconds_mean"]], fr["epoch_accuracy_mean"], "^-",
                label="predicted + fine-tuning, classifier re-solved (mean)")
    ax.plot([tp], [b["predicted"]["mean"]], "r*", ms=14, label=f"predicted ({tp * 1e3:.1f} ms)")
    ax.axhline(b["predicted"]["mean"], color="r", ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="wall time (s): predict, or cumulative training", ylabel="test accuracy",
           title=f"{r['dataset']} / {r['target']}: speedup {r['speedup']['text']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "accuracy_vs_time.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    best = [max(_curve_stats(_scratch_runs(row))["epoch_accuracy_mean"])
            for row in r["per_baseline_task"]]
    pred = [row["predicted"] for row in r["per_task"][:len(best)]]
    ax.scatter(best, pred)
    lo, hi = min(best + pred + [r["chance"]]), max(best + pred)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="best from-scratch accuracy (any epoch; mean over seeds)", ylabel="predicted accuracy (zero-shot)",
           title=f"per task ({len(best)} baseline tasks)")
    fig.tight_layout()
    fig.savefig(os.path.join(output, "per_task_scatter.png"), dpi=100)
    plt.close(fig)


def evaluation_config(config, *, seed: int, scratch_epochs=None, finetune_epochs=None,
                      num_tasks=None):
    """A copy of a predictor's ``config`` set up for the benchmark: ``seed`` replaces its
    meta-training seed (every predictor is then measured against the same from-scratch runs);
    the other arguments, where given, override ``config.eval`` / ``data.num_eval_tasks``."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.seed = int(seed)
        for key, value in (("scratch_epochs", scratch_epochs), ("finetune_epochs", finetune_epochs)):
            if value is not None:
                config.eval[key] = value
        if num_tasks is not None:
            config.data.num_eval_tasks = num_tasks
    return config


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    if not f["verbosity"].present:  # Orbax logs every read at INFO (as in main.py)
        from absl import logging

        logging.set_verbosity(logging.WARNING)
    config = f.config if f.config is not None else checkpoints.read_config(f.checkpoint)
    config = evaluation_config(config, seed=f.seed, scratch_epochs=f.scratch_epochs,
                               finetune_epochs=f.finetune_epochs, num_tasks=f.num_tasks)
    config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                      f"{f.checkpoint}/config.json")
    command = "python -m pudnet_jax.benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    finetune_lrs = [float(x) for x in f.finetune_lrs] if f.finetune_lrs else None
    r = run_benchmark(config, f.checkpoint, f.output, num_baseline_tasks=f.num_baseline_tasks,
                      scratch_lr=f.scratch_lr, finetune_lrs=finetune_lrs, lr_tune_tasks=f.lr_tune_tasks,
                      lr_tune_epochs=f.lr_tune_epochs, predict_repeats=f.predict_repeats,
                      command=command, config_arg=config_arg,
                      frontier_shots=[int(x) for x in f.frontier_shots or ()],
                      scratch_seeds=f.scratch_seeds)
    print(markdown_report(r))
    print(f"Wrote {os.path.abspath(f.output)}/benchmark.{{json,md}} and plots.")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file; default: the checkpoint's config.json.")
    flags.DEFINE_string("checkpoint", None, "Export dir or training workdir.", required=True)
    flags.DEFINE_string("output", None, "Output directory.", required=True)
    flags.DEFINE_integer("num_tasks", None, "Override data.num_eval_tasks (intra) for smoke runs.")
    flags.DEFINE_integer("num_baseline_tasks", None, "Override eval.num_baseline_tasks.")
    flags.DEFINE_integer("scratch_epochs", None, "Override eval.scratch_epochs.")
    flags.DEFINE_integer("finetune_epochs", None, "Override eval.finetune_epochs.")
    flags.DEFINE_float("scratch_lr", None, "Fix the from-scratch LR (skips tuning on meta-val).")
    flags.DEFINE_list("finetune_lrs", None, "Tune the fine-tuning LR over these on the meta-val "
                      "tasks (default: config.eval.finetune_lr, untuned), e.g. 1e-5,3e-5,1e-4,3e-4.")
    flags.DEFINE_integer("lr_tune_tasks", 3, "Meta-val tasks of the LR sweeps.")
    flags.DEFINE_integer("lr_tune_epochs", None, "Epochs per LR-sweep run (default: scratch_epochs).")
    flags.DEFINE_integer("predict_repeats", 3, "Timed predict calls per task (median).")
    flags.DEFINE_integer("seed", 0, "The evaluation's seed (from-scratch runs, random-init draws, "
                         "LR sweeps); the predictor's meta-training seed is not used.")
    flags.DEFINE_integer("scratch_seeds", 1, "From-scratch runs per baseline task (mean curve).")
    flags.DEFINE_list("frontier_shots", None, "Also score and time predict with these sample sizes "
                      "(images per class), e.g. 10,25,50, against the same from-scratch curve.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
