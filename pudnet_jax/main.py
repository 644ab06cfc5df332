"""Command-line entry point (thin: flags, logging, dispatch).

    python -m pudnet_jax.main --config=configs/intra.py --workdir=runs/intra_omniglot
    python -m pudnet_jax.main --config=configs/inter.py:quick --workdir=/tmp/q
    python -m pudnet_jax.main --mode=evaluate --config=configs/intra.py --workdir=runs/intra_omniglot
    python -m pudnet_jax.main --mode=predict --workdir=runs/inter --dataset=cifar10 --output=/tmp/vars
    python -m pudnet_jax.main --mode=export --workdir=runs/inter --output=checkpoints/inter_resnet8

Modes: ``train`` (default; meta-trains, resuming from the workdir, then evaluates), ``evaluate``
(the fixed protocol on the workdir's best checkpoint -> results.json), ``predict`` (variables for a
named dataset, saved with Orbax and as Flax msgpack) and ``export`` (params-only predictor).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/intra.py:quick.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "export"], "What to run.")
flags.DEFINE_string("dataset", None, "predict mode: dataset to predict for (its train split).")
flags.DEFINE_integer("shots", 100, "predict mode: images per class given to predict.")
flags.DEFINE_string("output", None, "predict/export mode: output directory.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    import jax

    from pudnet_jax import run_modes

    logging.info("JAX process %d/%d, local devices %s, backend %s", jax.process_index(),
                 jax.process_count(), jax.local_devices(), jax.default_backend())
    config = FLAGS.config
    if config is None:
        from pudnet_jax.checkpoints import read_config

        config = read_config(FLAGS.workdir)
    if FLAGS.mode == "train":
        from pudnet_jax.train import train_and_evaluate

        train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
        result = run_modes.evaluate_workdir(config, FLAGS.workdir)
        print(json.dumps(result["evaluation"]["predicted"]))
    elif FLAGS.mode == "predict":
        if not FLAGS.dataset or not FLAGS.output:
            raise app.UsageError("--mode=predict needs --dataset and --output.")
        run_modes.predict_dataset(FLAGS.workdir, FLAGS.dataset, FLAGS.shots, FLAGS.output)
    else:
        if not FLAGS.output:
            raise app.UsageError("--mode=export needs --output.")
        run_modes.export_workdir(config, FLAGS.workdir, FLAGS.output)
    print(f"Done: {FLAGS.mode} in {os.path.abspath(FLAGS.workdir)}")


if __name__ == "__main__":
    app.run(main)
