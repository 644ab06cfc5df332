"""Predicted conv kernels built on the second-order statistics of each conv's own input.

Why. Session 19 (RESULTS.md section 1) found that a resnet8 whose every conv is computed in
closed form from the predict batch (``pudnet_jax/pca_backbone.py``: each conv's filters are the
principal directions of its own input's patches) reads the unseen CIFAR-10 better than the
meta-trained predictor, and 25 points worse on the sources' tasks: the head learns what the
sources need, the data's own statistics carry what a new kind of image needs. This module
combines the two inside predict, for every conv, walking the target in forward order:

- ``'pca_residual'``: ``kernel = P + RESIDUAL_SCALE * H``. ``P``'s first ``2 m`` filters are the
  top ``m`` principal directions of the conv's input patches and their negatives (as
  ``pca_backbone``), the rest zero; ``H`` is the head's kernel. With ``H = 0`` and BatchNorm at
  (1, 0) this is exactly the PCA network, so meta-training starts from it and learns corrections.
  With ``normalized_residual``, ``H``'s filters are scaled to unit norm first, so the scale is
  the correction's size relative to the data-derived filter: BatchNorm after every conv makes
  a filter's norm irrelevant (only its direction counts), and a free ``H`` grows during
  meta-training until it drowns ``P`` (session 24, ``launch/head_gain_probe.py``: the shipped
  inter head's filters reached norms 220-890, so ``0.25 H`` is 55-220 times ``P``).
- ``'discriminant_residual'``: as ``'pca_residual'`` with ``P``'s directions the conv input's
  *discriminant* patch directions (``hypernet.discriminant``: what separates the batch's classes,
  relative to all the patch variation) in place of its principal ones. Needs the batch's labels.
- ``'whitened'``: ``kernel = W H`` with ``W = (C + eps I)^(-1/2)`` the ZCA whitening of the
  input's patch covariance ``C``: the head predicts filters for *whitened* patches, and each
  dataset's own covariance maps them back. What the head must learn no longer includes the
  dataset's pixel and channel correlations (grayscale sources vs a colour target).

Each conv is built from the activations the already-built layers produce, so the whole network
comes out of one forward pass over the batch: the BatchNorm pass predict runs anyway, with every
``nn.Conv`` call intercepted (``flax.linen.intercept_methods``) to compute its kernel from its
input first. Cost: one patch covariance and one ``D x D`` eigendecomposition per conv (``D = k
* k * C_in``; 576 for resnet8's widest); ``patch_stride`` thins the covariance's patches. The
statistics carry no gradient (``stem.patch_covariance``); the gradient reaches the head through
``H``.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pudnet_jax.hypernet.discriminant import (DISCRIMINANT_EPS, class_map_sums, discriminant_directions,
                                              scatter_from_class_map_sums)
from pudnet_jax.hypernet.head import get_path, replaced_path
from pudnet_jax.hypernet.stem import (covariance_from_moments, patch_covariance, patch_moments,
                                      principal_directions, regularised_inverse_sqrt,
                                      signed_direction_kernel)

MODES = ("none", "pca_residual", "discriminant_residual", "whitened")
# Modes whose kernels depend on the batch's labels as well as its images.
LABELLED_MODES = ("discriminant_residual",)
# (conv input on the batch [N, H, W, C], valid rows [N], current HWIO kernel) -> HWIO kernel.
KernelBuilder = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# The head's kernels have filter norm ~sqrt(2) x its learned gain (He scale); the PCA filters
# have norm 1. This factor makes the correction start at about a third of the PCA filter.
RESIDUAL_SCALE = 0.25
# normalized_residual: a head filter of norm below this is scaled as if it had this norm (no
# division blow-up for a dead filter; the head's filters have norms ~1 and up).
MIN_HEAD_FILTER_NORM = 1e-6
# Whitening regulariser, relative to the mean eigenvalue: directions with less variance than
# this are not amplified beyond it (the noise floor of the smallest components).
WHITEN_EPS = 0.1


def _as_rows(kernel):
    """HWIO ``[k, k, C, O]`` -> ``[C * k * k, O]`` with rows ordered (C, kh, kw) like the patches."""
    k1, k2, c_in, c_out = kernel.shape
    return kernel.transpose(2, 0, 1, 3).reshape(c_in * k1 * k2, c_out)


def _from_rows(rows, shape):
    k1, k2, c_in, c_out = shape
    return rows.reshape(c_in, k1, k2, c_out).transpose(1, 2, 0, 3)


def whitening_matrix(images, mask, kernel_size: int, eps: float = WHITEN_EPS, stride: int = 1):
    """``[D, D]`` symmetric ZCA whitening ``(C + eps * mean(eig C) I)^(-1/2)`` of the batch's patches
    (every ``stride``-th patch position per axis)."""
    return regularised_inverse_sqrt(patch_covariance(images, mask, kernel_size, stride), eps)


def filter_norms(kernel):
    """``[O]``: the norm of each output filter of an HWIO ``kernel``."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=(0, 1, 2)))


def unit_filters(kernel):
    """HWIO ``kernel`` with every output filter scaled to unit norm (see MIN_HEAD_FILTER_NORM)."""
    return kernel / jnp.maximum(filter_norms(kernel), MIN_HEAD_FILTER_NORM)


def data_derived_kernel(mode: str, x, mask, predicted_kernel, patch_stride: int = 1,
                        residual_scale: float = RESIDUAL_SCALE, labels=None,
                        num_classes: int | None = None, normalized_residual: bool = False,
                        discriminant_eps: float = DISCRIMINANT_EPS):
    """The kernel of a conv whose input on the batch is ``x`` (``[N, H, W, C]``), given the head's.

    ``patch_stride`` estimates the input's patch covariance from every ``patch_stride``-th
    position per axis: the statistics are most of the data layers' cost (a ``[D, N P]`` by
    ``[N P, D]`` product per conv, ``P`` patch positions per image), and N images times a
    32x32 map's ~1,000 positions are far more samples than a ``D x D`` covariance needs (the
    shipped inter predictor reads every 4th: RESULTS.md section 1, session 21).
    ``residual_scale`` weighs the head's kernel in the ``*_residual`` modes (``RESIDUAL_SCALE``
    unless ``hyper.data_layers_residual_scale`` says otherwise).
    ``labels`` (``[N]`` ints in ``[0, num_classes)``) are needed by ``LABELLED_MODES`` only.
    ``normalized_residual``: the head's filters enter at unit norm (``unit_filters``), so
    ``residual_scale`` bounds the correction relative to the data-derived unit filters.
    ``discriminant_eps``: ``'discriminant_residual'``'s whitening regulariser, relative to the
    mean eigenvalue of the patch covariance (``discriminant.DISCRIMINANT_EPS`` unless
    ``hyper.data_layers_discriminant_eps`` says otherwise): larger values damp the directions of
    little total variance, where float summation order moves the deepest convs' directions most
    (a first closed-form measurement: RESULTS.md section 4, session 32).

    Two stages, ``conv_input_sums`` then ``kernel_from_sums``: the first reads ``x`` and returns
    sums over its rows, so a batch too large for memory can be read chunk by chunk and the sums
    added (``hypernet.chunked``).
    """
    sums = conv_input_sums(mode, x, mask, predicted_kernel.shape[0], patch_stride, labels, num_classes)
    return kernel_from_sums(mode, sums, predicted_kernel, patch_stride, residual_scale,
                            normalized_residual, discriminant_eps)


def _check_mode(mode: str) -> None:
    if mode not in MODES or mode == "none":
        raise ValueError(f"hyper.data_layers must be one of {MODES[1:]} to build kernels; got {mode!r}.")


def conv_input_sums(mode: str, x, mask, kernel_size: int, patch_stride: int = 1, labels=None,
                    num_classes: int | None = None) -> dict:
    """What ``mode`` needs from a conv's input ``x`` (``[N, H, W, C]``), as sums over its valid
    rows: the patch moments (``stem.patch_moments``) and, for ``LABELLED_MODES``, the class map
    sums (``discriminant.class_map_sums``). Sums over disjoint chunks of a batch add up to the
    batch's. No gradient flows back."""
    _check_mode(mode)
    x = jax.lax.stop_gradient(x)
    count, total, outer = patch_moments(x, mask, kernel_size, patch_stride)
    sums = {"patch_count": count, "patch_sum": total, "patch_outer": outer}
    if mode in LABELLED_MODES:
        _require_labels(mode, labels, num_classes)
        sums.update(class_map_sums(x, labels, mask, num_classes))
    return sums


def kernel_from_sums(mode: str, sums: dict, predicted_kernel, patch_stride: int = 1,
                     residual_scale: float = RESIDUAL_SCALE, normalized_residual: bool = False,
                     discriminant_eps: float = DISCRIMINANT_EPS):
    """The conv's kernel from ``conv_input_sums``' output over the whole batch and the head's
    kernel (arguments as ``data_derived_kernel``)."""
    _check_mode(mode)
    k1, k2, c_in, c_out = predicted_kernel.shape
    if k1 != k2:
        raise ValueError(f"hyper.data_layers needs square conv kernels; got {k1}x{k2}.")
    _require_residual_mode(mode, normalized_residual)
    head = unit_filters(predicted_kernel) if normalized_residual else predicted_kernel
    m = min(c_out // 2, k1 * k2 * c_in)
    cov = covariance_from_moments(sums["patch_count"], sums["patch_sum"], sums["patch_outer"])
    if mode == "pca_residual":
        directions = principal_directions(cov, m)
    elif mode == "discriminant_residual":
        directions = discriminant_directions(cov, scatter_from_class_map_sums(sums, k1, patch_stride), m,
                                             eps=discriminant_eps)
    else:  # whitened
        whiten = regularised_inverse_sqrt(cov, WHITEN_EPS).astype(predicted_kernel.dtype)
        return _from_rows(whiten @ _as_rows(predicted_kernel), predicted_kernel.shape)
    return signed_direction_kernel(directions, jnp.zeros_like(predicted_kernel)) + residual_scale * head


def check_plain_conv(module: nn.Conv) -> None:
    """Raises ``ValueError`` unless ``module`` is a plain bias-free conv (what the data layers
    rebuild: a kernel alone, no groups or dilation)."""
    if (module.use_bias or module.feature_group_count != 1
            or module.kernel_dilation not in (None, 1, (1, 1))
            or module.input_dilation not in (None, 1, (1, 1))):
        raise ValueError(f"hyper.data_layers supports plain bias-free convs; {module.path} is not one.")


def _same_conv(module: nn.Conv, x, kernel):
    """What ``module(x)`` computes with ``kernel`` in place of its own (bias-free convs only)."""
    check_plain_conv(module)
    strides = module.strides if module.strides is not None else 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), strides, module.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _require_labels(mode: str, labels, num_classes) -> None:
    if labels is None or num_classes is None:
        raise ValueError(f"hyper.data_layers={mode!r} builds kernels from the batch's labels; "
                         "pass labels and num_classes.")


def _require_residual_mode(mode: str, normalized_residual: bool) -> None:
    if normalized_residual and not mode.endswith("_residual"):
        raise ValueError(f"hyper.data_layers_normalized_residual weighs the head's kernel on top of "
                         f"data-derived filters; hyper.data_layers={mode!r} has none (use a *_residual mode).")


def check_discriminant_eps(eps) -> None:
    """Raises ``ValueError`` unless ``eps`` is a finite number > 0 (0 would let directions with
    no variance win by a vanishing denominator)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < float(eps) < float("inf"):
        raise ValueError(f"hyper.data_layers_discriminant_eps must be a finite number > 0; got {eps!r}.")


def check_patch_stride(patch_stride) -> None:
    """Raises ``ValueError`` unless ``patch_stride`` is an integer >= 1."""
    if not (isinstance(patch_stride, int) and patch_stride >= 1):
        raise ValueError(f"hyper.data_layers_patch_stride must be an integer >= 1; got {patch_stride!r}.")


def kernel_builder(mode: str, patch_stride: int = 1, residual_scale: float = RESIDUAL_SCALE,
                   labels=None, num_classes: int | None = None,
                   normalized_residual: bool = False,
                   discriminant_eps: float = DISCRIMINANT_EPS) -> KernelBuilder:
    """The ``(x, mask, head_kernel) -> kernel`` function of a ``hyper.data_layers`` mode
    (``labels`` and ``num_classes``: the batch's, for ``LABELLED_MODES``;
    ``normalized_residual``, ``discriminant_eps``: see ``data_derived_kernel``)."""
    _check_mode(mode)
    check_patch_stride(patch_stride)
    check_discriminant_eps(discriminant_eps)
    _require_residual_mode(mode, normalized_residual)  # refused before any kernel is traced
    if mode in LABELLED_MODES:  # likewise
        _require_labels(mode, labels, num_classes)
    return functools.partial(data_derived_kernel, mode, patch_stride=patch_stride,
                             residual_scale=float(residual_scale), labels=labels,
                             num_classes=num_classes, normalized_residual=bool(normalized_residual),
                             discriminant_eps=float(discriminant_eps))


def forward_with_data_layers(build_kernel: KernelBuilder, target: nn.Module, variables, images, mask):
    """One train-mode pass of ``target`` that builds every conv kernel from its input on the batch.

    Args:
      build_kernel: ``(x, mask, kernel) -> kernel``, called once per conv in forward order with
        the conv's input ``x`` on the batch and its current kernel (for predict, the head's
        ``H``): ``kernel_builder(mode)`` for the modes above; ``pca_backbone`` passes the plain
        PCA construction.
      target: the target network (BatchNorm momentum 0, so the pass writes the batch's exact
        statistics).
      variables: ``{'params', 'batch_stats'}``; each conv's ``kernel`` in ``params`` is the
        one handed to ``build_kernel``.
      images, mask: the dataset batch ``[N, H, W, C]`` and its valid rows ``[N]``.

    Returns:
      ``(params, features, batch_stats)``: ``params`` with every conv kernel replaced by the
      one the pass used, the target's penultimate features, and the batch's BatchNorm statistics.
    """
    kernels = {}

    def build_conv(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, nn.Conv) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x = args[0]
        path = tuple(module.path) + ("kernel",)
        kernel = build_kernel(x, mask, get_path(variables["params"], path))
        kernels[path] = kernel
        return _same_conv(module, x, kernel)

    with nn.intercept_methods(build_conv):
        features, updates = target.apply(variables, images, train=True, mask=mask,
                                         features_only=True, mutable=["batch_stats"])
    params = variables["params"]
    for path, kernel in kernels.items():
        params = replaced_path(params, path, kernel)
    return params, features, updates["batch_stats"]
