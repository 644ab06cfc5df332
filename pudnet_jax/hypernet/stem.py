"""A data-derived first layer: the principal components of the dataset's own image patches.

The set encoder and the parameter head learn their first-layer filters from the meta-training
sources (Omniglot strokes, traffic signs, clothes: two of the three grayscale). For an unseen
dataset of another kind (natural colour images) those filters need not fit its pixel statistics.
The first convolution can instead be computed from the dataset batch in closed form, as the last
layer is (``ridge.py``): the top principal directions of its ``k x k x C`` patches, each as a
``+v, -v`` pair of filters so that the ReLU after BatchNorm keeps both signs (BatchNorm then
scales each to unit variance: a whitened projection onto the top components). The idea is old
(PCA / whitening first layers: Coates & Ng 2011; patch-whitening stems in fast CIFAR-10 training)
and costs one ``D x D`` eigendecomposition, ``D = k * k * C`` (27 for a 3x3 RGB stem).

Measured (RESULTS.md section 1, session 19; ``launch/stem_probe.py``): a *random* resnet8 with
this stem, read out like predict, gains +2.8 points on CIFAR-10 (31.16 -> 34.00%) and +5.5 on
GTSRB meta-val tasks; swapped into the shipped inter predictor without retraining it loses (the
predicted later layers expect the learned stem). ``hyper.stem_pca_components`` puts it in the
meta-training loop; there it did not help the inter predictor (warm-started: -1.8 to -2.0 points
on CIFAR-10; from step 0: +0.4, within noise), so it is off by default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# Images per step of the moment accumulation: bounds the patch tensor's memory to
# ``chunk * H * W * D`` floats whatever the dataset size.
_MOMENT_CHUNK = 128


def _patches(images, kernel_size: int, stride: int = 1):
    """``[N, H, W, C]`` -> ``[N, P, C * k * k]`` 'VALID' patches, features ordered (C, kh, kw),
    at every ``stride``-th position along each spatial axis."""
    p = jax.lax.conv_general_dilated_patches(
        images, (kernel_size, kernel_size), (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
    return p.reshape(p.shape[0], -1, p.shape[-1])


def patch_moments(images, mask, kernel_size: int, stride: int = 1):
    """``(count, sum [D], sum of outer products [D, D])`` of the masked images' patches.

    ``stride > 1`` samples every ``stride``-th patch position per axis (``stride**2`` times less
    work; the patches stay contiguous ``k x k`` windows, only fewer of them). Accumulated
    ``_MOMENT_CHUNK`` images at a time, so memory does not grow with the batch.
    Rows with ``mask=False`` contribute nothing.
    """
    n = images.shape[0]
    chunk = min(_MOMENT_CHUNK, n)
    num = -(-n // chunk)
    pad = num * chunk - n
    x = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1)).reshape(num, chunk, *images.shape[1:])
    w = jnp.pad(mask.astype(images.dtype), (0, pad)).reshape(num, chunk)

    def moments(args):
        xs, ws = args
        p = _patches(xs, kernel_size, stride) * ws[:, None, None]  # masked rows are all-zero patches
        flat = p.reshape(-1, p.shape[-1])
        return (ws.sum() * p.shape[1], flat.sum(0),
                jnp.matmul(flat.T, flat, precision=_HIGHEST))

    count, total, outer = jax.tree.map(lambda a: a.sum(0), jax.lax.map(moments, (x, w)))
    return count, total, outer


def patch_covariance(images, mask, kernel_size: int, stride: int = 1):
    """``[D, D]`` covariance of the masked images' ``k x k`` patches (no gradient flows back).

    The statistics are a data-derived basis, not a function to differentiate through:
    eigenvectors' gradients blow up at nearly equal eigenvalues.
    """
    return covariance_from_moments(*patch_moments(jax.lax.stop_gradient(images), mask, kernel_size, stride))


def covariance_from_moments(count, total, outer):
    """``[D, D]`` covariance from ``patch_moments``' ``(count, sum, sum of outer products)``:
    moments are sums over images, so chunks of a batch can be accumulated first
    (``hypernet.chunked``)."""
    count = jnp.maximum(count, 1.0)
    mean = total / count
    return outer / count - jnp.outer(mean, mean)


def regularised_inverse_sqrt(cov, eps: float):
    """``(C + eps * mean(eig C) I)^(-1/2)`` of a symmetric PSD ``[D, D]`` matrix: a whitening
    whose gain on directions with less variance than ``eps`` x the mean eigenvalue is capped
    (their variance is mostly noise)."""
    values, vectors = jnp.linalg.eigh(cov)
    values = jnp.maximum(values, 0.0)
    floor = eps * jnp.mean(values) + 1e-12
    return (vectors * jax.lax.rsqrt(values + floor)) @ vectors.T


def positive_pivots(directions):
    """``directions`` ``[D, m]`` with each column's sign fixed so that its largest-magnitude entry
    is positive: eigendecompositions return either sign, and the layers after a data-derived
    conv must see the same filter in the same channel for the same data."""
    pivot = jnp.take_along_axis(directions, jnp.argmax(jnp.abs(directions), axis=0)[None], axis=0)
    return directions * jnp.where(pivot < 0, -1.0, 1.0)


def principal_patch_directions(images, mask, kernel_size: int, num_components: int,
                               stride: int = 1):
    """``[D, m]``: the top ``m`` principal directions of the batch's patches, unit norm.

    Each direction's sign is fixed so that its largest-magnitude entry is positive
    (``positive_pivots``).
    """
    return principal_directions(patch_covariance(images, mask, kernel_size, stride), num_components)


def principal_directions(cov, num_components: int):
    """``[D, m]``: the top ``m`` eigenvectors of a ``[D, D]`` covariance, signs fixed by
    ``positive_pivots``."""
    _, vectors = jnp.linalg.eigh(cov)  # ascending eigenvalues
    return positive_pivots(vectors[:, ::-1][:, :num_components])


def pca_stem_kernel(images, mask, predicted_kernel, num_components: int, patch_stride: int = 1):
    """A conv's HWIO kernel with its first ``2 m`` output channels derived from its input.

    ``images`` is the conv's input (for the first conv, predict's batch; ``pca_backbone`` calls
    this for every conv with that layer's activations). Channels ``0..m-1`` are the top ``m``
    principal patch directions of ``images``, channels
    ``m..2m-1`` their negatives; the rest (if any) keep ``predicted_kernel``'s filters. The
    filter scale does not matter (BatchNorm follows); unit norm keeps it comparable to the
    head's fan-in-normalised filters. ``patch_stride`` estimates the patch covariance from every
    ``patch_stride``-th position per axis (``patch_moments``).
    """
    kh, kw, c_in, c_out = predicted_kernel.shape
    if kh != kw:
        raise ValueError(f"The PCA stem needs a square first-layer kernel; got {kh}x{kw}.")
    dim = kh * kw * c_in
    if not 1 <= num_components <= dim or 2 * num_components > c_out:
        raise ValueError(
            f"hyper.stem_pca_components={num_components} needs 1 <= m <= {dim} (the patch size "
            f"{kh}x{kw}x{c_in}) and 2 m <= {c_out} (the first layer's output channels).")
    directions = principal_patch_directions(images, mask, kh, num_components, patch_stride)
    return signed_direction_kernel(directions, predicted_kernel)


def signed_direction_kernel(directions, kernel):
    """HWIO ``kernel`` with its first ``2 m`` filters replaced by ``directions`` (``[D, m]``, rows
    ordered (C, kh, kw) like the patches) and their negatives; the rest keep ``kernel``'s values.
    Each direction as a ``+v, -v`` pair, so the ReLU after BatchNorm keeps both signs."""
    kh, kw, c_in, _ = kernel.shape
    filters = jnp.concatenate([directions, -directions], axis=1)  # [D, 2m]
    filters = filters.reshape(c_in, kh, kw, filters.shape[1]).transpose(1, 2, 0, 3)
    return jnp.concatenate([filters.astype(kernel.dtype), kernel[..., filters.shape[-1]:]], axis=-1)
