"""Test set-up: 4 fake CPU devices so the multi-device (mesh) path runs on one CPU.

``jax_num_cpu_devices`` must be set before JAX initialises its backends, hence at import time here.

Keys default to the ``rbg`` PRNG in the tests (and, through the environment, in their
subprocesses): XLA:CPU compiles the hypernetwork's initialisers 3.5x faster with it than with
``threefry2x32`` (tiny config: 4.5 s vs 15.5 s), which halves the init-heavy tests. The library
takes whatever key it is given and never inspects key data; ``test_hypernet`` keeps one test on
the production default ``threefry2x32``.
"""

import os
import sys

os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

import jax  # noqa: E402
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_prng_impl", os.environ["JAX_DEFAULT_PRNG_IMPL"])


@pytest.fixture
def tiny_config():
    """A small but complete config: resnet8 target, narrow hypernetwork."""
    from configs.common import base_config

    c = base_config()
    c.model.num_classes = 5
    c.hyper.encoder_widths = (8, 16)
    c.hyper.feature_dim = 32
    c.hyper.sketch_dim = 32
    c.hyper.hidden_dim = 32
    c.hyper.code_rank = 8
    return c


# Many tests compile the same programs (same tiny config, same mesh), also in subprocesses: a
# persistent compilation cache shared by the whole session makes the second compile a disk read.
_CACHE_DIR = os.environ.setdefault(
    "PUDNET_TEST_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pudnet_jax", "xla_test_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
