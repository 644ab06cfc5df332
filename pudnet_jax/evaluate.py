"""Scoring predicted parameters on evaluation tasks (the zero-shot part of docs/protocol.md).

The training baselines (Adam from scratch, fine-tuning, nearest prototype) live in
``pudnet_jax.benchmark``; this module holds what both meta-training and the benchmark need.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pudnet_jax.models import get_target
from pudnet_jax.predict import make_predict_fn


# Two-sided 95% quantiles of Student's t, t_{0.975}(dof), for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(dof: int) -> float:
    """``t_{0.975}`` with ``dof`` degrees of freedom (no SciPy needed).

    A table up to 30; beyond, the Cornish-Fisher expansion around the normal quantile 1.96,
    which agrees with the exact value to better than 1e-4 there.
    """
    if dof < 1:
        raise ValueError(f"t quantile needs at least 1 degree of freedom, got {dof}.")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, v = 1.959964, float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def mean_and_ci95(values) -> dict:
    """Mean and the half-width of a 95% Student-t interval over tasks (NaN for one value).

    Student's t rather than the normal 1.96: benchmark rows with the training baselines cover
    only a few tasks, where 1.96 would understate the interval (by 2.2x at 3 tasks).
    Results written before session 18 used 1.96 (1.2% narrower at 100 tasks).
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    half = (t_quantile_975(n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(values.mean()), "ci95": float(half), "n": int(n)}


def format_mean_ci(stats: dict) -> str:
    """``mean_and_ci95`` output as percent, ``"96.82 ± 0.33"`` (no interval for one value)."""
    ci = stats["ci95"]
    return f"{100 * stats['mean']:.2f}" + ("" if np.isnan(ci) else f" ± {100 * ci:.2f}")


@functools.lru_cache(maxsize=32)
def _jitted_init(target_name: str, num_classes: int, image_shape: tuple[int, ...]):
    target = get_target(target_name, num_classes)
    return jax.jit(lambda key: target.init(key, jnp.zeros((1, *image_shape), jnp.float32),
                                           train=False))


def random_init_seed(config, task_index: int = 0) -> int:
    """Seed of the random-init draw for evaluation task ``task_index``.

    Meta-training's final evaluation and every benchmark row that reads a random backbone use
    it, so their random-init numbers are the same draws, task by task.
    """
    return int(config.seed) + 12345 + int(task_index)


def init_target(target_name: str, num_classes: int, image_shape, seed: int):
    """The target's default Flax initialisation: the random-init and from-scratch baselines.

    The one random-init function of the repo (meta-training's final evaluation and the benchmark
    both use it, so their random-init numbers are the same draws). Jitted, because op-by-op init
    of a ResNet costs tens of seconds on CPU; with an ``rbg`` PRNG key, which has the same
    initialisers and distributions as the default threefry key but compiles ~3x faster on CPU
    (threefry: ~13 s for resnet8 on 2 cores).
    """
    fn = _jitted_init(target_name, int(num_classes), tuple(int(d) for d in image_shape))
    return fn(jax.random.key(int(seed), impl="rbg"))


@functools.lru_cache(maxsize=16)
def _logits_fn(target_name: str, num_classes: int):
    target = get_target(target_name, num_classes)
    return jax.jit(lambda variables, x: target.apply(variables, x, train=False))


def fixed_shape_chunks(images: np.ndarray, chunk: int):
    """Yields ``(start, n, x)``: ``images`` in chunks of ``min(chunk, len(images))`` rows, the last
    one zero-padded to that size so one compiled program serves every chunk; only the first ``n``
    rows of ``x`` are ``images[start:start + n]``."""
    size = min(int(chunk), len(images))
    for start in range(0, len(images), size):
        x = images[start:start + size]
        n = len(x)
        if n < size:
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
        yield start, n, x


def predictions(target_name: str, variables, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Top-1 classes ``[N]`` of ``target.apply(variables, ., train=False)`` (chunked, fixed chunk
    shape: one compile per class count and chunk size)."""
    num_classes = int(jax.tree.leaves(variables["params"]["Dense_0"]["bias"])[0].shape[0])
    logits_fn = _logits_fn(target_name, num_classes)
    out = np.empty(len(images), np.int64)
    for start, n, chunk in fixed_shape_chunks(images, batch_size):
        out[start:start + n] = np.asarray(jnp.argmax(logits_fn(variables, chunk), -1))[:n]
    return out


def accuracy(target_name: str, variables, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``target.apply(variables, ., train=False)`` (``predictions``)."""
    correct = int((predictions(target_name, variables, images, batch_size) == labels).sum())
    return correct / len(images)


class TaskEvaluator:
    """Zero-shot evaluation of a hypernetwork on fixed tasks, compiled once per class count."""

    def __init__(self, config):
        self.config = config
        self._predict = {}
        self._compiled_shapes = set()

    def predict_fn(self, num_classes: int):
        if num_classes not in self._predict:
            self._predict[num_classes] = jax.jit(make_predict_fn(self.config, num_classes))
        return self._predict[num_classes]

    def predict(self, hyper_params, task):
        """Predicted variables for ``task`` and the wall time of the compiled call.

        The first task of each batch shape is predicted once untimed, so that compilation is
        never part of the reported time (with one task, e.g. a whole held-out dataset, the
        median would otherwise be the compile time).
        """
        predict = self.predict_fn(task.num_classes)
        batch = task.dataset_batch()
        shape_key = (task.num_classes,) + tuple(
            (name, np.shape(value)) for name, value in sorted(batch.items()))
        if shape_key not in self._compiled_shapes:
            jax.block_until_ready(predict(hyper_params, batch))
            self._compiled_shapes.add(shape_key)
        start = time.perf_counter()
        variables = jax.block_until_ready(predict(hyper_params, batch))
        return variables, time.perf_counter() - start

    def evaluate(self, hyper_params, tasks, with_random_init: bool = False) -> dict:
        """Per-task accuracy of predicted variables (and of random init, ``random_init_seed``'s
        draw for each task, if ``with_random_init``)."""
        target_name = self.config.model.target
        predicted, random_init, seconds = [], [], []
        for i, task in enumerate(tasks):
            variables, elapsed = self.predict(hyper_params, task)
            seconds.append(elapsed)
            test_x, test_y = task.test_images, task.test_labels
            predicted.append(accuracy(target_name, variables, test_x, test_y))
            if with_random_init:
                init = init_target(target_name, task.num_classes, test_x.shape[1:],
                                   random_init_seed(self.config, i))
                random_init.append(accuracy(target_name, init, test_x, test_y))
        result = {"predicted": mean_and_ci95(predicted), "per_task_predicted": predicted,
                  "predict_seconds_median": float(np.median(seconds))}
        if random_init:
            result["random_init"] = mean_and_ci95(random_init)
            result["per_task_random_init"] = random_init
        result["chance"] = float(np.mean([1.0 / t.num_classes for t in tasks]))
        return result
