"""How good can source-trained features be on the held-out dataset? A reference for inter.

The inter predictor must give CIFAR-10 a backbone whose features, with the classifier solved
on the predict sample, beat one epoch of Adam from scratch. This script measures two
references with exactly that read-out (BatchNorm statistics and a ridge classifier from the
held-out dataset's predict sample, accuracy on its full test split):

- random init: the target's default initialisation, no training at all;
- source-supervised: the target trained with Adam, supervised, on the inter sources' training
  splits (each source's classes as separate labels), scored after every epoch.

If supervised training on the sources does not beat random features on CIFAR-10, a predictor
meta-trained on those sources has no source of transferable features to learn from.

  python launch/source_probe.py --output=results/source_probe/inter_cifar10

Flags: --config (default configs/inter.py), --sources (default: the config's inter sources),
--epochs, --lr, --seeds, --images_per_class (cap per source class, to bound an epoch's time).
Writes probe.json and probe.md under --output.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, data, evaluate, train  # noqa: E402
from pudnet_jax.metrics import machine_description, write_report  # noqa: E402


def source_training_set(config, sources, images_per_class: int, seed: int):
    """Training images of ``sources`` with labels made disjoint across sources."""
    rng = np.random.default_rng(seed)
    xs, ys, offset = [], [], 0
    for name in sources:
        prepared = data.prepare(name, "train", **train.prepare_kwargs(config))
        labels = np.asarray(prepared.labels)
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:images_per_class]
                               for c in np.unique(labels)])
        xs.append(np.asarray(prepared.images[keep], np.float32))
        ys.append(np.searchsorted(np.unique(labels), labels[keep]) + offset)
        offset += len(np.unique(labels))
    return np.concatenate(xs), np.concatenate(ys).astype(np.int32), offset


def ridge_probe(config, backbone, task, ridge_lambda: float) -> float:
    """Held-out test accuracy of ``backbone`` read out as predict reads out a predicted one
    (``baselines.solved_readout``: BatchNorm statistics and a ridge classifier from the task's
    predict sample)."""
    name = config.model.target
    k = task.num_classes
    head = evaluate.init_target(name, k, task.test_images.shape[1:], 0)["params"]["Dense_0"]
    backbone = {**backbone, "params": {**backbone["params"], "Dense_0": head}}
    variables = baselines.solved_readout(name, backbone, task.dataset_batch(), "ridge", ridge_lambda)
    return evaluate.accuracy(name, variables, task.test_images, task.test_labels)


def run_probe(config, sources, *, epochs: int, lr: float, seeds, images_per_class: int,
              batch_size: int = 128, ridge_lambda: float | None = None) -> dict:
    """Random-init and source-supervised probes; one record per seed."""
    ridge_lambda = float(config.hyper.ridge_lambda if ridge_lambda is None else ridge_lambda)
    task = train.make_test_tasks(config)[0]
    name = config.model.target
    x, y, num_source_classes = source_training_set(config, sources, images_per_class, 0)
    runs = []
    for seed in seeds:
        variables = evaluate.init_target(name, num_source_classes, x.shape[1:], seed)
        curve = [ridge_probe(config, variables, task, ridge_lambda)]
        seconds = [0.0]
        print(f"seed {seed}: random init -> {curve[0]:.4f}", flush=True)
        for epoch in range(epochs):
            r = baselines.train_from_scratch(
                name, num_source_classes, x, y, x[:256], y[:256], lr=lr, epochs=1,
                batch_size=batch_size, seed=seed * 1000 + epoch, init_variables=variables)
            variables = r["variables"]
            curve.append(ridge_probe(config, variables, task, ridge_lambda))
            seconds.append(seconds[-1] + r["epoch_seconds_cumulative"][-1])
            print(f"seed {seed}: epoch {epoch + 1} (source loss {r['epoch_train_loss'][-1]:.3f}) "
                  f"-> {curve[-1]:.4f}", flush=True)
        runs.append({"seed": int(seed), "probe_accuracy_by_epoch": curve,
                     "source_train_seconds_cumulative": seconds})
    return {"held_out": task.name, "sources": list(sources), "num_source_images": int(len(x)),
            "num_source_classes": int(num_source_classes), "epochs": epochs, "lr": lr,
            "batch_size": batch_size, "ridge_lambda": ridge_lambda,
            "predict_sample": int(len(task.predict_indices)),
            "images_per_class": images_per_class, "runs": runs,
            "machine": machine_description(),
            "note": "Adam's state is reset at every epoch (each epoch is one train_from_scratch "
                    "call from the previous epoch's variables)."}


def markdown(r: dict) -> str:
    curves = np.array([run["probe_accuracy_by_epoch"] for run in r["runs"]]) * 100
    lines = [f"Held-out task: {r['held_out']}; ridge read-out on {r['predict_sample']} predict "
             f"images (strength {r['ridge_lambda']}); sources {', '.join(r['sources'])} "
             f"({r['num_source_images']} images, {r['num_source_classes']} classes); lr {r['lr']}, "
             f"seeds {[run['seed'] for run in r['runs']]}.", "",
             "| source epochs | held-out test accuracy %, per seed | mean |", "| --- | --- | --- |"]
    for e in range(curves.shape[1]):
        label = "0 (random init)" if e == 0 else str(e)
        per_seed = " / ".join(f"{v:.2f}" for v in curves[:, e])
        lines.append(f"| {label} | {per_seed} | {curves[:, e].mean():.2f} |")
    return "\n".join(lines) + "\n"


def main():
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/inter.py", "Inter config.")
    flags.DEFINE_string("output", "results/source_probe/inter_cifar10", "Output directory.")
    flags.DEFINE_list("sources", [], "Source datasets (default: the config's inter sources).")
    flags.DEFINE_integer("epochs", 6, "Supervised epochs on the sources.")
    flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
    flags.DEFINE_list("seeds", ["0"], "Seeds of the init and of the training order.")
    flags.DEFINE_integer("images_per_class", 300, "Cap on training images per source class.")
    FLAGS = flags.FLAGS

    def _main(argv):
        del argv
        config = FLAGS.config
        sources = FLAGS.sources or list(data.inter_split(config.data.held_out).sources)
        start = time.time()
        result = run_probe(config, sources, epochs=FLAGS.epochs, lr=FLAGS.lr,
                           seeds=[int(s) for s in FLAGS.seeds],
                           images_per_class=FLAGS.images_per_class)
        result["wall_seconds"] = time.time() - start
        write_report(FLAGS.output, "probe", result,
                     markdown(result) + f"\nWall time {result['wall_seconds']:.0f} s.\n")

    app.run(_main)


if __name__ == "__main__":
    main()
