"""Command-line entry point (thin: flags, logging, dispatch).

    python -m pudnet_jax.main --config=configs/intra.py --workdir=runs/intra_omniglot
    python -m pudnet_jax.main --config=configs/inter.py:quick --workdir=/tmp/q
    python -m pudnet_jax.main --mode=evaluate --config=configs/intra.py --workdir=runs/intra_omniglot
    python -m pudnet_jax.main --mode=predict --workdir=runs/inter --dataset=cifar10 --output=/tmp/vars
    python -m pudnet_jax.main --mode=export --workdir=runs/inter --output=checkpoints/inter_resnet8

Multi-process (several hosts, or one process per GPU; see launch/README.md): the same command on
every process; ``jax.distributed`` is initialised from the SLURM / Open MPI environment, from
``--distributed=on`` on TPU pods, or from ``--coordinator_address --num_processes --process_id``.

Modes: ``train`` (default; meta-trains, resuming from the workdir, then evaluates), ``evaluate``
(the fixed protocol on the workdir's best checkpoint -> results.json), ``predict`` (variables for a
named dataset, saved with Orbax and as Flax msgpack) and ``export`` (params-only predictor).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/intra.py:quick.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "export"], "What to run.")
flags.DEFINE_string("dataset", None, "predict mode: dataset to predict for (its train split).")
flags.DEFINE_integer("shots", 100, "predict mode: images per class given to predict.")
flags.DEFINE_string("output", None, "predict/export mode: output directory.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 (omit "
                    "under SLURM / Open MPI, and on TPU pods with --distributed=on: detected).")
flags.DEFINE_integer("num_processes", None, "Multi-process: total number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0..num_processes-1.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize: auto "
                  "(flags above or a detected launcher), on (always; TPU pods), off.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    import jax

    from pudnet_jax import distributed

    # Before anything touches devices: the backend is fixed by the first device query.
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           mode=FLAGS.distributed)
    from pudnet_jax import run_modes

    # Orbax logs every save at INFO; keep the console to our own lines unless asked (-v 0).
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if distributed.is_primary():
        print(f"JAX process {jax.process_index()}/{jax.process_count()}, local devices "
              f"{jax.local_devices()}, backend {jax.default_backend()}", flush=True)
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
        run_modes.predict_dataset(FLAGS.workdir, FLAGS.dataset, FLAGS.shots, FLAGS.output,
                                  data_dir=config.data_dir or None)
    else:
        if not FLAGS.output:
            raise app.UsageError("--mode=export needs --output.")
        run_modes.export_workdir(config, FLAGS.workdir, FLAGS.output)
    if distributed.is_primary():
        print(f"Done: {FLAGS.mode} in {os.path.abspath(FLAGS.workdir)}")


def parse_flags(argv):
    """absl flag parsing that reports an unknown config field as a flag error, not a traceback."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        sys.exit(f"FATAL Flags parsing error: unknown config field {e} (in {' '.join(argv[1:])}). "
                 "See the config file's fields, e.g. configs/common.py.")
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --help for usage.")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
