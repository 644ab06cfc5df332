"""A closed-form, data-derived backbone: every conv from the principal components of its input.

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

from pudnet_jax.hypernet.data_layers import forward_with_data_layers
from pudnet_jax.hypernet.stem import pca_stem_kernel
from pudnet_jax.models import get_target


def _unit_batch_norms(params):
    """``params`` with every BatchNorm (a node holding exactly ``scale`` and ``bias``) at scale 1, bias 0."""
    if set(params) == {"scale", "bias"}:
        return {"scale": jnp.ones_like(params["scale"]), "bias": jnp.zeros_like(params["bias"])}
    return {key: _unit_batch_norms(value) if isinstance(value, dict) else value
            for key, value in params.items()}


def pca_backbone(target_name: str, variables, images, mask):
    """``variables`` with every conv kernel replaced by its input's principal patch directions.

    Conv ``l`` (forward order) with ``C`` input and ``O`` output channels, kernel ``k x k``: its
    first ``2m`` filters are the top ``m = min(O // 2, k * k * C)`` directions of its input's
    patches on the masked rows of ``images`` (``[N, H, W, C_img]``, preprocessed), then their
    negatives; any filters beyond ``2m`` keep their values. Convs are filled in order, each from
    the activations the already-replaced layers produce. Every BatchNorm scale is set to 1 and
    bias to 0; ``batch_stats`` is returned unchanged (a read-out recomputes it). Pure; jitted per
    target, class count and batch shape.
    """
    num_classes = int(variables["params"]["Dense_0"]["bias"].shape[0])
    return _pca_backbone_jit(target_name, num_classes)(variables, jnp.asarray(images, jnp.float32),
                                                       jnp.asarray(mask, bool))


def _pca_kernel(x, mask, kernel):
    """The PCA construction of one conv: ``m = min(O // 2, k * k * C)`` directions and negatives."""
    k, _, c_in, c_out = kernel.shape
    return pca_stem_kernel(x, mask, kernel, min(c_out // 2, k * k * c_in))


@functools.lru_cache(maxsize=16)
def _pca_backbone_jit(target_name: str, num_classes: int):
    target = get_target(target_name, num_classes, bn_momentum=0.0)

    def run(variables, images, mask):
        # One forward pass builds every conv from its input (the same walk predict makes under
        # hyper.data_layers): each conv sees the activations of the already-built layers.
        params, _, _ = forward_with_data_layers(
            _pca_kernel, target,
            {"params": _unit_batch_norms(variables["params"]), "batch_stats": variables["batch_stats"]},
            images, mask)
        return {**variables, "params": params}

    return jax.jit(run)
