"""A closed-form, data-derived backbone: every conv from the principal components of its input.

(or, with ``construction='discriminant'``, from the directions of its input's patches that
separate the batch's classes: ``hypernet.discriminant``; the "discriminant network".)

A reference point for what the hypernetwork's meta-learning adds, computed from the dataset
batch alone with no meta-training: walking the target in forward order, each conv's filters
become the top principal directions of the ``k x k x C`` patches *of its own input on the
batch* and their negatives (PCANet, Chan et al. 2015, applied greedily to the target's own
architecture; each layer is built as ``hypernet.stem`` builds the first). Every BatchNorm gets scale 1 and bias 0
(a Flax ResNet zero-initialises the last BatchNorm of each block, which would switch the
residual branches off). Read out like a prediction (``baselines.solved_readout``: BatchNorm
statistics and the classifier solved on the batch), it is a baseline a predictor should beat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pudnet_jax.hypernet.data_layers import forward_with_data_layers, kernel_builder
from pudnet_jax.hypernet.discriminant import DISCRIMINANT_EPS
from pudnet_jax.hypernet.stem import pca_stem_kernel
from pudnet_jax.models import get_target


def _unit_batch_norms(params):
    """``params`` with every BatchNorm (a node holding exactly ``scale`` and ``bias``) at scale 1, bias 0."""
    if set(params) == {"scale", "bias"}:
        return {"scale": jnp.ones_like(params["scale"]), "bias": jnp.zeros_like(params["bias"])}
    return {key: _unit_batch_norms(value) if isinstance(value, dict) else value
            for key, value in params.items()}


CONSTRUCTIONS = ("pca", "discriminant")


def pca_backbone(target_name: str, variables, images, mask, labels=None, construction: str = "pca",
                 patch_stride: int = 1, discriminant_eps: float = DISCRIMINANT_EPS):
    """``variables`` with every conv kernel replaced by its input's principal patch directions.

    Conv ``l`` (forward order) with ``C`` input and ``O`` output channels, kernel ``k x k``: its
    first ``2m`` filters are the top ``m = min(O // 2, k * k * C)`` directions of its input's
    patches on the masked rows of ``images`` (``[N, H, W, C_img]``, preprocessed), then their
    negatives; any filters beyond ``2m`` keep their values. Convs are filled in order, each from
    the activations the already-replaced layers produce. Every BatchNorm scale is set to 1 and
    bias to 0; ``batch_stats`` is returned unchanged (a read-out recomputes it). Pure; jitted per
    target, class count and batch shape.

    ``construction='discriminant'`` takes the top ``m`` *discriminant* directions instead
    (``hypernet.discriminant``; needs ``labels`` ``[N]``, in ``[0, num_classes)``; any filters
    beyond ``2m`` are zero); ``patch_stride`` thins the patch statistics as
    ``hyper.data_layers_patch_stride`` does, and ``discriminant_eps`` regularises the
    discriminant directions as ``hyper.data_layers_discriminant_eps`` does.
    """
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {CONSTRUCTIONS}; got {construction!r}.")
    if construction == "discriminant" and labels is None:
        raise ValueError("The discriminant construction needs the batch's labels.")
    num_classes = int(variables["params"]["Dense_0"]["bias"].shape[0])
    labels = jnp.zeros(len(mask), jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    return _pca_backbone_jit(target_name, num_classes, construction, int(patch_stride), float(discriminant_eps))(
        variables, jnp.asarray(images, jnp.float32), labels, jnp.asarray(mask, bool))


def _pca_kernel(x, mask, kernel, patch_stride: int = 1):
    """The PCA construction of one conv: ``m = min(O // 2, k * k * C)`` directions and negatives."""
    k, _, c_in, c_out = kernel.shape
    return pca_stem_kernel(x, mask, kernel, min(c_out // 2, k * k * c_in), patch_stride)


@functools.lru_cache(maxsize=16)
def _pca_backbone_jit(target_name: str, num_classes: int, construction: str, patch_stride: int,
                      discriminant_eps: float):
    target = get_target(target_name, num_classes, bn_momentum=0.0)

    def run(variables, images, labels, mask):
        if construction == "pca":
            build = functools.partial(_pca_kernel, patch_stride=patch_stride)
        else:  # the discriminant_residual data layers with a zero head: directions, negatives, zeros
            discriminant = kernel_builder("discriminant_residual", patch_stride, 0.0, labels, num_classes,
                                          discriminant_eps=discriminant_eps)

            def build(x, mask, kernel):
                return discriminant(x, mask, jnp.zeros_like(kernel))
        # One forward pass builds every conv from its input (the same walk predict makes under
        # hyper.data_layers): each conv sees the activations of the already-built layers.
        params, _, _ = forward_with_data_layers(
            build, target,
            {"params": _unit_batch_norms(variables["params"]), "batch_stats": variables["batch_stats"]},
            images, mask)
        return {**variables, "params": params}

    return jax.jit(run)
