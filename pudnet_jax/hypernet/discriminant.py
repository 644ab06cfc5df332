"""Conv filters that separate the dataset's classes: discriminant directions of a conv's input patches.

Why. The principal directions of a conv's input (``stem.principal_patch_directions``, the PCA
network of ``pca_backbone``) keep what varies most in the patches, whatever the classes. The
dataset given to predict is labelled, so each conv can keep instead what varies most *between
classes* relative to all the variation: Fisher's linear discriminant applied to patches. Every
image's patches are compared with its class's mean map at the same position, so the class
structure kept is spatial (a traffic sign's class is in where its strokes are, not only in its
average texture): with ``M_c`` the mean of class ``c``'s input maps and ``M`` the mean of all,

  S_b = sum_c (n_c / n) * mean_positions [ patch(M_c - M) patch(M_c - M)^T ]    (between classes)
  S_t = covariance of all patches                                              (total)

and the directions are the top generalised eigenvectors of ``S_b v = lambda S_t v``, computed as
``v = W u`` with ``W = (S_t + eps)^(-1/2)`` (the ZCA whitening of ``hypernet.data_layers``) and
``u`` the top eigenvectors of ``W (S_b + TIE_BREAK S_t) W`` (the small total-covariance term
orders the directions S_b does not rank). An old idea (LDANet, Chan et al. 2015, used class
scatter of patches as PCANet's alternative); here each conv is built greedily on the activations
of the layers before it (``data_layers.forward_with_data_layers``).

Measured (RESULTS.md section 1, session 23; ``launch/construction_probe.py``): a closed-form
resnet8 built this way, read out as predict does, beats the PCA network by +12.4 points on GTSRB
meta-val tasks and +6.0 on Fashion-MNIST, the datasets the choice was made on (and, reported
after the choice, +3.9 on CIFAR-10). Meta-trained under ``hyper.data_layers=discriminant_residual``
the head gives part of it back; the shipped inter predictor keeps ``pca_residual``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pudnet_jax.hypernet.stem import _patches, patch_covariance, positive_pivots, regularised_inverse_sqrt

# Relative regulariser of the total covariance before whitening (as data_layers.WHITEN_EPS):
# directions with little total variance cannot win by a tiny denominator.
DISCRIMINANT_EPS = 0.1
# Weight of the (whitened) total covariance added to the between-class scatter. Small tasks
# (5 classes, 10 images each, a deep conv's few positions) give S_b a rank below the filters
# wanted; without it the rest would be an arbitrary basis of S_b's null space that turns with
# float32 summation order. With it they are the most varying directions of that space.
TIE_BREAK = 0.05


def class_map_sums(x, labels, mask, num_classes: int) -> dict:
    """What the between-class scatter needs from ``x`` (``[N, H, W, C]``), as sums over rows:
    per class the sum of its valid rows' maps (``[K, H, W, C]``) and their count (``[K]``), and
    the sum and count of all valid rows. Sums over disjoint chunks of a batch add up to the
    batch's (``hypernet.chunked``). No gradient flows back (a basis, as
    ``stem.patch_covariance``)."""
    x = jax.lax.stop_gradient(x)
    weights = mask.astype(x.dtype)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype) * weights[:, None]  # [N, K]
    return {"class_sums": jnp.einsum("nk,nhwc->khwc", one_hot, x), "class_counts": one_hot.sum(0),
            "map_sum": jnp.einsum("n,nhwc->hwc", weights, x), "rows": weights.sum()}


def scatter_from_class_map_sums(sums: dict, kernel_size: int, stride: int = 1):
    """``[D, D]`` between-class patch scatter ``S_b`` from ``class_map_sums``' output."""
    counts = sums["class_counts"]
    total = jnp.maximum(sums["rows"], 1.0)
    class_maps = sums["class_sums"] / jnp.maximum(counts, 1.0)[:, None, None, None]
    mean_map = sums["map_sum"] / total
    patches = _patches(class_maps - mean_map[None], kernel_size, stride)  # [K, P, D]
    patches = patches * jnp.sqrt(counts / total)[:, None, None]
    flat = patches.reshape(-1, patches.shape[-1])
    return jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST) / patches.shape[1]


def between_class_patch_scatter(x, labels, mask, num_classes: int, kernel_size: int, stride: int = 1):
    """``[D, D]`` between-class scatter ``S_b`` of the ``k x k`` patches of ``x`` (``[N, H, W, C]``).

    Patches are linear in the map, so the patch of a class-mean map is the mean of that class's
    patches at that position: ``S_b`` weighs each class by its share of the valid rows, and
    averages over the patch positions (every ``stride``-th per axis). Rows with ``mask=False``
    and classes without rows contribute nothing. No gradient flows back.
    """
    return scatter_from_class_map_sums(class_map_sums(x, labels, mask, num_classes), kernel_size, stride)


def discriminant_patch_directions(x, labels, mask, num_classes: int, kernel_size: int,
                                  num_components: int, stride: int = 1,
                                  eps: float = DISCRIMINANT_EPS, tie_break: float = TIE_BREAK):
    """``[D, m]``: the top ``m`` discriminant directions of the batch's patches, unit norm.

    The top generalised eigenvectors of ``(S_b + tie_break S_t) v = lambda (S_t + eps) v``
    (module docstring). Beyond the rank of ``S_b`` (at most ``(K - 1) x positions``) the
    directions are ordered by the whitened total variance alone. Invariant to relabelling the
    classes; each direction's sign is fixed like the principal directions'.
    """
    total = patch_covariance(x, mask, kernel_size, stride)
    between = between_class_patch_scatter(x, labels, mask, num_classes, kernel_size, stride)
    return discriminant_directions(total, between, num_components, eps, tie_break)


def discriminant_directions(total, between, num_components: int, eps: float = DISCRIMINANT_EPS,
                            tie_break: float = TIE_BREAK):
    """``[D, m]`` discriminant directions from the total covariance ``S_t`` and the
    between-class scatter ``S_b`` of the patches (``discriminant_patch_directions``)."""
    whiten = regularised_inverse_sqrt(total, eps)
    _, vectors = jnp.linalg.eigh(whiten @ (between + tie_break * total) @ whiten)  # ascending
    directions = whiten @ vectors[:, ::-1][:, :num_components]
    directions = directions / jnp.maximum(jnp.linalg.norm(directions, axis=0, keepdims=True), 1e-12)
    return positive_pivots(directions)
