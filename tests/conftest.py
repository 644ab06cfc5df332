"""Test set-up: 4 fake CPU devices so the multi-device (mesh) path runs on one CPU.

``jax_num_cpu_devices`` must be set before JAX initialises its backends, hence at import time here.

Keys default to the ``rbg`` PRNG in the tests (and, through the environment, in their
subprocesses): XLA:CPU compiles the hypernetwork's initialisers 3.5x faster with it than with
``threefry2x32`` (tiny config: 4.5 s vs 15.5 s), which halves the init-heavy tests. The library
takes whatever key it is given and never inspects key data; ``test_hypernet`` keeps one test on
the production default ``threefry2x32``. Compiles run at LLVM -O0 (below: why).
"""

import os
import sys

os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# The suite compiles XLA:CPU's generated code at LLVM -O0 (XLA's own HLO passes still run):
# compiling is most of its time, and the work inside the compiled programs is mostly library
# calls (convolutions, matmuls) either way. Measured in clean-clone CI runs on the 2-core CI
# machine (session 30, AMD EPYC, same commit otherwise): pytest 12:51 with it, 15:03 and 15:03
# without (the suite's budget is 15 minutes); pinned to one core, the three heaviest train-step
# tests 237 s -> 155 s. Float results move within summation-order noise, which every tolerance
# here allows; the library and every results/ number use XLA's default. Set before JAX
# initialises; subprocesses inherit it. PUDNET_TEST_XLA_OPT=1 keeps the default.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("PUDNET_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in _xla_flags:
    os.environ["XLA_FLAGS"] = (_xla_flags + " --xla_backend_optimization_level=0").strip()

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
# Under pytest-xdist each worker gets its own subdirectory: JAX writes cache entries without a
# lock (no eviction configured), so two workers compiling the same program at once could read a
# half-written entry. Subprocesses inherit the worker's directory through the environment.
_CACHE_DIR = os.environ.get(
    "PUDNET_TEST_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pudnet_jax", "xla_test_cache"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    _CACHE_DIR = os.path.join(_CACHE_DIR, os.environ["PYTEST_XDIST_WORKER"])
os.environ["PUDNET_TEST_COMPILATION_CACHE"] = _CACHE_DIR
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture
def check_padding_and_relabelling():
    """``check(predict, params, batch, got, tol)``: two properties every predict fn must have on a
    5-class resnet8 ``batch`` it predicted ``got`` for: 6 masked rows of garbage (100x) change
    nothing, and relabelling the classes permutes the predicted network's logits the same way."""
    import chex
    import numpy as np

    from pudnet_jax.models import get_target

    def check(predict, params, batch, got, tol):
        images, labels = batch["image"], batch["label"]
        n = len(labels)
        padded = {"image": np.concatenate([images, 100.0 * images[:6]]),
                  "label": np.concatenate([labels, labels[:6]]),
                  "mask": np.r_[np.ones(n, bool), np.zeros(6, bool)]}
        chex.assert_trees_all_close(predict(params, padded), got, rtol=tol, atol=tol)
        perm = np.array([3, 0, 4, 1, 2])
        relabelled = predict(params, {**batch, "label": perm[labels].astype(np.int32)})
        target = get_target("resnet8", 5)
        np.testing.assert_allclose(np.asarray(target.apply(relabelled, images, train=False))[:, perm],
                                   np.asarray(target.apply(got, images, train=False)), rtol=tol, atol=tol)

    return check


@pytest.fixture
def predict_against_plain(tiny_config):
    """``run(config)`` for a predict option that adds no parameters (``config`` = ``tiny_config``
    with the option on): asserts both configs give the same parameter tree, predicts with each
    for the same 20-image, 5-class batch, checks the two outputs have the same tree, and returns
    ``(params, batch, got, plain_output, predict)``."""
    import chex
    import numpy as np

    from pudnet_jax.predict import init_hyper_params, make_predict_fn

    def run(config):
        params = init_hyper_params(tiny_config, jax.random.key(0))
        chex.assert_trees_all_equal_shapes(init_hyper_params(config, jax.random.key(0)), params)
        rng = np.random.default_rng(0)
        labels = (np.arange(20) % 5).astype(np.int32)
        images = rng.normal(size=(20, 32, 32, 3)).astype(np.float32) + labels[:, None, None, None] * 0.3
        batch = {"image": images, "label": labels, "mask": np.ones(20, bool)}
        predict, plain = jax.jit(make_predict_fn(config)), jax.jit(make_predict_fn(tiny_config))
        got, plain_output = predict(params, batch), plain(params, batch)
        chex.assert_trees_all_equal_shapes(got, plain_output)
        return params, batch, got, plain_output, predict

    return run


@pytest.fixture
def chunked_apply_calls(monkeypatch):
    """The chunk sizes predict hands to ``chunked_apply``, in call order: a test's evidence that
    the chunked path ran (a ``chunk_size`` ignored would otherwise pass any equality check)."""
    from pudnet_jax import predict
    from pudnet_jax.hypernet.chunked import chunked_apply

    calls = []
    monkeypatch.setattr(predict, "chunked_apply",
                        lambda *args: calls.append(args[-1]) or chunked_apply(*args))
    return calls
