"""Check: does the order of the dataset batch's rows change the predicted network?

predict is a function of a *set* of examples, but its float sums over the batch (encoder
pooling, class means, BatchNorm and patch statistics) depend on the order they are added in.
``make_predict_fn`` therefore sorts the rows first (``predict.canonical_order``). For each of the
protocol's unseen tasks this script shuffles the predict sample ``--num_orders`` times and
measures, with the sort (as shipped) and without it (``canonical_row_order=False``): whether the
predicted variables are bitwise equal to those of the task's own order, the test accuracy, how
often the predictions agree with the own order's, and how many conv filters moved by more than
1% (``chunked_predict_check.compare``).

  python launch/row_order_check.py --checkpoint=checkpoints/inter_resnet8 --num_orders=4 \
      --output=results/row_order/inter_resnet8

Writes ``check.json`` and ``check.md`` (seed, machine, command and wall time included).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.chunked_predict_check import PREDICT_BATCH, compare
from pudnet_jax import checkpoints, train
from pudnet_jax.evaluate import predictions
from pudnet_jax.metrics import machine_description, machine_line, write_report
from pudnet_jax.predict import make_predict_fn


def _bitwise_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check(checkpoint: str, num_orders: int, seed: int, num_tasks: int | None) -> dict:
    start = time.perf_counter()
    config = checkpoints.read_config(checkpoint)
    params, info = checkpoints.restore_hyper_params(checkpoint, config)
    target_name = config.model.target
    tasks = train.make_test_tasks(config)[:num_tasks]
    rows = []
    for t, task in enumerate(tasks):
        batch = task.dataset_batch()
        row = {"task": task.name, "predict_images": int(np.sum(batch["mask"])), "orders": {}}
        for sort in (True, False):
            predict = jax.jit(make_predict_fn(config, task.num_classes, canonical_row_order=sort))
            own = predict(params, batch)
            own_pred = predictions(target_name, own, task.test_images, PREDICT_BATCH)
            shuffles = []
            for k in range(num_orders):
                order = np.random.default_rng([seed, t, k]).permutation(len(batch["label"]))
                got = predict(params, {key: np.asarray(value)[order] for key, value in batch.items()})
                pred = predictions(target_name, got, task.test_images, PREDICT_BATCH)
                shuffles.append({"bitwise_equal": _bitwise_equal(own, got),
                                 "accuracy": float(np.mean(pred == task.test_labels)),
                                 "agreement": float(np.mean(pred == own_pred)), **compare(own, got)})
            row["orders"]["sorted" if sort else "caller"] = {
                "own_order_accuracy": float(np.mean(own_pred == task.test_labels)), "shuffles": shuffles}
        rows.append(row)
        print(row, flush=True)
    return {"checkpoint": checkpoint, "info": info, "data_layers": config.hyper.get("data_layers", "none"),
            "num_orders": num_orders, "seed": seed, "rows": rows, "machine": machine_description(),
            "wall_seconds": time.perf_counter() - start}


def markdown(result: dict) -> str:
    lines = [f"# `{result['checkpoint']}`: the predict sample's rows shuffled "
             f"(hyper.data_layers={result['data_layers']})", "",
             f"- Machine: {machine_line(result['machine'])}; wall time {result['wall_seconds']:.1f} s; "
             f"shuffle seed {result['seed']}",
             f"- Command: `{result['command']}`",
             "- `sorted`: predict as shipped (rows sorted first); `caller`: summed in the order given "
             "(`canonical_row_order=False`). Each shuffle is compared with the task's own order.", "",
             "| task | rows | accuracy % in own order | shuffles bitwise equal | accuracy % shuffled "
             "| predictions agree % (min) | conv filters moved > 1% (max; flipped) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        for name, r in row["orders"].items():
            s = r["shuffles"]
            shuffled = ", ".join(f"{100 * x['accuracy']:.2f}" for x in s)
            lines.append(
                f"| {row['task']} | {name} | {100 * r['own_order_accuracy']:.2f} | "
                f"{sum(x['bitwise_equal'] for x in s)} of {len(s)} | "
                f"{shuffled} | "
                f"{100 * min(x['agreement'] for x in s):.2f} | "
                f"{max(x['conv_filters_moved'] for x in s)} of {s[0]['conv_filters']}; "
                f"{max(x['conv_filters_flipped'] for x in s)} |")
    worst = {row["task"]: min(row["orders"]["caller"]["shuffles"], key=lambda x: x["agreement"])
             for row in result["rows"]}
    moved = {task: w for task, w in worst.items() if w["conv_filters_moved"]}
    if not moved:
        return "\n".join(lines + ["", "No conv filter moved by more than 1% in any caller-order shuffle."]) + "\n"
    lines += ["", "Per conv, for each task whose filters moved, the caller-order shuffle that agreed least with "
              "the own order (smallest pivot margin: of the own order's filters, the closest to a sign tie, "
              "`chunked_predict_check.pivot_margins`):", "",
              "| task | conv kernel | filters moved > 1% | flipped | largest change of an unflipped filter "
              "| smallest pivot margin |", "| --- | --- | --- | --- | --- | --- |"]
    for task, shuffle in moved.items():
        for c in shuffle["per_conv"]:
            lines.append(f"| {task} | `{c['leaf']}` | {c['moved']} of {c['filters']} | {c['flipped']} | "
                         f"{c['largest_unflipped_change']:.1e} | {c['smallest_pivot_margin']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an export or a training workdir")
    parser.add_argument("--num_orders", type=int, default=4, help="shuffles per task")
    parser.add_argument("--num_tasks", type=int, default=None, help="first n unseen tasks (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.num_orders < 1 or (args.num_tasks is not None and args.num_tasks < 1):
        parser.error("--num_orders and --num_tasks must be positive.")
    result = check(args.checkpoint, args.num_orders, args.seed, args.num_tasks)
    result["command"] = "python launch/row_order_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_report(args.output, "check", result, markdown(result))


if __name__ == "__main__":
    main()
