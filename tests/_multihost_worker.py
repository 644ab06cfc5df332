"""One process of a localhost multi-process run of ``pudnet_jax.main`` (used by test_multihost.py).

    JAX_NUM_CPU_DEVICES=2 PUDNET_STOP_AFTER=2 python tests/_multihost_worker.py \
        --workdir=/tmp/w --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=0 \
        $(python -c "import tests._multihost_worker as w; print(' '.join(w.config_flags()))")

It runs the real ``main`` (flags -> ``jax.distributed.initialize`` -> ``train_and_evaluate``);
the only difference is ``PUDNET_STOP_AFTER``, which stops meta-training after that many steps
(checkpointed, as if the job had been killed there) so the test skips the final evaluation.
Cross-process collectives on CPU go through Gloo over TCP on 127.0.0.1.
"""

from __future__ import annotations

import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny meta-training config of the test (tests/conftest.py ``tiny_config`` sizes), as
# ``--config.KEY=VALUE`` overrides of configs/intra.py.
OVERRIDES = {
    "model.num_classes": 5,
    "hyper.encoder_widths": (8, 16),
    "hyper.feature_dim": 32,
    "hyper.sketch_dim": 32,
    "hyper.hidden_dim": 32,
    "hyper.code_rank": 8,
    "data.way": 5,
    "data.shots": 2,
    "data.queries": 2,
    "data.tasks_per_batch": 4,
    "data.num_eval_tasks": 2,
    "train.num_steps": 3,
    "train.warmup_steps": 1,
    "train.eval_every": 0,
    "train.log_every": 1,
    "train.checkpoint_every": 100,
    "train.progress_bar": False,
}


def config_flags(cache_dir: str | None = None) -> list[str]:
    flags = ["--config=" + os.path.join(ROOT, "configs", "intra.py")]
    for key, value in OVERRIDES.items():
        value = "(" + ",".join(map(str, value)) + ")" if isinstance(value, tuple) else value
        flags.append(f"--config.{key}={value}")
    if cache_dir:
        flags.append(f"--config.cache_dir={cache_dir}")
    return flags


def tiny_config(cache_dir: str | None = None):
    """The same config as ``config_flags`` builds through the command line."""
    sys.path.insert(0, ROOT)
    from configs.intra import get_config

    config = get_config()
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        config[section][name] = value
    if cache_dir:
        config.cache_dir = cache_dir
    return config


def _run_main() -> None:
    sys.path.insert(0, ROOT)
    from absl import app

    from pudnet_jax import main, train

    stop_after = os.environ.get("PUDNET_STOP_AFTER")
    if stop_after:
        train.train_and_evaluate = functools.partial(train.train_and_evaluate,
                                                     stop_after=int(stop_after))
    app.run(main.main, argv=[sys.argv[0], *sys.argv[1:]])


if __name__ == "__main__":
    _run_main()
