"""Check: does predict with bounded memory (``chunk_size``) give a trained predictor's network?

``make_predict_fn(config, chunk_size=c)`` reads the dataset batch ``c`` images at a time (the
encoder, every BatchNorm layer's statistics and, with ``hyper.data_layers``, every conv's patch
statistics: ``pudnet_jax/hypernet/chunked.py``). Its result equals the one-pass predict's up to
float summation order; this script measures what that order does on the protocol's own unseen
tasks: the largest leaf gap, how many conv filters moved by more than 1% (eigenvectors of
near-degenerate spectra turn, and a filter's sign pivot can flip), the test accuracy of each
network, how often their predictions agree, and predict's wall time (compiled, second call).

  python launch/chunked_predict_check.py --checkpoint=checkpoints/inter_resnet8 \
      --chunk_sizes=100,256 --output=results/chunked_predict/inter_resnet8

Writes ``check.json`` and ``check.md`` (machine, command and wall time included).
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

from pudnet_jax import checkpoints, train
from pudnet_jax.evaluate import predictions
from pudnet_jax.metrics import machine_description, machine_line, write_report
from pudnet_jax.predict import make_predict_fn

# Relative change of a conv filter (its norm) above which it counts as moved.
MOVED_FILTER = 1e-2
# Cosine between a filter and its counterpart below minus this: the filter flipped sign.
FLIPPED_COSINE = 0.99
# Test images per compiled call of the predicted networks (the committed results used 1,000).
PREDICT_BATCH = 1000


def _timed(fn, *args):
    jax.block_until_ready(fn(*args))  # compile (and warm up) outside the timing
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def compare(plain, chunked) -> dict:
    """Largest leaf gap (relative to the leaf's largest entry), the conv filters that moved and,
    of those, the ones that flipped sign (cosine below ``-FLIPPED_COSINE``: a data-derived
    direction whose sign rule, ``stem.positive_pivots``, went the other way, which swaps the
    ``+v, -v`` pair of channels)."""
    gaps, per_conv = [], []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(chunked)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        gaps.append((float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)), jax.tree_util.keystr(path)))
        if a.ndim == 4:  # HWIO conv kernel: compare output filters
            fa, fb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            norm_a, norm_b = np.linalg.norm(fa, axis=0), np.linalg.norm(fb, axis=0)
            rel = np.linalg.norm(fa - fb, axis=0) / np.maximum(norm_a, 1e-12)
            cosine = np.sum(fa * fb, axis=0) / np.maximum(norm_a * norm_b, 1e-12)
            flips = cosine < -FLIPPED_COSINE
            per_conv.append({"leaf": jax.tree_util.keystr(path), "filters": a.shape[-1],
                             "moved": int((rel > MOVED_FILTER).sum()), "flipped": int(flips.sum()),
                             # how far the filters that kept their sign turned (relative change)
                             "largest_unflipped_change": float(rel[~flips].max(initial=0.0)),
                             "smallest_pivot_margin": float(pivot_margins(fa).min())})
    gap, where = max(gaps)
    return {"largest_leaf_gap": gap, "largest_gap_leaf": where,
            "conv_filters_moved": sum(c["moved"] for c in per_conv),
            "conv_filters_flipped": sum(c["flipped"] for c in per_conv),
            "conv_filters": sum(c["filters"] for c in per_conv), "per_conv": per_conv}


def pivot_margins(filters) -> np.ndarray:
    """``[O]``: for each column of ``filters`` (``[D, O]``) scaled to unit norm, its largest
    magnitude minus the largest magnitude of opposite sign: how far the filter is from a
    tie that would flip ``stem.positive_pivots``' sign choice for a data-derived direction."""
    unit = filters / np.maximum(np.linalg.norm(filters, axis=0, keepdims=True), 1e-12)
    top = unit[np.argmax(np.abs(unit), axis=0), np.arange(unit.shape[1])]
    opposite = np.where(np.sign(unit) != np.sign(top), np.abs(unit), 0.0).max(axis=0)
    return np.abs(top) - opposite


def check(checkpoint: str, chunk_sizes: list[int]) -> dict:
    start = time.perf_counter()
    config = checkpoints.read_config(checkpoint)
    params, info = checkpoints.restore_hyper_params(checkpoint, config)
    target_name = config.model.target
    rows = []
    for task in train.make_test_tasks(config):
        batch = task.dataset_batch()
        plain, plain_s = _timed(jax.jit(make_predict_fn(config, task.num_classes)), params, batch)
        plain_pred = predictions(target_name, plain, task.test_images, PREDICT_BATCH)
        row = {"task": task.name, "predict_images": int(np.sum(batch["mask"])),
               "test_images": int(len(task.test_labels)), "plain_seconds": plain_s,
               "plain_accuracy": float(np.mean(plain_pred == task.test_labels)), "chunked": []}
        for size in chunk_sizes:
            chunked, seconds = _timed(jax.jit(make_predict_fn(config, task.num_classes, chunk_size=size)),
                                      params, batch)
            pred = predictions(target_name, chunked, task.test_images, PREDICT_BATCH)
            row["chunked"].append({"chunk_size": size, "seconds": seconds,
                                   "accuracy": float(np.mean(pred == task.test_labels)),
                                   "agreement": float(np.mean(pred == plain_pred)),
                                   **compare(plain, chunked)})
        rows.append(row)
        print(row, flush=True)
    return {"checkpoint": checkpoint, "info": info, "data_layers": config.hyper.get("data_layers", "none"),
            "chunk_sizes": chunk_sizes, "rows": rows, "machine": machine_description(),
            "wall_seconds": time.perf_counter() - start}


def markdown(result: dict) -> str:
    lines = [f"# `{result['checkpoint']}`: predict with chunk_size against one pass "
             f"(hyper.data_layers={result['data_layers']})", "",
             f"- Machine: {machine_line(result['machine'])}; wall time {result['wall_seconds']:.1f} s",
             f"- Command: `{result['command']}`", "",
             "| task | predict images | chunk | accuracy % (one pass -> chunked) | predictions agree % "
             "| conv filters moved > 1% (flipped) | largest leaf gap (leaf) | predict s (one pass / chunked) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        for c in row["chunked"]:
            lines.append(
                f"| {row['task']} | {row['predict_images']} | {c['chunk_size']} | "
                f"{100 * row['plain_accuracy']:.2f} -> {100 * c['accuracy']:.2f} | {100 * c['agreement']:.2f} | "
                f"{c['conv_filters_moved']} of {c['conv_filters']} ({c['conv_filters_flipped']}) | {c['largest_leaf_gap']:.1e} "
                f"(`{c['largest_gap_leaf']}`) | {row['plain_seconds']:.2f} / {c['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an export or a training workdir")
    parser.add_argument("--chunk_sizes", default="100,256", help="comma-separated")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    sizes = [int(s) for s in args.chunk_sizes.split(",") if s]
    if not sizes or min(sizes) < 1:
        parser.error("--chunk_sizes needs positive integers.")
    result = check(args.checkpoint, sizes)
    result["command"] = "python launch/chunked_predict_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_report(args.output, "check", result, markdown(result))


if __name__ == "__main__":
    main()
