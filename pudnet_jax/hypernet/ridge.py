"""Closed-form ridge-regression classifier (as in R2D2, Bertinetto et al., ICLR 2019).

The prototype classifier keeps one number per class and feature: the class mean. With hundreds
of examples per class (GTSRB's full-data regime, a whole unseen dataset) that throws most of the
support away. Ridge regression of one-hot labels on the features uses all of it, stays a single
differentiable forward pass (one ``D x D`` solve, ``D`` = penultimate width: 64 for resnet8, 512
for resnet18), and is still a Dense layer, so the predicted network keeps the target's exact tree.

Swapping it into predictors meta-trained with the prototype classifier, with no retraining
(``launch/classifier_swap.py``; ridge strength chosen on meta-val tasks): unseen GTSRB tasks
71.1% -> 81.2%, CIFAR-10 never seen 22.1% -> 32.4%, Omniglot 96.8% -> 97.0% (RESULTS.md 1.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Gram matrices on TPU default to bf16 passes; the solve needs them in full float32.
_HIGHEST = jax.lax.Precision.HIGHEST
# The one default of the ridge strength (PudNet's field, configs/common.py, and configs saved
# before the field existed all read it from here).
DEFAULT_RIDGE_LAMBDA = 0.01


def centre_and_scale(features, weight):
    """``(mean [D], centred [N, D], scale)`` of ``features [N, D]`` under row weights ``weight [N]``.

    ``mean`` is the weighted mean, ``centred`` the features minus it with rows of weight 0 zeroed,
    ``scale`` one root mean square over all weighted entries and dimensions (1 when no row has
    weight: there is nothing to measure). Shared by the ridge solve and the source head's
    standardised input (``pudnet_jax.source_head.standardize_features``).
    """
    total = weight.sum()
    n = jnp.maximum(total, 1.0)
    mean = (features * weight[:, None]).sum(0) / n
    centred = (features - mean) * weight[:, None]
    scale = jnp.sqrt(jnp.sum(centred**2) / (n * features.shape[-1]) + 1e-8)
    return mean, centred, jnp.where(total > 0, scale, 1.0)


def ridge_classifier(features, labels, mask, num_classes: int, ridge_lambda: float):
    """Dense ``kernel [D, K]`` and ``bias [K]`` minimising the ridge loss on the masked rows.

    Solves ``min_W mean_i ||x_i W - (y_i - ybar)||^2 + lambda ||W||^2`` with ``x_i`` the
    features centred on their (masked) mean and divided by one global scale (their root mean
    square over all dimensions), so ``lambda`` is relative to the features' variance and does not
    depend on the network's activation scale. The returned layer computes
    ``x W + ybar`` on raw features; ``ybar`` (class frequencies) is the unpenalised intercept.

    Properties the hypernetwork relies on: rows with ``mask=False`` have no effect; relabelling
    the classes permutes the columns; a class with no example gets a zero column and zero bias
    (the caller masks it out).
    """
    if ridge_lambda <= 0:
        raise ValueError(f"ridge_lambda must be positive (it keeps the solve well posed); got {ridge_lambda}.")
    dtype = features.dtype
    weight = mask.astype(dtype)
    n = jnp.maximum(weight.sum(), 1.0)
    dim = features.shape[-1]
    mean, centred, scale = centre_and_scale(features, weight)
    x = centred / scale
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=dtype) * weight[:, None]
    y_mean = one_hot.sum(0) / n
    y = (one_hot - y_mean) * weight[:, None]
    gram = jnp.matmul(x.T, x, precision=_HIGHEST) / n + ridge_lambda * jnp.eye(dim, dtype=dtype)
    rhs = jnp.matmul(x.T, y, precision=_HIGHEST) / n
    w = jnp.linalg.solve(gram, rhs)
    kernel = w / scale
    bias = y_mean - mean @ kernel
    return kernel, bias
